"""Requests too large for a limit are refused before any memory is touched.

A single request of 1 MiB or more that alone would take a scope (or a scope
around it, or the global limit of a participant) past its memory limit is
refused in the allocator hook: the allocator below is never called, Python
raises MemoryError, and the scope records a MEMORY breach naming the
request.  The scope treats that MemoryError as its breach: a move-on scope
absorbs it, a fail scope raises MemoryLimitReached from it.

The RSS checks compare /proc/self/statm before and after with a margin of
hundreds of MiB against requests of GiBs: the requests are never touched.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Iterator

import anyio
import pytest

import memlimits_async as ml
from helpers import MIB

GIB = 1024 * MIB
HUGE = 10 * GIB
# Far below any refused request, far above what the tests' own bookkeeping
# and a collector's reshuffling move RSS by.
RSS_MARGIN = 512 * MIB


def _rss() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.fixture
def rss_before() -> Iterator[int]:
    gc.collect()
    yield _rss()


def _assert_refused(scope: ml.LimitScope, size: int) -> None:
    assert scope.breached
    breach = scope.breach
    assert breach is not None
    assert breach.kind is ml.BreachKind.MEMORY
    assert breach.refused >= size
    assert breach.observed is not None and breach.observed > (breach.limit or 0)
    assert "was refused" in breach.reason


@pytest.mark.anyio
async def test_huge_bytearray_is_refused_and_absorbed(rss_before: int) -> None:
    reached = False
    async with ml.limit_scope(memory="64 MiB") as scope:
        data = bytearray(HUGE)
        reached = True
        del data
    assert not reached
    _assert_refused(scope, HUGE)
    assert scope.cancelled_caught
    assert _rss() - rss_before < RSS_MARGIN
    assert ml.stats().refused_requests > 0


@pytest.mark.anyio
async def test_fail_scope_raises_memory_limit_reached(rss_before: int) -> None:
    with pytest.raises(ml.MemoryLimitReached) as caught:
        async with ml.limit_scope(memory="64 MiB", raise_on_breach=True) as scope:
            bytearray(HUGE)
    assert type(caught.value.__cause__) is MemoryError
    assert caught.value.breach.refused >= HUGE
    assert "10 GiB was refused" in str(caught.value)
    _assert_refused(scope, HUGE)
    assert scope.cancelled_caught
    assert _rss() - rss_before < RSS_MARGIN


def test_plain_with_scope_outside_a_task(rss_before: int) -> None:
    with ml.limit_scope(memory="64 MiB") as scope:
        bytes(HUGE)  # calloc
    _assert_refused(scope, HUGE)
    assert _rss() - rss_before < RSS_MARGIN


def test_body_that_catches_the_memory_error_keeps_it() -> None:
    """The body's own except: its business; the breach is recorded still."""
    handled = False
    with ml.limit_scope(memory="64 MiB", preempt=False) as scope:
        try:
            bytearray(HUGE)
        except MemoryError:
            handled = True
        after = bytearray(16)  # the body goes on
    assert handled and len(after) == 16
    _assert_refused(scope, HUGE)
    assert not scope.cancelled_caught


@pytest.mark.anyio
async def test_caught_refusal_is_delivered_as_a_cancellation() -> None:
    async with ml.limit_scope(memory="64 MiB") as scope:
        with contextlib.suppress(MemoryError):
            bytearray(HUGE)
        for _ in range(30_000):  # the breach cancels it at a checkpoint
            await anyio.sleep(0.001)
    _assert_refused(scope, HUGE)
    assert scope.cancelled_caught


@pytest.mark.anyio
async def test_outer_limit_refuses_through_an_unlimited_inner_scope(
    rss_before: int,
) -> None:
    async with ml.limit_scope(memory="64 MiB") as outer:
        async with ml.limit_scope() as inner:
            bytearray(HUGE)
    _assert_refused(outer, HUGE)
    assert not inner.breached  # the outer scope's limit, the outer's report
    assert _rss() - rss_before < RSS_MARGIN


@pytest.mark.anyio
async def test_no_memory_limit_never_refuses() -> None:
    # An allocation limit alone, or no limit: no request is refused (this
    # one is reserved, not touched: calloc'd pages are mapped lazily).
    async with ml.limit_scope(allocations="64 MiB") as scope:
        data = bytes(256 * MIB)
        assert len(data) == 256 * MIB
        del data
    assert scope.breach is None or scope.breach.refused == 0
    async with ml.limit_scope() as scope:
        data = bytes(256 * MIB)
        del data
    assert not scope.breached


def test_requests_under_one_mib_are_never_refused() -> None:
    with ml.limit_scope(memory="256 KiB", preempt=False) as scope:
        held = [bytearray(512 * 1024) for _ in range(4)]  # 2 MiB in all
        assert all(len(each) == 512 * 1024 for each in held)
        del held
    # Sampled, it breaches (a sample made it); never refused.
    assert scope.breach is None or scope.breach.refused == 0


def test_request_within_the_limit_is_granted() -> None:
    with ml.limit_scope(memory="64 MiB", preempt=False) as scope:
        data = bytearray(8 * MIB)
        assert len(data) == 8 * MIB
        del data
    assert scope.breach is None or scope.breach.refused == 0


def test_realloc_growth_is_refused_with_the_old_data_intact(
    rss_before: int,
) -> None:
    extra = bytes(30 * MIB)  # made outside the scope: not charged to it
    with ml.limit_scope(memory="64 MiB", preempt=False) as scope:
        data = bytearray(40 * MIB)
        data[:3] = b"abc"
        data.extend(b"def")  # a small growth is granted
        with pytest.raises(MemoryError):
            data += extra  # a realloc growing it by 30 MiB, past 64
        with pytest.raises(MemoryError):
            data.extend(extra)
        with pytest.raises(MemoryError):
            data *= 2
        with pytest.raises(MemoryError):
            data *= HUGE // len(data)
        assert len(data) == 40 * MIB + 3
        assert data[:3] == b"abc" and data[-3:] == b"def"
        del data
    _assert_refused(scope, 30 * MIB)
    assert _rss() - rss_before < RSS_MARGIN


def test_global_memory_limit_refuses_a_participant(rss_before: int) -> None:
    ml.set_global_memory_limit(ml.stats().metered_heap + 256 * MIB)
    try:
        with ml.limit_scope(global_memory=True, preempt=False) as scope:
            bytearray(HUGE)
        with ml.limit_scope(preempt=False) as quiet:  # not a participant
            data = bytes(512 * MIB)  # reserved, not touched
            del data
    finally:
        ml.set_global_memory_limit(None)
    assert scope.breach is not None
    assert scope.breach.kind is ml.BreachKind.GLOBAL_MEMORY
    assert scope.breach.refused >= HUGE
    assert not quiet.breached
    assert _rss() - rss_before < RSS_MARGIN


def test_fail_scope_global_memory_raises(rss_before: int) -> None:
    ml.set_global_memory_limit(ml.stats().metered_heap + 256 * MIB)
    try:
        with pytest.raises(ml.MemoryLimitReached):
            with ml.limit_scope(global_memory=True, raise_on_breach=True):
                bytearray(HUGE)
    finally:
        ml.set_global_memory_limit(None)


def test_numpy_array_is_refused(rss_before: int) -> None:
    np = pytest.importorskip("numpy")
    with ml.limit_scope():  # wraps numpy's data handler, the first time
        pass
    assert ml.stats().numpy_buffers_metered
    with ml.limit_scope(memory="64 MiB", preempt=False) as scope:
        np.ones(2**31)  # 16 GiB of float64
    _assert_refused(scope, 2**31 * 8)
    with pytest.raises(ml.MemoryLimitReached) as caught:
        with ml.limit_scope(memory="64 MiB", raise_on_breach=True):
            np.zeros(2**31)  # calloc
    assert isinstance(caught.value.__cause__, MemoryError)
    assert _rss() - rss_before < RSS_MARGIN


@pytest.mark.anyio
async def test_refused_in_a_worker_thread_by_run_sync(rss_before: int) -> None:
    def work() -> int:
        return len(bytearray(HUGE))

    async with ml.limit_scope(memory="64 MiB") as scope:
        await ml.run_sync(work)
    _assert_refused(scope, HUGE)
    assert scope.cancelled_caught
    with pytest.raises(ml.MemoryLimitReached):
        await ml.run_sync(work, budget=ml.Budget(memory="64 MiB"))
    assert _rss() - rss_before < RSS_MARGIN


@pytest.mark.anyio
async def test_refused_in_a_child_task_of_a_task_group() -> None:
    async def child() -> None:
        bytearray(HUGE)

    async with ml.limit_scope(memory="64 MiB") as scope:
        async with anyio.create_task_group() as group:
            group.start_soon(child)
            await anyio.sleep(30)
    _assert_refused(scope, HUGE)


@pytest.mark.anyio
async def test_inner_fail_scope_result_is_not_taken_by_the_outer_scope() -> None:
    """Both limits refuse: the inner scope's MemoryLimitReached is its own
    result, and it leaves the outer scope as any other exception does."""
    with pytest.raises(ml.MemoryLimitReached) as caught:
        async with ml.limit_scope(memory="128 MiB") as outer:
            async with ml.limit_scope(memory="64 MiB", raise_on_breach=True):
                bytearray(HUGE)
    assert caught.value.breach.limit == 64 * MIB
    assert outer.breached  # its limit refused the request too


def test_shielded_scope_keeps_the_limits_around_it_from_refusing() -> None:
    with ml.limit_scope(memory="64 MiB", preempt=False) as outer:
        with ml.limit_scope(shield=True) as shielded:
            data = bytes(256 * MIB)  # reserved, not touched
            del data
            with ml.limit_scope(memory="64 MiB") as inner:
                bytes(256 * MIB)  # a scope inside the shield still refuses
    _assert_refused(inner, 256 * MIB)
    assert not shielded.breached
    assert outer.breach is None or outer.breach.refused == 0
    with ml.limit_scope(memory="64 MiB", shield=True, preempt=False) as own:
        bytes(256 * MIB)  # a shielded scope's own limit refuses
    _assert_refused(own, 256 * MIB)


def test_interrupt_safe_region_keeps_the_limits_around_it_from_refusing() -> None:
    refused = ml.stats().refused_requests
    with ml.limit_scope(memory="64 MiB", preempt=False) as outer:
        with ml.interrupt_safe():
            data = bytes(256 * MIB)  # reserved, not touched
            del data
            assert ml.stats().refused_requests == refused
            with ml.limit_scope(memory="64 MiB") as inner:
                bytes(256 * MIB)  # a scope inside the region still refuses
        with pytest.raises(MemoryError):
            bytes(256 * MIB)  # out of the region: refused
    assert ml.stats().refused_requests == refused + 2
    _assert_refused(inner, 256 * MIB)
    assert outer.breached  # sampled in the region, then refused outside


class _Marker:
    pass


def _refused_in_a_frame(raise_on_breach: bool) -> weakref.ref[_Marker]:
    marker = _Marker()
    try:
        with ml.limit_scope(memory="64 MiB", raise_on_breach=raise_on_breach):
            bytearray(HUGE)
    except ml.MemoryLimitReached as limit:
        # Where the request was refused is still shown.
        cause = limit.__cause__
        assert isinstance(cause, MemoryError) and cause.__traceback__ is not None
        assert cause.__traceback__.tb_frame.f_code.co_name == "_refused_in_a_frame"
    return weakref.ref(marker)


@pytest.mark.parametrize("raise_on_breach", [False, True])
def test_refused_requests_keep_no_frames_alive(raise_on_breach: bool) -> None:
    """From 3.12 on, once more than 16 MemoryErrors are alive, CPython
    raises one interpreter-wide MemoryError, whose traceback every raise
    extends: a server refusing requests kept each request's frames (and the
    buffers they held) alive for good.  With the free list emptied, no
    frame of a refused request outlives it."""
    alive = [MemoryError() for _ in range(20)]  # the free list has 16
    refs = [_refused_in_a_frame(raise_on_breach) for _ in range(3)]
    gc.collect()
    assert [ref() for ref in refs] == [None, None, None]
    del alive


def test_a_numpy_refusal_keeps_its_own_message() -> None:
    """numpy raises a MemoryError subclass of its own, never shared by the
    interpreter: the LimitReached chains to it, message and all."""
    np = pytest.importorskip("numpy")
    with pytest.raises(ml.MemoryLimitReached) as caught:
        with ml.limit_scope(memory="64 MiB", raise_on_breach=True):
            np.ones((100_000, 100_000))
    cause = caught.value.__cause__
    assert isinstance(cause, MemoryError) and type(cause) is not MemoryError
    assert "Unable to allocate" in str(cause)


@pytest.mark.anyio
async def test_a_refusal_in_nested_task_groups_keeps_no_frames_alive() -> None:
    """The shared MemoryError inside a group inside a group: the group that
    the LimitReached chains to is rebuilt around a copy, which keeps the
    traceback, and the shared one is left bare."""

    async def child(refs: list[weakref.ref[_Marker]]) -> None:
        marker = _Marker()
        refs.append(weakref.ref(marker))
        bytearray(HUGE)

    alive = [MemoryError() for _ in range(20)]  # the free list has 16
    refs: list[weakref.ref[_Marker]] = []
    for _ in range(3):
        with pytest.raises(ml.MemoryLimitReached) as caught:
            async with ml.limit_scope(memory="64 MiB", raise_on_breach=True):
                async with anyio.create_task_group() as outer:
                    async with anyio.create_task_group() as inner:
                        inner.start_soon(child, refs)
                        await anyio.sleep(30)
                    outer.start_soon(anyio.sleep, 30)
        group = caught.value.__cause__
        assert isinstance(group, BaseExceptionGroup)
        refused = group.subgroup(lambda each: type(each) is MemoryError)
        assert refused is not None
        del caught, group, refused
    gc.collect()
    assert [ref() for ref in refs] == [None, None, None]
    del alive
