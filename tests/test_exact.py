"""Sampling interval 1: every allocation is charged with its exact size."""

from __future__ import annotations

import contextvars
import sys

import pytest

import memlimits_async as ml


def _in_fresh_context(fn: object) -> None:
    contextvars.Context().run(fn)  # type: ignore[arg-type]


# bytes(0) and bytes(1) are cached singletons: no allocation to measure.
@pytest.mark.parametrize("size", [2, 100, 511, 512, 513, 4096, 100_000, 3_000_001])
def test_exact_accounting_matches_a_known_allocation_to_the_byte(
    exact_accounting: None, size: int
) -> None:
    def run() -> None:
        with ml.limit_scope() as scope:
            block = bytes(size)
        assert scope.usage == ml.Usage(
            allocated=sys.getsizeof(block),
            live=sys.getsizeof(block),
            peak_live=sys.getsizeof(block),
        )

    _in_fresh_context(run)


def test_empty_scope_is_charged_nothing(exact_accounting: None) -> None:
    with ml.limit_scope() as scope:
        pass
    assert scope.usage == ml.Usage(0, 0, 0)


def test_freed_blocks_are_credited_back(exact_accounting: None) -> None:
    with ml.limit_scope() as scope:
        block = bytearray(200_000)
        size = sys.getsizeof(block)
        peak = scope.usage.live
        del block
    assert peak >= size
    assert scope.usage.allocated >= size
    assert scope.usage.live < peak
    assert scope.usage.peak_live >= size


def test_nested_scopes_charge_every_ancestor(exact_accounting: None) -> None:
    def run() -> None:
        with ml.limit_scope() as outer, ml.limit_scope() as middle:
            with ml.limit_scope() as inner:
                block = bytes(50_000)
        size = sys.getsizeof(block)
        assert inner.usage.allocated == size
        assert middle.usage.allocated >= size
        assert outer.usage.allocated >= middle.usage.allocated
        assert outer.usage.live >= middle.usage.live >= inner.usage.live == size

    _in_fresh_context(run)


def test_block_outliving_its_scope_keeps_counting_in_the_parent(
    exact_accounting: None,
) -> None:
    def run(free_before_exit: bool) -> int:
        with ml.limit_scope() as outer:
            with ml.limit_scope() as inner:
                kept = bytes(80_000)
            if free_before_exit:
                del kept
        assert inner.usage.live == 80_033
        return outer.usage.live

    held: list[int] = []
    freed: list[int] = []
    contextvars.Context().run(lambda: held.append(run(False)))
    contextvars.Context().run(lambda: freed.append(run(True)))
    # The inner scope's exit bookkeeping runs in the outer body and may take
    # floats and small objects from freelists or from the allocator, which
    # depends on what ran before: a few hundred bytes of slack, against 80 KB.
    assert abs(held[0] - freed[0] - 80_033) <= 512


def test_realloc_is_charged_its_new_size_and_credited_once(
    exact_accounting: None,
) -> None:
    def run() -> None:
        with ml.limit_scope() as scope:
            buffer = bytearray(1000)
            buffer.extend(bytes(100_000))  # grows the storage by realloc
            live = scope.usage.live
            del buffer
            after = scope.usage.live
        assert live >= 101_000
        assert after < live - 100_000

    _in_fresh_context(run)


def test_allocation_limit_fires_exactly_at_interval_one(exact_accounting: None) -> None:
    with ml.limit_scope(allocations=10_000) as scope:
        first = bytes(9_000)
    assert not scope.breached
    # Not preemptible: a thread descheduled for the grace between the two
    # lines (a busy machine) was preempted before `second` was bound.
    with ml.limit_scope(allocations=10_000, preempt=False) as scope:
        first = bytes(9_000)
        second = bytes(2_000)
    assert scope.breach is not None
    assert scope.breach.kind is ml.BreachKind.ALLOCATIONS
    assert scope.breach.observed == sys.getsizeof(first) + sys.getsizeof(second)
    assert len(first) + len(second) == 11_000
