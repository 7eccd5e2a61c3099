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
* only in a task the scope's cancellation reaches (the task that entered
  it, or a child of a task group or nursery opened inside it: an exception
  there comes back to the scope), never in a task merely started inside it
  (``_task_tree``);
* only inside the scope's body: walking out from the interrupted frame must
  reach the frame where the body runs (synchronous scopes: the innermost
  frame still running of those on the stack at entry, so that wrappers such
  as ``ExitStack`` or ``@contextmanager`` are seen through) or the task's
  outermost frame (its coroutine's, whoever drives it: asyncio's
  ``Handle._run``, uvloop from C, trio's run loop), or the frame that
  :func:`memlimits_async.run_sync`'s fence runs;
* never in code marked ``@interrupt_safe``, in a ``__del__``, a weakref or
  ``gc`` callback, inside an ``interrupt_safe()`` region or shielded scope
  opened inside the breached scope, nor in framework code (the event loops
  and their primitives, threading, queue, contextlib, weakref, importlib,
  warnings, this package) or in user code that framework code called: only
  the wrappers around a task's outermost frame are allowed;
* never between a call that returned an awaitable and its ``await`` (the
  exit of an ``async with`` calls ``__aexit__``, then awaits it);
* only in code that has run without a checkpoint for the grace: a task
  parked in ``await``, or resuming after it, is stopped by its cancellation
  at its next checkpoint, as under anyio (see ``_Step``).

Otherwise it waits: while requests wait, the delivery thread polls every
:data:`RETRY_PERIOD` to :data:`MAX_RETRY_PERIOD` seconds, and each poll
starts from the code running in each thread and looks only at the scopes
around it, so that it costs the nesting depth, not the number of waiting
scopes.  The cooperative cancellation at the next checkpoint or region exit
still comes first if it can.

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

import collections
import dis
import functools
import heapq
import inspect
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextvars import Context
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Final, TypeVar

from ._accounts import Account, current_account
from ._delivery import TICK, LoopHandle, call_later, on_tick, report_unraisable
from ._exceptions import Preempted
from ._masking import is_protected_code as _is_marked
from ._masking import region_account
from ._meter import _core
from ._task_tree import current_task_of, root_frame, scope_reaches

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
        "_weakrefset",
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
    """A breached scope waiting for its code to stop.

    Requests are kept by the scope's account, and what is tried at each poll
    starts from the code running in each thread: its account and the
    accounts around it (:func:`_requests_around`).  So a poll costs the
    nesting depth of the running code, however many scopes wait: a server
    with 100,000 breached or timed-out scopes whose tasks are parked in
    ``await`` (which their cancellation stops at once, with no preemption)
    pays nothing for them.
    """

    __slots__ = ("account", "due", "fired", "grace", "scope", "thread_id")

    def __init__(self, scope: LimitScope, grace: float) -> None:
        self.scope = scope
        self.grace = grace
        self.account = scope._account
        self.thread_id = scope._preempt_thread()
        self.due = time.monotonic() + grace
        self.fired = 0  # Preempted raised so far

    def start(self) -> None:
        """Wait for the code to stop; preempt it once the grace has passed.

        Safe from any thread and from a signal handler: a dict store and a
        set add, each one atomic, and a timer handed to the delivery thread.
        """
        if self.account is None:
            return
        _requests[self.account] = self
        _polled_threads.add(self.thread_id)
        _start_polling()

    def close(self) -> None:
        if self.account is not None and _requests.get(self.account) is self:
            del _requests[self.account]

    def _fired(self) -> None:
        self.fired += 1
        # A body that catches Preempted and goes on gets another grace.
        self.due = time.monotonic() + self.grace
        self.scope._note_preempted()


# Waiting requests by the account of their scope; written from any thread
# (single dict operations, atomic under the GIL).
_requests: dict[Account, PreemptRequest] = {}
# Threads where a waiting scope was entered: where its code runs, besides
# run_sync workers (``_workers``).  Only added to while requests come and
# go (a thread without a request costs a poll a lookup); threads that have
# ended are dropped when no request waits.
_polled_threads: set[int] = set()

_poll_scheduled = False
_poll_period = RETRY_PERIOD


def _start_polling() -> None:
    """Make sure the delivery thread polls (:func:`_poll`) soon."""
    global _poll_scheduled, _poll_period
    _poll_period = RETRY_PERIOD
    if not _poll_scheduled:
        # Two callers racing here may both schedule a poll: harmless, both
        # stop once no request waits.
        _poll_scheduled = True
        call_later(RETRY_PERIOD, _poll)


def _poll() -> None:
    """In the delivery thread, while requests wait: try each thread where
    the code of a waiting scope may run, then poll again in a while."""
    global _poll_scheduled, _poll_period
    if not _requests:
        # Clear the flag first, then look again: a request started in
        # between either saw the flag cleared (and scheduled a poll) or is
        # seen here.
        _poll_scheduled = False
        _polled_threads.intersection_update(sys._current_frames())
        _steps.clear()
        if not _requests:
            return
        _poll_scheduled = True
    fired = False
    try:
        for thread_id in (*_polled_threads, *_workers):
            if thread_id == _MAIN_THREAD:
                # Decided and raised there, at its next eval-breaker check.
                _core.call_on_main_thread()
            elif THREADS_PREEMPTIBLE and thread_id != threading.get_ident():
                fired = _attempt_in_thread(thread_id) or fired
    finally:
        # Whatever happened, the next poll comes: the flag says one will.
        # Quick while something may land, then backing off while nothing
        # does: the main thread's own retries are quicker (interrupts.c).
        if fired:
            _poll_period = RETRY_PERIOD
        else:
            _poll_period = min(_poll_period * 2, MAX_RETRY_PERIOD)
        call_later(_poll_period, _poll)


def _requests_around(account: Account | None) -> Iterator[PreemptRequest]:
    """The waiting requests of ``account``'s scope and of the scopes around
    it, innermost first."""
    while account is not None:
        request = _requests.get(account)
        if request is not None:
            yield request
        account = account.outer


class _Step:
    """One stretch of a thread's code seen running without a checkpoint.

    A task step that started before the breach and has not reached a
    checkpoint for the grace is what preemption is for; a task that was
    parked, or waited its turn behind others, and has just resumed is not:
    its cancellation reaches it at its next checkpoint, as anyio's would.
    The first time a thread is seen running a waiting scope's code, a
    marker goes to the back of the loop's queue: it runs only once the
    running step has ended.  The step counts as the same for as long as
    the same task runs and the marker has not run.  Code outside any task
    (a worker thread, a script) has no steps: it is one stretch.

    A step has run for the grace when that much time has passed *and* its
    thread has used half of it on a CPU: on a busy machine a short step
    may be descheduled for longer than the grace, and was not computing.
    Code blocked in C (a synchronous sleep or read in a task) uses no CPU:
    it counts once four graces have passed.
    """

    __slots__ = ("cpu_since", "ended", "since", "task")

    def __init__(self, task: int, since: float, cpu_since: float) -> None:
        self.task = task  # its id: holding the task would keep it alive
        self.since = since
        self.cpu_since = cpu_since
        self.ended = False

    def end(self) -> None:
        self.ended = True


_steps: dict[int, _Step] = {}  # by thread


def _ran_for(
    thread_id: int,
    task: object | None,
    loop: LoopHandle | None,
    now: float,
    grace: float,
) -> bool:
    """True if the code running in ``thread_id`` (in ``task``) has run for
    ``grace`` seconds without a checkpoint, as far as seen (``_Step``)."""
    cpu_now = _thread_cpu_time(thread_id)
    step = _steps.get(thread_id)
    if step is None or step.ended or step.task != id(task):
        step = _steps[thread_id] = _Step(id(task), now, cpu_now)
        if loop is not None:
            loop.call_soon_threadsafe(step.end)
    elapsed = now - step.since
    return elapsed >= grace and (
        cpu_now - step.cpu_since >= grace / 2 or elapsed >= 4 * grace
    )


def _thread_cpu_time(thread_id: int) -> float:
    """CPU seconds used by a thread (this process's, alive)."""
    if thread_id == threading.get_ident():
        return time.thread_time()
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread_id))
    except (OSError, AttributeError):  # gone, or no per-thread clocks here
        return math.inf  # never holds a preemption back


def _ripe(
    request: PreemptRequest,
    thread_id: int,
    task: object | None,
    loop: LoopHandle | None,
    now: float,
) -> bool:
    """True once the grace has passed and the code running in ``task`` on
    ``loop`` (None: not a loop's task) has not reached a checkpoint for as
    long."""
    ran = _ran_for(thread_id, task, loop, now, request.grace)
    return now >= request.due and (loop is None or ran)


def _loop_and_task(
    scope: LimitScope, thread_id: int
) -> tuple[LoopHandle | None, object | None]:
    """The scope's loop and its running task, if that loop runs in
    ``thread_id`` (a run_sync worker runs the scope's code in no task)."""
    loop = scope._loop
    if loop is None or loop.thread_id != thread_id:
        return None, None
    if thread_id == threading.get_ident():
        return loop, current_task_of(getattr(loop, "loop", None))
    # From another thread: asyncio keeps the running task by loop; trio
    # only in its own thread, where it is the step, not the task, that
    # counts (the marker).
    asyncio_loop = getattr(loop, "loop", None)
    return loop, current_task_of(asyncio_loop) if asyncio_loop is not None else None


def _attempt_in_thread(thread_id: int) -> bool:
    """From the delivery thread: raise in another thread if it runs the code
    of a waiting scope, where that is safe now.  True if raised."""
    frame = sys._current_frames().get(thread_id)
    context = _core.thread_context(thread_id)
    if frame is None or context is None:
        return False
    running = context.get(current_account)
    now = time.monotonic()
    for request in _requests_around(running):
        scope = request.scope
        loop, task = _loop_and_task(scope, thread_id)
        if not _ripe(request, thread_id, task, loop, now):
            continue
        if may_interrupt(scope, frame, context, task) and _core.raise_in_thread_at(
            thread_id,
            frame,
            frame.f_lasti,
            current_account,
            running,
            Preempted,
        ):
            request._fired()
            return True
    return False


# ---- timeouts: a deadline passed while the body was running ----
#
# Active scopes with a timeout, by id, and their deadlines in a heap of
# (deadline, id) that the delivery thread keeps for itself, fed through a
# deque (appends are atomic: scopes are entered in any thread without a
# lock).  At every tick (0.25 s) it pops the deadlines that have passed; a
# deadline due before the next tick gets a timer of its own.  So a tick
# costs the scopes that are due, not all that wait, and no timer outlives
# a tick.  Exited scopes leave their pair in the heap (finding it would
# cost a search); the heap is rebuilt from the live scopes when they are
# fewer than half of it.  The pairs hold no object (the GC never looks at
# them), and the scope is held by the dict only while it is active.
_deadlines: dict[int, LimitScope] = {}
_deadline_inbox: collections.deque[tuple[float, int]] = collections.deque()
_deadline_heap: list[tuple[float, int]] = []  # the delivery thread's own
_next_scan = math.inf


def watch_deadline(scope: LimitScope, deadline: float) -> None:
    """Preempt ``scope``'s body if it still runs at ``deadline`` (monotonic)."""
    global _next_scan
    scope._watched_deadline = deadline
    _deadlines[id(scope)] = scope
    _deadline_inbox.append((deadline, id(scope)))
    delay = deadline - time.monotonic()
    if deadline < _next_scan and delay < TICK:
        _next_scan = deadline
        call_later(max(delay, 0.0), scan_deadlines)


def unwatch_deadline(scope: LimitScope) -> None:
    _deadlines.pop(id(scope), None)


def scan_deadlines() -> None:
    """In the delivery thread: arm the scopes whose deadline has passed."""
    global _next_scan, _deadline_heap
    # First, so that a deadline watched from now on schedules a scan of its
    # own if it is due before the next tick, whatever happens below.
    _next_scan = math.inf
    heap = _deadline_heap
    while _deadline_inbox:
        heapq.heappush(heap, _deadline_inbox.popleft())
    now = time.monotonic()
    while heap and heap[0][0] <= now:
        deadline, key = heapq.heappop(heap)
        scope = _deadlines.get(key)
        if scope is None or scope._watched_deadline != deadline:
            continue  # exited, or another scope entered at the same id since
        _deadlines.pop(key, None)  # (the scope's own exit may race to it)
        try:
            scope._deadline_passed()
        except Exception as exc:  # one scope's failure costs the others nothing
            report_unraisable(exc, "Exception arming a timed-out scope", scope)
    if len(heap) > 64 and len(_deadlines) < len(heap) // 2:
        live = list(_deadlines.items())  # one C call: scopes come and go
        heap = _deadline_heap = [(scope._watched_deadline, key) for key, scope in live]
        heapq.heapify(heap)
    earliest = heap[0][0] if heap else math.inf
    if earliest - now < TICK and earliest < _next_scan:
        _next_scan = earliest
        call_later(max(earliest - now, 0.0), scan_deadlines)


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
    exception to raise there, True to be called again shortly (a request is
    due but this is not a place to land), or False."""
    running = current_account.get(None)
    if running is None or not _requests:
        return False
    frame = sys._getframe(1)
    now = time.monotonic()
    again = False
    for request in _requests_around(running):
        scope = request.scope
        loop, task = _loop_and_task(scope, _MAIN_THREAD)  # type: ignore[arg-type]
        if not _ripe(request, _MAIN_THREAD, task, loop, now):  # type: ignore[arg-type]
            continue
        if may_interrupt(scope, frame, None, task):
            request._fired()
            return Preempted(scope._preempt_reason())
        again = True
    return again


# Code where the innermost frame is never interrupted, whatever the scope:
# framework and marked code, learnt as met (the C side skips the handler
# there).  Only grows: both properties are fixed for a code object.
_never_here: set[CodeType] = set()

_core.set_interrupt_handler(_on_main_thread_call, _never_here)


# ---- the decision ----


def may_interrupt(
    scope: LimitScope,
    frame: FrameType,
    context: Context | None,
    task: object | None = None,
) -> bool:
    """True if raising in ``frame`` (running in ``context``, None for the
    current one, and in ``task``, None for code outside any task) can only
    unwind code of the scope's body that is not protected (see the module
    docstring)."""
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
    root = None
    if task is not None:
        cancel_scope = scope._cancel_scope
        if cancel_scope is not None and not scope_reaches(cancel_scope, task):
            return False  # started inside, but not owned by the scope
        root = root_frame(task)
    return _frames_allow(frame, scope._entry_frames, root)


def _frames_allow(
    frame: FrameType,
    entry_frames: tuple[FrameType, ...],
    root: FrameType | None,
) -> bool:
    _learn_drivers()
    chain: list[FrameType] = []
    current: FrameType | None = frame
    while current is not None:
        chain.append(current)
        if current is root or current in entry_frames:
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
        if _is_marked(code) or code.co_name == "__del__" or _runtime_callback(each):
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


def _runtime_callback(frame: FrameType) -> bool:
    """True for a function the runtime called on its own, in the middle of
    whatever code ran, like a ``__del__``: a weakref callback (called with
    the dead reference) or a ``gc.callbacks`` function (called with the
    phase and an info dict).  An exception raised there is never seen by the
    code around it: CPython reports it as unraisable and goes on.

    (``weakref.finalize`` and ``atexit`` need no test: the first runs in
    the weakref module, which is framework code, and the second outside any
    scope's body.)"""
    code = frame.f_code
    if not 1 <= code.co_argcount <= 3:
        return False
    # Only exact types, compared by identity: the arguments are the user's
    # objects, whose __eq__ or __bool__ may do anything (a numpy array's
    # raises).  Read only when a landing is being decided, in a body that is
    # breached already: on 3.11 and 3.12 the snapshot of the locals that
    # f_locals makes stays on the frame until it ends.
    local_values = frame.f_locals
    names = code.co_varnames[: code.co_argcount]
    arguments = [local_values.get(name) for name in names]
    if any(
        type(argument) is weakref.ReferenceType and argument() is None
        for argument in arguments[:2]
    ):
        # A weakref callback, maybe a bound method's, maybe with defaults
        # after the reference (``WeakSet``'s ``_remove(item, selfref=...)``).
        return True
    first, last = arguments[0], arguments[-1]
    return (
        len(arguments) == 2
        and type(first) is str
        and first in ("start", "stop")
        and type(last) is dict
        and "generation" in last
    )


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
    there skips the ``finally`` or ``__exit__``.  3.14 leaves more of a
    loop's tail out of the range (a body ending in an ``if``: the
    conditional jump, its ``NOT_TAKEN`` and the jump back), so the
    instruction before the jump is no witness there: a jump back must also
    have the handler of the loop head it jumps to.  The next check inside
    the loop body is a safe place; a loop without calls has none (see
    docs/preemption.md)."""
    lasti = frame.f_lasti
    code = frame.f_code
    raw = code.co_code
    ranges = _handler_ranges(code)
    here = _handler_at(ranges, lasti)
    target = _back_edges(code).get(lasti)
    if target is not None and _handler_at(ranges, target) != here:
        return False
    previous = lasti - 2
    while previous > 0 and raw[previous] == _EXTENDED_ARG:
        previous -= 2  # the prefix of this very instruction
    while previous > 0 and raw[previous] == _CACHE:
        previous -= 2  # the inline cache of the one before
    if previous < 0:
        return True
    return here == _handler_at(ranges, previous)


@functools.lru_cache(maxsize=4096)
def _back_edges(code: CodeType) -> dict[int, int]:
    """The offsets of the backward jumps of ``code``, with their targets."""
    return {
        instruction.offset: instruction.argval
        for instruction in dis.get_instructions(code)
        if instruction.opname.startswith("JUMP_BACKWARD")
        and isinstance(instruction.argval, int)
    }


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


def _reset_after_fork() -> None:
    # The poll and the deadline timers lived in the parent's delivery
    # thread, which the child has not: poll again if requests came along,
    # and let the next watched deadline schedule its scan.
    global _poll_scheduled, _next_scan
    _poll_scheduled = False
    _next_scan = math.inf
    _steps.clear()
    if _requests:
        _start_polling()


os.register_at_fork(after_in_child=_reset_after_fork)
