"""Preemptive delivery: CPU-bound code in a breached scope is interrupted,
never in protected code, on asyncio, trio, in threads and in run_sync."""

from __future__ import annotations

import abc
import asyncio
import queue
import random
import threading
import time
from collections.abc import Callable
from types import TracebackType

import anyio
import pytest

import memlimits_async as ml
from helpers import KIB
from memlimits_async._preempt import THREADS_PREEMPTIBLE

pytestmark = pytest.mark.filterwarnings("error")

RUN_FOR = 30.0  # seconds a CPU-bound body runs if nobody stops it

needs_thread_preemption = pytest.mark.skipif(
    not THREADS_PREEMPTIBLE,
    reason="3.13+ preempts the main thread only (docs/preemption.md)",
)


def spin(seconds: float) -> int:
    """Pure-Python work without a checkpoint (and not in one line: see
    docs/preemption.md on loops whose `finally` CPython may skip)."""
    deadline = time.perf_counter() + seconds
    count = 0
    while time.perf_counter() < deadline:
        count += 1
    return count


def hold_memory(held: list[bytes]) -> None:
    deadline = time.perf_counter() + RUN_FOR
    while time.perf_counter() < deadline:
        held.append(bytes(KIB))


def cancel_later(token: ml.CancelToken, delay: float, reason: str = "stop") -> None:
    threading.Timer(delay, token.cancel, args=(reason,)).start()


class Canceller:
    """One thread that cancels tokens after given delays (no thread per
    cancel, so that thousands of them cost little)."""

    def __init__(self) -> None:
        self.requests: queue.Queue[tuple[ml.CancelToken, float] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (request := self.requests.get()) is not None:
            token, delay = request
            time.sleep(delay)  # releases the GIL (a busy wait would hold it)
            token.cancel("fuzz")

    def cancel_after(self, token: ml.CancelToken, delay: float) -> None:
        self.requests.put((token, delay))

    def close(self) -> None:
        self.requests.put(None)
        self.thread.join()


# ---- CPU-bound code is stopped ----


@pytest.mark.anyio
async def test_cpu_bound_loop_over_its_memory_budget_is_preempted() -> None:
    held: list[bytes] = []
    async with ml.limit_scope(memory="4 MiB") as scope:
        hold_memory(held)  # never awaits
        pytest.fail("preempted before this line")
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.MEMORY
    assert len(held) < RUN_FOR * 1e7  # stopped, not run to its end


@pytest.mark.anyio
async def test_cpu_bound_loop_stopped_by_a_token_from_another_thread() -> None:
    token = ml.CancelToken()
    cancel_later(token, 0.02, "from a thread")
    async with ml.limit_scope(token=token) as scope:
        spin(RUN_FOR)
    assert scope.breach is not None
    assert scope.breach.reason == "token cancelled: from a thread"


@pytest.mark.anyio
async def test_cpu_bound_loop_stopped_by_its_timeout() -> None:
    async with ml.limit_scope(timeout=0.02) as scope:
        spin(RUN_FOR)
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TIMEOUT


@needs_thread_preemption
@pytest.mark.anyio
async def test_token_from_another_task_stops_work_moved_to_a_thread() -> None:
    # A loop that runs CPU-bound code in its own thread lets no other task
    # run; with run_sync the loop stays free, so a sibling can cancel.
    token = ml.CancelToken()

    async def admin() -> None:
        await anyio.sleep(0.02)
        token.cancel("by a sibling task")

    async with ml.limit_scope(token=token) as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(admin)
            await ml.run_sync(spin, RUN_FOR)
    assert scope.breach is not None
    assert scope.breach.reason == "token cancelled: by a sibling task"


def test_token_from_a_task_of_another_loop_stops_a_cpu_bound_loop() -> None:
    token = ml.CancelToken()
    blocked = threading.Event()

    async def other_loop() -> None:
        await anyio.to_thread.run_sync(blocked.wait)
        token.cancel("from a task of another loop")

    thread = threading.Thread(target=anyio.run, args=(other_loop,))
    thread.start()

    async def main() -> ml.LimitScope:
        async with ml.limit_scope(token=token) as scope:
            blocked.set()
            spin(RUN_FOR)
        return scope

    scope = asyncio.run(main())
    thread.join()
    assert scope.breach is not None and "another loop" in scope.breach.reason


@pytest.mark.anyio
async def test_the_loop_and_other_tasks_go_on_and_later_deadlines_work() -> None:
    ticks: list[int] = []

    async def ticker() -> None:
        for i in range(5):
            ticks.append(i)
            await anyio.sleep(0)

    held: list[bytes] = []
    async with anyio.create_task_group() as tg:
        async with ml.limit_scope(memory="2 MiB") as scope:
            hold_memory(held)
        tg.start_soon(ticker)
    assert scope.breached and ticks == [0, 1, 2, 3, 4]
    with anyio.move_on_after(0.01) as later:
        await anyio.sleep(RUN_FOR)
    assert later.cancelled_caught
    assert not ml.is_interrupted()


@pytest.mark.anyio
async def test_preempted_child_of_a_task_group_is_absorbed_by_the_scope() -> None:
    held: list[bytes] = []
    sibling_cancelled = []

    async def sibling() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            sibling_cancelled.append(True)

    async def leaking_child() -> None:
        hold_memory(held)

    async with ml.limit_scope(memory="4 MiB") as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sibling)
            await anyio.sleep(0)
            tg.start_soon(leaking_child)
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.MEMORY
    assert sibling_cancelled == [True]


@pytest.mark.anyio
async def test_preempted_goes_through_an_inner_scope_to_the_breached_one() -> None:
    held: list[bytes] = []
    async with ml.limit_scope(memory="4 MiB") as outer:
        async with ml.limit_scope() as inner:
            hold_memory(held)
    assert outer.breached and not inner.breached


@pytest.mark.anyio
async def test_preempt_false_leaves_the_body_to_its_next_checkpoint() -> None:
    token = ml.CancelToken()
    cancel_later(token, 0.005)
    async with ml.limit_scope(token=token, preempt=False) as scope:
        spin(0.1)  # not interrupted: runs to its end
        finished = True
        await anyio.sleep(RUN_FOR)
    assert finished and scope.breached


def test_sync_scope_on_the_main_thread_is_preempted() -> None:
    held: list[bytes] = []
    with ml.limit_scope(memory="4 MiB") as scope:
        hold_memory(held)
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.MEMORY


@needs_thread_preemption
def test_sync_scope_in_a_thread_is_preempted() -> None:
    scopes: list[ml.LimitScope] = []

    def work() -> None:
        held: list[bytes] = []
        with ml.limit_scope(memory="4 MiB") as scope:
            hold_memory(held)
        scopes.append(scope)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert scopes and scopes[0].breach is not None


def test_native_trio() -> None:
    import trio

    async def main() -> ml.LimitScope:
        token = ml.CancelToken()
        cancel_later(token, 0.02)
        async with ml.limit_scope(token=token) as scope:
            spin(RUN_FOR)
        return scope

    assert trio.run(main).breached


@pytest.mark.asyncio
async def test_native_asyncio_task() -> None:
    async def work() -> ml.LimitScope:
        held: list[bytes] = []
        async with ml.limit_scope(memory="4 MiB") as scope:
            hold_memory(held)
        return scope

    scope = await asyncio.create_task(work())
    assert scope.breached


@needs_thread_preemption
def test_an_event_loop_in_another_thread_is_covered() -> None:
    result: list[ml.LimitScope] = []

    async def main() -> None:
        held: list[bytes] = []
        async with ml.limit_scope(memory="4 MiB") as scope:
            hold_memory(held)
        result.append(scope)

    thread = threading.Thread(target=anyio.run, args=(main,))
    thread.start()
    thread.join()
    assert result and result[0].breached


# ---- where it lands ----


def _innermost_module(exc: BaseException) -> str:
    tb = exc.__traceback__
    assert tb is not None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__"))


def _landing_frames(exc: BaseException) -> list[str]:
    frames = []
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return frames


def _run_until_preempted(
    body: Callable[[], object], repeats: int = 20, *, thread: bool = False
) -> list[list[str]]:
    """Run ``body`` (which loops forever) under tokens cancelled at random
    moments, and return the frames each Preempted went through."""
    landings: list[list[str]] = []
    preempted = []
    rng = random.Random(1234)

    def once() -> None:
        token = ml.CancelToken()
        cancel_later(token, rng.uniform(0.001, 0.01))
        with ml.limit_scope(token=token, preempt=0) as scope:
            try:
                body()
            except ml.Preempted as exc:
                landings.append(_landing_frames(exc))
                raise
        assert scope.breached
        preempted.append(scope._preempted > 0)

    for _ in range(repeats if not thread else repeats // 2):
        if thread:
            worker = threading.Thread(target=once)
            worker.start()
            worker.join()
        else:
            once()
    # Every scope was preempted; on a busy machine the token may fire before
    # the `try` (a landing in the scope's body all the same, not in body()).
    assert preempted == [True] * (repeats if not thread else repeats // 2)
    assert len(landings) >= len(preempted) // 2
    return landings


@ml.interrupt_safe
def _marked_step(state: dict[str, bool]) -> None:
    state["inside"] = True
    spin(0.001)
    state["inside"] = False


@pytest.mark.parametrize(
    "thread",
    [False, pytest.param(True, marks=needs_thread_preemption)],
    ids=["main", "thread"],
)
def test_never_lands_in_marked_code(thread: bool) -> None:
    state = {"inside": False}

    def body() -> None:
        while True:
            _marked_step(state)
            assert not state["inside"]
            spin(0.0001)

    for frames in _run_until_preempted(body, thread=thread):
        assert "_marked_step" not in frames
        assert "spin" in frames or "body" in frames


@pytest.mark.parametrize(
    "thread",
    [False, pytest.param(True, marks=needs_thread_preemption)],
    ids=["main", "thread"],
)
def test_never_lands_in_a_region(thread: bool) -> None:
    state = {"inside": False}

    def body() -> None:
        while True:
            with ml.interrupt_safe():
                state["inside"] = True
                spin(0.001)
                state["inside"] = False
            spin(0.0001)

    for frames in _run_until_preempted(body, thread=thread):
        assert not state["inside"], frames


class _SlowFinalizer:
    inside = False

    def __del__(self) -> None:
        _SlowFinalizer.inside = True
        spin(0.001)
        _SlowFinalizer.inside = False


def test_never_lands_in_del() -> None:
    def body() -> None:
        while True:
            _SlowFinalizer()  # dropped at once: __del__ runs here
            spin(0.0001)

    for frames in _run_until_preempted(body):
        assert "__del__" not in frames
        assert not _SlowFinalizer.inside


def test_never_lands_in_framework_code() -> None:
    # Most of the time of this body is spent inside asyncio and threading.
    events = [threading.Event() for _ in range(50)]
    lock = threading.Condition()

    def body() -> None:
        while True:
            q: asyncio.Queue[int] = asyncio.Queue()
            for i in range(200):
                q.put_nowait(i)
            while not q.empty():
                q.get_nowait()
            for event in events:
                event.set()
                event.clear()
            with lock:
                lock.notify_all()

    for frames in _run_until_preempted(body, repeats=40):
        assert frames[-1] == "body", frames  # raised in the user's frame


class _Checked(abc.ABC):
    @abc.abstractmethod
    def check(self) -> None: ...


def test_never_lands_in_an_abc_check() -> None:
    # trio's Cancelled has an ABCMeta metaclass: when trio throws it into a
    # task, the interpreter checks it with abc's Python code, called from the
    # task's frame without the task calling it.  Landing there replaced the
    # Cancelled (seen on a busy machine by the interrupt fuzz test).
    def body() -> None:
        while True:
            issubclass(int, _Checked)

    for frames in _run_until_preempted(body):
        assert frames[-1] == "body", frames


def _breached_inside_region_is_delivered_after_it() -> None:
    held: list[bytes] = []
    log: list[str] = []
    with ml.limit_scope(memory="1 MiB") as scope:
        with ml.interrupt_safe():
            held.append(bytes(2 * 1024 * 1024))
            spin(0.05)  # far past the grace: held back all the same
            log.append("region done")
        spin(RUN_FOR)
    assert log == ["region done"] and scope.breached


def test_a_breach_inside_a_region_is_preempted_after_it(exact_accounting: None) -> None:
    _breached_inside_region_is_delivered_after_it()


@pytest.mark.anyio
async def test_asyncio_lock_and_anyio_limiter_stay_consistent() -> None:
    # CPU-bound use of framework primitives that never yield when free:
    # interrupts must leave them consistent.
    async_lock = asyncio.Lock() if _on_asyncio() else None
    limiter = anyio.CapacityLimiter(1)
    rng = random.Random(99)
    canceller = Canceller()
    preempted = 0
    try:
        for _ in range(200):
            token = ml.CancelToken()
            canceller.cancel_after(token, rng.uniform(0, 0.002))
            async with ml.limit_scope(token=token, preempt=0) as scope:
                deadline = time.perf_counter() + RUN_FOR
                while time.perf_counter() < deadline:
                    limiter.acquire_nowait()
                    limiter.release()
                    if async_lock is not None:
                        await async_lock.acquire()  # free: does not yield
                        async_lock.release()
            preempted += scope._preempted > 0
            assert scope.breached
            assert limiter.borrowed_tokens == 0
            assert async_lock is None or not async_lock.locked()
    finally:
        canceller.close()
    assert preempted > 100


def _on_asyncio() -> bool:
    import sniffio

    return sniffio.current_async_library() == "asyncio"


# ---- run_sync ----


@needs_thread_preemption
@pytest.mark.anyio
async def test_run_sync_work_is_preempted_for_the_scope_around_it() -> None:
    held: list[bytes] = []
    async with ml.limit_scope(memory="4 MiB") as scope:
        await ml.run_sync(hold_memory, held)
        pytest.fail("preempted before this line")
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.MEMORY


@pytest.mark.anyio
@pytest.mark.skipif(THREADS_PREEMPTIBLE, reason="3.13+: threads are not preempted")
async def test_run_sync_work_finishes_when_threads_are_not_preemptible() -> None:
    token = ml.CancelToken()
    cancel_later(token, 0.01)
    async with ml.limit_scope(token=token) as scope:
        assert await ml.run_sync(spin, 0.2) > 0  # runs to its end
        await anyio.sleep(RUN_FOR)  # stopped at the next checkpoint
    assert scope.breached


@pytest.mark.anyio
async def test_run_sync_blocked_in_c_is_abandoned_on_request() -> None:
    token = ml.CancelToken()
    release = threading.Event()
    returned: list[bool] = []

    def blocked() -> None:
        release.wait(RUN_FOR)  # blocked in C until the test lets it go
        returned.append(True)

    cancel_later(token, 0.01)
    try:
        # Not preempted: only abandoning it can end the scope before the call.
        async with ml.limit_scope(token=token, preempt=False) as scope:
            await ml.run_sync(blocked, abandon_on_cancel=True)
        assert scope.breached
        assert not returned  # the scope did not wait for the blocked call
    finally:
        release.set()


@pytest.mark.anyio
async def test_run_sync_returns_the_result_and_keeps_the_context() -> None:
    assert await ml.run_sync(sum, [1, 2, 3]) == 6
    async with ml.limit_scope() as scope:
        await ml.run_sync(lambda: bytes(64 * KIB))
    assert scope.usage.allocated >= 0  # charged through the copied context


def test_run_sync_bad_arguments() -> None:
    async def main() -> None:
        with pytest.raises(TypeError, match="function must be callable"):
            await ml.run_sync(42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="abandon_on_cancel must be a bool"):
            await ml.run_sync(print, abandon_on_cancel=1)  # type: ignore[arg-type]

    anyio.run(main)


@pytest.mark.parametrize(
    ("preempt", "error"),
    [
        (-1, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        ("1", TypeError),
        (True, TypeError),
    ],
)
def test_bad_preempt_is_refused(preempt: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="preempt"):
        ml.limit_scope(preempt=preempt)  # type: ignore[arg-type]
    with pytest.raises(error, match="preempt"):
        ml.configure(preempt=preempt)  # type: ignore[arg-type]


# ---- the fuzz ----


@pytest.mark.anyio
async def test_interrupt_fuzz_keeps_primitives_tasks_and_reports_consistent() -> None:
    """Thousands of preemptions at random moments of a workload that uses
    locks, a limiter, events, a memory stream and a task group, partly
    CPU-bound (preempted) and partly awaiting (cancelled): afterwards the
    loop runs, no lock is held, no task is lost, every scope reported."""
    wanted, max_iterations = 1000, 10_000
    rng = random.Random(2026)
    canceller = Canceller()
    lock = anyio.Lock()
    limiter = anyio.CapacityLimiter(2)
    event = anyio.Event()
    send, receive = anyio.create_memory_object_stream[int](100)
    started = finished = preempted = 0
    landings: list[str] = []

    async def worker(seed: int) -> None:
        nonlocal started, finished
        try:
            started += 1  # inside: an interrupt may land before the `try`
            local = random.Random(seed)
            deadline = time.perf_counter() + RUN_FOR
            while time.perf_counter() < deadline:
                draw = local.random()
                if draw < 0.05:
                    async with lock:  # yields: may be cancelled here
                        spin(0.00005)
                elif draw < 0.15:
                    if limiter.available_tokens:
                        limiter.acquire_nowait()
                        limiter.release()
                    if send.statistics().current_buffer_used < 50:
                        send.send_nowait(1)
                    if receive.statistics().current_buffer_used:
                        receive.receive_nowait()
                    event.is_set()
                spin(local.uniform(0, 0.0003))  # mostly user code
        except ml.Preempted as exc:
            landings.append(_innermost_module(exc))
            raise
        finally:
            finished += 1

    try:
        i = -1
        while preempted < wanted and i + 1 < max_iterations:
            i += 1
            token = ml.CancelToken()
            canceller.cancel_after(token, rng.uniform(0, 0.001))
            async with ml.limit_scope(token=token, preempt=0) as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(worker, i)
                    tg.start_soon(worker, -i)
            preempted += scope._preempted > 0
            assert scope.breach is not None, i
            assert scope.breach.kind is ml.BreachKind.TOKEN
            assert not lock.locked(), i
            # acquire_nowait() then release() are two user-code statements:
            # a worker may be stopped between them, and only then.
            assert limiter.borrowed_tokens <= 1, i
            if limiter.borrowed_tokens:
                limiter.release()
            # Every worker that entered its `try` ran its `finally` (one
            # stopped before its first line has neither); the task group
            # itself waited for both.
            assert started == finished, i
    finally:
        canceller.close()
        send.close()
        receive.close()
    with anyio.fail_after(5):
        await anyio.sleep(0.001)  # the loop still runs
    # Most scopes end by preemption (the rest by cancellation at the lock):
    # a thousand interrupts per backend, fired at random points, each in
    # this module's code or the plain library code it calls.
    assert preempted == wanted, (preempted, i)
    assert set(landings) <= {__name__, "random"}, set(landings)
    print(f"fuzz: {i + 1} scopes, {preempted} preempted")
