"""Preemptive delivery: interrupting code that never reaches a checkpoint.

A breached scope is cancelled at its task's next checkpoint.  A task that
computes without awaiting (a CPU-bound loop, a huge ``json.dumps``) has none,
so after a grace period (``preempt=``, default :data:`DEFAULT_GRACE`) the
scope *preempts* it: :class:`~memlimits_async.Preempted` is raised inside the
running code, at a point where that is safe, and the scope absorbs it on
exit and reports its breach as usual.

Where it may land (decided by :func:`may_interrupt`, trio's
KeyboardInterrupt protection made per scope):

* only in code charged to the breached scope: the running context's account
  is the scope's or one of its descendants;
* only inside the scope's body: walking out from the interrupted frame must
  reach the frame that entered the scope (synchronous scopes) or a task's
  outermost frame, the one a task driver (asyncio's ``Handle._run``, trio's
  run loop, :func:`memlimits_async.run_sync`'s fence) runs;
* never in code marked ``@interrupt_safe``, in a ``__del__``, inside an
  ``interrupt_safe()`` region or shielded scope opened inside the breached
  scope, nor in framework code (the event loops and their primitives,
  threading, queue, contextlib, weakref, importlib, warnings, this package)
  or in user code that framework code called: only the wrappers around a
  task's outermost frame are allowed;
* never between a call that returned an awaitable and its ``await`` (the
  exit of an ``async with`` calls ``__aexit__``, then awaits it).

Otherwise it waits and tries again every :data:`RETRY_PERIOD` seconds; the
cooperative cancellation at the next checkpoint or region exit still comes
first if it can.

How it is raised (``_meter/interrupts.c``): on the main thread, a pending
call runs the decision at an eval-breaker check of the running code and
raises there (decision and landing are one instant).  In other threads (loops
run in threads, ``run_sync`` workers) the delivery thread decides from the
thread's current frame and arms ``PyThreadState_SetAsyncExc`` only if the
thread has not moved since, without releasing the GIL in between; on
3.11 and 3.12 only (:data:`THREADS_PREEMPTIBLE`).

Invariant: a preemption request lives exactly as long as its scope is
active; ``LimitScope.__exit__`` ends it (:meth:`PreemptRequest.close`).
"""

from __future__ import annotations

import dis
import functools
import inspect
import math
import sys
import threading
import time
import weakref
from collections.abc import Callable
from contextvars import Context
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Final, TypeVar

from ._accounts import Account, current_account
from ._delivery import TICK, call_later, on_tick
from ._exceptions import Preempted
from ._masking import is_protected_code as _is_marked
from ._masking import region_account
from ._meter import _core

if TYPE_CHECKING:
    from ._scope import LimitScope

__all__ = [
    "DEFAULT_GRACE",
    "PreemptRequest",
    "may_interrupt",
    "run_fenced",
    "set_default_grace",
    "unwatch_deadline",
    "watch_deadline",
]

T = TypeVar("T")

DEFAULT_GRACE: Final = 0.05
"""Seconds a breached body gets to reach a checkpoint before it is
preempted.  Half of asyncio's own threshold for a slow step
(``slow_callback_duration``, 0.1 s), a hundred times a typical step: a task
that awaits as it should, even on a loaded machine, is stopped cooperatively,
at a checkpoint, and only code that does not await is preempted.  Short
enough that the overshoot stays bounded: a runaway body allocates at most
~2 GB/s, so at most ~100 MB past a memory limit, typically far less."""

THREADS_PREEMPTIBLE: Final = sys.version_info < (3, 13)
"""Whether threads other than the main one can be preempted.  3.13 checks
for an asynchronous exception with the eval-breaker bits it read *before*
waiting for the GIL, so an exception armed while a thread waits lands at its
next check, not where it waits: a place nobody looked at (measured: past the
end of a ``try``, skipping its ``finally``).  There, other threads are
stopped at their next checkpoint only (docs/preemption.md)."""

RETRY_PERIOD: Final = 0.001
MAX_RETRY_PERIOD: Final = 0.005
"""Seconds between two attempts while the running code is protected: from
the first to the second, doubling."""

_grace = DEFAULT_GRACE
_MAIN_THREAD: Final = threading.main_thread().ident

# Code that must not be cut in half: the event loops and their primitives,
# ours, and the runtime's own Python code that runs inside a body without the
# body calling it (imports, warnings, weakref finalizers, the abc checks of
# an exception thrown into a task: trio's Cancelled has an ABCMeta
# metaclass), or that keeps shared state (queue, selectors).
_FRAMEWORK_PACKAGES: Final = frozenset(
    {
        "_frozen_importlib",
        "_frozen_importlib_external",
        "abc",
        "anyio",
        "asyncio",
        "concurrent",
        "contextlib",
        "importlib",
        "memlimits_async",
        "outcome",
        "queue",
        "selectors",
        "sniffio",
        "threading",
        "trio",
        "warnings",
        "weakref",
    }
)
_CACHE: Final = dis.opmap["CACHE"]
_EXTENDED_ARG: Final = dis.opmap["EXTENDED_ARG"]
_RESUMABLE: Final = (
    inspect.CO_COROUTINE
    | inspect.CO_ASYNC_GENERATOR
    | inspect.CO_GENERATOR
    | inspect.CO_ITERABLE_COROUTINE
)
_GET_AWAITABLE: Final = dis.opmap["GET_AWAITABLE"]

# Code whose frame calls a task's outermost frame (filled in lazily: the
# frameworks are imported only if used).
_driver_codes: set[CodeType] = set()
_drivers_known: set[str] = set()


def set_default_grace(grace: float | None) -> None:
    """The grace of scopes opened without ``preempt=``; None disables."""
    global _grace
    _grace = grace  # type: ignore[assignment]


def default_grace() -> float | None:
    return _grace


def parse_preempt(preempt: object) -> float | None:
    """``preempt=`` of a scope: None (the default grace), False (never), or
    seconds >= 0.  Returns the grace in seconds, or None for never."""
    if preempt is None:
        return _grace
    if preempt is False:
        return None
    if isinstance(preempt, bool) or not isinstance(preempt, int | float):
        raise TypeError(
            "preempt must be a number of seconds, False or None, not "
            f"{type(preempt).__name__}"
        )
    try:
        grace = float(preempt)
    except OverflowError:
        grace = math.inf
    if not grace >= 0 or grace == math.inf:
        raise ValueError(f"preempt must be a finite number >= 0, got {preempt!r}")
    return grace


class PreemptRequest:
    """A breached scope waiting for its code to stop."""

    __slots__ = ("active", "fired", "grace", "retry_in", "scope")

    def __init__(self, scope: LimitScope, grace: float) -> None:
        self.scope = scope
        self.grace = grace
        self.retry_in = RETRY_PERIOD
        self.active = True
        self.fired = 0  # Preempted raised so far

    def start(self) -> None:
        """Try once the grace has passed (at once for a zero grace)."""
        if self.grace == 0:
            self.attempt()
        else:
            call_later(self.grace, self.attempt)

    def close(self) -> None:
        self.active = False
        _main_thread_requests.discard(self)

    def attempt(self) -> None:
        """Raise in each thread of the scope where it is safe now; try again
        shortly where it is not, for as long as the scope is active."""
        if not self.active:
            return
        for thread_id in {self.scope._preempt_thread(), *_workers}:
            if thread_id == _MAIN_THREAD:
                _main_thread_requests.add(self)
                _core.call_on_main_thread()
            elif THREADS_PREEMPTIBLE and thread_id != threading.get_ident():
                self._attempt_in_thread(thread_id)
        # The main thread's own retries are quicker (interrupts.c); these
        # cover worker threads, and back off while nothing lands.
        call_later(self.retry_in, self.attempt)
        self.retry_in = min(self.retry_in * 2, MAX_RETRY_PERIOD)

    def _attempt_in_thread(self, thread_id: int) -> None:
        frame = sys._current_frames().get(thread_id)
        context = _core.thread_context(thread_id)
        if frame is None or context is None:
            return
        if may_interrupt(self.scope, frame, context) and _core.raise_in_thread_at(
            thread_id,
            frame,
            frame.f_lasti,
            current_account,
            context.get(current_account),
            Preempted,
        ):
            self._fired()

    def _fired(self) -> None:
        self.fired += 1
        self.retry_in = RETRY_PERIOD
        self.scope._note_preempted()


_main_thread_requests: set[PreemptRequest] = set()


# ---- timeouts: a deadline passed while the body was running ----
#
# Active scopes with a timeout, by id: (deadline, weak reference).  The
# delivery thread scans them at every tick (0.25 s) and arms those whose
# deadline passed; a deadline due before the next tick gets a timer of its
# own.  So no timer outlives a tick, however many scopes with long timeouts
# come and go (one timer per scope would live until its deadline).
_deadlines: dict[int, tuple[float, weakref.ref[LimitScope]]] = {}
_next_scan = math.inf


def watch_deadline(scope: LimitScope, deadline: float) -> None:
    """Preempt ``scope``'s body if it still runs at ``deadline`` (monotonic)."""
    global _next_scan
    _deadlines[id(scope)] = (deadline, weakref.ref(scope))
    delay = deadline - time.monotonic()
    if deadline < _next_scan and delay < TICK:
        _next_scan = deadline
        call_later(max(delay, 0.0), scan_deadlines)


def unwatch_deadline(scope: LimitScope) -> None:
    _deadlines.pop(id(scope), None)


def scan_deadlines() -> None:
    """In the delivery thread: arm the scopes whose deadline has passed."""
    global _next_scan
    if not _deadlines:
        _next_scan = math.inf
        return
    now = time.monotonic()
    earliest = math.inf
    for key, (deadline, scope_ref) in list(_deadlines.items()):
        if deadline > now:
            earliest = min(earliest, deadline)
            continue
        _deadlines.pop(key, None)
        scope = scope_ref()
        if scope is not None:
            scope._deadline_passed()
    _next_scan = math.inf
    if earliest - now < TICK:
        _next_scan = earliest
        call_later(earliest - now, scan_deadlines)


on_tick(scan_deadlines)

_workers: set[int] = set()
"""Threads running ``run_sync`` work: any of them may be running a breached
scope's code (their context says whose)."""


def run_fenced(function: Callable[..., T], args: tuple[object, ...]) -> T:
    """Run ``function(*args)`` in this worker thread so that a preemption
    can land only inside it: this frame is a task driver (the frame it
    calls is the outermost one that may be interrupted), and an interrupt
    armed too late is disarmed before the thread goes back to its pool."""
    thread_id = threading.get_ident()
    _workers.add(thread_id)
    try:
        return function(*args)
    finally:
        _workers.discard(thread_id)
        _core.async_raise(thread_id, None)


def _on_main_thread_call() -> BaseException | bool:
    """Runs at an eval-breaker check of the main thread (a pending call):
    the frame that called it is the code being interrupted.  Returns the
    exception to raise there, True to be called again shortly (a request
    waits), or False."""
    frame = sys._getframe(1)
    for request in tuple(_main_thread_requests):
        if not request.active:
            _main_thread_requests.discard(request)
        elif may_interrupt(request.scope, frame, None):
            _main_thread_requests.discard(request)
            request._fired()
            return Preempted(request.scope._preempt_reason())
    return bool(_main_thread_requests)


# Code where the innermost frame is never interrupted, whatever the scope:
# framework and marked code, learnt as met (the C side skips the handler
# there).  Only grows: both properties are fixed for a code object.
_never_here: set[CodeType] = set()

_core.set_interrupt_handler(_on_main_thread_call, _never_here)


# ---- the decision ----


def may_interrupt(scope: LimitScope, frame: FrameType, context: Context | None) -> bool:
    """True if raising in ``frame`` (running in ``context``, None for the
    current one) can only unwind code of the scope's body that is not
    protected (see the module docstring)."""
    account = scope._account
    if account is None:
        return False
    running: Account | None
    region: Account | None
    if context is None:
        running = current_account.get(None)
        region = region_account.get(None)
    else:
        running = context.get(current_account)
        region = context.get(region_account)
    if running is None or not running.is_within(account):
        return False  # not charged to the scope: not its code
    if region is not None and region.is_within(account):
        return False  # a region or shield opened inside the scope
    return _frames_allow(frame, scope._entry_frame)


def _frames_allow(frame: FrameType, entry_frame: FrameType | None) -> bool:
    _learn_drivers()
    chain: list[FrameType] = []
    current: FrameType | None = frame
    while current is not None:
        chain.append(current)
        if current is entry_frame:
            break
        outer = current.f_back
        if outer is not None and outer.f_code in _driver_codes:
            break
        current = outer
    else:
        return False  # never reached the scope's body: loop or thread code
    innermost = frame.f_code
    if _is_marked(innermost) or _is_framework(frame):
        _never_here.add(innermost)
        return False
    if _about_to_await(frame) or not _handled_like_its_neighbour(frame):
        return False
    outermost_user = None
    for index, each in enumerate(chain):
        code = each.f_code
        if _is_marked(code) or code.co_name == "__del__":
            return False
        if not _is_framework(each):
            outermost_user = index
    if outermost_user is None:
        return False
    # Framework frames are allowed only as wrappers outside all user code
    # (anyio runs a task's coroutine inside one of its own), and a wrapper
    # drives the task's code by awaiting it: a plain function under
    # framework code is a helper the framework called (typing.cast in a
    # cancel scope's __enter__), not the task's code.
    if outermost_user < len(chain) - 1 and not (
        chain[outermost_user].f_code.co_flags & _RESUMABLE
    ):
        return False
    return all(not _is_framework(each) for each in chain[:outermost_user])


def _about_to_await(frame: FrameType) -> bool:
    """True between a call that made an awaitable and the await of it: an
    ``async with`` block's exit has called ``__aexit__`` but not awaited it,
    and an exception there would skip it (a lock never released)."""
    code = frame.f_code.co_code
    index = frame.f_lasti + 2
    while index < len(code) and code[index] == _CACHE:
        index += 2
    return index < len(code) and code[index] == _GET_AWAITABLE


def _handled_like_its_neighbour(frame: FrameType) -> bool:
    """False where CPython would attribute an exception to a position whose
    ``try``/``with`` handler differs from that of the code just run.

    3.11-3.13 check for interrupts at a loop's back edge, and the jump
    back can lie just past the end of the handler range of the ``try`` or
    ``with`` around the loop (cpython#108214, #130279): an exception raised
    there skips the ``finally`` or ``__exit__``.  The next check inside the
    loop body is a safe place; a loop without calls has none (see
    docs/preemption.md)."""
    lasti = frame.f_lasti
    code = frame.f_code
    raw = code.co_code
    previous = lasti - 2
    while previous > 0 and raw[previous] == _EXTENDED_ARG:
        previous -= 2  # the prefix of this very instruction
    while previous > 0 and raw[previous] == _CACHE:
        previous -= 2  # the inline cache of the one before
    if previous < 0:
        return True
    ranges = _handler_ranges(code)
    return _handler_at(ranges, lasti) == _handler_at(ranges, previous)


@functools.lru_cache(maxsize=4096)
def _handler_ranges(code: CodeType) -> tuple[tuple[int, int, int], ...]:
    return tuple(
        (entry.start, entry.end, entry.target)
        for entry in dis._parse_exception_table(code)  # type: ignore[attr-defined]
    )


def _handler_at(ranges: tuple[tuple[int, int, int], ...], offset: int) -> int:
    for start, end, target in ranges:
        if start <= offset < end:
            return target
    return -1


def _is_framework(frame: FrameType) -> bool:
    module = frame.f_globals.get("__name__")
    if not isinstance(module, str):
        return False
    return module.partition(".")[0] in _FRAMEWORK_PACKAGES


def _learn_drivers() -> None:
    """Add the task drivers of the frameworks imported so far."""
    if not _driver_codes:
        _driver_codes.add(run_fenced.__code__)
    if "asyncio" not in _drivers_known and "asyncio" in sys.modules:
        import asyncio.events

        _driver_codes.add(asyncio.events.Handle._run.__code__)
        _drivers_known.add("asyncio")
    if "trio" not in _drivers_known and "trio" in sys.modules:
        from trio._core import _run as trio_run

        _driver_codes.add(trio_run.unrolled_run.__code__)
        _drivers_known.add("trio")
