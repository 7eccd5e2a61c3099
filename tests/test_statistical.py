"""Statistical tests: each states its false-failure probability.

The meter samples Poisson-style: each byte is marked with probability 1/R
and a scope's estimate is R times its marks.  With a limit L in force the
interval is R = max(512, floor4(L) / 1200) (floor4: rounded down to 4
significant bits), so a breach needs N > L/R marks where N ~ Poisson(T/R)
for T true bytes.  The probabilities below are exact Poisson tails
(scipy.stats.poisson), computed for the R the meter picks; the reproduction
snippet is in docs/accuracy.md.
"""

from __future__ import annotations

import math
import sys

import anyio
import pytest

import memlimits_async as ml
from helpers import KIB, MIB, held_bytes, leak_until_cancelled

pytestmark = pytest.mark.statistical

CHUNK = 4 * KIB


async def allocate_chunks(count: int) -> None:
    """Allocate and free ``count`` chunks, with a checkpoint every 8."""
    for index in range(count):
        block = bytes(CHUNK)
        del block
        if index % 8 == 7:
            await anyio.sleep(0)


async def true_cost_per_chunk() -> float:
    """Exact bytes allocated per chunk of ``allocate_chunks``, checkpoint
    overhead included, measured at sampling interval 1."""
    ml.configure(sampling_interval=1)
    try:
        async with ml.limit_scope() as scope:
            await allocate_chunks(800)
    finally:
        ml.configure(sampling_interval="64 KiB")
    return scope.usage.allocated / 800


# ---- the limit-0 case (memprof-limits T1) ----


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["memory", "allocations"])
async def test_limit_zero_stops_the_first_allocating_task(kind: str) -> None:
    # With a limit of 0 the interval drops to its floor, R = 512 B, and the
    # first mark breaches.  64 KiB allocated without a mark:
    # P(false failure) = exp(-65536 / 512) = exp(-128) = 2.6e-56.
    held: list[bytes] = []
    async with ml.limit_scope(**{kind: 0}) as scope:  # type: ignore[arg-type]
        await leak_until_cancelled(held)
    assert scope.breach is not None
    assert scope.breach.kind.value == kind
    assert len(held) * KIB <= 64 * KIB


def test_limit_zero_in_sync_code_reports_at_exit() -> None:
    # Same bound: P(false failure) = exp(-128) = 2.6e-56.
    with ml.limit_scope(allocations=0) as scope:
        blocks = [bytes(KIB) for _ in range(64)]
    assert len(blocks) == 64
    assert scope.breach is not None
    assert scope.breach.kind is ml.BreachKind.ALLOCATIONS


# ---- concurrent nested allocation limits (memprof-limits T2) ----


@pytest.mark.anyio
async def test_concurrent_nested_allocation_limits() -> None:
    # Twenty tasks run at once on one loop, ten with L = 8 MiB and ten with
    # L = 512 KiB, each inside its own outer scope with allocations=L and
    # two nested unlimited scopes.  The first nested scope allocates 0.7 L
    # and must not breach the outer limit; the second goes on to 1.4 L and
    # must be stopped by it.  The largest interval any scope can see is the
    # one for 8 MiB alone (R = 6990 B, breach at N >= 1201):
    #   P(breach by 0.7 L)    = P(Poisson(840.06) >= 1201)  = 8.0e-32
    #   P(no breach by 1.4 L) = P(Poisson(1680.1) <= 1200)  = 3.0e-35
    # and for 512 KiB at the 512 B floor (breach at N >= 1025): 1.8e-27 and
    # 2.4e-30.  Over 20 tasks, P(false failure) < 40 * 1.8e-27 < 1e-25.
    cost = await true_cost_per_chunk()
    limits = [8 * MIB] * 10 + [512 * KIB] * 10
    outcomes: dict[int, dict[str, object]] = {}

    async def scenario(index: int, limit: int) -> None:
        safe_chunks = math.floor(0.7 * limit / cost)
        stop_chunks = math.ceil(1.4 * limit / cost) - safe_chunks
        outcome: dict[str, object] = {"reached_end": False}
        outcomes[index] = outcome
        # preempt=False: the cancellation is what this test swallows (level
        # triggered); a body a quarter past its limit before a checkpoint
        # saw it (the loop starved on a busy machine) would be preempted
        # instead, and Preempted is not to be caught.
        async with ml.limit_scope(allocations=limit, preempt=False) as outer:
            async with ml.limit_scope() as first:
                await allocate_chunks(safe_chunks)
            outcome["breach_after_safe"] = outer.breach
            try:
                async with ml.limit_scope() as second:
                    await allocate_chunks(stop_chunks)
                outcome["second_completed"] = True
            except anyio.get_cancelled_exc_class():
                outcome["second_completed"] = False  # swallowed, on purpose
            if index % 2 == 0:
                # Level-triggered: the outer scope stays cancelled.
                await allocate_chunks(stop_chunks)
                outcome["reached_end"] = True
        outcome.update(outer=outer, first=first, second=second)

    async with anyio.create_task_group() as tg:
        for index, limit in enumerate(limits):
            tg.start_soon(scenario, index, limit)

    for index in range(len(limits)):
        outcome = outcomes[index]
        outer = outcome["outer"]
        assert isinstance(outer, ml.LimitScope)
        assert outcome["breach_after_safe"] is None, index
        assert outcome["second_completed"] is False, index
        assert outcome["reached_end"] is False, index
        assert outer.breach is not None, index
        assert outer.breach.kind is ml.BreachKind.ALLOCATIONS
        assert outer.breach.limit == limits[index]
        for name in ("first", "second"):
            nested = outcome[name]
            assert isinstance(nested, ml.LimitScope)
            assert not nested.breached, (index, name)


# ---- accuracy of a memory limit for a structure built up steadily ----


@pytest.mark.anyio
async def test_steady_buildup_is_stopped_between_8_and_12_mib_under_10_mib() -> None:
    # For 10 MiB the meter picks R = 8738 B and breaches at N >= 1201 marks.
    #   P(stopped before 8 MiB)     = P(Poisson(960.0) >= 1201)  = 3.9e-14
    #   P(not stopped by 12 MiB)    = P(Poisson(1440.0) <= 1200) = 4.1e-11
    # The breach reaches the task at its next checkpoint, after at most two
    # more 4 KiB appends.  P(false failure) < 4.2e-11.
    held: list[bytes] = []
    async with ml.limit_scope(memory="10 MiB") as scope:
        await leak_until_cancelled(held, chunk=CHUNK)
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.MEMORY
    assert 8 * MIB <= held_bytes(held) <= 12 * MIB, held_bytes(held) / MIB


def test_estimate_of_held_bytes_is_unbiased_in_sync_code() -> None:
    # 64 scopes each hold 1000 blocks of 4129 B plus the list (4.2 MB true,
    # via sys.getsizeof) at the default interval R = 64 KiB.  The summed
    # estimate is R * Poisson(T / R) with T / R = 4040 marks.  Off by more
    # than 10%: P(false failure) = P(|Poisson(4040) - 4040| > 404) = 2.4e-10.
    estimated = 0
    true = 0
    for _ in range(64):
        with ml.limit_scope() as scope:
            blocks = [bytes(CHUNK) for _ in range(1000)]
        estimated += scope.usage.live
        true += held_bytes(blocks)
    assert 0.9 < estimated / true < 1.1, estimated / true
    assert sys.getsizeof(blocks[0]) == CHUNK + 33
