"""limit_scope as a drop-in for anyio's and trio's CancelScope and asyncio's
Timeout (issue 20): unknown attributes raise, deadlines that move,
cancelled_caught, a writable shield, negative timeouts, cancel() after exit,
exceptions chained to the cancellation and picklable, and preemption under
the package's own public (integration) modules.

``@pytest.mark.anyio`` tests run on asyncio, uvloop and trio through anyio;
the native asyncio and trio tests use those libraries' own names.  No test
here asserts a duration: sleeps only bound a body that must be cut, and a
guard (``fail_after(GUARD)``) only turns a hang into a failure.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import math
import multiprocessing
import pickle
import time
import traceback
import types
from pathlib import Path

import anyio
import pytest
import trio
import trio.testing

import memlimits_async as ml
from helpers import leak_until_cancelled

pytestmark = pytest.mark.filterwarnings("error")

GUARD = 60.0  # seconds before a body that should have been cut fails the test
RUN_FOR = 30.0  # seconds a CPU-bound body runs if nobody stops it
# Rounding of (t + 3600) - t on a clock such as uvloop's (whole milliseconds
# as a float): not a duration, the last bits of one.
SLACK = 1e-9


def spin(seconds: float) -> int:
    """Pure-Python work without a checkpoint (not on one line: see
    docs/preemption.md)."""
    deadline = time.perf_counter() + seconds
    count = 0
    while time.perf_counter() < deadline:
        count += 1
    return count


def spin_then_fail() -> None:
    """User code that a wrapper calls: it fails itself if it was not
    preempted, rather than leave its caller (the wrapper, or the test) to
    notice, where a preemption refused until then could land late."""
    spin(RUN_FOR)
    pytest.fail("preempted before this line")


def _frames_of(exc: BaseException) -> list[traceback.FrameSummary]:
    return list(traceback.extract_tb(exc.__traceback__))


# ---- 1. unknown attributes raise ----


@pytest.mark.anyio
async def test_unknown_attribute_assignment_raises() -> None:
    scope = ml.limit_scope(timeout=3600)
    with pytest.raises(AttributeError):
        scope.dedline = 5.0  # type: ignore[attr-defined]
    async with scope:
        with pytest.raises(AttributeError):
            scope.deadlines = anyio.current_time() + 1  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        scope.shielded = True  # type: ignore[attr-defined]
    assert not hasattr(scope, "__dict__")


def test_unknown_attribute_assignment_raises_in_a_plain_with() -> None:
    with ml.limit_scope() as scope:
        with pytest.raises(AttributeError):
            scope.cancel_caught = True  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_asyncio_unknown_attribute_assignment_raises() -> None:
    async with ml.limit_scope(timeout=3600) as scope:
        with pytest.raises(AttributeError):
            scope.expires = asyncio.get_running_loop().time()  # type: ignore[attr-defined]


def test_trio_unknown_attribute_assignment_raises() -> None:
    async def main() -> None:
        async with ml.limit_scope(timeout=3600) as scope:
            with pytest.raises(AttributeError):
                scope.dead_line = trio.current_time() + 1  # type: ignore[attr-defined]
            with pytest.raises(AttributeError):
                scope.breached = True  # type: ignore[misc]

    trio.run(main)


# ---- 2. deadlines: read, set, moved while the body runs ----


@pytest.mark.anyio
async def test_deadline_is_on_the_loop_clock() -> None:
    before = anyio.current_time()
    async with ml.limit_scope(timeout=3600) as scope:
        after = anyio.current_time()
        assert before + 3600 <= scope.deadline <= after + 3600
        assert 0 < scope.relative_deadline <= 3600 + SLACK
        assert scope.when() == scope.deadline
        assert not scope.expired()
    async with ml.limit_scope() as unlimited:
        assert unlimited.deadline == math.inf
        assert unlimited.relative_deadline == math.inf
        assert unlimited.when() is None
    assert not unlimited.expired()


@pytest.mark.anyio
async def test_deadline_given_instead_of_a_timeout() -> None:
    deadline = anyio.current_time() + 0.01
    with anyio.fail_after(GUARD):
        async with ml.limit_scope(deadline=deadline) as scope:
            assert scope.deadline == deadline
            await anyio.sleep_forever()
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TIMEOUT
    assert scope.cancelled_caught and scope.expired()
    # Seconds from entry to the deadline (uvloop's clock is cached per tick).
    assert scope.timeout is not None and scope.timeout < 1


@pytest.mark.anyio
async def test_an_earlier_deadline_that_has_passed_cancels_at_once() -> None:
    with anyio.fail_after(GUARD):
        async with ml.limit_scope(timeout=3600) as scope:
            scope.deadline = anyio.current_time() - 1
            await anyio.sleep_forever()
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TIMEOUT


@pytest.mark.anyio
async def test_relative_deadline_shortens_a_running_scope() -> None:
    with anyio.fail_after(GUARD):
        async with ml.limit_scope(timeout=3600) as scope:
            scope.relative_deadline = 0.01
            await anyio.sleep_forever()
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TIMEOUT


@pytest.mark.anyio
async def test_a_later_deadline_postpones_the_timeout() -> None:
    async with ml.limit_scope(timeout=0.05) as scope:
        scope.deadline = anyio.current_time() + 3600
        await anyio.sleep(0.2)  # past the first deadline
    assert not scope.cancel_called and not scope.breached
    assert scope.timeout is not None and scope.timeout > 3000


@pytest.mark.anyio
async def test_a_scope_entered_without_a_deadline_can_be_given_one() -> None:
    with anyio.fail_after(GUARD):
        async with ml.limit_scope() as scope:
            scope.deadline = anyio.current_time() + 0.01
            await anyio.sleep_forever()
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TIMEOUT


@pytest.mark.anyio
async def test_deadline_set_before_entry() -> None:
    scope = ml.limit_scope(timeout=3600)
    assert scope.relative_deadline == 3600
    scope.relative_deadline = 0.01
    assert scope.timeout == 0.01
    with anyio.fail_after(GUARD):
        async with scope:
            await anyio.sleep_forever()
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TIMEOUT
    later = ml.limit_scope()
    later.deadline = anyio.current_time() + 3600
    assert later.timeout is None
    async with later:
        assert 0 < later.relative_deadline <= 3600 + SLACK


@pytest.mark.anyio
async def test_a_moved_deadline_preempts_cpu_bound_code() -> None:
    # The delivery thread watches the moved deadline, not the first one.
    async with ml.limit_scope(timeout=3600) as scope:
        scope.relative_deadline = 0.01
        spin(RUN_FOR)
        pytest.fail("preempted before this line")
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TIMEOUT


def _spin_until_armed(scope: ml.LimitScope) -> None:
    """Compute, without a checkpoint, until the scope's passed deadline has
    armed a preemption (bounded by GUARD: then the test proves nothing)."""
    give_up = time.monotonic() + GUARD
    while scope._preempt_request is None and time.monotonic() < give_up:
        spin(0.001)


@pytest.mark.anyio
async def test_a_deadline_moved_later_withdraws_the_preemption_of_the_old_one() -> None:
    # The old deadline passed while the body computed, and the body moved
    # it later before any checkpoint: anyio and trio never cancel then
    # (their loop had no turn to see it pass), so no preemption lands
    # either.  It used to, at the end of the grace.
    async with ml.limit_scope(timeout=0.01, preempt=0.2) as scope:
        _spin_until_armed(scope)
        scope.deadline = anyio.current_time() + 3600
        spin(1.0)  # well past the grace
        await anyio.sleep(0)
    assert not scope.breached and not scope.cancelled_caught


def test_a_plain_with_deadline_moved_later_withdraws_the_preemption() -> None:
    with ml.limit_scope(timeout=0.01, preempt=0.2) as scope:
        _spin_until_armed(scope)
        scope.relative_deadline = 3600
        spin(1.0)
    assert not scope.breached


def test_a_plain_with_has_a_monotonic_deadline() -> None:
    before = time.monotonic()
    with ml.limit_scope(timeout=3600, preempt=False) as scope:
        assert before + 3600 <= scope.deadline <= time.monotonic() + 3600
        scope.deadline = time.monotonic() - 1
        assert scope.expired()
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TIMEOUT


def test_a_plain_with_deadline_moved_later_is_not_breached() -> None:
    with ml.limit_scope(timeout=0.01, preempt=False) as scope:
        scope.relative_deadline = 3600
        time.sleep(0.05)
    assert not scope.breached


@pytest.mark.asyncio
async def test_asyncio_timeout_names() -> None:
    loop = asyncio.get_running_loop()
    async with ml.limit_scope(timeout=3600) as scope:
        assert scope.when() == scope.deadline
        scope.reschedule(None)
        assert scope.when() is None and scope.deadline == math.inf
        scope.reschedule(loop.time() + 3600)
        assert not scope.expired()
    assert not scope.breached and not scope.expired()
    async with asyncio.timeout(GUARD):
        async with ml.limit_scope(timeout=3600) as scope:
            scope.reschedule(loop.time() - 1)
            assert scope.expired()
            await asyncio.sleep(3600)
    assert scope.expired() and scope.cancelled_caught
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TIMEOUT
    async with asyncio.timeout(GUARD):
        async with ml.limit_scope(deadline=loop.time() + 0.01) as given:
            assert given.when() == given.deadline
            await asyncio.sleep(3600)
    assert given.breach is not None and given.breach.kind is ml.BreachKind.TIMEOUT


def test_trio_deadline_moves() -> None:
    async def main() -> None:
        async with ml.limit_scope(timeout=0.05) as postponed:
            assert postponed.deadline <= trio.current_time() + 0.05
            postponed.deadline = trio.current_time() + 3600
            await trio.sleep(0.2)
        assert not postponed.cancel_called
        with trio.fail_after(GUARD):
            async with ml.limit_scope(timeout=3600) as shortened:
                shortened.relative_deadline = -1
                await trio.sleep_forever()
        assert shortened.breach is not None
        assert shortened.breach.kind is ml.BreachKind.TIMEOUT
        deadline = trio.current_time() + 0.01
        with trio.fail_after(GUARD):
            async with ml.limit_scope(deadline=deadline) as given:
                assert given.deadline == deadline
                await trio.sleep_forever()
        assert given.breach is not None and given.cancelled_caught
        assert given.breach.kind is ml.BreachKind.TIMEOUT

    trio.run(main)


def test_trio_deadline_is_on_a_mock_clock() -> None:
    # trio.current_time(), not time.monotonic(): the clock jumps to the
    # deadline as soon as every task sleeps.
    # (The guards are on that clock too: they fire if the scope does not.)
    async def main() -> None:
        start = trio.current_time()
        with trio.fail_after(7200):
            async with ml.limit_scope(timeout=3600) as given:
                assert given.deadline == start + 3600
                await trio.sleep_forever()
        assert given.breach is not None and given.cancelled_caught
        with trio.fail_after(1000):
            async with ml.limit_scope() as moved:
                moved.deadline = trio.current_time() + 100
                await trio.sleep_forever()
        assert moved.breach is not None and moved.cancelled_caught

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


# ---- 3. cancelled_caught ----


@pytest.mark.anyio
async def test_cancelled_caught_after_cancel() -> None:
    async with ml.limit_scope() as scope:
        scope.cancel("enough")
        await anyio.sleep(0)
        pytest.fail("cancelled before this line")
    assert scope.cancelled_caught and not scope.breached
    async with ml.limit_scope() as finished:
        finished.cancel()  # and never reaches a checkpoint: nothing is cut
    assert finished.cancel_called and not finished.cancelled_caught


@pytest.mark.anyio
async def test_cancelled_caught_for_each_cause() -> None:
    held: list[bytes] = []
    async with ml.limit_scope(memory="2 MiB") as memory:
        await leak_until_cancelled(held)
    del held
    token = ml.CancelToken()
    token.cancel("gone")
    async with ml.limit_scope(token=token) as by_token:
        await anyio.sleep_forever()
    with anyio.fail_after(GUARD):
        async with ml.limit_scope(timeout=0.01) as by_timeout:
            await anyio.sleep_forever()
    for scope in (memory, by_token, by_timeout):
        assert scope.breached and scope.cancelled_caught, scope
    with pytest.raises(ml.TimeLimitReached):
        async with ml.limit_scope(timeout=-1, raise_on_breach=True) as raising:
            await anyio.sleep_forever()
    assert raising.cancelled_caught


@pytest.mark.anyio
async def test_cancelled_caught_is_false_for_an_outer_cancellation() -> None:
    with anyio.CancelScope() as outer:
        async with ml.limit_scope() as inner:
            outer.cancel()
            await anyio.sleep_forever()
    assert outer.cancelled_caught
    assert not inner.cancelled_caught and not inner.cancel_called


@pytest.mark.asyncio
async def test_asyncio_cancelled_caught() -> None:
    async with ml.limit_scope() as scope:
        scope.cancel()
        await asyncio.sleep(3600)
    assert scope.cancelled_caught and not scope.breached
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            async with ml.limit_scope() as inner:
                await asyncio.sleep(3600)
    assert not inner.cancelled_caught and not inner.cancel_called


def test_trio_cancelled_caught() -> None:
    async def main() -> None:
        async with ml.limit_scope() as scope:
            scope.cancel()
            await trio.sleep_forever()
        assert scope.cancelled_caught
        with trio.CancelScope() as outer:
            async with ml.limit_scope() as inner:
                outer.cancel()
                await trio.sleep_forever()
        assert outer.cancelled_caught and not inner.cancelled_caught

    trio.run(main)


# ---- 4. a writable shield ----


@pytest.mark.anyio
async def test_unshielding_lets_a_pending_outer_cancellation_in() -> None:
    reached: list[str] = []
    with anyio.fail_after(GUARD):
        with anyio.CancelScope() as outer:
            async with ml.limit_scope(shield=True) as inner:
                outer.cancel()
                await anyio.sleep(0)
                reached.append("shielded checkpoint passed")
                inner.shield = False
                assert not inner.shield
                await anyio.sleep_forever()
            reached.append("after the scope")
    assert reached == ["shielded checkpoint passed"]
    assert outer.cancelled_caught and not inner.cancelled_caught


@pytest.mark.anyio
async def test_shielding_while_the_body_runs() -> None:
    reached: list[str] = []
    with anyio.CancelScope() as outer:
        async with ml.limit_scope() as inner:
            inner.shield = True
            outer.cancel()
            await anyio.sleep(0)
            reached.append("shielded checkpoint passed")
        await anyio.sleep(0)
        reached.append("after the scope")
    assert reached == ["shielded checkpoint passed"]
    with pytest.raises(TypeError, match="shield"):
        inner.shield = 1  # type: ignore[assignment]


@pytest.mark.asyncio
async def test_asyncio_unshielding_lets_a_pending_outer_cancellation_in() -> None:
    reached: list[str] = []
    async with asyncio.timeout(GUARD):
        with anyio.CancelScope() as outer:
            async with ml.limit_scope(shield=True) as inner:
                outer.cancel()
                await asyncio.sleep(0)
                reached.append("shielded checkpoint passed")
                inner.shield = False
                await asyncio.sleep(3600)
    assert reached == ["shielded checkpoint passed"] and outer.cancelled_caught


def test_trio_unshielding_lets_a_pending_outer_cancellation_in() -> None:
    async def main() -> None:
        reached: list[str] = []
        with trio.fail_after(GUARD):
            with trio.CancelScope() as outer:
                async with ml.limit_scope(shield=True) as inner:
                    outer.cancel()
                    await trio.sleep(0)
                    reached.append("shielded checkpoint passed")
                    inner.shield = False
                    await trio.sleep_forever()
        assert reached == ["shielded checkpoint passed"] and outer.cancelled_caught

    trio.run(main)


@pytest.mark.anyio
async def test_a_shielded_scope_is_preempted_for_its_own_limits() -> None:
    # The shield keeps out the scopes around, not the scope's own timeout.
    async with ml.limit_scope(timeout=0.01, shield=True) as scope:
        spin(RUN_FOR)
        pytest.fail("preempted before this line")
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TIMEOUT


def test_a_shielded_plain_with_stays_a_region_until_unshielded() -> None:
    from memlimits_async._masking import shielded_accounts

    with ml.limit_scope(shield=True) as scope:
        assert len(shielded_accounts) == 1
        scope.shield = False
        assert not shielded_accounts
        scope.shield = True
        assert len(shielded_accounts) == 1
    assert not shielded_accounts


# ---- 5. a negative timeout has expired already ----


@pytest.mark.anyio
async def test_negative_timeout_is_expired_at_entry() -> None:
    with anyio.fail_after(GUARD):
        async with ml.limit_scope(timeout=-1) as scope:
            await anyio.sleep_forever()
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TIMEOUT
    assert scope.cancelled_caught and scope.expired()
    with pytest.raises(ValueError, match="timeout"):
        ml.limit_scope(timeout=math.nan)


@pytest.mark.asyncio
async def test_asyncio_negative_timeout_is_expired_at_entry() -> None:
    async with asyncio.timeout(GUARD):
        async with ml.limit_scope(timeout=-0.5) as scope:
            await asyncio.sleep(3600)
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TIMEOUT


def test_trio_negative_timeout_is_expired_at_entry() -> None:
    async def main() -> ml.LimitScope:
        with trio.fail_after(GUARD):
            async with ml.limit_scope(timeout=-1) as scope:
                await trio.sleep_forever()
        return scope

    scope = trio.run(main)
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TIMEOUT


def test_negative_timeout_in_a_plain_with_and_a_budget() -> None:
    with ml.limit_scope(timeout=-1, preempt=False) as scope:
        pass
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TIMEOUT
    assert ml.Budget(timeout=-1).timeout == -1.0


# ---- 6. cancel() after exit ----


@pytest.mark.anyio
async def test_cancel_after_exit_sets_cancel_called() -> None:
    async with ml.limit_scope() as scope:
        await anyio.sleep(0)
    assert not scope.cancel_called
    scope.cancel()
    assert scope.cancel_called and not scope.cancelled_caught and not scope.breached


@pytest.mark.asyncio
async def test_asyncio_cancel_after_exit_sets_cancel_called() -> None:
    async with ml.limit_scope(timeout=3600) as scope:
        await asyncio.sleep(0)
    scope.cancel("too late")
    assert scope.cancel_called and not scope.cancelled_caught


def test_trio_cancel_after_exit_sets_cancel_called() -> None:
    async def main() -> ml.LimitScope:
        async with ml.limit_scope() as scope:
            await trio.sleep(0)
        return scope

    scope = trio.run(main)
    scope.cancel()
    assert scope.cancel_called


def test_cancel_after_a_plain_with_sets_cancel_called() -> None:
    with ml.limit_scope() as scope:
        pass
    scope.cancel()
    assert scope.cancel_called


# ---- 7. the LimitReached raised chains to the cancellation ----


@pytest.mark.anyio
async def test_raise_on_breach_chains_to_the_cancellation() -> None:
    with pytest.raises(ml.TimeLimitReached) as caught:
        with anyio.fail_after(GUARD):
            async with ml.limit_scope(timeout=0.01, raise_on_breach=True):
                await anyio.sleep_forever()  # where the body was
    cause = caught.value.__cause__
    assert isinstance(cause, anyio.get_cancelled_exc_class())
    lines = [frame.line or "" for frame in _frames_of(cause)]
    assert any("where the body was" in line for line in lines), lines


@pytest.mark.anyio
async def test_raise_on_breach_chains_to_the_preemption() -> None:
    with pytest.raises(ml.TimeLimitReached) as caught:
        async with ml.limit_scope(timeout=0.01, raise_on_breach=True):
            spin(RUN_FOR)
    cause = caught.value.__cause__
    assert isinstance(cause, ml.Preempted)
    assert "spin" in [frame.name for frame in _frames_of(cause)]


@pytest.mark.asyncio
async def test_asyncio_raise_on_breach_chains_to_the_cancellation() -> None:
    with pytest.raises(ml.TimeLimitReached) as caught:
        async with asyncio.timeout(GUARD):
            async with ml.limit_scope(timeout=0.01, raise_on_breach=True):
                await asyncio.sleep(3600)  # where the body was
    cause = caught.value.__cause__
    assert isinstance(cause, asyncio.CancelledError)
    lines = [frame.line or "" for frame in _frames_of(cause)]
    assert any("where the body was" in line for line in lines), lines


def test_trio_raise_on_breach_chains_to_the_cancellation() -> None:
    async def main() -> None:
        with trio.fail_after(GUARD):
            async with ml.limit_scope(memory="1 MiB", raise_on_breach=True):
                held = []
                while True:
                    held.append(bytes(1024))
                    await trio.sleep(0)  # where the body was

    with pytest.raises(ml.MemoryLimitReached) as caught:
        trio.run(main)
    cause = caught.value.__cause__
    assert isinstance(cause, trio.Cancelled)
    lines = [frame.line or "" for frame in _frames_of(cause)]
    assert any("where the body was" in line for line in lines), lines


def test_raise_on_breach_after_the_body_swallowed_it_has_no_cause() -> None:
    token = ml.CancelToken()
    token.cancel("gone")

    async def main() -> None:
        async with ml.limit_scope(token=token, raise_on_breach=True):
            with contextlib.suppress(trio.Cancelled):  # swallowed (don't)
                await trio.sleep_forever()

    with pytest.raises(ml.TokenCancelled) as caught:
        trio.run(main)
    assert caught.value.__cause__ is None


# ---- 8. pickling ----

_BREACHES = [
    ml.Breach(ml.BreachKind.MEMORY, 4096, 5000, "memory limit of 4 KiB exceeded"),
    ml.Breach(ml.BreachKind.ALLOCATIONS, 1 << 30, (1 << 30) + 7, "allocations"),
    ml.Breach(ml.BreachKind.GLOBAL_MEMORY, 1 << 31, 1 << 32, "global"),
    ml.Breach(ml.BreachKind.TOKEN, None, None, "token cancelled: gone"),
    ml.Breach(ml.BreachKind.TIMEOUT, 0.5, 0.75, "timeout of 0.5 s expired"),
]


def _same_exception(a: BaseException, b: BaseException) -> None:
    assert type(a) is type(b)
    assert a.args == b.args and str(a) == str(b)
    assert getattr(a, "breach", None) == getattr(b, "breach", None)
    assert getattr(a, "__notes__", None) == getattr(b, "__notes__", None)


@pytest.mark.parametrize("breach", _BREACHES, ids=lambda b: b.kind.name)
def test_limit_reached_pickles_with_its_breach(breach: ml.Breach) -> None:
    for kind in (
        ml.LimitReached,
        ml.MemoryLimitReached,
        ml.AllocationLimitReached,
        ml.TokenCancelled,
        ml.TimeLimitReached,
    ):
        exc = kind(breach)
        exc.add_note("a note")
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            again = pickle.loads(pickle.dumps(exc, protocol))
            _same_exception(exc, again)
            assert again.breach == breach
    assert pickle.loads(pickle.dumps(breach)) == breach


def test_a_breach_with_its_top_sites_pickles() -> None:
    # A byte limit's breach names the scope's top sites; every protocol,
    # as for the breaches above (0 and 1 failed on Traceback's slots).
    site = ml.Statistic(
        ml.Traceback(
            [ml.Frame("app.py", 12, "build"), ml.Frame("app.py", 3, "main")],
            truncated=True,
        ),
        size=5 << 20,
        count=3,
        size_sd=1024.0,
    )
    breach = ml.Breach(ml.BreachKind.MEMORY, 4 << 20, 5 << 20, "memory", (site,))
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        exc = pickle.loads(pickle.dumps(ml.MemoryLimitReached(breach), protocol))
        assert exc.breach == breach
        again = exc.breach.top_sites[0].traceback
        assert list(again) == list(site.traceback) and again.truncated


def test_usage_and_preempted_pickle() -> None:
    usage = ml.Usage(allocated=10, live=5, peak_live=7)
    assert pickle.loads(pickle.dumps(usage)) == usage
    _same_exception(
        ml.Preempted("preempted: x"),
        pickle.loads(pickle.dumps(ml.Preempted("preempted: x"))),
    )


def test_the_other_public_exceptions_pickle() -> None:
    # They take several arguments and pass one message up: rebuilt from
    # args alone (BaseException's way) they failed to unpickle.
    crash = ValueError("boom")
    event = ml.SupervisorEvent(ml.EventKind.CRASHED, "sup", "worker", 1.5, crash)
    errors: list[BaseException] = [
        ml.ChildCancelled("worker", "bye"),
        ml.ChildCancelled("worker", None),
        ml.SupervisorGaveUp("sup", 3, 60.0, (event,)),
    ]
    for exc in errors:
        exc.add_note("a note")
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            again = pickle.loads(pickle.dumps(exc, protocol))
            _same_exception(exc, again)
            assert vars(again).keys() == vars(exc).keys()
            for name, value in vars(exc).items():
                if name != "history":
                    assert getattr(again, name) == value, name
    gave_up = pickle.loads(pickle.dumps(errors[-1]))
    assert isinstance(gave_up, ml.SupervisorGaveUp)
    (again_event,) = gave_up.history
    assert again_event.kind is ml.EventKind.CRASHED and again_event.child == "worker"
    assert repr(again_event.exception) == repr(crash)


def _breach_in_child() -> None:
    with ml.limit_scope(timeout=-1, raise_on_breach=True, preempt=False):
        pass


def test_limit_reached_crosses_a_process_boundary() -> None:
    # What multiprocessing (and Dask, pytest-xdist) do with a worker's error.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        with pytest.raises(ml.TimeLimitReached) as caught:
            pool.submit(_breach_in_child).result(timeout=300)
    breach = caught.value.breach
    assert breach.kind is ml.BreachKind.TIMEOUT and breach.limit is not None
    assert breach.limit < 0 and breach.reason == str(caught.value)


# ---- 9. the package's public modules are wrappers like a user's ----

_WRAPPER = Path(__file__).with_name("package_wrapper.py")


def _module_in_package(name: str) -> types.ModuleType:
    """tests/package_wrapper.py as a module of the package named ``name``
    (its frames carry that name, which is what the landing rule reads)."""
    spec = importlib.util.spec_from_file_location(name, _WRAPPER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


integration = _module_in_package("memlimits_async.integration_for_tests")
core_module = _module_in_package("memlimits_async._core_for_tests")


@pytest.mark.anyio
async def test_code_called_by_a_public_module_of_the_package_is_preempted() -> None:
    async with ml.limit_scope(timeout=0.01) as scope:
        integration.call(spin_then_fail)
        pytest.fail("preempted before this line")
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TIMEOUT
    assert scope.cancelled_caught
    async with ml.limit_scope(timeout=0.01) as awaited:
        await integration.call_async(spin_then_fail)
        pytest.fail("preempted before this line")
    assert awaited.breach is not None


@pytest.mark.anyio
async def test_a_task_run_by_a_public_module_of_the_package_is_preempted() -> None:
    async with ml.limit_scope(timeout=0.01) as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(integration.call_async, spin_then_fail)
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TIMEOUT


@pytest.mark.anyio
async def test_code_called_by_the_core_is_still_never_preempted() -> None:
    log: list[str] = []

    def called_by_the_core() -> None:
        spin(0.3)  # past the deadline and the grace: preemption is waiting
        log.append("ran to its end")

    async with ml.limit_scope(timeout=0.01) as scope:
        core_module.call(called_by_the_core)
        spin(RUN_FOR)  # and lands here, in the body's own code
        pytest.fail("preempted before this line")
    assert log == ["ran to its end"] and scope.breached


def test_trio_code_called_by_a_public_module_of_the_package_is_preempted() -> None:
    async def main() -> ml.LimitScope:
        async with ml.limit_scope(timeout=0.01) as scope:
            await integration.call_async(spin_then_fail)
            pytest.fail("preempted before this line")
        return scope

    scope = trio.run(main)
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TIMEOUT


@pytest.mark.asyncio
async def test_asyncio_code_called_by_a_public_module_of_the_package_is_preempted() -> (
    None
):
    async with ml.limit_scope(timeout=0.01) as scope:
        integration.call(spin_then_fail)
        pytest.fail("preempted before this line")
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TIMEOUT


def test_a_plain_with_under_a_public_module_of_the_package_is_preempted() -> None:
    def body() -> ml.LimitScope:
        with ml.limit_scope(timeout=0.01) as scope:
            spin(RUN_FOR)
            pytest.fail("preempted before this line")
        return scope

    scope = integration.call(body)
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TIMEOUT
    with ml.limit_scope(timeout=0.01) as around:
        integration.call(spin_then_fail)
        pytest.fail("preempted before this line")
    assert around.breach is not None and around.breach.kind is ml.BreachKind.TIMEOUT


async def _cpu_bound_endpoint(scope: object, receive: object, send: object) -> None:
    spin(RUN_FOR)
    pytest.fail("preempted before this line")


async def _nothing() -> None:
    pass


@pytest.mark.anyio
async def test_an_endpoint_behind_a_middleware_of_the_package_is_preempted() -> None:
    limits = await integration.middleware(
        _cpu_bound_endpoint, {"type": "http"}, _nothing, _nothing
    )
    assert limits.breach is not None and limits.breach.kind is ml.BreachKind.TIMEOUT


def test_trio_an_endpoint_behind_a_middleware_of_the_package_is_preempted() -> None:
    # Called from a task of the user's (a server's), not as trio.run's root:
    # framework frames at a task's root are its runner's wrappers, and the
    # code they call is the task's own (preempted at adb9fd7 too).
    async def serve() -> ml.LimitScope:
        limits: ml.LimitScope = await integration.middleware(
            _cpu_bound_endpoint, {"type": "http"}, _nothing, _nothing
        )
        return limits

    limits = trio.run(serve)
    assert limits.breach is not None and limits.breach.kind is ml.BreachKind.TIMEOUT
