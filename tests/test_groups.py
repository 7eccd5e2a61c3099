"""Budgets as values, and budgeted task groups with a budget per child."""

from __future__ import annotations

import asyncio
import inspect
import pickle
import sys
import time

import anyio
import anyio.abc
import pytest
import trio

import memlimits_async as ml
from helpers import KIB, MIB, leak_until_cancelled
from memlimits_async._preempt import default_grace

# ---- Budget ----


def test_budget_parses_like_limit_scope() -> None:
    token = ml.CancelToken()
    budget = ml.Budget(
        memory="1 KiB", allocations="2 MB", timeout=3, token=[token], preempt=0
    )
    assert budget.memory == 1024
    assert budget.allocations == 2_000_000
    assert budget.timeout == 3.0 and isinstance(budget.timeout, float)
    assert budget.token == (token,)
    assert budget.preempt == 0.0
    assert ml.Budget(token=token).token is token
    assert ml.Budget(preempt=False).preempt is False
    assert ml.Budget() == ml.Budget(memory=None)


def test_budget_is_an_immutable_value() -> None:
    budget = ml.Budget(memory="1 MiB", timeout=2)
    assert budget == ml.Budget(memory=MIB, timeout=2.0)
    assert hash(budget) == hash(ml.Budget(memory=MIB, timeout=2.0))
    assert budget != ml.Budget(memory=MIB)
    assert repr(budget) == "Budget(memory=1048576, timeout=2.0)"
    assert pickle.loads(pickle.dumps(budget)) == budget
    with pytest.raises(AttributeError, match="immutable"):
        budget.memory = 5
    with pytest.raises(AttributeError, match="immutable"):
        del budget.timeout


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"memory": -1}, ValueError, "memory must not be negative"),
        ({"memory": "lots"}, ValueError, "memory must look like"),
        ({"allocations": 1.5j}, TypeError, "allocations must be a size"),
        ({"timeout": "1"}, TypeError, "timeout must be a number"),
        ({"timeout": float("nan")}, ValueError, "timeout must be a number"),
        ({"token": "tok"}, TypeError, "token must be a CancelToken"),
        ({"preempt": True}, TypeError, "preempt must be"),
        ({"preempt": -1}, ValueError, "preempt must be"),
    ],
)
def test_bad_budgets_name_the_argument(
    arguments: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        ml.Budget(**arguments)  # type: ignore[arg-type]


def test_limit_scope_takes_a_budget() -> None:
    token = ml.CancelToken()
    scope = ml.limit_scope(budget=ml.Budget(memory="1 MiB", timeout=4, token=token))
    assert (scope.memory, scope.allocations, scope.timeout) == (MIB, None, 4.0)
    token.cancel("stop")
    with scope:  # outside a task: reported at exit
        pass
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TOKEN


def test_limit_scope_refuses_a_budget_and_limits_together() -> None:
    budget = ml.Budget(memory="1 MiB")
    with pytest.raises(TypeError, match=r"either budget= or memory=, timeout="):
        ml.limit_scope(budget=budget, memory="2 MiB", timeout=1)
    with pytest.raises(TypeError, match=r"either budget= or preempt="):
        ml.limit_scope(budget=budget, token=ml.CancelToken(), preempt=0)
    with pytest.raises(TypeError, match="budget must be a memlimits_async"):
        ml.limit_scope(budget={"memory": 1})  # type: ignore[arg-type]


@pytest.mark.parametrize("budget_tokens", [0, 1, 2])
@pytest.mark.parametrize("cancelled", ["budget's", "given"])
def test_limit_scope_takes_a_token_besides_a_budget(
    budget_tokens: int, cancelled: str
) -> None:
    # One budget for every request, a token of its own for each.
    own = [ml.CancelToken() for _ in range(budget_tokens)]
    budget = ml.Budget(
        memory="1 MiB", token=own[0] if budget_tokens == 1 else own or None
    )
    request_token, other = ml.CancelToken(), ml.CancelToken()
    scope = ml.limit_scope(budget=budget, token=[request_token, other])
    assert (scope.memory, scope.allocations, scope.timeout) == (MIB, None, None)
    if cancelled == "given":
        other.cancel("client went away")
    elif own:
        own[-1].cancel("client went away")
    with scope:  # outside a task: reported at exit
        pass
    if cancelled == "budget's" and not own:
        assert scope.breach is None
    else:
        assert scope.breach is not None
        assert scope.breach.reason == "token cancelled: client went away"
    assert budget.token == (own[0] if budget_tokens == 1 else tuple(own) or None)


def test_a_bad_token_besides_a_budget_names_the_argument() -> None:
    for budget in (ml.Budget(), ml.Budget(token=ml.CancelToken())):
        with pytest.raises(TypeError, match="token must be a CancelToken"):
            ml.limit_scope(budget=budget, token="tok")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_token_besides_a_budget_cancels_the_scope_while_it_waits() -> None:
    budget = ml.Budget(memory="64 MiB")
    token = ml.CancelToken()
    async with ml.limit_scope(budget=budget, token=token) as scope:
        token.cancel("client went away")
        await anyio.sleep_forever()
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TOKEN


@pytest.mark.anyio
async def test_limit_scope_with_a_budget_enforces_it() -> None:
    async with ml.limit_scope(budget=ml.Budget(allocations="1 MiB")) as scope:
        await leak_until_cancelled([])
    assert scope.breach is not None
    assert scope.breach.kind is ml.BreachKind.ALLOCATIONS


# ---- budgeted task groups: a budget per child ----


async def wait_then_return(event: anyio.Event, value: int) -> int:
    await event.wait()
    return value


@pytest.mark.anyio
async def test_a_child_that_breaks_its_budget_is_stopped_alone() -> None:
    release = anyio.Event()
    async with ml.create_task_group() as group:
        first = group.start_soon(wait_then_return, release, 1)
        leaky = group.start_soon(
            leak_until_cancelled, [], budget=ml.Budget(memory="1 MiB"), name="leaky"
        )
        second = group.start_soon(wait_then_return, release, 2)
        await leaky.wait()
        assert first.status is second.status is ml.ChildStatus.PENDING
        release.set()
    assert group.breach is None
    assert (await first, await second) == (1, 2)
    assert leaky.status is ml.ChildStatus.BREACHED
    assert leaky.breach is not None and leaky.breach.kind is ml.BreachKind.MEMORY
    assert leaky.usage.peak_live > MIB
    with pytest.raises(ml.MemoryLimitReached) as raised:
        await leaky
    assert raised.value.breach == leaky.breach


@pytest.mark.anyio
async def test_a_breach_of_the_group_budget_cancels_the_whole_group() -> None:
    async with ml.create_task_group(memory="1 MiB") as group:
        sleeper = group.start_soon(anyio.sleep_forever)
        leaky = group.start_soon(leak_until_cancelled, [])
        await anyio.sleep_forever()
    assert group.breach is not None and group.breach.kind is ml.BreachKind.MEMORY
    assert sleeper.status is leaky.status is ml.ChildStatus.CANCELLED
    assert sleeper.breach is None  # the group's limit, not theirs
    with pytest.raises(ml.ChildCancelled):
        await sleeper


@pytest.mark.anyio
async def test_the_group_budget_can_be_a_budget() -> None:
    async with ml.create_task_group(budget=ml.Budget(allocations="1 MiB")) as group:
        group.start_soon(leak_until_cancelled, [])
    assert group.breach is not None
    assert group.breach.kind is ml.BreachKind.ALLOCATIONS


async def hold(
    size: int, held: list[bytes], ready: anyio.Event, go: anyio.Event
) -> int:
    held.append(bytes(size))
    ready.set()
    await go.wait()
    return len(held[0])


@pytest.mark.anyio
@pytest.mark.usefixtures("exact_accounting")
async def test_handles_and_children_report_usage() -> None:
    size = 100 * KIB
    held: list[bytes] = []
    ready, go = anyio.Event(), anyio.Event()
    async with ml.create_task_group() as group:
        holder = group.start_soon(hold, size, held, ready, go, name="holder")
        idle = group.start_soon(go.wait, name="idle")
        await ready.wait()
        snapshot = group.children()
        assert [child.name for child in snapshot] == ["holder", "idle"]
        assert snapshot[0].breach is None
        assert size <= snapshot[0].usage.live <= size + 4 * KIB
        assert snapshot[1].usage.live <= 4 * KIB
        assert holder.usage == snapshot[0].usage
        assert group.usage.live >= size  # charged to the group's budget too
        go.set()
    assert await holder == size
    assert idle.status is ml.ChildStatus.FINISHED
    assert group.children() == []
    usage = holder.usage  # at its exit, the block still held
    assert size <= usage.live <= size + 4 * KIB
    assert size <= usage.allocated <= usage.live + 4 * KIB


async def spawn_a_sibling(
    group: ml.BudgetedTaskGroup,
    size: int,
    held: list[bytes],
    handles: list[ml.ChildHandle[int]],
) -> None:
    ready, go = anyio.Event(), anyio.Event()
    handles.append(group.start_soon(hold, size, held, ready, go))
    await ready.wait()
    go.set()


@pytest.mark.anyio
@pytest.mark.usefixtures("exact_accounting")
async def test_a_child_spawned_by_a_sibling_is_charged_to_the_group() -> None:
    size = 200 * KIB
    held: list[bytes] = []
    handles: list[ml.ChildHandle[int]] = []
    async with ml.create_task_group() as group:
        spawner = group.start_soon(
            spawn_a_sibling, group, size, held, handles, budget=ml.Budget(memory=size)
        )
    assert spawner.status is ml.ChildStatus.FINISHED  # not charged the sibling
    assert spawner.usage.allocated < 16 * KIB
    assert handles[0].usage.live >= size
    assert group.usage.live >= size


async def fail(message: str) -> None:
    await anyio.sleep(0)
    raise ValueError(message)


@pytest.mark.anyio
async def test_exceptions_of_children_propagate_as_in_anyio() -> None:
    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="boom")):
        async with ml.create_task_group() as group:
            sleeper = group.start_soon(anyio.sleep_forever)
            failing = group.start_soon(fail, "boom")
    assert failing.status is ml.ChildStatus.FAILED
    assert sleeper.status is ml.ChildStatus.CANCELLED
    with pytest.raises(ValueError, match="boom"):
        await failing


@pytest.mark.anyio
async def test_a_breach_that_a_child_turns_into_an_error_is_still_an_error() -> None:
    async def cleanup_fails() -> None:
        try:
            await leak_until_cancelled([])
        finally:
            raise RuntimeError("cleanup failed")

    with pytest.RaisesGroup(RuntimeError):
        async with ml.create_task_group() as group:
            child = group.start_soon(cleanup_fails, budget=ml.Budget(memory="1 MiB"))
    assert child.status is ml.ChildStatus.FAILED  # what the group got
    assert child.breach is not None  # and what happened first


@pytest.mark.anyio
async def test_cancel_stops_one_child_with_a_reason() -> None:
    release = anyio.Event()
    async with ml.create_task_group() as group:
        sleeper = group.start_soon(anyio.sleep_forever, name="sleeper")
        other = group.start_soon(wait_then_return, release, 7)
        sleeper.cancel("not needed")
        assert sleeper.status is ml.ChildStatus.CANCELLING
        await sleeper.wait()
        release.set()
    assert sleeper.status is ml.ChildStatus.CANCELLED
    assert sleeper.breach is None  # a cancel() is not a breach
    assert await other == 7
    with pytest.raises(ml.ChildCancelled, match="'sleeper' was cancelled: not needed"):
        await sleeper
    sleeper.cancel("again")  # finished: nothing happens


@pytest.mark.anyio
async def test_group_cancel_and_cancel_scope() -> None:
    async with ml.create_task_group() as group:
        child = group.start_soon(anyio.sleep_forever)
        assert isinstance(group.cancel_scope, anyio.CancelScope)
        group.cancel("enough")
    assert group.cancel_scope.cancel_called
    assert child.status is ml.ChildStatus.CANCELLED
    assert group.breach is None


async def starts_then_waits(
    value: str, event: anyio.Event, *, task_status: anyio.abc.TaskStatus[str]
) -> int:
    task_status.started(value)
    await event.wait()
    return len(value)


async def leaks_before_starting(*, task_status: anyio.abc.TaskStatus[None]) -> None:
    await leak_until_cancelled([])
    task_status.started()


@pytest.mark.anyio
async def test_start_returns_the_started_value_or_the_handle() -> None:
    event = anyio.Event()
    async with ml.create_task_group() as group:
        value = await group.start(starts_then_waits, "ready", event)
        handle = await group.start(
            starts_then_waits,
            "steady",
            event,
            name="second",
            budget=ml.Budget(memory="1 MiB"),
            return_handle=True,
        )
        assert value == "ready"
        assert handle.start_value == "steady"
        assert handle.name == "second"
        event.set()
    assert await handle == len("steady")


@pytest.mark.anyio
async def test_a_breach_before_started_is_raised_by_start() -> None:
    async with ml.create_task_group() as group:
        with pytest.raises(ml.MemoryLimitReached):
            await group.start(leaks_before_starting, budget=ml.Budget(memory="1 MiB"))
        assert group.children() == []
    assert group.breach is None


@pytest.mark.anyio
async def test_create_task_takes_a_coroutine_and_a_budget() -> None:
    async with ml.create_task_group() as group:
        named = group.create_task(wait_then_return(anyio.Event(), 1), name="named")
        leaky = group.create_task(
            leak_until_cancelled([]), budget=ml.Budget(allocations="1 MiB")
        )
        await leaky.wait()
        named.cancel()
    assert named.name == "named"
    assert leaky.name.endswith("leak_until_cancelled")
    assert leaky.status is ml.ChildStatus.BREACHED
    assert leaky.breach is not None
    assert leaky.breach.kind is ml.BreachKind.ALLOCATIONS


@pytest.mark.anyio
async def test_a_cancelled_token_in_a_childs_budget_stops_that_child() -> None:
    token = ml.CancelToken()
    async with ml.create_task_group() as group:
        child = group.start_soon(anyio.sleep_forever, budget=ml.Budget(token=token))
        await anyio.sleep(0)
        token.cancel("job withdrawn")
    assert child.status is ml.ChildStatus.BREACHED
    assert child.breach is not None and child.breach.reason.endswith("job withdrawn")
    with pytest.raises(ml.TokenCancelled):
        await child


@pytest.mark.anyio
async def test_a_budget_timeout_stops_the_child() -> None:
    async with ml.create_task_group() as group:
        child = group.start_soon(anyio.sleep_forever, budget=ml.Budget(timeout=0.01))
    assert child.breach is not None and child.breach.kind is ml.BreachKind.TIMEOUT
    with pytest.raises(ml.TimeLimitReached):
        await child


async def never_awaits(held: list[bytes], finished: list[bool]) -> None:
    """Breaks a 1 MiB budget, then computes for 2 s without a checkpoint."""
    held.extend(bytes(KIB) for _ in range(2 * 1024))
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        held.append(bytes(64))
        held.pop()
    finished.append(True)


@pytest.mark.anyio
async def test_the_budget_preemption_grace_reaches_the_childs_scope() -> None:
    # With preemption off by default, only the budget's grace can stop a
    # child that never reaches a checkpoint.
    # (Preempted lands within milliseconds of the breach; a failure would
    # let the child compute for its whole 2 s and say so.)
    default = default_grace()
    finished: list[bool] = []
    ml.configure(preempt=False)
    try:
        async with ml.create_task_group() as group:
            child = group.start_soon(
                never_awaits,
                [],
                finished,
                budget=ml.Budget(memory="1 MiB", preempt=0.01),
            )
    finally:
        ml.configure(preempt=default if default is not None else False)
    assert child.status is ml.ChildStatus.BREACHED
    assert not finished


# ---- bad input ----


def not_async() -> int:
    return 1


@pytest.mark.anyio
async def test_bad_children_are_refused_before_anything_starts() -> None:
    async with ml.create_task_group() as group:
        with pytest.raises(TypeError, match="must return a coroutine"):
            group.start_soon(not_async)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="budget must be a memlimits_async"):
            group.start_soon(anyio.sleep, 0, budget="1 MiB")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="expected a coroutine"):
            group.create_task(anyio.sleep)  # type: ignore[arg-type]
        coroutine = anyio.sleep(0)
        with pytest.raises(TypeError, match="budget must be"):
            group.create_task(coroutine, budget=3)  # type: ignore[arg-type]
        assert inspect.getcoroutinestate(coroutine) == "CORO_CLOSED"  # no warning
        with pytest.raises(TypeError, match="budget must be"):
            await group.start(starts_then_waits, "x", anyio.Event(), budget=1)  # type: ignore[call-overload]
        assert group.children() == []
        child = group.start_soon(anyio.sleep, 0)
        with pytest.raises(TypeError, match="reason must be a str"):
            child.cancel(3)  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match="not started with start"):
            _ = child.start_value
    with pytest.raises(RuntimeError, match="not active"):
        group.start_soon(anyio.sleep, 0)
    with pytest.raises(RuntimeError, match="not active"):
        await group.start(starts_then_waits, "x", anyio.Event())
    with pytest.raises(RuntimeError, match="only be entered once"):
        async with group:
            pass


def test_bad_group_budgets_name_the_argument() -> None:
    with pytest.raises(ValueError, match="memory must not be negative"):
        ml.create_task_group(memory=-1)
    with pytest.raises(TypeError, match="either budget= or allocations="):
        ml.create_task_group(budget=ml.Budget(), allocations=1)
    group = ml.create_task_group()
    with pytest.raises(RuntimeError, match="not been entered"):
        group.cancel()


# ---- native asyncio and trio ----


async def isolation_scenario() -> tuple[ml.ChildStatus, ml.ChildStatus, int]:
    """A leaky child beside a steady one, under any event loop."""
    release = anyio.Event()
    async with ml.create_task_group(memory="64 MiB") as group:
        leaky = group.start_soon(
            leak_until_cancelled, [], budget=ml.Budget(memory="1 MiB")
        )
        steady = group.start_soon(wait_then_return, release, 5)
        await leaky.wait()
        release.set()
    return leaky.status, steady.status, await steady


@pytest.mark.asyncio
async def test_isolation_on_native_asyncio() -> None:
    result = await isolation_scenario()
    assert result == (ml.ChildStatus.BREACHED, ml.ChildStatus.FINISHED, 5)


def test_isolation_on_native_trio() -> None:
    result = trio.run(isolation_scenario)
    assert result == (ml.ChildStatus.BREACHED, ml.ChildStatus.FINISHED, 5)


@pytest.mark.anyio
async def test_a_child_scope_cancels_through_its_tasks_own_cancel_scope() -> None:
    """One cancel scope per child, not two (most of a budget's cost): the
    child's scope adopts the one anyio's task handle runs it in."""
    release = anyio.Event()
    async with ml.create_task_group() as group:
        child = group.start_soon(wait_then_return, release, 1, budget=ml.Budget())
        assert isinstance(child._scope._adopted, anyio.CancelScope)
        release.set()
    assert await child == 1


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks: 3.12+")
@pytest.mark.asyncio
async def test_isolation_under_an_eager_task_factory() -> None:
    """anyio starts no task eagerly (it calls the factory's task class
    without eager_start); were one started before its handle came back,
    its scope would enter a cancel scope of its own."""
    loop = asyncio.get_running_loop()
    if sys.version_info >= (3, 12):  # as the skipif says; mypy reads this one
        loop.set_task_factory(asyncio.eager_task_factory)
    try:
        release = anyio.Event()
        async with ml.create_task_group() as group:
            leaky = group.start_soon(
                leak_until_cancelled, [], budget=ml.Budget(memory="1 MiB")
            )
            steady = group.start_soon(wait_then_return, release, 5)
            await leaky.wait()
            release.set()
    finally:
        loop.set_task_factory(None)
    assert leaky.status is ml.ChildStatus.BREACHED
    assert await steady == 5
