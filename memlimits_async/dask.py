"""Per-task budgets, and real cancellation of running tasks, in Dask workers.

```python
import dask
from distributed import Client
from memlimits_async.dask import BudgetPlugin

client = Client(...)
client.register_plugin(BudgetPlugin(memory="2 GiB"))   # every task's default
with dask.annotate(memory="500 MiB", allocations="20 GiB", timeout=600):
    futures = client.map(work, items)                   # these tasks' budgets
```

Every task a worker runs (in its thread pool, or as a coroutine on its event
loop) runs inside a :class:`memlimits_async.LimitScope` with its budget, in
the thread that runs it.  A breach stops that task alone, which fails with
the matching :class:`memlimits_async.LimitReached`.  A running task that
the client cancels, or whose result nothing needs any more, is stopped too
(preempted where it runs, its ``finally`` blocks running), and the thread is
free for the next task.  See docs/dask.md.

Built only on memlimits_async's public API, like any user's integration;
needs the ``[dask]`` extra (``dask`` and ``distributed``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from dask.task_spec import GraphNode
from distributed import Reschedule
from distributed.diagnostics.plugin import WorkerPlugin

import memlimits_async as ml

if TYPE_CHECKING:
    from distributed import Client, Worker

__all__ = [
    "ANNOTATIONS",
    "PLUGIN_NAME",
    "BudgetPlugin",
    "TaskUsage",
    "task_usage",
]

PLUGIN_NAME: Final = "memlimits_async"
"""The name the plugin registers under (``worker.plugins[PLUGIN_NAME]``)."""

ANNOTATIONS: Final = ("memory", "allocations", "timeout")
"""The task annotations read as a task's budget: ``dask.annotate(memory=...,
allocations=..., timeout=...)``.  Each one given replaces the plugin's
default for that limit (``None``: no limit)."""

_CANCELLED_REASON: Final = "the task was cancelled (its result is no longer needed)"
# Transitions out of a running state that Dask makes when the scheduler
# releases a running task: the worker moves it to "cancelled" and lets the
# thread run on, discarding what it returns.
_RUNNING: Final = frozenset({"executing", "long-running"})


@dataclass(frozen=True, slots=True)
class TaskUsage:
    """One task's budget and what it used, as a worker saw it."""

    key: str
    """The task's key, as ``str(key)``."""
    state: str
    """``"running"``; or how it ended: ``"finished"``, ``"failed"`` (its own
    exception), ``"breached"`` (its budget stopped it), ``"cancelled"``
    (Dask cancelled it while it ran, and it was stopped)."""
    budget: ml.Budget
    """Its limits (memory, allocations, timeout, preempt)."""
    usage: ml.Usage
    """Bytes charged to it so far (running) or in all (ended)."""
    breach: ml.Breach | None
    """What stopped it (``"breached"`` and ``"cancelled"``), else None."""
    started: float
    """When it started, as ``time.time()``."""
    elapsed: float
    """Seconds it has run (running) or ran (ended)."""
    thread: int
    """The thread that ran it (``threading.get_ident()``)."""


class _Run:
    """A task running under the plugin: what the worker needs to reach it."""

    __slots__ = ("budget", "cancelled", "key", "scope", "started", "thread", "token")

    def __init__(self, key: object, budget: ml.Budget, token: ml.CancelToken) -> None:
        self.key = key
        self.budget = budget
        self.token = token
        self.scope: ml.LimitScope | None = None
        self.cancelled = False
        self.started = time.time()
        self.thread = threading.get_ident()


class _BudgetedTask(GraphNode):
    """A task's run spec, run inside a limit scope by the plugin.

    The worker calls a task's run spec with the values of its dependencies
    in the thread (or, for a coroutine function, the event-loop task) that
    runs it, so a scope opened here is opened where the work runs, after
    Dask's own bookkeeping and around nothing else.  Only ``is_coro``,
    calling it and ``repr`` are what a worker uses of a run spec; pickling
    it (an executor in another process) gives the plain task back."""

    __slots__ = ("_budget", "_inner", "_invalid", "_plugin")

    def __init__(
        self,
        inner: GraphNode,
        plugin: BudgetPlugin,
        budget: ml.Budget | None,
        invalid: Exception | None = None,
    ) -> None:
        self.key = inner.key
        self._dependencies = inner.dependencies
        self._inner = inner
        self._plugin = plugin
        self._budget = budget
        self._invalid = invalid

    @property
    def is_coro(self) -> bool:
        return bool(self._inner.is_coro)

    def __call__(self, values: Mapping[object, object]) -> object:
        if self._invalid is not None:
            raise self._invalid
        assert self._budget is not None
        if self._inner.is_coro:
            return self._plugin._run_async(self._inner, self._budget, values)
        return self._plugin._run(self._inner, self._budget, values)

    def __repr__(self) -> str:
        return repr(self._inner)

    def __reduce__(self) -> tuple[Callable[[GraphNode], GraphNode], tuple[GraphNode]]:
        return (_plain, (self._inner,))


def _plain(inner: GraphNode) -> GraphNode:
    return inner


class BudgetPlugin(WorkerPlugin):
    """A worker plugin that runs every task inside a limit scope.

    Register it with ``client.register_plugin(BudgetPlugin(...))``: every
    worker, and every worker that joins later, gets it.

    :param memory: the default live-bytes limit of a task (int, or a string
        such as ``"2 GiB"``); ``None``, no limit.
    :param allocations: the default cumulative-allocations limit of a task.
    :param timeout: the default timeout of a task, in seconds.
    :param preempt: the grace before a stopped task is preempted
        (``limit_scope(preempt=...)``: seconds, or False never to preempt).
        None (default): at once for a task run in a worker thread (nothing
        else can stop it: it has no checkpoint), and after the configured
        grace (``ml.configure(preempt=...)``, 0.05 s) for a coroutine task,
        which is cancelled at its next ``await`` first.
    :param cancel_running: stop a running task when Dask cancels it (the
        client cancelled its future, or nothing needs its result any more).
    :param history: how many ended tasks each worker remembers for
        :func:`task_usage`.

    A task's annotations ``memory``, ``allocations`` and ``timeout``
    (:data:`ANNOTATIONS`) replace the defaults for that task.
    """

    name = PLUGIN_NAME
    idempotent = False

    def __init__(
        self,
        *,
        memory: int | str | None = None,
        allocations: int | str | None = None,
        timeout: float | None = None,
        preempt: float | bool | None = None,
        cancel_running: bool = True,
        history: int = 1000,
    ) -> None:
        # Checked here, on the client, so that a bad value fails at once.
        self._default = ml.Budget(
            memory=memory, allocations=allocations, timeout=timeout, preempt=preempt
        )
        if not isinstance(cancel_running, bool):
            raise TypeError(
                f"cancel_running must be a bool, not {type(cancel_running).__name__}"
            )
        if isinstance(history, bool) or not isinstance(history, int):
            raise TypeError(f"history must be an int, not {type(history).__name__}")
        if history < 0:
            raise ValueError(f"history must be >= 0, got {history}")
        self._cancel_running = cancel_running
        self._history = history
        self._setup_state()

    def _setup_state(self) -> None:
        self._worker: Worker | None = None
        self._running: dict[object, _Run] = {}
        self._ended: deque[TaskUsage] = deque(maxlen=self._history)
        self._budgets: dict[tuple[object, ...], ml.Budget] = {}
        self._counts = {"finished": 0, "failed": 0, "breached": 0, "cancelled": 0}
        # Tasks end in several threads at once; ``+=`` on a dict is not atomic.
        self._counts_lock = threading.Lock()

    @property
    def default(self) -> ml.Budget:
        """The budget of a task that has no budget annotations."""
        return self._default

    def __getstate__(self) -> dict[str, object]:
        # Sent to every worker: the settings, not a worker's running state.
        return {
            "_default": self._default,
            "_cancel_running": self._cancel_running,
            "_history": self._history,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup_state()

    # ---- the worker's side ----

    def setup(self, worker: Worker) -> None:
        self._worker = worker
        worker.metrics[PLUGIN_NAME] = self._metrics

    def teardown(self, worker: Worker) -> None:
        if worker.metrics.get(PLUGIN_NAME) == self._metrics:
            del worker.metrics[PLUGIN_NAME]
        self._worker = None

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        # Called on the worker's event loop, synchronously after each change
        # of a task's state and before the worker acts on it: the task that
        # becomes "executing" has not started yet.
        if finish == "executing":
            self._wrap(key)
        elif finish == "released" and start in _RUNNING and self._cancel_running:
            run = self._running.get(key)
            if run is not None:
                run.cancelled = True
                run.token.cancel(_CANCELLED_REASON)

    def _wrap(self, key: object) -> None:
        worker = self._worker
        if worker is None:
            return
        ts = worker.state.tasks.get(key)  # type: ignore[call-overload]
        if ts is None or ts.state != "executing":
            return
        spec = ts.run_spec
        if not isinstance(spec, GraphNode) or isinstance(spec, _BudgetedTask):
            return
        try:
            budget = self._budget_of(ts.annotations or {})
        except (TypeError, ValueError) as invalid:
            ts.run_spec = _BudgetedTask(spec, self, None, invalid)
        else:
            ts.run_spec = _BudgetedTask(spec, self, budget)

    def _budget_of(self, annotations: Mapping[str, object]) -> ml.Budget:
        given = tuple(annotations.get(name, self) for name in ANNOTATIONS)
        try:
            budget = self._budgets.get(given)
        except TypeError:  # an unhashable value: Budget names it below
            budget = None
        if budget is None:
            default = self._default
            memory, allocations, timeout = (
                getattr(default, name) if value is self else value
                for name, value in zip(ANNOTATIONS, given, strict=True)
            )
            try:
                budget = ml.Budget(
                    memory=memory,  # type: ignore[arg-type]
                    allocations=allocations,  # type: ignore[arg-type]
                    timeout=timeout,  # type: ignore[arg-type]
                    preempt=default.preempt,
                )
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"task annotation: {exc}") from None
            if len(self._budgets) < 1000:  # annotations are few; a cap all the same
                self._budgets[given] = budget  # hashable: Budget accepted it
        return budget

    # ---- running a task (its thread, or its event-loop task) ----

    def _scope(self, run: _Run, preempt: float | bool | None) -> ml.LimitScope:
        budget = run.budget
        scope = ml.limit_scope(
            memory=budget.memory,
            allocations=budget.allocations,
            timeout=budget.timeout,
            preempt=preempt,
            token=run.token,
            raise_on_breach=True,
        )
        run.scope = scope
        return scope

    def _run(
        self, task: GraphNode, budget: ml.Budget, values: Mapping[object, object]
    ) -> object:
        run = _Run(task.key, budget, ml.CancelToken())
        self._running[run.key] = run
        # A grace lets a task reach a checkpoint and be cancelled there; a
        # thread has none, so it would only let the task allocate on.
        preempt = 0.0 if budget.preempt is None else budget.preempt
        scope = self._scope(run, preempt)
        state = "failed"
        try:
            with scope:
                result = task(values)
            state = "finished"
            return result
        except ml.LimitReached as exc:
            state = self._stopped(run, exc)
            if state != "cancelled":
                raise
        finally:
            self._ended_run(run, state)
        # A task that Dask cancelled: the worker discards what it returns,
        # unless the task was submitted again meanwhile (then the same run
        # is resumed, and it must be computed again).
        raise Reschedule()

    async def _run_async(
        self, task: GraphNode, budget: ml.Budget, values: Mapping[object, object]
    ) -> object:
        run = _Run(task.key, budget, ml.CancelToken())
        self._running[run.key] = run
        scope = self._scope(run, budget.preempt)
        state = "failed"
        try:
            async with scope:
                coroutine: Coroutine[Any, Any, object] = task(values)
                result = await coroutine
            state = "finished"
            return result
        except ml.LimitReached as exc:
            state = self._stopped(run, exc)
            if state != "cancelled":
                raise
        finally:
            self._ended_run(run, state)
        raise Reschedule()

    @staticmethod
    def _stopped(run: _Run, exc: ml.LimitReached) -> str:
        """How a task that raised ``exc`` ended."""
        scope = run.scope
        if scope is None or exc.breach is not scope.breach:
            return "failed"  # a scope of the task's own: its exception
        if run.cancelled and exc.breach.kind is ml.BreachKind.TOKEN:
            return "cancelled"
        return "breached"

    def _ended_run(self, run: _Run, state: str) -> None:
        if self._running.get(run.key) is run:
            del self._running[run.key]
        scope = run.scope
        with self._counts_lock:
            self._counts[state] += 1
        if self._history:
            self._ended.append(
                TaskUsage(
                    key=str(run.key),
                    state=state,
                    budget=run.budget,
                    usage=scope.usage if scope is not None else ml.Usage(0, 0, 0),
                    breach=scope.breach if scope is not None else None,
                    started=run.started,
                    elapsed=time.time() - run.started,
                    thread=run.thread,
                )
            )
        if state in ("breached", "cancelled") and scope is not None:
            self._log_stop(run, state, scope)

    def _log_stop(self, run: _Run, state: str, scope: ml.LimitScope) -> None:
        worker = self._worker
        breach = scope.breach
        if worker is None or breach is None:
            return
        usage = scope.usage
        worker.log_event(
            PLUGIN_NAME,
            {
                "key": str(run.key),
                "state": state,
                "kind": breach.kind.value,
                "reason": breach.reason,
                "limit": breach.limit,
                "observed": breach.observed,
                "allocated": usage.allocated,
                "peak_live": usage.peak_live,
                "elapsed": time.time() - run.started,
            },
        )

    # ---- what users see ----

    def running(self) -> list[TaskUsage]:
        """The tasks running on this worker under the plugin, with their usage."""
        now = time.time()
        reports = []
        for run in list(self._running.values()):
            scope = run.scope
            if scope is None:
                continue
            reports.append(
                TaskUsage(
                    key=str(run.key),
                    state="running",
                    budget=run.budget,
                    usage=scope.usage,
                    breach=scope.breach,
                    started=run.started,
                    elapsed=now - run.started,
                    thread=run.thread,
                )
            )
        return reports

    def ended(self) -> list[TaskUsage]:
        """The last ``history`` tasks that ended on this worker, oldest first."""
        return list(self._ended)

    def _metrics(self, worker: Worker) -> dict[str, object]:
        """The worker's heartbeat metric: every running task's usage, and
        how many tasks ended each way (msgpack-friendly)."""
        return {
            "running": [
                {
                    "key": each.key,
                    "live": each.usage.live,
                    "peak_live": each.usage.peak_live,
                    "allocated": each.usage.allocated,
                    "elapsed": each.elapsed,
                }
                for each in self.running()
            ],
            **self._counts,  # a copy, made while the GIL is held
        }


def _reports(
    name: str, ended: bool, *, dask_worker: Worker
) -> dict[str, list[TaskUsage]] | None:
    plugin = dask_worker.plugins.get(name)
    if not isinstance(plugin, BudgetPlugin):
        return None
    return {"running": plugin.running(), "ended": plugin.ended() if ended else []}


def task_usage(
    client: Client, *, ended: bool = False, name: str = PLUGIN_NAME
) -> dict[str, list[TaskUsage]]:
    """Every worker's running tasks with their usage (and, with
    ``ended=True``, the tasks that ended there, after them), by worker
    address.  Workers without the plugin are left out."""
    if not isinstance(ended, bool):
        raise TypeError(f"ended must be a bool, not {type(ended).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, not {type(name).__name__}")
    by_worker = client.run(_reports, name, ended)
    return {
        address: reports["running"] + reports["ended"]
        for address, reports in by_worker.items()
        if reports is not None
    }
