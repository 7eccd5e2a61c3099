"""Supervisors: restart types, strategies, intensity, backoff, nesting,
shutdown, events and bad specs.

Every scenario is driven by the supervisor's own events: a test waits until
the log reaches a given line (``Log.until``), never for some time to pass.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Coroutine, Sequence
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.abc
import pytest
import trio

import memlimits_async as ml
from helpers import KIB, MIB, leak_until_cancelled

Child = Callable[[], Coroutine[Any, Any, object]]


class Log:
    """An ``on_event`` hook that tests can wait on."""

    def __init__(self) -> None:
        self.events: list[ml.SupervisorEvent] = []
        self._changed: anyio.Event | None = None

    def __call__(self, event: ml.SupervisorEvent) -> None:
        self.events.append(event)
        if self._changed is not None:
            self._changed.set()

    def lines(self) -> list[str]:
        """``"kind child"`` for each event, e.g. ``"crashed b"``."""
        return [f"{event.kind.value} {event.child}" for event in self.events]

    async def until(self, line: str, count: int = 1) -> None:
        """Wait until ``line`` has been logged ``count`` times."""
        while self.lines().count(line) < count:
            self._changed = anyio.Event()
            await self._changed.wait()


class Script:
    """A child whose n-th run does ``actions[n]`` (the last one repeats):
    ``"crash"``, ``"return"``, ``"leak"`` or ``"wait"`` (forever)."""

    def __init__(self, *actions: str) -> None:
        self.actions = actions
        self.runs = 0

    async def __call__(self) -> None:
        action = self.actions[min(self.runs, len(self.actions) - 1)]
        self.runs += 1
        await anyio.sleep(0)
        if action == "crash":
            raise ValueError(f"crash in run {self.runs}")
        if action == "leak":
            await leak_until_cancelled([])
        if action == "wait":
            await anyio.sleep_forever()


def specs(**children: Child) -> list[ml.ChildSpec]:
    return [ml.ChildSpec(name, start) for name, start in children.items()]


async def run_until(
    supervisor: ml.Supervisor, log: Log, line: str, count: int = 1
) -> None:
    """Run the supervisor until ``line`` is logged, then cancel it (a
    graceful shutdown) and wait for it to finish."""
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            await group.start(supervisor.run)
            await log.until(line, count)
            group.cancel_scope.cancel()


# ---- strategies ----


@pytest.mark.anyio
async def test_one_for_one_restarts_the_child_alone() -> None:
    log = Log()
    children = specs(a=Script("wait"), b=Script("crash", "wait"), c=Script("wait"))
    supervisor = ml.Supervisor(children, on_event=log, max_restarts=5, period=60)
    await run_until(supervisor, log, "restarted b")
    assert log.lines() == [
        "started a",
        "started b",
        "started c",
        "crashed b",
        "restarted b",
        # the shutdown, in reverse start order
        "stopped c",
        "stopped b",
        "stopped a",
    ]
    crash = log.events[3]
    assert isinstance(crash.exception, ValueError)
    assert str(crash.exception) == "crash in run 1"


@pytest.mark.anyio
async def test_one_for_all_restarts_every_child() -> None:
    log = Log()
    children = specs(a=Script("wait"), b=Script("crash", "wait"), c=Script("wait"))
    supervisor = ml.Supervisor(
        children, strategy="one_for_all", on_event=log, max_restarts=5, period=60
    )
    await run_until(supervisor, log, "restarted c")
    assert log.lines()[3:9] == [
        "crashed b",
        "stopped c",  # the others, in reverse start order
        "stopped a",
        "restarted a",  # everyone, in start order
        "restarted b",
        "restarted c",
    ]


@pytest.mark.anyio
async def test_rest_for_one_restarts_the_children_started_after_it() -> None:
    log = Log()
    children = specs(
        a=Script("wait"), b=Script("crash", "wait"), c=Script("wait"), d=Script("wait")
    )
    supervisor = ml.Supervisor(
        children, strategy=ml.Strategy.REST_FOR_ONE, on_event=log, max_restarts=5
    )
    await run_until(supervisor, log, "restarted d")
    assert log.lines()[4:10] == [
        "crashed b",
        "stopped d",
        "stopped c",
        "restarted b",
        "restarted c",
        "restarted d",
    ]
    assert "stopped a" not in log.lines()[:-4]  # a only at the shutdown


# ---- restart types ----


@pytest.mark.anyio
async def test_permanent_children_are_restarted_even_after_a_normal_exit() -> None:
    log = Log()
    supervisor = ml.Supervisor(
        specs(a=Script("return", "wait")), on_event=log, max_restarts=5
    )
    await run_until(supervisor, log, "restarted a")
    assert log.lines()[:3] == ["started a", "exited a", "restarted a"]


@pytest.mark.anyio
async def test_transient_children_are_restarted_only_after_abnormal_exits() -> None:
    log = Log()
    children = [
        ml.ChildSpec("crashes", Script("crash", "return"), restart="transient"),
        ml.ChildSpec(
            "leaks",
            Script("leak", "return"),
            restart=ml.Restart.TRANSIENT,
            budget=ml.Budget(memory="1 MiB"),
        ),
        ml.ChildSpec("returns", Script("return"), restart="transient"),
    ]
    supervisor = ml.Supervisor(children, on_event=log, max_restarts=5)
    with anyio.fail_after(10):
        await supervisor.run()  # returns once nothing is left to run
    assert sorted(log.lines()[3:]) == sorted(
        [
            "crashed crashes",
            "restarted crashes",
            "exited crashes",
            "breached leaks",
            "restarted leaks",
            "exited leaks",
            "exited returns",
        ]
    )


@pytest.mark.anyio
async def test_temporary_children_are_never_restarted() -> None:
    log = Log()
    children = [
        ml.ChildSpec("crashes", Script("crash"), restart="temporary"),
        ml.ChildSpec("returns", Script("return"), restart="temporary"),
    ]
    supervisor = ml.Supervisor(children, on_event=log, max_restarts=0)
    with anyio.fail_after(10):
        await supervisor.run()
    assert sorted(log.lines()[2:]) == ["crashed crashes", "exited returns"]


@pytest.mark.anyio
async def test_a_group_restart_revives_ended_transients_and_forgets_temporaries() -> (
    None
):
    # OTP: one_for_all stops the others, forgets the temporary ones, and
    # starts every remaining spec again, a transient one that had ended too.
    log = Log()
    trigger = anyio.Event()
    done = Script("return", "wait")

    async def crash_when_triggered(runs: list[int]) -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            await trigger.wait()
            raise ValueError("now")
        await anyio.sleep_forever()

    children = [
        ml.ChildSpec("done", done, restart="transient"),
        ml.ChildSpec("temp", Script("wait"), restart="temporary"),
        ml.ChildSpec("perm", crash_when_triggered, ([],)),
    ]
    supervisor = ml.Supervisor(
        children, strategy="one_for_all", on_event=log, max_restarts=5
    )
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            await group.start(supervisor.run)
            await log.until("exited done")
            trigger.set()
            await log.until("restarted perm")
            group.cancel_scope.cancel()
    assert log.lines()[3:] == [
        "exited done",  # transient, normal: not restarted (yet)
        "crashed perm",
        "stopped temp",  # and forgotten
        "restarted done",
        "restarted perm",
        "stopped perm",  # the shutdown
        "stopped done",
    ]
    assert done.runs == 2


# ---- intensity ----


@pytest.mark.anyio
async def test_too_many_restarts_give_up_with_the_history() -> None:
    log = Log()
    children = specs(steady=Script("wait"), flaky=Script("crash"))
    supervisor = ml.Supervisor(
        children, on_event=log, max_restarts=2, period=60, name="pool"
    )
    with anyio.fail_after(10), pytest.raises(ml.SupervisorGaveUp) as raised:
        await supervisor.run()
    error = raised.value
    assert log.lines()[2:] == [
        "crashed flaky",
        "restarted flaky",
        "crashed flaky",
        "restarted flaky",
        "crashed flaky",
        "gave up None",
        "stopped steady",  # everything else stopped before it raised
    ]
    assert [event.kind for event in error.history] == [ml.EventKind.CRASHED] * 3
    assert (error.supervisor, error.max_restarts, error.period) == ("pool", 2, 60.0)
    assert isinstance(error.__cause__, ValueError)  # the last crash
    assert str(error).startswith(
        "supervisor 'pool' gave up: 3 exits asked for a restart within 60 s, "
        "more than max_restarts=2 (pool: flaky crashed: ValueError("
    )
    assert str(log.events[-2]) == (
        "pool: gave up after 3 exits within 60 s (max_restarts=2)"
    )
    assert log.events[-2].exception is error
    assert supervisor.children() == []


@pytest.mark.anyio
async def test_restarts_older_than_the_period_are_forgotten() -> None:
    log = Log()

    async def crash_after_a_while() -> None:
        await anyio.sleep(0.03)  # longer than the period: each run is alone
        raise ValueError("late")

    slow = ml.ChildSpec("slow", crash_after_a_while)
    supervisor = ml.Supervisor([slow], on_event=log, max_restarts=1, period=0.02)
    await run_until(supervisor, log, "restarted slow", count=4)
    assert "gave up None" not in log.lines()


@pytest.mark.anyio
async def test_max_restarts_zero_gives_up_at_the_first_restart() -> None:
    supervisor = ml.Supervisor(specs(a=Script("crash")), max_restarts=0)
    with anyio.fail_after(10), pytest.raises(ml.SupervisorGaveUp):
        await supervisor.run()


# ---- budgets ----


@pytest.mark.anyio
async def test_a_breach_is_reported_with_usage_and_restarted_with_a_fresh_budget() -> (
    None
):
    # The second run allocates about 1 MiB under a 2 MiB allocation budget:
    # breached only if the first run's 2 MiB still counted.  (Sampling at
    # about 2 MiB / 1200: the estimate of ~1.1 MiB passes 2 MiB, or stays
    # under 0.5 MiB, with probability < 1e-9.)
    log = Log()
    churned = anyio.Event()

    async def leak_then_churn(runs: list[int]) -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            await leak_until_cancelled([])
        for _ in range(512):
            bytes(2 * KIB)
            await anyio.sleep(0)
        churned.set()
        await anyio.sleep_forever()

    runs: list[int] = []
    child = ml.ChildSpec(
        "worker", leak_then_churn, (runs,), budget=ml.Budget(allocations="2 MiB")
    )
    supervisor = ml.Supervisor([child], on_event=log)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            await group.start(supervisor.run)
            await churned.wait()
            (worker,) = supervisor.children()
            group.cancel_scope.cancel()
    assert worker.breach is None and worker.usage.allocated > MIB // 2
    breached = log.events[1]
    assert breached.kind is ml.EventKind.BREACHED
    assert breached.breach is not None
    assert breached.breach.kind is ml.BreachKind.ALLOCATIONS
    assert breached.usage is not None and breached.usage.allocated > 2 * MIB
    assert log.lines()[2:] == ["restarted worker", "stopped worker"]
    assert runs == [0, 1]


@pytest.mark.anyio
async def test_children_lists_the_running_children_with_usage() -> None:
    log = Log()
    supervisor = ml.Supervisor(specs(a=Script("wait"), b=Script("wait")), on_event=log)
    seen: list[list[ml.ChildInfo]] = []

    async def look() -> None:
        await log.until("started b")
        await anyio.sleep(0)
        seen.append(supervisor.children())

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            await group.start(supervisor.run)
            await look()
            group.cancel_scope.cancel()
    assert [child.name for child in seen[0]] == ["a", "b"]
    assert all(child.breach is None for child in seen[0])
    assert all(child.usage.allocated >= 0 for child in seen[0])
    assert supervisor.children() == []


# ---- backoff ----


def test_backoff_grows_exponentially_to_its_maximum() -> None:
    backoff = ml.Backoff(
        initial=0.1, maximum=1.0, multiplier=2, jitter=0.5, random=lambda: 0.5
    )
    delays = [backoff.delay(n) for n in range(6)]
    assert delays == pytest.approx([0.075, 0.15, 0.3, 0.6, 0.75, 0.75])
    assert backoff.delay(10_000) == pytest.approx(0.75)  # no overflow
    no_jitter = ml.Backoff(initial=0.1, jitter=0, random=lambda: 0.9)
    assert no_jitter.delay(0) == pytest.approx(0.1)
    full = ml.Backoff(initial=0.1, jitter=1, random=lambda: 0.9)
    assert full.delay(0) == pytest.approx(0.01)


@pytest.mark.anyio
async def test_restarts_wait_their_backoff() -> None:
    log = Log()
    backoff = ml.Backoff(
        initial=0.001, maximum=0.004, multiplier=2, jitter=0.5, random=lambda: 0.5
    )
    supervisor = ml.Supervisor(
        specs(a=Script("crash", "crash", "crash", "crash", "wait")),
        backoff=backoff,
        max_restarts=10,
        on_event=log,
    )
    await run_until(supervisor, log, "restarted a", count=4)
    delays = [e.delay for e in log.events if e.kind is ml.EventKind.RESTARTED]
    assert delays == pytest.approx([0.00075, 0.0015, 0.003, 0.003])
    assert str(log.events[2]) == "supervisor: a restarted after 0.00075 s"


# ---- nesting ----


@pytest.mark.anyio
async def test_a_supervisor_can_supervise_another() -> None:
    log = Log()
    inner = ml.Supervisor(
        specs(x=Script("wait"), y=Script("crash", "wait")),
        name="inner",
        on_event=log,
        max_restarts=5,
    )
    outer = ml.Supervisor(
        [inner.child_spec(), ml.ChildSpec("z", Script("wait"))],
        name="outer",
        on_event=log,
    )
    await run_until(outer, log, "restarted y")
    assert [str(event) for event in log.events] == [
        "outer: inner started",
        "outer: z started",
        "inner: x started",
        "inner: y started",
        "inner: y crashed: ValueError('crash in run 1')",
        "inner: y restarted",
        # outer's shutdown: z, then inner, which stops its own children first
        "outer: z stopped",
        "inner: y stopped",
        "inner: x stopped",
        "outer: inner stopped",
    ]


def giving_up_inner(log: Log) -> ml.Supervisor:
    return ml.Supervisor(
        specs(x=Script("crash")), name="inner", on_event=log, max_restarts=0
    )


@pytest.mark.anyio
async def test_a_nested_supervisor_that_gives_up_is_restarted_if_permanent() -> None:
    log = Log()
    inner = giving_up_inner(log)
    outer = ml.Supervisor([inner.child_spec()], name="outer", on_event=log)
    with anyio.fail_after(10), pytest.raises(ml.SupervisorGaveUp) as raised:
        await outer.run()  # the inner one gives up twice: too much for outer
    assert [event.kind for event in raised.value.history] == [ml.EventKind.CRASHED] * 2
    assert all(
        isinstance(event.exception, ml.SupervisorGaveUp)
        for event in raised.value.history
    )
    assert log.lines().count("restarted inner") == 1


@pytest.mark.anyio
async def test_a_nested_supervisor_that_gives_up_is_not_restarted_if_transient() -> (
    None
):
    # OTP: a supervisor that gave up exits with `shutdown`, a normal exit.
    log = Log()
    inner = giving_up_inner(log)
    outer = ml.Supervisor(
        [inner.child_spec(restart="transient")], name="outer", on_event=log
    )
    with anyio.fail_after(10):
        await outer.run()
    assert "crashed inner" in log.lines()
    assert "restarted inner" not in log.lines()


# ---- shutdown ----


@pytest.mark.anyio
async def test_shutdown_asks_trapping_children_then_cancels_after_the_grace() -> None:
    log = Log()
    steps: list[str] = []
    trapped: list[str] = []
    all_trapped = anyio.Event()

    def trap(name: str) -> ml.CancelToken:
        token = ml.trap_shutdown()
        trapped.append(name)
        if len(trapped) == 3:
            all_trapped.set()
        return token

    async def polite(name: str) -> None:
        token = trap(name)
        await token.wait()
        steps.append(f"{name}: asked ({token.reason})")

    async def stubborn() -> None:
        token = trap("stubborn")
        try:
            await token.wait()
            steps.append("stubborn: asked")
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            steps.append("stubborn: cancelled")
            raise

    async def oblivious() -> None:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            steps.append("oblivious: cancelled")
            raise

    children = [
        ml.ChildSpec("first", polite, ("first",)),
        ml.ChildSpec("oblivious", oblivious, shutdown=60),  # cancelled at once
        ml.ChildSpec("stubborn", stubborn, shutdown=0.01),
        ml.ChildSpec("last", polite, ("last",), shutdown=None),
    ]
    supervisor = ml.Supervisor(children, on_event=log, name="pool")
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            await group.start(supervisor.run)
            await all_trapped.wait()
            group.cancel_scope.cancel()
    assert steps == [
        "last: asked (supervisor 'pool' is shutting down)",
        "stubborn: asked",
        "stubborn: cancelled",
        "oblivious: cancelled",
        "first: asked (supervisor 'pool' is shutting down)",
    ]
    assert log.lines()[4:] == [
        "stopped last",
        "stopped stubborn",
        "stopped oblivious",
        "stopped first",
    ]


@pytest.mark.anyio
async def test_a_zero_grace_cancels_a_trapping_child_at_once() -> None:
    log = Log()
    tokens: list[ml.CancelToken] = []
    has_trapped = anyio.Event()

    async def trapping() -> None:
        tokens.append(ml.trap_shutdown())
        has_trapped.set()
        await anyio.sleep_forever()

    supervisor = ml.Supervisor([ml.ChildSpec("a", trapping, shutdown=0)], on_event=log)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            await group.start(supervisor.run)
            await has_trapped.wait()
            group.cancel_scope.cancel()
    assert not tokens[0].cancelled
    assert log.lines()[-1] == "stopped a"


@pytest.mark.anyio
async def test_a_breach_of_the_supervisors_budget_stops_children_without_grace() -> (
    None
):
    log = Log()
    tokens: list[ml.CancelToken] = []

    async def trapping() -> None:
        tokens.append(ml.trap_shutdown())
        await anyio.sleep_forever()

    children = [
        ml.ChildSpec("patient", trapping, shutdown=None),
        ml.ChildSpec("leaky", leak_until_cancelled, ([],)),
    ]
    supervisor = ml.Supervisor(children, on_event=log)
    with anyio.fail_after(10):
        async with ml.limit_scope(memory="1 MiB") as scope:
            await supervisor.run()
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.MEMORY
    assert log.lines()[2:] == ["stopped leaky", "stopped patient"]
    assert not tokens[0].cancelled  # no time for courtesy


# ---- events ----


@pytest.mark.anyio
async def test_a_failing_event_hook_is_reported_and_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reported: list[SimpleNamespace] = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)

    def broken(event: ml.SupervisorEvent) -> None:
        raise RuntimeError(f"cannot log {event.kind.value}")

    supervisor = ml.Supervisor(
        [ml.ChildSpec("a", Script("return"), restart="temporary")], on_event=broken
    )
    with anyio.fail_after(10):
        await supervisor.run()
    assert [str(each.exc_value) for each in reported] == [
        "cannot log started",
        "cannot log exited",
    ]


# ---- bad specs ----


async def nothing() -> None:
    pass


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"id": ""}, TypeError, "id must be a non-empty str"),
        ({"id": 3}, TypeError, "id must be a non-empty str"),
        ({"start": "nothing"}, TypeError, "start must be an async function"),
        ({"args": "ab"}, TypeError, "args must be a tuple"),
        ({"restart": "forever"}, ValueError, "restart must be one of 'permanent'"),
        ({"restart": 1}, TypeError, "restart must be one of"),
        ({"budget": "1 MiB"}, TypeError, "budget must be a memlimits_async"),
        ({"shutdown": -1}, ValueError, "shutdown must be >= 0"),
        ({"shutdown": "5"}, TypeError, "shutdown must be a number"),
    ],
)
def test_bad_child_specs_name_the_argument(
    arguments: dict[str, object], error: type[Exception], message: str
) -> None:
    given: dict[str, Any] = {"id": "a", "start": nothing, **arguments}
    with pytest.raises(error, match=message):
        ml.ChildSpec(**given)


def test_child_specs_are_values() -> None:
    spec = ml.ChildSpec(
        "a", nothing, [1, 2], restart="transient", shutdown=float("inf")
    )
    assert spec.args == (1, 2)
    assert spec.restart is ml.Restart.TRANSIENT
    assert spec.shutdown is None
    assert spec == ml.ChildSpec(
        "a", nothing, (1, 2), restart=ml.Restart.TRANSIENT, shutdown=None
    )


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"children": ml.ChildSpec("a", nothing)}, TypeError, "an iterable of"),
        ({"children": [nothing]}, TypeError, "must be ChildSpec objects"),
        (
            {"children": [ml.ChildSpec("a", nothing), ml.ChildSpec("a", nothing)]},
            ValueError,
            "two specs with id 'a'",
        ),
        ({"strategy": "one_for_some"}, ValueError, "strategy must be one of"),
        ({"max_restarts": -1}, ValueError, "max_restarts must be >= 0"),
        ({"max_restarts": 1.5}, TypeError, "max_restarts must be an int"),
        ({"max_restarts": True}, TypeError, "max_restarts must be an int"),
        ({"period": 0}, ValueError, "period must be a finite number > 0"),
        ({"period": float("inf")}, ValueError, "period must be a finite number"),
        ({"backoff": 0.1}, TypeError, "backoff must be a Backoff"),
        ({"on_event": "print"}, TypeError, "on_event must be callable"),
        ({"name": None}, TypeError, "name must be a str"),
    ],
)
def test_bad_supervisors_name_the_argument(
    arguments: dict[str, object], error: type[Exception], message: str
) -> None:
    given: dict[str, Any] = {"children": [], **arguments}
    with pytest.raises(error, match=message):
        ml.Supervisor(**given)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"initial": -1}, "initial must be >= 0"),
        ({"initial": 2, "maximum": 1}, "maximum must be >= initial"),
        ({"multiplier": 0.5}, "multiplier must be >= 1"),
        ({"jitter": 1.5}, "jitter must be between 0 and 1"),
    ],
)
def test_bad_backoffs_name_the_argument(
    arguments: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ml.Backoff(**arguments)


def test_trap_shutdown_outside_a_supervisor_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="children run by a Supervisor"):
        ml.trap_shutdown()


@pytest.mark.anyio
async def test_a_supervisor_runs_once_at_a_time() -> None:
    supervisor = ml.Supervisor(specs(a=Script("wait")))
    async with anyio.create_task_group() as group:
        await group.start(supervisor.run)
        with pytest.raises(RuntimeError, match="already running"):
            await supervisor.run()
        group.cancel_scope.cancel()
    # ...and can run again once it has ended.
    with anyio.move_on_after(0.01):
        await supervisor.run()


# ---- native asyncio and trio ----


async def restart_scenario() -> list[str]:
    log = Log()
    supervisor = ml.Supervisor(
        [ml.ChildSpec("a", Script("crash", "return"), restart="transient")],
        on_event=log,
    )
    await supervisor.run()
    return log.lines()


EXPECTED: Sequence[str] = ["started a", "crashed a", "restarted a", "exited a"]


@pytest.mark.asyncio
async def test_supervisor_on_native_asyncio() -> None:
    assert await restart_scenario() == EXPECTED


def test_supervisor_on_native_trio() -> None:
    assert trio.run(restart_scenario) == EXPECTED
