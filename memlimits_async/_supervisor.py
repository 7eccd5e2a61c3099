"""Supervisors: Erlang/OTP restart strategies over budgeted children.

A :class:`Supervisor` runs a list of :class:`ChildSpec` as children of a
budgeted task group (``_groups``), each start in a fresh scope with the
spec's budget, and restarts them as an OTP supervisor does:

* **restart types** (OTP ``do_restart``): ``permanent`` children are always
  restarted, ``transient`` ones only after an abnormal exit, ``temporary``
  ones never (and are then forgotten).  Abnormal means: it raised, or its
  budget stopped it (it did not finish its work).  A normal return is
  normal; so is a nested supervisor that gave up, which exits with OTP's
  ``shutdown`` (only ``permanent`` escalates it);
* **strategies** (OTP ``restart/3``): ``one_for_one`` restarts the child
  alone; ``one_for_all`` stops every other child (in reverse start order)
  and starts them all again (in start order); ``rest_for_one`` does that for
  the children started after it.  Temporary children stopped that way are
  forgotten; transient ones that had ended are started again;
* **intensity** (OTP ``add_restart``): a restart at time t counts the
  restarts in [t - period, t]; more than ``max_restarts`` and the supervisor
  gives up: it stops every child and raises :class:`SupervisorGaveUp`;
* **shutdown** (OTP ``terminate/2``): children are stopped one by one in
  reverse start order.  A child that asked for a graceful stop
  (:func:`trap_shutdown`, OTP's ``trap_exit``) first sees its token
  cancelled and gets ``shutdown`` seconds to return; then, like any other
  child, it is cancelled.

Added to OTP: a backoff before each restart (exponential, with jitter) and
events for logging.  The supervisor handles one exit at a time, in order, as
an OTP supervisor handles its messages; a backoff delay holds up the
handling of later exits.

Invariants:

* ``slot.run`` is the child's current run, or None once it has ended and the
  supervisor has handled that; an exit whose run is not its slot's current
  run is stale (the supervisor stopped that run itself and reported it then)
  and is ignored.
* The children live in a task group held by a separate task inside a
  shielded scope (``_hold_children``): a cancellation of the supervisor
  reaches its own loop only, which then stops the children in order.
"""

from __future__ import annotations

import collections
import contextvars
import enum
import functools
import random
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import anyio.abc

from ._accounts import Breach, Usage
from ._budget import Budget
from ._delivery import report_unraisable
from ._exceptions import Preempted
from ._groups import (
    BudgetedTaskGroup,
    ChildHandle,
    ChildInfo,
    ChildStatus,
    _child_scope,
)
from ._masking import is_interrupted
from ._scope import _parse_timeout, limit_scope
from ._tokens import CancelToken

__all__ = [
    "Backoff",
    "ChildSpec",
    "EventKind",
    "Restart",
    "Strategy",
    "Supervisor",
    "SupervisorEvent",
    "SupervisorGaveUp",
    "trap_shutdown",
]


class Restart(enum.StrEnum):
    """When a child is restarted (OTP's restart types)."""

    PERMANENT = "permanent"
    """Always, whatever its exit."""
    TRANSIENT = "transient"
    """Only after an abnormal exit: an exception, or a breach of its budget."""
    TEMPORARY = "temporary"
    """Never; the supervisor forgets it once it has ended."""


class Strategy(enum.StrEnum):
    """Which children are restarted when one must be (OTP's strategies)."""

    ONE_FOR_ONE = "one_for_one"
    """That child alone."""
    ONE_FOR_ALL = "one_for_all"
    """Every child: the others are stopped first, in reverse start order."""
    REST_FOR_ONE = "rest_for_one"
    """That child and those started after it (stopped in reverse order)."""


_UNFINISHED: Final = (ChildStatus.PENDING, ChildStatus.CANCELLING)


def _finished(handle: ChildHandle[Any]) -> bool:
    return handle.status not in _UNFINISHED


def _enum_value(enum_type: type[enum.StrEnum], value: object, name: str) -> Any:
    known = ", ".join(repr(member.value) for member in enum_type)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {known}, not {type(value).__name__}")
    try:
        return enum_type(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {known}, got {value!r}") from None


def _grace(value: object, name: str) -> float | None:
    """Seconds, or None for no limit (math.inf is the same)."""
    if value is None:
        return None
    seconds = _parse_timeout(value, name)
    return None if seconds == float("inf") else seconds


@dataclass(frozen=True, slots=True, init=False)
class ChildSpec:
    """One child of a :class:`Supervisor`: what to run and how to restart it.

    :param id: the child's name, unique within its supervisor (events, logs,
        ``children()``).
    :param start: an async function; each start runs ``await start(*args)``.
    :param args: its positional arguments (a tuple; a list is copied).
    :param restart: ``"permanent"`` (default), ``"transient"`` or
        ``"temporary"`` (:class:`Restart`).
    :param budget: the :class:`Budget` of each start (a fresh scope each
        time, so a restart after a breach starts with nothing charged), or
        None for no limits.
    :param shutdown: seconds a child that called :func:`trap_shutdown` gets to
        return after its token is cancelled, before it is cancelled; 0 cancels
        it at once; None waits as long as it takes (meant for nested
        supervisors, which stop their own children first).  Default 5, as in
        OTP.
    """

    id: str
    start: Callable[..., Coroutine[Any, Any, object]]
    args: tuple[object, ...]
    restart: Restart
    budget: Budget | None
    shutdown: float | None

    def __init__(
        self,
        id: str,
        start: Callable[..., Coroutine[Any, Any, object]],
        args: tuple[object, ...] | list[object] = (),
        *,
        restart: Restart | str = Restart.PERMANENT,
        budget: Budget | None = None,
        shutdown: float | None = 5.0,
    ) -> None:
        if not isinstance(id, str) or not id:
            raise TypeError(f"id must be a non-empty str, not {id!r}")
        if not callable(start):
            raise TypeError(
                f"start must be an async function, not {type(start).__name__}"
            )
        if isinstance(args, list):
            args = tuple(args)
        elif not isinstance(args, tuple):
            raise TypeError(
                f"args must be a tuple (or a list), not {type(args).__name__}"
            )
        if budget is not None and not isinstance(budget, Budget):
            raise TypeError(
                f"budget must be a memlimits_async.Budget or None, "
                f"not {type(budget).__name__}"
            )
        values = {
            "id": id,
            "start": start,
            "args": args,
            "restart": _enum_value(Restart, restart, "restart"),
            "budget": budget,
            "shutdown": _grace(shutdown, "shutdown"),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)


def _random_fraction() -> float:
    return random.random()


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long to wait before a restart: exponential, capped, with jitter.

    The n-th restart of one child within the supervisor's ``period``
    (n = 0, 1, ...) waits ``min(maximum, initial * multiplier ** n)``, less
    a random fraction ``jitter * random()`` of it (``jitter=1`` is "full
    jitter").  A child that ran quietly for a whole period starts again at
    ``initial``.

    :param random: returns a float in [0, 1); inject one for tests.
    """

    initial: float = 0.1
    maximum: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5
    random: Callable[[], float] = field(
        default=_random_fraction, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        for name in ("initial", "maximum", "multiplier", "jitter"):
            seconds = _parse_timeout(getattr(self, name), name)
            object.__setattr__(self, name, seconds)
        if self.maximum < self.initial:
            raise ValueError(
                f"maximum must be >= initial ({self.initial:g} s), got {self.maximum:g}"
            )
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier:g}")
        if self.jitter > 1:
            raise ValueError(f"jitter must be between 0 and 1, got {self.jitter:g}")
        if not callable(self.random):
            raise TypeError("random must be a function returning a float in [0, 1)")

    def delay(self, restarts: int) -> float:
        """Seconds before a child's restart, after ``restarts`` recent ones."""
        try:
            grown = self.initial * self.multiplier**restarts
        except OverflowError:
            grown = self.maximum
        delay = min(self.maximum, grown)
        return delay * (1.0 - self.jitter * self.random())


class EventKind(enum.Enum):
    """What happened to a supervised child (or to the supervisor)."""

    STARTED = "started"
    """A child was started for the first time."""
    EXITED = "exited"
    """It returned (a normal exit)."""
    CRASHED = "crashed"
    """It raised ``exception``."""
    BREACHED = "breached"
    """Its budget stopped it: ``breach`` says which limit, ``usage`` what it
    had used."""
    STOPPED = "stopped"
    """The supervisor stopped it (for a restart of others, or a shutdown)."""
    RESTARTED = "restarted"
    """It was started again, after ``delay`` seconds of backoff."""
    GAVE_UP = "gave up"
    """Too many restarts: ``exception`` is the :class:`SupervisorGaveUp`."""


@dataclass(frozen=True, slots=True)
class SupervisorEvent:
    """One line of a supervisor's log; ``str(event)`` is that line."""

    kind: EventKind
    supervisor: str
    child: str | None
    """The child's id (None for ``GAVE_UP``)."""
    time: float
    """The event loop's clock (``anyio.current_time()``)."""
    exception: BaseException | None = None
    breach: Breach | None = None
    usage: Usage | None = None
    """The child's usage when it ended (exits only)."""
    delay: float | None = None
    """Backoff waited before a restart (``RESTARTED``)."""

    def __str__(self) -> str:
        who = f"{self.supervisor}: {self.child}"
        kind = self.kind
        if kind is EventKind.CRASHED:
            return f"{who} crashed: {self.exception!r}"
        if kind is EventKind.BREACHED and self.breach is not None:
            return f"{who} breached {self.breach.kind.name}: {self.breach.reason}"
        if kind is EventKind.RESTARTED and self.delay:
            return f"{who} restarted after {self.delay:.3g} s"
        if kind is EventKind.GAVE_UP and isinstance(self.exception, SupervisorGaveUp):
            error = self.exception
            return (
                f"{self.supervisor}: gave up after {len(error.history)} exits "
                f"within {error.period:g} s (max_restarts={error.max_restarts})"
            )
        return f"{who} {kind.value}"


class SupervisorGaveUp(Exception):
    """A supervisor needed more than ``max_restarts`` restarts within
    ``period`` seconds; it stopped its children and gave up.

    ``history`` holds the exits that asked for those restarts, oldest
    first, the last one included; the exception of the last crash, if it was
    one, is the ``__cause__``.
    """

    def __init__(
        self,
        supervisor: str,
        max_restarts: int,
        period: float,
        history: tuple[SupervisorEvent, ...],
    ) -> None:
        exits = "; ".join(str(event) for event in history)
        super().__init__(
            f"supervisor {supervisor!r} gave up: {len(history)} exits asked for a "
            f"restart within {period:g} s, more than max_restarts={max_restarts} "
            f"({exits})"
        )
        self.supervisor = supervisor
        self.max_restarts = max_restarts
        self.period = period
        self.history = history

    def __reduce__(self) -> tuple[object, ...]:
        # As ChildCancelled's: args hold only the message.
        return (
            self.__class__,
            (self.supervisor, self.max_restarts, self.period, self.history),
            self.__dict__,
        )


class _Run:
    """One start of a child: its handle and how it was asked to stop."""

    __slots__ = ("exception", "handle", "killed", "slot", "stop_token", "stopping")

    handle: ChildHandle[None]

    def __init__(self, slot: _Slot) -> None:
        self.slot = slot
        self.exception: BaseException | None = None  # what it raised
        self.stop_token: CancelToken | None = None  # made by trap_shutdown()
        self.stopping = False  # the supervisor is stopping it
        self.killed = False  # ... and did not wait (any longer)

    def trap(self) -> CancelToken:
        if self.stop_token is None:
            self.stop_token = CancelToken()
        return self.stop_token


class _Slot:
    """A spec in its supervisor: its current run and recent restart times."""

    __slots__ = ("restarts", "run", "spec")

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.run: _Run | None = None
        self.restarts: collections.deque[float] = collections.deque()


_current_run: contextvars.ContextVar[_Run | None] = contextvars.ContextVar(
    "memlimits_async.supervised_run", default=None
)


def trap_shutdown() -> CancelToken:
    """Ask for a graceful stop: called in a supervised child (or a task it
    started), returns the token its supervisor cancels when it stops this
    run of the child, ``shutdown`` seconds before cancelling it.

    Without this call a child is cancelled at once, as an OTP process that
    does not trap exits is killed by the shutdown signal.  Each restart is a
    new run with a new token.

    :raises RuntimeError: outside a child run by a :class:`Supervisor`
    """
    run = _current_run.get()
    if run is None:
        raise RuntimeError("trap_shutdown() is for children run by a Supervisor")
    return run.trap()


async def _run_supervised(run: _Run) -> None:
    """The body of a supervised child, inside its budget's scope."""
    _current_run.set(run)
    spec = run.slot.spec
    try:
        await spec.start(*spec.args)
    except Exception as exc:
        run.exception = exc  # a crash: the supervisor's to handle, not the group's
    except BaseException as exc:
        if not isinstance(exc, (anyio.get_cancelled_exc_class(), Preempted)):
            run.exception = exc  # fatal (KeyboardInterrupt...): it goes on up
        raise


class Supervisor:
    """Runs children and restarts them, as an Erlang/OTP supervisor.

    :param children: the :class:`ChildSpec` list, in start order; ids unique.
    :param strategy: ``"one_for_one"`` (default), ``"one_for_all"`` or
        ``"rest_for_one"`` (:class:`Strategy`).
    :param max_restarts: restarts allowed within ``period`` seconds; one
        more and the supervisor gives up (:class:`SupervisorGaveUp`).  OTP's
        defaults: 1 within 5 s.
    :param period: seconds (> 0).
    :param backoff: a :class:`Backoff` before each restart, or None (the
        default) to restart at once, as OTP does.
    :param on_event: called with each :class:`SupervisorEvent`, in the
        supervisor's task (an exception it raises is reported with
        ``sys.unraisablehook`` and ignored).
    :param name: the supervisor's name, in events and errors.

    ``await supervisor.run()`` runs it until every child has ended for good
    (temporary or transient children that are done), or until it is
    cancelled, which stops the children gracefully in reverse start order.
    Give it to a task group with ``await tg.start(supervisor.run)`` to go on
    once every child is started, or to another supervisor with
    :meth:`child_spec`.
    """

    def __init__(
        self,
        children: Iterable[ChildSpec],
        *,
        strategy: Strategy | str = Strategy.ONE_FOR_ONE,
        max_restarts: int = 1,
        period: float = 5.0,
        backoff: Backoff | None = None,
        on_event: Callable[[SupervisorEvent], object] | None = None,
        name: str = "supervisor",
    ) -> None:
        if isinstance(children, ChildSpec) or not isinstance(children, Iterable):
            raise TypeError("children must be an iterable of ChildSpec")
        specs = tuple(children)
        seen: set[str] = set()
        for spec in specs:
            if not isinstance(spec, ChildSpec):
                raise TypeError(
                    f"children must be ChildSpec objects, not {type(spec).__name__}"
                )
            if spec.id in seen:
                raise ValueError(f"children have two specs with id {spec.id!r}")
            seen.add(spec.id)
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int):
            raise TypeError(
                f"max_restarts must be an int, not {type(max_restarts).__name__}"
            )
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
        period = _parse_timeout(period, "period")
        if not 0 < period < float("inf"):
            raise ValueError(f"period must be a finite number > 0, got {period:g}")
        if backoff is not None and not isinstance(backoff, Backoff):
            raise TypeError(f"backoff must be a Backoff or None, not {backoff!r}")
        if on_event is not None and not callable(on_event):
            raise TypeError("on_event must be callable or None")
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, not {type(name).__name__}")
        self.name = name
        self.strategy: Strategy = _enum_value(Strategy, strategy, "strategy")
        self.max_restarts = max_restarts
        self.period = period
        self.backoff = backoff
        self._specs = specs
        self._on_event = on_event
        self._active = False
        self._slots: list[_Slot] = []
        self._exits: collections.deque[_Run] = collections.deque()
        self._restart_times: collections.deque[tuple[float, SupervisorEvent]] = (
            collections.deque()
        )

    @property
    def specs(self) -> tuple[ChildSpec, ...]:
        return self._specs

    def child_spec(
        self,
        id: str | None = None,
        *,
        restart: Restart | str = Restart.PERMANENT,
        budget: Budget | None = None,
        shutdown: float | None = None,
    ) -> ChildSpec:
        """A spec that runs this supervisor as a child of another one (its
        id defaults to this supervisor's name; it waits for this one's
        children to stop on shutdown, as OTP's ``infinity``)."""
        return ChildSpec(
            id=self.name if id is None else id,
            start=self.run,
            restart=restart,
            budget=budget,
            shutdown=shutdown,
        )

    def children(self) -> list[ChildInfo]:
        """A snapshot of the running children, in start order, with usage."""
        return [
            ChildInfo(slot.spec.id, run.handle.usage, run.handle.breach)
            for slot in self._slots
            if (run := slot.run) is not None and not _finished(run.handle)
        ]

    # ---- running ----

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Start the children and supervise them (see the class)."""
        if self._active:
            raise RuntimeError(f"supervisor {self.name!r} is already running")
        self._active = True
        self._slots = [_Slot(spec) for spec in self._specs]
        self._exits.clear()
        self._restart_times.clear()
        self._wakeup = anyio.Event()
        self._release = anyio.Event()
        parent_run = _current_run.get()  # we are a child of a supervisor
        stop_token = parent_run.trap() if parent_run is not None else None
        gave_up: SupervisorGaveUp | None = None
        try:
            async with anyio.create_task_group() as keeper:
                group = await keeper.start(self._hold_children)
                try:
                    with limit_scope(token=stop_token):  # the parent's request
                        await self._supervise(group, task_status)
                except SupervisorGaveUp as exc:
                    gave_up = exc
                finally:
                    # Stopped by a budget or killed: no time for courtesy.
                    graceful = not is_interrupted() and not (
                        parent_run is not None and parent_run.killed
                    )
                    try:
                        with anyio.CancelScope(shield=True):
                            await self._stop_all(graceful)
                    finally:
                        self._release.set()
            if gave_up is not None:
                raise gave_up
        finally:
            self._active = False

    async def _hold_children(
        self, *, task_status: anyio.abc.TaskStatus[BudgetedTaskGroup]
    ) -> None:
        """The children's group, out of reach of the supervisor's cancellation
        (see the module's invariants), until the supervisor releases it."""
        with anyio.CancelScope(shield=True):
            async with BudgetedTaskGroup() as group:
                task_status.started(group)
                await self._release.wait()

    async def _supervise(
        self, group: BudgetedTaskGroup, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        for slot in self._slots:
            self._start(slot, group, EventKind.STARTED, None)
        task_status.started()
        while any(slot.run is not None for slot in self._slots):
            run = await self._next_exit()
            slot = run.slot
            if slot.run is not run:
                continue  # stale: stopped by the supervisor, reported then
            slot.run = None
            event = self._exit_event(run)
            self._emit(event)
            if not self._restarts(slot.spec.restart, event):
                if slot.spec.restart is Restart.TEMPORARY:
                    self._slots.remove(slot)
                continue
            self._count_restart(event)
            await self._restart(slot, group)

    @staticmethod
    def _restarts(restart: Restart, ended: SupervisorEvent) -> bool:
        """OTP's ``do_restart``: does this exit restart the child?"""
        if ended.exception is not None and not isinstance(ended.exception, Exception):
            return False  # fatal: it is on its way up through everything
        if restart is Restart.PERMANENT:
            return True
        if restart is Restart.TEMPORARY:
            return False
        if ended.kind is EventKind.BREACHED:
            return True
        # A nested supervisor that gave up exits as OTP's `shutdown`.
        return ended.kind is EventKind.CRASHED and not isinstance(
            ended.exception, SupervisorGaveUp
        )

    def _count_restart(self, ended: SupervisorEvent) -> None:
        """OTP's ``add_restart``: give up past the intensity."""
        now = ended.time
        history = self._restart_times
        while history and history[0][0] < now - self.period:
            history.popleft()
        history.append((now, ended))
        if len(history) <= self.max_restarts:
            return
        error = SupervisorGaveUp(
            self.name, self.max_restarts, self.period, tuple(e for _, e in history)
        )
        self._emit(SupervisorEvent(EventKind.GAVE_UP, self.name, None, now, error))
        raise error from ended.exception

    async def _restart(self, failed: _Slot, group: BudgetedTaskGroup) -> None:
        """OTP's ``restart/3`` for the strategy, then the backoff, then the
        starts."""
        if self.strategy is Strategy.ONE_FOR_ONE:
            affected = [failed]
        elif self.strategy is Strategy.ONE_FOR_ALL:
            affected = list(self._slots)
        else:
            affected = self._slots[self._slots.index(failed) :]
        reason = f"supervisor {self.name!r} restarts {failed.spec.id!r}"
        for slot in reversed(affected):
            if slot.run is not None:
                await self._stop(slot, reason, graceful=True)
                if slot.spec.restart is Restart.TEMPORARY:
                    self._slots.remove(slot)  # stopped for good, as in OTP
        delay = self._backoff_delay(failed)
        if delay > 0:
            await anyio.sleep(delay)
        for slot in affected:
            if slot in self._slots:
                self._start(slot, group, EventKind.RESTARTED, delay)

    def _backoff_delay(self, slot: _Slot) -> float:
        now = anyio.current_time()
        recent = slot.restarts
        while recent and recent[0] < now - self.period:
            recent.popleft()
        restarts = len(recent)
        recent.append(now)
        return 0.0 if self.backoff is None else self.backoff.delay(restarts)

    def _start(
        self,
        slot: _Slot,
        group: BudgetedTaskGroup,
        kind: EventKind,
        delay: float | None,
    ) -> None:
        run = _Run(slot)
        run.handle = group._spawn(
            _run_supervised(run),
            _child_scope(slot.spec.budget),
            slot.spec.id,
            functools.partial(self._child_done, run),
        )
        slot.run = run
        self._emit(
            SupervisorEvent(
                kind, self.name, slot.spec.id, anyio.current_time(), delay=delay
            )
        )

    def _child_done(self, run: _Run, _handle: ChildHandle[Any]) -> None:
        """In the child's task, as it ends: queue the exit for the loop."""
        self._exits.append(run)
        self._wakeup.set()

    async def _next_exit(self) -> _Run:
        while not self._exits:
            self._wakeup = anyio.Event()
            await self._wakeup.wait()
        return self._exits.popleft()

    # ---- stopping ----

    async def _stop(self, slot: _Slot, reason: str, graceful: bool) -> None:
        """OTP's ``shutdown/2``: ask (if it traps), wait the grace, cancel."""
        run = slot.run
        assert run is not None
        handle = run.handle
        run.stopping = True
        if not _finished(handle):
            grace = slot.spec.shutdown
            if graceful and run.stop_token is not None and grace != 0:
                run.stop_token.cancel(reason)
                with anyio.move_on_after(grace):
                    await handle.wait()
            if not _finished(handle):
                run.killed = True
                handle.cancel(reason)
                await handle.wait()
        slot.run = None
        self._emit(self._exit_event(run))

    async def _stop_all(self, graceful: bool) -> None:
        """OTP's ``terminate/2``: every running child, newest first."""
        reason = f"supervisor {self.name!r} is shutting down"
        for slot in reversed(self._slots):
            if slot.run is not None:
                await self._stop(slot, reason, graceful)

    # ---- events ----

    def _exit_event(self, run: _Run) -> SupervisorEvent:
        handle = run.handle
        kind = EventKind.EXITED
        if handle.status is ChildStatus.BREACHED:
            kind = EventKind.BREACHED
        elif run.exception is not None:
            kind = EventKind.CRASHED
        elif run.stopping or handle.status is ChildStatus.CANCELLED:
            kind = EventKind.STOPPED
        return SupervisorEvent(
            kind,
            self.name,
            run.slot.spec.id,
            anyio.current_time(),
            exception=run.exception,
            breach=handle.breach,
            usage=handle.usage,
        )

    def _emit(self, event: SupervisorEvent) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception as exc:
            report_unraisable(exc, "Exception in a supervisor's on_event", event)

    def __repr__(self) -> str:
        state = "running" if self._active else "idle"
        return (
            f"<Supervisor {self.name!r} {self.strategy.value} ({state}, "
            f"{len(self._specs)} specs)>"
        )
