"""LimitScope: a cancel scope whose deadline is a budget of bytes.

``limit_scope(memory="50 MiB")`` is to live bytes what
``anyio.move_on_after(5)`` is to time: when the bytes held by the scope's
tasks pass the limit, the scope is cancelled (at the task's next checkpoint,
through an anyio cancel scope, trio's own on trio, so level-triggered
re-delivery, shields and nesting behave as anyio and trio users expect), and
the scope then reports what happened.

Result contract (from memprof-limits):

* ``breached`` is True iff *this* scope's own limit or timeout fired; it stays
  True when the body swallowed the cancellation and returned normally;
* the cancellation caused by a breach never leaves the scope; with
  ``raise_on_breach=True`` the scope raises a :class:`LimitReached` subclass
  on exit instead;
* any other exception leaves the scope unchanged, breach or not.

Outside an event-loop task (a script, a worker thread) the scope meters and
reports but cannot interrupt: a breach is reported at exit.

This module knows nothing of C: it talks to ``_accounts`` (what is charged)
and ``_delivery`` (how a breach reaches this task's loop).
"""

from __future__ import annotations

import inspect
import math
import sys
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType, TracebackType
from typing import Final

import anyio

from ._accounts import (
    Account,
    Breach,
    BreachKind,
    Usage,
    breach_from,
    usage_from,
)
from ._budget import Budget, budget_arguments
from ._delivery import (
    CancelScopeLike,
    LoopHandle,
    current_loop_handle,
    retry_later,
    start_delivery,
)
from ._exceptions import LimitReached, Preempted, exception_for
from ._masking import protected_code_waits, shielded_accounts
from ._preempt import (
    PreemptRequest,
    default_grace,
    parse_preempt,
    unwatch_deadline,
    watch_deadline,
)
from ._sites import Snapshot, account_snapshot
from ._tokens import CancelToken
from ._units import parse_size

__all__ = ["LimitScope", "limit_scope"]


# Plain module constants, not an Enum: enum member lookups allocate on
# Python 3.11 (EnumType.__getattr__), and the exit path runs while nothing
# but the body may be charged to the scope.
_NEW: Final = "new"
_ACTIVE: Final = "active"
_EXITED: Final = "exited"


def _parse_timeout(
    timeout: object, name: str = "timeout", negative: bool = False
) -> float:
    """Seconds, as a float.  ``negative``: a timeout or deadline offset, where
    a negative value means "already expired" (as ``asyncio.timeout(-1)`` and
    ``anyio.move_on_after(-1)``), rather than a period, which cannot be."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(
            f"{name} must be a number of seconds or None, not {type(timeout).__name__}"
        )
    if timeout != timeout:  # NaN
        if negative:
            raise ValueError(f"{name} must be a number of seconds, got {timeout!r}")
        raise ValueError(f"{name} must be >= 0 seconds, got {timeout!r}")
    if timeout < 0 and not negative:
        raise ValueError(f"{name} must be >= 0 seconds, got {timeout!r}")
    try:
        return float(timeout)
    except OverflowError:  # an int beyond the largest float
        raise ValueError(f"{name} is too large to be seconds: {timeout}") from None


def _parse_deadline(deadline: object, name: str = "deadline") -> float:
    """An absolute time on the scope's clock; math.inf for none."""
    if isinstance(deadline, bool) or not isinstance(deadline, int | float):
        raise TypeError(
            f"{name} must be a number (a time on the loop's clock), "
            f"not {type(deadline).__name__}"
        )
    if deadline != deadline:
        raise ValueError(f"{name} must be a time on the loop's clock, got nan")
    try:
        return float(deadline)
    except OverflowError:
        raise ValueError(f"{name} is too large to be a time: {deadline}") from None


def _parse_tokens(token: object) -> tuple[CancelToken, ...]:
    if isinstance(token, CancelToken):
        return (token,)
    if isinstance(token, Iterable) and not isinstance(token, str | bytes):
        tokens = tuple(token)
        if all(isinstance(each, CancelToken) for each in tokens):
            return tokens
    raise TypeError(
        f"token must be a CancelToken, an iterable of them, or None, "
        f"not {type(token).__name__}"
    )


def _token_breach(reason: str | None) -> Breach:
    text = "token cancelled" if reason is None else f"token cancelled: {reason}"
    return Breach(BreachKind.TOKEN, None, None, text)


def _require_bool(value: object, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, not {type(value).__name__}")


class LimitScope:
    """A scope that is cancelled when its tasks pass a budget.

    Create it with ``limit_scope(...)`` (the same class) and use it once, as
    ``async with`` or ``with``, in the task (or thread) that runs the work.
    Only that task or thread may exit it (elsewhere, also in a task started
    inside it, ``RuntimeError``).

    :param memory: live bytes the scope's tasks may hold (int, or a string
        such as ``"50 MiB"``); passing it cancels the scope (``MEMORY``).
    :param allocations: cumulative bytes the scope's tasks may allocate, a
        measure of work done; passing it cancels the scope (``ALLOCATIONS``).
    :param timeout: seconds, like ``anyio.move_on_after`` (``TIMEOUT``);
        negative: expired at entry, as ``asyncio.timeout(-1)``.
    :param deadline: instead of ``timeout``, the time it expires on the
        clock of the loop that enters it (``loop.time()``,
        ``trio.current_time()``, ``anyio.current_time()``; outside any task,
        ``time.monotonic()``).  Giving both is a TypeError.  Both can be
        moved while the body runs (:attr:`deadline`).
    :param token: a :class:`CancelToken`, or several: cancelling any of them
        cancels the scope (``TOKEN``), within one loop iteration even while
        the task is blocked in ``await``; one cancelled already cancels the
        scope at once.
    :param global_memory: take part in the process-wide limit set with
        :func:`set_global_memory_limit`: while the process is over it, a
        sample of this scope's allocations stops the scope
        (``GLOBAL_MEMORY``).
    :param shield: protect the body from cancellation by enclosing scopes
        (its own limits still apply), like ``anyio.CancelScope(shield=True)``;
        the body is an interrupt-safe region for the scopes around it.
    :param raise_on_breach: on exit after a breach, raise the matching
        :class:`LimitReached` subclass instead of returning normally.
    :param preempt: seconds a breached body may run without reaching a
        checkpoint before :class:`Preempted` is raised inside it, where that
        is safe (see docs/preemption.md); None (default) for the grace set
        with ``configure(preempt=...)`` (0.05 s unless changed), False never
        to preempt.
    :param budget: a :class:`Budget`, instead of ``memory``, ``allocations``,
        ``timeout`` and ``preempt`` (passing both is a TypeError); ``token``
        may come with it, and is watched besides the budget's tokens.

    Everything anyio's and trio's ``CancelScope`` and asyncio's ``Timeout``
    offer means the same here (``cancel()``, ``cancel_called``,
    ``cancelled_caught``, ``deadline``, ``relative_deadline``, a writable
    ``shield``, ``when()``, ``reschedule()``, ``expired()``), so porting
    code to it is a rename (docs/limit-scope.md).  Assigning any other
    attribute raises ``AttributeError``.

    Usage is charged to this scope and to every enclosing scope, so an inner
    scope can never extend an outer one.  Tasks started inside the scope
    (task groups, nurseries, ``asyncio.create_task``) are charged to it: they
    copy the context that holds its account.
    """

    # Slots, so that a misspelt or foreign attribute (``scope.deadlin``,
    # ``scope.shield_all``) raises instead of being silently kept and
    # ignored; every slot is set in __init__.  (Slots cost a scope's creation
    # a little more than class-level defaults did, and its entry and exit,
    # which read them, a little less: benchmarks/scope_cost.py.)
    __slots__ = (
        "__weakref__",
        "_account",
        "_adopted",
        "_allocations",
        "_breach",
        "_cancel_reason",
        "_cancel_requested",
        "_cancel_scope",
        "_caught",
        "_deadline",
        "_deferred",
        "_delivered",
        "_entry_frames",
        "_expired",
        "_global_memory",
        "_loop",
        "_memory",
        "_preempt",
        "_preempt_breach",
        "_preempt_request",
        "_preempted",
        "_raise_on_breach",
        "_shield",
        "_shielding",
        "_sited_breach",
        "_started_at",
        "_state",
        "_thread_id",
        "_timeout",
        "_timeout_came_first",
        "_token_unregisters",
        "_tokens",
        "_watched_deadline",
    )

    _state: str
    _account: Account | None
    _cancel_scope: CancelScopeLike | None
    _loop: LoopHandle | None
    # The deadline on the scope's clock (the loop's, or time.monotonic()
    # outside any task): given with deadline=, or set at entry from the
    # timeout; math.inf for none.
    _deadline: float
    # Seconds from entry to the deadline: given with timeout=, or (once
    # entered) the deadline in force minus the entry time.  Not None iff
    # the scope has had a deadline since it was entered, which is what its
    # entry and exit test (one comparison).
    _timeout: float | None
    _started_at: float
    _breach: Breach | None
    _cancel_requested: bool
    _cancel_reason: str | None
    _timeout_came_first: bool
    _caught: bool  # cancelled_caught
    _expired: bool  # the deadline passed while it was active (set at exit)
    _tokens: tuple[CancelToken, ...]
    _token_unregisters: tuple[Callable[[], object], ...]
    _delivered: Breach | None  # the first breach that cancelled it
    _deferred: Breach | None  # held back by interrupt-safe coroutines
    _global_memory: bool
    _preempt: object  # as given; None: the configured default
    _preempt_request: PreemptRequest | None
    _preempt_breach: Breach | None  # what the preemption is for
    _preempted: int  # times Preempted was raised in the body
    _watched_deadline: float  # monotonic, while _preempt watches it
    # Outside a task: the frames on the stack where it was entered (the
    # innermost of them still running is where its body runs).
    _entry_frames: tuple[FrameType, ...]
    _thread_id: int  # outside a task: the thread it was entered in
    _shield: bool
    _shielding: bool  # its account is in shielded_accounts (_masking)
    _raise_on_breach: bool
    # A cancel scope of the task's own, entered by its owner around the whole
    # body, that this scope cancels instead of entering one (``_adopt``).
    _adopted: anyio.CancelScope | None
    _memory: int | None
    _allocations: int | None
    # The meter's breach, with the scope's top sites as they were when it
    # was first reported (they change as the body unwinds): made once.
    _sited_breach: Breach | None

    def __init__(
        self,
        *,
        memory: int | str | None = None,
        allocations: int | str | None = None,
        timeout: float | None = None,
        deadline: float | None = None,
        token: CancelToken | Iterable[CancelToken] | None = None,
        global_memory: bool = False,
        shield: bool = False,
        raise_on_breach: bool = False,
        preempt: float | bool | None = None,
        budget: Budget | None = None,
    ) -> None:
        if budget is not None:
            memory, allocations, timeout, token, preempt = budget_arguments(
                budget, memory, allocations, timeout, token, preempt
            )
            # Checked already, by the Budget's constructor (and a token
            # beside it by budget_arguments): a server makes a scope from
            # the same budget for every request.
            self._memory = memory
            self._allocations = allocations
            self._timeout = timeout
            if token is None:
                self._tokens = ()
            elif isinstance(token, CancelToken):
                self._tokens = (token,)
            else:
                self._tokens = tuple(token)
        else:
            # The checks skip a call for the common arguments (None, bools).
            self._memory = None if memory is None else parse_size(memory, name="memory")
            self._allocations = (
                None
                if allocations is None
                else parse_size(allocations, name="allocations")
            )
            self._timeout = (
                None if timeout is None else _parse_timeout(timeout, negative=True)
            )
            self._tokens = () if token is None else _parse_tokens(token)
            if preempt is not None:
                parse_preempt(preempt)  # checked now, read when a breach comes
        self._deadline = math.inf
        if deadline is not None:
            if timeout is not None:
                raise TypeError(
                    "give timeout (seconds from entry) or deadline (a time on "
                    "the loop's clock), not both"
                )
            self._deadline = _parse_deadline(deadline)
        if shield.__class__ is not bool:
            _require_bool(shield, "shield")
        if raise_on_breach.__class__ is not bool:
            _require_bool(raise_on_breach, "raise_on_breach")
        if global_memory is not False:
            _require_bool(global_memory, "global_memory")
        self._shield = shield
        self._raise_on_breach = raise_on_breach
        self._global_memory = global_memory
        self._preempt = preempt
        self._state = _NEW
        self._account = None
        self._cancel_scope = None
        self._loop = None
        self._started_at = 0.0
        self._breach = None
        self._cancel_requested = False
        self._cancel_reason = None
        self._timeout_came_first = False
        self._caught = False
        self._expired = False
        self._token_unregisters = ()
        self._delivered = None
        self._deferred = None
        self._preempt_request = None
        self._preempt_breach = None
        self._preempted = 0
        self._watched_deadline = math.inf
        self._entry_frames = ()
        self._thread_id = 0
        self._shielding = False
        self._adopted = None
        self._sited_breach = None

    # ---- entering and leaving ----

    def _adopt(self, cancel_scope: object) -> None:
        """Cancel through ``cancel_scope`` instead of a cancel scope of its own.

        For a scope that is the whole body of a task whose owner already runs
        that body in a cancel scope of its own (a budgeted group's child, in
        anyio's task handle): one cancel scope per task instead of two, which
        is most of a scope's cost.  The owner enters and exits
        ``cancel_scope`` just around this scope's entry and exit, with
        nothing in between that a breach could wrongly cancel, and it is the
        owner's exit that absorbs the cancellation: this scope's exit lets
        it through.  Ignored (the scope keeps entering its own) once the
        scope was entered, for a shielded scope, and for anything but an
        anyio cancel scope.
        """
        if (
            self._state == _NEW
            and not self._shield
            and isinstance(cancel_scope, anyio.CancelScope)
        ):
            self._adopted = cancel_scope

    def __enter__(self) -> LimitScope:
        if self._state != _NEW:
            raise RuntimeError("a limit_scope can only be entered once")
        loop = current_loop_handle()
        if loop is None and self._cancel_requested:
            raise RuntimeError(
                "this limit_scope was cancelled before entry, but it is "
                "entered outside any event-loop task, where nothing can "
                "cancel it"
            )
        timeout = self._timeout
        if timeout is not None:
            self._started_at = loop.time() if loop is not None else time.monotonic()
            self._deadline = self._started_at + timeout
        elif self._deadline != math.inf:  # deadline= (or set before entry)
            self._started_at = loop.time() if loop is not None else time.monotonic()
            timeout = self._timeout = self._deadline - self._started_at
        cancel_scope: CancelScopeLike | None = None
        owned: CancelScopeLike | None = None  # entered here, exited on failure
        if loop is not None:
            cancel_scope = self._adopted
            if cancel_scope is None:
                if timeout is None and not self._shield:
                    cancel_scope = owned = loop.cancel_scope_type()
                else:
                    cancel_scope = owned = loop.cancel_scope_type(
                        deadline=self._deadline, shield=self._shield
                    )
                owned.__enter__()
            elif timeout is not None:
                cancel_scope.deadline = self._deadline
        try:
            if self._global_memory:
                account = Account(self._memory, self._allocations, True)
            else:
                account = Account(self._memory, self._allocations)
        except BaseException:
            if owned is not None:
                owned.__exit__(None, None, None)
            raise
        self._account = account
        self._cancel_scope = cancel_scope
        self._loop = loop
        if cancel_scope is not None and self._cancel_requested:
            cancel_scope.cancel(self._cancel_reason)
        self._state = _ACTIVE
        listener: LimitScope | None = self
        try:
            if loop is None and not self._enter_outside_a_task():
                listener = None
            if self._tokens and listener is not None:
                self._watch_tokens()
            if timeout is not None and self._grace() is not None:
                watch_deadline(self, time.monotonic() + timeout)
            if self._shield:
                # A region for the scopes around (for preemption; anyio's
                # shield does it for cancellation).
                self._set_shielding(True)
            # Last, so that only the body's allocations are charged.
            account.enter(listener)
        except BaseException:
            self._set_shielding(False)
            self._unwatch_tokens()
            unwatch_deadline(self)
            account.leave()  # closes it; nothing was made current
            self._account = self._cancel_scope = self._loop = None
            self._delivered = None
            self._state = _NEW
            if owned is not None:
                owned.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._state != _ACTIVE or self._account is None:
            raise RuntimeError("this limit_scope is not active")
        # First, so that only the body's allocations are charged.
        record = self._account.leave()
        self._state = _EXITED
        self._set_shielding(False)
        if self._preempt_request is not None:
            self._preempt_request.close()
            # It refers to this scope: kept, they would make a cycle (with
            # the account, the breach and its sites) of every preempted
            # scope, left for a full collection.
            self._preempt_request = None
        if self._timeout is not None:
            unwatch_deadline(self)
            loop = self._loop
            now = loop.time() if loop is not None else time.monotonic()
            self._expired = now >= self._deadline
        if self._entry_frames:
            self._entry_frames = ()
        breach = self._delivered
        if self._tokens:
            self._unwatch_tokens()
            if breach is None:
                breach = self._undelivered_breach(record)
        elif breach is None and record is not None:
            breach = self._meter_breach(record)
        suppressed = False
        cancel_scope = self._cancel_scope
        if cancel_scope is not None and self._adopted is None:
            try:
                suppressed = cancel_scope.__exit__(exc_type, exc, tb)
            except BaseException as left:
                # trio strips its Cancelled out of an exception group and
                # raises what is left: the breach is kept all the same.
                self._breach = self._final_breach(breach, cancel_scope, True)
                self._caught = cancel_scope.cancelled_caught
                if not self._absorbs(left):
                    raise
                suppressed = True
        if exc is not None and not suppressed and self._absorbs(exc):
            suppressed = True
        if (exc is not None or self._preempted or cancel_scope is None) and (
            self._timeout is not None or breach is None
        ):
            # A body that returned, unpreempted, in a task keeps its breach:
            # no timeout cut it (_final_breach), and it had no other.
            breach = self._final_breach(breach, cancel_scope, exc is not None)
        self._breach = breach
        if suppressed and exc is not None:
            self._caught = True
        if breach is not None and self._raise_on_breach and (exc is None or suppressed):
            if exc is None:
                raise exception_for(breach) from None
            # Chained to the cancellation, whose traceback shows where the
            # body was when the limit fired (asyncio.timeout does the same).
            raise exception_for(breach) from _detached(exc)
        if suppressed and exc is not None:
            _drop_tracebacks(exc)
        return suppressed

    def _final_breach(
        self,
        breach: Breach | None,
        cancel_scope: CancelScopeLike | None,
        body_failed: bool,
    ) -> Breach | None:
        """The breach to report, the timeout included (known only now).

        A deadline that passed while the body ran to its end without a
        checkpoint cut nothing: like anyio's ``cancelled_caught``, it is not
        reported (a task resuming after a stall finishes its step).  It is
        when the body left with an exception (the cancellation, or what it
        turned into) or was preempted."""
        if breach is None and self._preempted:
            breach = self._preempt_breach  # preempted before the loop knew
        if self._timeout is None:
            return breach
        if cancel_scope is not None:
            # Cancelled with no breach and no cancel() call: the deadline did it.
            timed_out = (
                cancel_scope.cancel_called
                and (body_failed or self._preempted > 0)
                and (
                    self._timeout_came_first
                    or (breach is None and not self._cancel_requested)
                )
            )
        else:
            timed_out = breach is None and time.monotonic() >= self._deadline
        if timed_out:
            return self._timeout_breach(self._now() - self._started_at)
        return breach

    async def __aenter__(self) -> LimitScope:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return self.__exit__(exc_type, exc, tb)

    def _now(self) -> float:
        """The clock of the scope's deadline: the loop's, or monotonic."""
        return self._loop.time() if self._loop is not None else time.monotonic()

    # ---- delivery ----

    def _on_breach(self) -> None:
        """Called by the delivery layer, on any thread, right after a breach."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._cancel_for_breach)
        record = self._account.breach() if self._account is not None else None
        if record is not None:
            self._arm(self._meter_breach(record))

    def _cancel_for_breach(self) -> None:
        """Runs on the scope's own loop thread, between task steps."""
        record = self._account.breach() if self._account is not None else None
        if record is not None:
            self._deliver(self._meter_breach(record))

    def _watch_tokens(self) -> None:
        """Cancel on any of the tokens; at once for one cancelled already."""
        tokens = self._tokens
        on_token = self._on_token
        if len(tokens) == 1:  # a request's token: one per scope, on a server
            self._token_unregisters = (tokens[0].on_cancel(on_token),)
        else:
            self._token_unregisters = tuple(
                token.on_cancel(on_token) for token in tokens
            )
        for token in tokens:
            if token.cancelled:
                self._deliver(_token_breach(token.reason))
                break

    def add_token(self, token: CancelToken) -> None:
        """Watch one more :class:`CancelToken`: cancelling it cancels the
        scope (``TOKEN``), as if it had been given with ``token=``.

        Before entry it is simply added to the scope's tokens; while the
        body runs it is watched from now on (one cancelled already cancels
        the scope at once).  For code that makes a token only when it is
        needed: a server that cancels a request's scope when its client
        goes away makes no token for the requests whose client stays.

        Call it in the thread that runs the scope (its event loop's), or, in
        another thread, before anything could cancel the token.

        :raises RuntimeError: once the scope has exited.
        """
        if not isinstance(token, CancelToken):
            raise TypeError(f"token must be a CancelToken, not {type(token).__name__}")
        if self._state == _NEW:
            self._tokens = (*self._tokens, token)
            return
        if self._state != _ACTIVE:
            raise RuntimeError("this limit_scope has exited: no token can stop it")
        self._tokens = (*self._tokens, token)
        loop = self._loop
        if loop is None and not self._entry_frames:
            return  # waits for no breach: the tokens are read at exit
        unregister = token.on_cancel(self._on_token)
        self._token_unregisters = (*self._token_unregisters, unregister)
        if self._state != _ACTIVE:
            # Exited meanwhile (from another thread), perhaps before it
            # could see the new callback: unregistered here instead.
            unregister()
            return
        if (
            token.cancelled
            and loop is not None
            and loop.thread_id == threading.get_ident()
        ):
            # At once, as at entry (elsewhere, the callback that on_cancel
            # ran already hands it to the loop).
            self._deliver(_token_breach(token.reason))

    def _unwatch_tokens(self) -> None:
        for unregister in self._token_unregisters:
            unregister()
        self._token_unregisters = ()

    def _on_token(self, reason: str | None) -> None:
        """Called in the thread (or signal handler) that cancelled a token."""
        breach = _token_breach(reason)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: self._deliver(breach))
        self._arm(breach)

    # ---- preemption (``_preempt``) ----

    def _grace(self) -> float | None:
        return (
            default_grace() if self._preempt is None else parse_preempt(self._preempt)
        )

    def _enter_outside_a_task(self) -> bool:
        """Outside a task, breaches are only waited for to preempt the body:
        remember where it runs.  Returns whether to wait for them."""
        if self._grace() is None:
            return False
        self._entry_frames = _frames_from(sys._getframe(2))
        self._thread_id = threading.get_ident()
        start_delivery()
        return True

    def _deadline_passed(self) -> None:
        """Any thread: the timeout expired while the body was running."""
        if self._state == _ACTIVE and self._timeout is not None:
            self._arm(self._timeout_breach(self._timeout))

    def _arm(self, breach: Breach) -> None:
        """Any thread: start the grace period of a preemption (once)."""
        grace = self._grace()
        if grace is None or self._state != _ACTIVE or self._preempt_request:
            return
        self._preempt_breach = breach
        request = self._preempt_request = PreemptRequest(self, grace)
        request.start()

    def _preempt_thread(self) -> int:
        """The thread the scope was entered in (run_sync workers aside)."""
        return self._loop.thread_id if self._loop is not None else self._thread_id

    def _note_preempted(self) -> None:
        self._preempted += 1
        if self._account is not None:
            self._account.mark_interrupted()

    def _preempt_reason(self) -> str:
        breach = self._preempt_breach
        reason = breach.reason if breach is not None else "breached"
        return f"preempted: {reason}"

    def _absorbs(self, exc: BaseException) -> bool:
        """True for what this scope's breach raised in its body, alone or in
        a group with nothing but such exceptions and cancellations: its
        Preempted, and, once the meter refused a request for its limit, a
        MemoryError (the refused allocation's, or what numpy made of it; not
        a LimitReached of a scope inside, whose own result that is)."""
        preempted = self._preempted > 0
        refused = self._account is not None and self._account.refused()
        if not preempted and not refused:
            return False

        def ours(each: BaseException) -> bool:
            if preempted and isinstance(each, Preempted):
                return True
            return (
                refused
                and isinstance(each, MemoryError)
                and not isinstance(each, LimitReached)
            )

        if ours(exc):
            return True
        if not isinstance(exc, BaseExceptionGroup):
            return False
        cancelled = anyio.get_cancelled_exc_class() if self._loop is not None else None

        def ours_or_cancelled(each: BaseException) -> bool:
            return ours(each) or (cancelled is not None and isinstance(each, cancelled))

        _, rest = exc.split(ours_or_cancelled)
        return rest is None and exc.subgroup(ours) is not None

    def _deliver(self, breach: Breach) -> None:
        """On the loop thread: the first breach delivered cancels the scope,
        unless a task of the scope is inside an interrupt-safe coroutine:
        then it is tried again shortly (``_masking``)."""
        loop = self._loop
        if (
            self._state != _ACTIVE
            or self._cancel_scope is None
            or self._account is None
            or loop is None
            or self._delivered is not None
        ):
            return
        if self._cancel_scope.cancel_called and not self._cancel_requested:
            self._timeout_came_first = True
            return
        if self._deferred is not None and breach is not self._deferred:
            return  # an earlier breach is waiting for its turn
        if protected_code_waits(self._account):
            self._deferred = breach
            retry_later(loop, self._retry_deferred)
            return
        self._deferred = None
        self._delivered = breach
        self._account.mark_interrupted()
        self._cancel_scope.cancel(breach.reason)

    def _retry_deferred(self) -> None:
        if self._deferred is not None:
            self._deliver(self._deferred)

    def _undelivered_breach(
        self, record: tuple[int, int, int, int] | None
    ) -> Breach | None:
        """A breach that did not reach the loop (or there is no loop): the
        meter's record, else the first cancelled token."""
        if record is not None:
            return self._meter_breach(record)
        for token in self._tokens:
            if token.cancelled:
                return _token_breach(token.reason)
        return None

    def _meter_breach(self, record: tuple[int, int, int, int]) -> Breach:
        """The breach the meter recorded (first limit only, so it never
        changes), with the sites of the first moment it was asked for."""
        breach = self._sited_breach
        if breach is None:
            breach = self._sited_breach = breach_from(record, self._account)
        return breach

    def _timeout_breach(self, elapsed: float) -> Breach:
        assert self._timeout is not None
        # The loop fired the deadline by its own clock, which may tick
        # coarser than the one read here (uvloop's: milliseconds, cached
        # once per iteration): at least the timeout has elapsed.
        elapsed = max(elapsed, self._timeout)
        return Breach(
            BreachKind.TIMEOUT,
            self._timeout,
            elapsed,
            f"timeout of {self._timeout:g} s expired ({elapsed:.3g} s elapsed)",
        )

    # ---- what the user sees ----

    def cancel(self, reason: str | None = None) -> None:
        """Cancel the scope, like ``anyio.CancelScope.cancel``.

        This is not a breach: ``breached`` stays False unless a limit fired.
        Call it from the scope's own event-loop thread.  A scope running
        outside any event-loop task cannot be cancelled (``RuntimeError``).
        """
        if reason is not None and not isinstance(reason, str):
            raise TypeError(
                f"reason must be a str or None, not {type(reason).__name__}"
            )
        if self._state == _ACTIVE and self._cancel_scope is None:
            raise RuntimeError(
                "this limit_scope runs outside any event-loop task, where "
                "nothing can cancel it"
            )
        self._cancel_requested = True
        self._cancel_reason = reason
        if self._state == _ACTIVE and self._cancel_scope is not None:
            self._cancel_scope.cancel(reason)

    def step_outside(self) -> None:
        """Stop charging this scope in the current context, a copy of the
        scope's own (a task or thread started inside it).

        From this call on, allocations in this context are charged to the
        scopes around this one, not to it, and a scope entered next is its
        sibling rather than its child: a tool that gives every task a
        budget of its own (``memlimits-async run``) calls it at the start of
        a task started in another task's scope, so that the parent's budget
        does not cover its children.  Cancelling the scope still reaches
        tasks that its cancellation reaches (a task group's children).

        :raises RuntimeError: if the scope is not open, not the innermost
            scope current here, or this is the context that entered it
            (where its exit must find it current).
        """
        account = self._account
        if self._state != _ACTIVE or account is None:
            raise RuntimeError("step_outside() needs an open limit_scope")
        account.step_outside()

    @property
    def cancel_called(self) -> bool:
        """True once :meth:`cancel` was called (also after exit, as in anyio
        and trio), or a breach or the deadline cancelled the scope."""
        if self._cancel_requested:
            return True
        if self._cancel_scope is not None:
            return self._cancel_scope.cancel_called
        return False

    @property
    def cancelled_caught(self) -> bool:
        """True iff the scope's exit swallowed a cancellation that the scope
        caused: :meth:`cancel`, a limit, the deadline or a token (anyio's and
        trio's meaning).  Not when the body caught it and returned, nor when
        an enclosing scope's cancellation went through.  With
        ``raise_on_breach`` it is True when the swallowed cancellation was
        turned into the :class:`LimitReached` raised."""
        return self._caught

    # ---- the deadline ----

    def _clock(self) -> float:
        """The clock a scope entered here would use: the running loop's, or
        monotonic outside any task."""
        if self._state != _NEW:
            return self._now()
        loop = current_loop_handle()
        return loop.time() if loop is not None else time.monotonic()

    @property
    def deadline(self) -> float:
        """When the scope is cancelled for its timeout, on the clock of the
        loop that runs it (``loop.time()``, ``trio.current_time()``,
        ``anyio.current_time()``; ``time.monotonic()`` for a scope outside
        any task), or ``math.inf`` for never.

        Settable before entry (instead of ``timeout=``) and while the body
        runs: a deadline that has passed cancels the scope at once, a later
        one postpones its timeout.  Before entry, a scope given a
        ``timeout`` reports the deadline it would have if entered now."""
        if self._state == _NEW and self._timeout is not None:
            return self._clock() + self._timeout
        return self._deadline

    @deadline.setter
    def deadline(self, value: float) -> None:
        self._move_deadline(_parse_deadline(value))

    @property
    def relative_deadline(self) -> float:
        """Seconds from now to the deadline, like trio's: before entry, the
        timeout (counted from entry); ``math.inf`` for none.  Settable like
        :attr:`deadline` (negative: expired already)."""
        if self._state == _NEW:
            if self._timeout is not None:
                return self._timeout
            return self._deadline - self._clock()
        return self._deadline - self._now()

    @relative_deadline.setter
    def relative_deadline(self, value: float) -> None:
        seconds = _parse_timeout(value, "relative_deadline", negative=True)
        if self._state == _NEW:
            self._timeout = seconds
            self._deadline = math.inf
            return
        self._move_deadline(self._now() + seconds)

    def _move_deadline(self, deadline: float) -> None:
        if self._state == _NEW:
            self._deadline = deadline
            self._timeout = None
            return
        self._deadline = deadline
        if self._state != _ACTIVE:
            return  # kept, and meaning nothing, as in anyio and trio
        now = self._now()
        if self._timeout is None:
            # Entered without a deadline: its timeout counts from now.
            self._started_at = now
        self._timeout = deadline - self._started_at
        if self._cancel_scope is not None:
            # The cancel scope cancels at once for a deadline passed already.
            self._cancel_scope.deadline = deadline
        request = self._preempt_request
        if (
            request is not None
            and not request.fired
            and deadline > now
            and self._preempt_breach is not None
            and self._preempt_breach.kind is BreachKind.TIMEOUT
        ):
            # The old deadline passed while the body ran without a
            # checkpoint, and is moved later before its preemption landed:
            # anyio's and trio's loops had no turn to cancel for it, so
            # they never do; neither does the preemption that stands in
            # for them.
            request.close()
            self._preempt_request = None
            self._preempt_breach = None
        if self._grace() is not None:
            # Watched anew: the pair of the old deadline left in the heap no
            # longer matches the scope's and is skipped (_preempt).
            if deadline == math.inf:
                unwatch_deadline(self)
            else:
                watch_deadline(self, time.monotonic() + (deadline - now))

    # asyncio.Timeout's names for the same thing.

    def when(self) -> float | None:
        """The deadline, or None for none (``asyncio.Timeout.when``)."""
        deadline = self.deadline
        return None if deadline == math.inf else deadline

    def reschedule(self, when: float | None) -> None:
        """Move the deadline; None for none (``asyncio.Timeout.reschedule``).
        Unlike asyncio's, also before entry and after the timeout fired."""
        self._move_deadline(math.inf if when is None else _parse_deadline(when, "when"))

    def expired(self) -> bool:
        """True once the deadline has passed while the scope was active
        (``asyncio.Timeout.expired``), whether or not that cut anything:
        :attr:`breached` says whether the timeout stopped the body."""
        if self._state == _ACTIVE:
            return self._timeout is not None and self._now() >= self._deadline
        return self._expired

    @property
    def breach(self) -> Breach | None:
        """What fired, or None.  While the scope is active this is read live
        from the meter (a timeout is only known at exit)."""
        if self._state == _ACTIVE and self._account is not None:
            return self._delivered or self._undelivered_breach(self._account.breach())
        return self._breach

    @property
    def breached(self) -> bool:
        """True iff this scope's own limit or timeout fired."""
        if self._state == _ACTIVE and self._account is not None:
            # breach's test, without making the breach (a server reads it
            # for every response it starts).
            if self._delivered is not None or self._account.breach() is not None:
                return True
            tokens = self._tokens
            return bool(tokens) and any(token.cancelled for token in tokens)
        return self._breach is not None

    @property
    def usage(self) -> Usage:
        """Bytes charged so far (while active) or at exit (afterwards)."""
        if self._account is None:
            return usage_from((0, 0, 0))
        if self._state == _ACTIVE:
            return usage_from(self._account.usage())
        return usage_from(self._account.usage_at_leave())

    def snapshot(self) -> Snapshot:
        """The scope's sampled allocation sites: live bytes (blocks charged
        to it, or to scopes inside it, not freed yet) and allocated bytes,
        by allocating stack; while it is active or after it exited (live
        bytes then are those still held).  See docs/sites.md."""
        return account_snapshot(self._account)

    @property
    def memory(self) -> int | None:
        """The live-bytes limit, in bytes, or None."""
        return self._memory

    @property
    def allocations(self) -> int | None:
        """The cumulative allocation limit, in bytes, or None."""
        return self._allocations

    @property
    def timeout(self) -> float | None:
        """Seconds from entry to the deadline, or None without one: the
        ``timeout`` given, or, once entered with a deadline or after it was
        moved, the deadline minus the entry time (minus the time it was set,
        for a scope entered without one; ``math.inf`` once a deadline it had
        was removed with ``reschedule(None)`` or ``deadline = math.inf``)."""
        return self._timeout

    @property
    def shield(self) -> bool:
        """Whether the body is protected from the cancellation of enclosing
        scopes.  Settable while the body runs, as in anyio and trio:
        lowering it lets a pending outer cancellation in at the next
        checkpoint."""
        return self._shield

    @shield.setter
    def shield(self, value: bool) -> None:
        if value.__class__ is not bool:
            _require_bool(value, "shield")
        self._shield = value
        if self._state == _NEW:
            if value:
                self._adopted = None  # a shielded scope enters one of its own
            return
        if self._state != _ACTIVE or self._account is None:
            return
        if self._cancel_scope is not None:
            self._cancel_scope.shield = value
        self._set_shielding(value)

    def _set_shielding(self, on: bool) -> None:
        """Make the active account a region for the scopes around it, or
        stop: for preemption (``shielded_accounts``) and for the meter's
        refusals (which then spare it the outer limits)."""
        account = self._account
        if on == self._shielding or account is None:
            return
        self._shielding = on
        if on:
            shielded_accounts.add(account)
        else:
            shielded_accounts.discard(account)
        account.set_shielding(on)

    def __repr__(self) -> str:
        limits = [
            f"{name}={value!r}"
            for name, value in (
                ("memory", self._memory),
                ("allocations", self._allocations),
                ("timeout", self._timeout),
            )
            if value is not None
        ]
        breach = self.breach
        status = self._state if breach is None else f"breached: {breach.reason}"
        return f"<LimitScope {' '.join(limits) or 'unlimited'} ({status})>"


def _drop_tracebacks(exc: BaseException) -> None:
    """Forget the tracebacks of a cancellation this scope swallowed.

    The body's frames, and so whatever it was building when the limit fired,
    stay alive as long as the exception's traceback does, and the traceback
    is often in a reference cycle: a worker thread's exception is kept by the
    future that carried it, which a frame of that traceback holds (anyio's
    ``run_sync_in_worker_thread``).  Such garbage waits for a collection that
    allocating bytes does not trigger, so a server stopping 50 MiB requests
    held gigabytes.  Nothing reads the swallowed exception after the scope
    (its breach says what happened), so its traceback is dropped, which
    frees the frames at once.  Its ``__context__`` is left alone: that may
    be an exception the code around the scope is still handling."""
    exc.__traceback__ = None
    if isinstance(exc, BaseExceptionGroup):
        for each in exc.exceptions:
            _drop_tracebacks(each)


def _detached(exc: BaseException) -> BaseException:
    """What a LimitReached raised for ``exc`` is chained to: ``exc``, except
    for a refused request's MemoryError, which may be an object the
    interpreter raises again.  From 3.12 on, once its free list of
    MemoryErrors is empty (more than 16 alive), CPython raises one
    interpreter-wide instance (of MemoryError itself, never a subclass),
    whose traceback each raise extends: a server refusing requests kept
    every refused request's frames, and what they held, for good.  Its
    traceback moves to a copy, and the shared one is left bare; a group
    holding it is rebuilt around the copy."""
    if isinstance(exc, BaseExceptionGroup):
        members = [_detached(each) for each in exc.exceptions]
        if all(new is old for new, old in zip(members, exc.exceptions, strict=True)):
            return exc
        copy: BaseException = exc.derive(members)
    elif type(exc) is MemoryError:
        copy = MemoryError(*exc.args)
    else:
        return exc
    copy.__traceback__ = exc.__traceback__
    copy.__cause__ = exc.__cause__
    copy.__context__ = exc.__context__
    copy.__suppress_context__ = exc.__suppress_context__
    if hasattr(exc, "__notes__"):
        copy.__notes__ = list(exc.__notes__)
    if type(exc) is MemoryError:
        exc.__traceback__ = exc.__context__ = exc.__cause__ = None
    return copy


def _frames_from(frame: FrameType | None) -> tuple[FrameType, ...]:
    """The frame that entered the scope, and the wrappers' callers.

    The frame that calls ``__enter__`` is where the body runs only when
    the ``with`` names the scope itself.  Through a wrapper (an
    ``ExitStack``, a ``@contextmanager`` generator, a class whose
    ``__enter__`` enters the scope) the wrapper's frames return or suspend
    before the body starts, and the body runs in the frame that entered the
    wrapper: so the walk goes out through wrapper frames, and stops at the
    first frame that is not one.  It never goes further: a scope entered in
    a plain generator belongs to the generator's frame, not to the code
    that consumes it (which runs charged to the scope between two ``next``
    calls, but outside its ``with``).  (Holding a returned wrapper's frame
    keeps it alive until the scope exits; a scope outside any task is rare
    enough for that.)"""
    frames = []
    while frame is not None:
        frames.append(frame)
        outer = frame.f_back
        if not (_in_contextlib(frame) or frame.f_code.co_name == "__enter__") and not (
            frame.f_code.co_flags & inspect.CO_GENERATOR and _in_contextlib(outer)
        ):
            break
        frame = outer
    return tuple(frames)


def _in_contextlib(frame: FrameType | None) -> bool:
    return frame is not None and frame.f_globals.get("__name__") == "contextlib"


limit_scope = LimitScope
"""``limit_scope(...)`` opens a :class:`LimitScope` (the lowercase name reads
like ``move_on_after`` at call sites; it is the class itself, as with
``contextlib.suppress``, so creating a scope costs no extra call)."""
