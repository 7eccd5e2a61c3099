"""Budgeted task groups: anyio task groups whose children have budgets.

``create_task_group(memory="1 GiB")`` is an ``anyio.create_task_group()``
inside a ``limit_scope``: the whole tree shares the group's budget, because
every child copies the context that holds the group's account.  A child
started with ``budget=Budget(...)`` also runs inside a scope of its own, so
that breaking its own budget stops that child alone::

    LimitScope (the group's budget)          entered by the host task
      anyio task group
        child task: anyio's task handle runs it in a cancel scope
          _run_child
            LimitScope (the child's budget)  cancels through that cancel scope
              the child's coroutine

Invariants:

* A child's account is a child of the group's account, whichever task
  spawned it: a sibling that calls ``start_soon`` lends the new task its own
  context, in which *its* scope is current, so ``_run_child`` makes the
  group's account current again before the child's scope opens.
* A child's own breach never leaves its task: its scope absorbs the
  cancellation, the handle records it, and the group goes on.  Every other
  outcome reaches the group exactly as in anyio (exceptions are grouped,
  cancellations are cancellations).
* ``_running`` holds the handles of the children spawned and not finished,
  in spawn order: a handle is added before its task is spawned and removed
  by ``_finish``, its task's last act.
* A child's scope enters no cancel scope of its own when anyio gave its task
  one (``LimitScope._adopt``): its breach and ``handle.cancel()`` cancel
  that, so the cancellation leaves ``_run_child`` (which records it) and
  anyio's task handle absorbs it.  Children started with ``start()``, whose
  anyio handle comes too late, enter their own.

Every child gets a scope, with a budget or not, so that every handle and
``children()`` can report usage; a scope without limits costs an account and
no sampling-rate change.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Coroutine, Generator, Iterable
from types import CoroutineType, TracebackType
from typing import (
    Any,
    Final,
    Generic,
    Literal,
    NamedTuple,
    TypeVar,
    TypeVarTuple,
    Unpack,
    overload,
)

import anyio
import anyio.abc
import anyio.lowlevel

from ._accounts import Account, Breach, Usage, current_account
from ._budget import Budget
from ._delivery import report_unraisable
from ._exceptions import Preempted, exception_for
from ._scope import LimitScope
from ._tokens import CancelToken

__all__ = [
    "BudgetedTaskGroup",
    "ChildCancelled",
    "ChildHandle",
    "ChildInfo",
    "ChildStatus",
    "create_task_group",
]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
PosArgsT = TypeVarTuple("PosArgsT")


class ChildStatus(enum.Enum):
    """Where a child of a budgeted task group is (anyio's task statuses,
    plus ``BREACHED``)."""

    PENDING = "pending"
    """Spawned and not finished."""
    CANCELLING = "cancelling"
    """Not finished, but cancelled (``cancel()``) or stopped by its budget."""
    FINISHED = "finished"
    """Returned a value."""
    FAILED = "failed"
    """Raised an exception (which also reached the group)."""
    CANCELLED = "cancelled"
    """Stopped by ``handle.cancel()`` or by a cancellation of the group."""
    BREACHED = "breached"
    """Stopped by its own budget (``breach`` says which limit)."""


# Bound once: the finishing path runs for every child.
_FINISHED: Final = ChildStatus.FINISHED
_FAILED: Final = ChildStatus.FAILED
_CANCELLED: Final = ChildStatus.CANCELLED
_BREACHED: Final = ChildStatus.BREACHED


class ChildCancelled(Exception):
    """Raised by ``await handle`` for a child that was cancelled."""

    def __init__(self, name: str, reason: str | None) -> None:
        because = "" if reason is None else f": {reason}"
        super().__init__(f"child {name!r} was cancelled{because}")
        self.name = name
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        # BaseException's rebuilds it from args (the message alone), which
        # its __init__ refuses: pickled across processes, it failed to load.
        return (self.__class__, (self.name, self.reason), self.__dict__)


class ChildInfo(NamedTuple):
    """One running child in a ``children()`` snapshot."""

    name: str
    usage: Usage
    """Bytes charged to the child's scope so far (estimates)."""
    breach: Breach | None
    """Its budget's breach, set from delivery until the child has unwound."""


class ChildHandle(Generic[T_co]):
    """A child of a :class:`BudgetedTaskGroup`, like ``anyio.TaskHandle``.

    ``await handle`` returns the child's return value, or raises: the
    child's own exception (``FAILED``), the :class:`LimitReached` subclass of
    its breach (``BREACHED``, also when the child swallowed the cancellation
    and returned: the scope's result contract), or :class:`ChildCancelled`.
    """

    # Slots left unset until needed cost no time on the spawn path:
    # _result (set on return), _exception (on failure), _start_value (by
    # start()), _cancel_reason (by cancel()).
    __slots__ = (
        "_cancel_reason",
        "_exception",
        "_finished",
        "_name",
        "_on_done",
        "_result",
        "_scope",
        "_start_value",
        "_status",
    )

    _result: T_co
    _exception: BaseException
    _start_value: object
    _cancel_reason: str | None

    def __init__(
        self,
        name: str,
        scope: LimitScope,
        on_done: Callable[[ChildHandle[Any]], object] | None,
    ) -> None:
        self._name = name
        self._scope = scope
        self._on_done = on_done
        self._status: ChildStatus | None = None  # None until finished
        self._finished: anyio.Event | None = None  # made by the first waiter

    # ---- what the child's task does ----

    def _finish(
        self,
        exc: BaseException | None,
        returned: bool,
        running: dict[ChildHandle[Any], None],
    ) -> None:
        """The child's last act, in its own task, after its scope exited."""
        breach = self._scope.breach
        if exc is None:
            if breach is not None:
                status = _BREACHED  # even if it returned: the result contract
            else:
                status = _FINISHED if returned else _CANCELLED
        elif isinstance(exc, (anyio.get_cancelled_exc_class(), Preempted)):
            # Stopped from outside (the group, an enclosing scope); if its
            # own budget fired too, that is what stopped its work.
            status = _CANCELLED if breach is None else _BREACHED
        else:
            self._exception = exc
            status = _FAILED
        self._status = status
        del running[self]
        if self._finished is not None:
            self._finished.set()
        if self._on_done is not None:
            try:
                self._on_done(self)
            except Exception as error:
                report_unraisable(error, "Exception in a child's done callback", self)

    # ---- what the user sees ----

    @property
    def name(self) -> str:
        return self._name

    @property
    def status(self) -> ChildStatus:
        if self._status is not None:
            return self._status
        if self._scope.cancel_called:
            return ChildStatus.CANCELLING
        return ChildStatus.PENDING

    @property
    def breach(self) -> Breach | None:
        """What stopped the child's own budget, or None (read live while it
        runs, like ``LimitScope.breach``)."""
        return self._scope.breach

    @property
    def usage(self) -> Usage:
        """Bytes charged to the child's scope: live while it runs, at its
        exit afterwards (zero before its task first ran)."""
        return self._scope.usage

    @property
    def start_value(self) -> object:
        """The value the child passed to ``task_status.started()``.

        :raises RuntimeError: if the child was not started with ``start()``
        """
        try:
            return self._start_value
        except AttributeError:
            raise RuntimeError(
                f"child {self._name!r} was not started with start()"
            ) from None

    def cancel(self, reason: str | None = None) -> None:
        """Cancel this child alone (its scope; not a breach).  Does nothing
        once it has finished.  Call it from the group's event-loop thread."""
        if self._status is None:
            self._scope.cancel(reason)  # checks the reason's type
            self._cancel_reason = reason

    async def wait(self) -> None:
        """Wait until the child has finished, however it finished."""
        if self._status is not None:
            await anyio.lowlevel.checkpoint()
            return
        if self._finished is None:
            self._finished = anyio.Event()
        await self._finished.wait()

    def __await__(self) -> Generator[Any, Any, T_co]:
        yield from self.wait().__await__()
        return self._outcome()

    def _outcome(self) -> T_co:
        status = self._status
        if status is _FINISHED:
            return self._result
        if status is _FAILED:
            raise self._exception
        breach = self._scope.breach
        if breach is not None:  # _BREACHED
            raise exception_for(breach)
        raise ChildCancelled(self._name, getattr(self, "_cancel_reason", None))

    def __repr__(self) -> str:
        return f"<ChildHandle {self.status.value} name={self._name!r}>"


async def _run_child(
    handle: ChildHandle[T], coro: Coroutine[Any, Any, T], group: BudgetedTaskGroup
) -> None:
    """The body of every child's task: its scope around its coroutine.

    Written for the memory of a parked child: the scope is entered and left
    by hand, because a ``with`` statement keeps its bound ``__exit__`` alive
    for as long as the body runs (64 bytes a child).
    """
    if current_account.get(None) is not group._account:
        current_account.set(group._account)  # see the module's invariants
    scope = handle._scope
    returned = False
    try:
        scope.__enter__()
        try:
            handle._result = await coro
            returned = True
        except BaseException as exc:
            if not scope.__exit__(type(exc), exc, exc.__traceback__):
                raise
        else:
            scope.__exit__(None, None, None)
    except BaseException as exc:  # what left the scope (or its entry failed)
        coro.close()  # a no-op once it ran; an unstarted one must not warn
        handle._finish(exc, returned, group._running)
        raise
    handle._finish(None, returned, group._running)


class _StartStatus:
    """Passes ``started()`` on to anyio's task status, remembering it."""

    __slots__ = ("called", "inner")

    def __init__(self, inner: anyio.abc.TaskStatus[Any]) -> None:
        self.inner = inner
        self.called = False

    def started(self, value: object = None) -> None:
        self.inner.started(value)
        self.called = True


async def _start_child(
    handle: ChildHandle[Any],
    func: Callable[..., Coroutine[Any, Any, Any]],
    args: tuple[object, ...],
    group: BudgetedTaskGroup,
    *,
    task_status: anyio.abc.TaskStatus[Any],
) -> None:
    status = _StartStatus(task_status)
    coro = _checked_coroutine(func(*args, task_status=status), func)
    group._running[handle] = None
    await _run_child(handle, coro, group)
    breach = handle._scope.breach
    if not status.called and handle._status is _BREACHED and breach is not None:
        # Stopped by its budget while starting: say so to start()'s caller
        # (anyio would say "Child exited without calling task_status.started()").
        raise exception_for(breach)


def _child_scope(budget: Budget | None) -> LimitScope:
    """A fresh scope for one start of a child; checks ``budget``."""
    if budget is None:
        return LimitScope()
    return LimitScope(budget=budget)


def _checked_coroutine(
    coro: object, func: Callable[..., object]
) -> Coroutine[Any, Any, Any]:
    if coro.__class__ is CoroutineType or isinstance(coro, Coroutine):
        return coro
    raise TypeError(
        f"{_callable_name(func)}() must return a coroutine (an async def "
        f"function), returned {type(coro).__name__}"
    )


def _callable_name(func: Callable[..., object]) -> str:
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    return ".".join([part for part in (module, qualname) if part]) or repr(func)


def _coroutine_name(coro: Coroutine[Any, Any, Any]) -> str:
    frame = getattr(coro, "cr_frame", None)
    module = frame.f_globals.get("__name__") if frame is not None else None
    qualname = getattr(coro, "__qualname__", None)
    return ".".join([part for part in (module, qualname) if part]) or repr(coro)


class BudgetedTaskGroup:
    """An anyio task group inside a budget, whose children may have their own.

    Open it with ``async with create_task_group(...) as group`` (the same
    class, as with ``limit_scope``).  The arguments are the group's budget,
    shared by the whole tree (the host's body and every child), as in
    ``limit_scope``.  A breach of the group's budget cancels the group; it
    then exits normally and ``group.breach`` says what fired.

    Children are started with anyio's shapes plus ``budget=``, and each gets a
    :class:`ChildHandle`.  A child that breaks its own budget is stopped
    alone: its handle reports the breach, its siblings and the group go on.
    Exceptions of children propagate as in anyio (an exception group).
    """

    def __init__(
        self,
        *,
        memory: int | str | None = None,
        allocations: int | str | None = None,
        timeout: float | None = None,
        token: CancelToken | Iterable[CancelToken] | None = None,
        budget: Budget | None = None,
    ) -> None:
        self._scope = LimitScope(
            memory=memory,
            allocations=allocations,
            timeout=timeout,
            token=token,
            budget=budget,
        )
        self._task_group: anyio.abc.TaskGroup | None = None
        self._active = False
        self._account: Account | None = None
        self._running: dict[ChildHandle[Any], None] = {}

    async def __aenter__(self) -> BudgetedTaskGroup:
        if self._task_group is not None:
            raise RuntimeError("a budgeted task group can only be entered once")
        task_group = anyio.create_task_group()
        self._scope.__enter__()
        try:
            self._account = current_account.get(None)
            await task_group.__aenter__()
        except BaseException as exc:
            self._scope.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._task_group = task_group
        self._active = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        task_group = self._task_group
        assert task_group is not None, "__aexit__ without __aenter__"
        try:
            suppressed = await task_group.__aexit__(exc_type, exc, tb)
        except BaseException as raised:
            self._active = False
            if self._scope.__exit__(type(raised), raised, raised.__traceback__):
                return True
            raise
        self._active = False
        if suppressed:  # the task group swallowed the body's exception
            self._scope.__exit__(None, None, None)
            return True
        return self._scope.__exit__(exc_type, exc, tb)

    # ---- starting children ----

    def start_soon(
        self,
        func: Callable[[Unpack[PosArgsT]], Coroutine[Any, Any, T]],
        *args: *PosArgsT,
        name: object = None,
        budget: Budget | None = None,
    ) -> ChildHandle[T]:
        """Start ``func(*args)`` in a new child task, in a scope with
        ``budget`` (or without limits), and return its handle."""
        scope = _child_scope(budget)
        coro = _checked_coroutine(func(*args), func)
        return self._spawn(
            coro, scope, _callable_name(func) if name is None else str(name), None
        )

    def create_task(
        self,
        coro: Coroutine[Any, Any, T],
        *,
        name: object = None,
        budget: Budget | None = None,
    ) -> ChildHandle[T]:
        """Start a coroutine object in a new child task (anyio's
        ``TaskGroup.create_task``), in a scope with ``budget``."""
        if not isinstance(coro, Coroutine):
            raise TypeError(f"expected a coroutine, got {type(coro).__name__}")
        try:
            scope = _child_scope(budget)
        except BaseException:
            coro.close()
            raise
        return self._spawn(
            coro, scope, _coroutine_name(coro) if name is None else str(name), None
        )

    @overload
    async def start(
        self,
        func: Callable[..., Coroutine[Any, Any, Any]],
        *args: object,
        name: object = None,
        budget: Budget | None = None,
        return_handle: Literal[False] = False,
    ) -> Any: ...

    @overload
    async def start(
        self,
        func: Callable[..., Coroutine[Any, Any, T]],
        *args: object,
        name: object = None,
        budget: Budget | None = None,
        return_handle: Literal[True],
    ) -> ChildHandle[T]: ...

    async def start(
        self,
        func: Callable[..., Coroutine[Any, Any, Any]],
        *args: object,
        name: object = None,
        budget: Budget | None = None,
        return_handle: bool = False,
    ) -> Any:
        """Start ``func(*args, task_status=...)`` and wait until it calls
        ``task_status.started(value)``; return the value (or, with
        ``return_handle=True``, the handle, whose ``start_value`` is it).

        The child's budget covers its start-up too: if it breaks it before
        calling ``started()``, this raises the breach's
        :class:`LimitReached` subclass.
        """
        scope = _child_scope(budget)
        task_group = self._require_active()
        child_name = _callable_name(func) if name is None else str(name)
        handle: ChildHandle[Any] = ChildHandle(child_name, scope, None)
        value = await task_group.start(
            _start_child,
            handle,
            func,
            args,
            self,
            name=child_name,
        )
        handle._start_value = value
        return handle if return_handle else value

    def _spawn(
        self,
        coro: Coroutine[Any, Any, T],
        scope: LimitScope,
        name: str,
        on_done: Callable[[ChildHandle[Any]], object] | None,
    ) -> ChildHandle[T]:
        """Start ``coro`` in ``scope`` in a new child task; ``on_done(handle)``
        runs in that task when it finishes (for the supervisor)."""
        try:
            task_group = self._require_active()
        except RuntimeError:
            coro.close()
            raise
        handle: ChildHandle[T] = ChildHandle(name, scope, on_done)
        self._running[handle] = None
        try:
            task = task_group.start_soon(_run_child, handle, coro, self, name=name)
        except BaseException:
            self._running.pop(handle, None)
            coro.close()
            raise
        # anyio (4.14 and later) runs each task in a cancel scope of its own,
        # just around _run_child: the child's scope cancels through it rather
        # than entering a second one.  Not with an anyio that returns no
        # handle, nor for a child already running (anyio starts none eagerly).
        scope._adopt(getattr(task, "_cancel_scope", None))
        return handle

    def _require_active(self) -> anyio.abc.TaskGroup:
        if not self._active or self._task_group is None:
            raise RuntimeError(
                "this task group is not active; no new children can be started"
            )
        return self._task_group

    # ---- the group as a whole ----

    @property
    def cancel_scope(self) -> anyio.CancelScope:
        """The anyio task group's cancel scope."""
        if self._task_group is None:
            raise RuntimeError("the task group has not been entered yet")
        return self._task_group.cancel_scope

    def cancel(self, reason: str | None = None) -> None:
        """Cancel the group and every child (not a breach), like anyio's
        ``TaskGroup.cancel``."""
        self.cancel_scope.cancel(reason)

    @property
    def breach(self) -> Breach | None:
        """What stopped the group's budget, or None."""
        return self._scope.breach

    @property
    def usage(self) -> Usage:
        """Bytes charged to the group's budget (the host's body and every
        child), live while it runs, at its exit afterwards."""
        return self._scope.usage

    def children(self) -> list[ChildInfo]:
        """A snapshot of the children not finished yet, in start order, with
        their usage: one C call per child, meant for dashboards polling many
        children (see benchmarks/groups.py)."""
        return [
            ChildInfo(handle._name, handle._scope.usage, handle._scope.breach)
            for handle in self._running
        ]

    def __repr__(self) -> str:
        state = "active" if self._active else "inactive"
        return f"<BudgetedTaskGroup {state}, {len(self._running)} children running>"


create_task_group = BudgetedTaskGroup
"""``create_task_group(...)`` opens a :class:`BudgetedTaskGroup` (the name
reads like ``anyio.create_task_group``; it is the class itself, as
``limit_scope`` is :class:`LimitScope`)."""
