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
  :func:`memlimits_async.run_sync`'s fence runs, or (3.12+) that an anyio
  or trio worker thread runs for the task awaiting it;
* never in code marked ``@interrupt_safe``, in a ``__del__``, a weakref or
  ``gc`` callback, inside an ``interrupt_safe()`` region or shielded scope
  opened inside the breached scope, nor in framework code (the event loops
  and their primitives, threading, queue, contextlib, weakref, importlib,
  warnings, this package's core: not its public integration modules, which
  are wrappers like a user's) or in user code that framework code called: only
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
run in threads, ``run_sync`` workers), on 3.12 and later, the same: while a
preemption is due there, ``sys.monitoring`` INSTRUCTION events are on for the
code objects of that thread's stack, and the callback decides in the thread,
before one of the instructions where an exception is handled exactly as at
a statement boundary (:func:`_landings`), and raises there
(:data:`MONITORING_ROUTE`).  On 3.11 the delivery thread decides from the
thread's current frame and arms ``PyThreadState_SetAsyncExc`` only if the
thread has not moved since, without releasing the GIL in between.

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
from ._masking import region_account, shielded_within
from ._meter import _core
from ._task_tree import current_task_of, root_frame, scope_reaches, worker_awaiter

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
enough that the overshoot stays bounded: a body building fresh memory gets
about 100 MB past a memory limit in that time (1.2-2 GB/s), one reusing
memory its process freed before several times more (docs/preemption.md)."""

MONITORING_ROUTE: Final = sys.version_info >= (3, 12)
"""Whether other threads are preempted from inside, by ``sys.monitoring``
INSTRUCTION events switched on while a preemption is due (3.12 and later),
rather than by ``PyThreadState_SetAsyncExc`` armed from the delivery thread
(3.11).  The latter cannot be used on 3.13 and later: they check for an
asynchronous exception with the eval-breaker bits read *before* waiting for
the GIL, so an exception armed while a thread waits lands at its next
check, a place nobody looked at (measured: past the end of a ``try``,
skipping its ``finally``).  On 3.12 both work; this one lands sooner and
also stops one-line loops without calls (docs/preemption.md)."""

MONITORING_TOOL_IDS: Final = (4, 3)
"""The ``sys.monitoring`` tool ids tried, in this order, while a preemption
is due: not those that debuggers, coverage tools, profilers and optimizers
use by convention (0, 1, 2, 5).  When both are taken, 3.12 falls back to
``PyThreadState_SetAsyncExc`` and later versions do not preempt other
threads until one is free."""

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
# The event loops' own: they also call plain functions of their own or a
# callback's (trio's scheduler checks its instruments with a dict's
# ``__contains__``), which are no task's code; only a coroutine (or
# generator) they resume is.
_loop_driver_codes: set[CodeType] = set()
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

    def overrun(self) -> bool:
        """True once the body has gone a quarter past a byte limit of its
        scope: it is preempted then, grace or not.  A body allocating
        untouched pages (``bytearray(1 << 20)`` in a loop) went 200 MB past
        a 50 MiB limit within the 0.05 s grace; the grace is there to let a
        body reach its own checkpoint, not to let it grow without bound."""
        account = self.account
        if account is None or self.fired:
            # Once preempted, a body that goes on (it caught the Preempted
            # to clean up) gets its grace again: preempting its except
            # block at once would cut the cleanup short.
            return False
        scope = self.scope
        memory, allocations = scope._memory, scope._allocations
        if memory is None and allocations is None:
            return False
        allocated, live, _ = account.usage()
        return (memory is not None and live >= memory + (memory >> 2)) or (
            allocations is not None and allocated >= allocations + (allocations >> 2)
        )

    def _fired(self) -> None:
        self.fired += 1
        # A body that catches Preempted and goes on gets another grace.
        self.due = time.monotonic() + self.grace
        self.scope._note_preempted()

    def _unfired(self) -> None:
        """Runs in the thread where an exception armed from outside
        (:func:`_attempt_in_thread`) was disarmed before it landed, because
        the call the thread was in failed (``interrupts.c``): nothing was
        raised, and the scope must not report a preemption (its timeout
        would count as having cut the body).  Due again at once: the next
        poll decides afresh."""
        self.fired -= 1
        self.due = time.monotonic()
        self.scope._preempted -= 1


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
        _monitor(None)  # nothing is due any more: every event off
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
    due: dict[int, tuple[set[CodeType], float]] = {}
    delivery_thread = threading.get_ident()
    try:
        if _MAIN_THREAD in _polled_threads:
            # Decided and raised there, at its next eval-breaker check.
            _core.call_on_main_thread()
        if MONITORING_ROUTE:
            # Every thread: whatever runs charged to a waiting scope, also
            # work handed to anyio's or trio's worker threads without
            # run_sync (a thread's own code is never the scope's body:
            # _frames_allow).
            for thread_id, frame in sys._current_frames().items():
                if thread_id not in (_MAIN_THREAD, delivery_thread):
                    seen = _due_in_thread(thread_id, frame)
                    if seen is not None:
                        codes, ripe_at = seen
                        armed_codes = codes | _armed.get(thread_id, set())
                        due[thread_id] = (armed_codes, ripe_at)
        else:
            # Only where a waiting scope was entered and run_sync's fenced
            # workers: an asynchronous exception armed in anyio's own
            # worker loop would kill its thread.
            for thread_id in {*_polled_threads, *_workers}:
                if thread_id not in (_MAIN_THREAD, delivery_thread):
                    fired = _attempt_in_thread(thread_id) or fired
        if due and _monitor_tool() is None:
            # Both tool ids are taken: 3.12 can still arm an asynchronous
            # exception; later versions wait for the next checkpoint.
            if sys.version_info < (3, 13):
                for thread_id in due:
                    fired = _attempt_in_thread(thread_id) or fired
            due = {}
        _monitor(due)
        fired = fired or bool(due)  # lands in the thread: look again soon
    finally:
        # Whatever happened, the next poll comes: the flag says one will.
        # Quick while something may land, then backing off while nothing
        # does: the main thread's own retries are quicker (interrupts.c).
        now = time.monotonic()
        if fired or any(
            not request.fired
            and now < request.due
            and (
                request.scope._memory is not None
                or request.scope._allocations is not None
            )
            for request in list(_requests.values())
        ):
            # Quick too while a body may be running past a byte limit within
            # its grace (PreemptRequest.overrun): at 4 GB/s, 10 ms is 40 MB.
            # Only then: once the grace is over the usual rule applies, and
            # a request that waits long (its body blocked) is polled less.
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


def _step_of(
    thread_id: int, task: object | None, loop: LoopHandle, now: float
) -> _Step:
    """The step running in ``thread_id`` (in ``task``), as seen from now:
    a new one if the last one seen has ended or was another task's."""
    step = _steps.get(thread_id)
    if step is None or step.ended or step.task != id(task):
        step = _steps[thread_id] = _Step(id(task), now, _thread_cpu_time(thread_id))
        loop.call_soon_threadsafe(step.end)
    return step


def _step_ran_for(step: _Step, thread_id: int, now: float, grace: float) -> bool:
    """True if ``step`` (running in ``thread_id``) has run for ``grace``
    seconds without a checkpoint (``_Step``)."""
    elapsed = now - step.since
    return elapsed >= grace and (
        _thread_cpu_time(thread_id) - step.cpu_since >= grace / 2
        or elapsed >= 4 * grace
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
    if loop is None:
        return now >= request.due or request.overrun()
    # The step is looked at before the grace has passed, so that a body
    # already running when it does is not given another grace.
    step = _step_of(thread_id, task, loop, now)
    if request.overrun():
        return True  # what runs now is charged to it, and allocating
    return now >= request.due and _step_ran_for(step, thread_id, now, request.grace)


def _ripe_at(
    request: PreemptRequest,
    thread_id: int,
    task: object | None,
    loop: LoopHandle | None,
    now: float,
) -> float:
    """When :func:`_ripe` becomes true if the same step goes on running
    (on a CPU: the thread's CPU time is checked where it lands)."""
    if request.overrun():
        return now
    if loop is None:
        return request.due
    step = _step_of(thread_id, task, loop, now)
    return max(request.due, step.since + request.grace)


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
    handled: object = sys._current_exceptions().get(thread_id)
    if isinstance(handled, tuple):  # 3.11: sys.exc_info() of the thread
        handled = handled[1]
    if isinstance(handled, Preempted):
        return False  # cleaning up after one: as _on_monitored_instruction
    running = context.get(current_account)
    now = time.monotonic()
    for request in _requests_around(running):
        scope = request.scope
        loop, task = _loop_and_task(scope, thread_id)
        if not _ripe(request, thread_id, task, loop, now):
            continue
        if may_interrupt(
            scope, frame, context, task, awaiter=_workers.get(thread_id)
        ) and _core.raise_in_thread_at(
            thread_id,
            frame,
            frame.f_lasti,
            current_account,
            running,
            Preempted,
            request._unfired,
        ):
            request._fired()
            return True
    return False


# ---- other threads, 3.12+: deciding inside the thread (sys.monitoring) ----
#
# While a preemption is due in a thread, the poll above switches on
# INSTRUCTION events for the code objects on that thread's stack (the
# scope's body and what it runs, sampled again at each poll, so that code
# entered later is added) and arms the thread in C (``monitor_arm``).  The
# callback (``_core.monitor_event``) runs in whatever thread executes that
# code, before an instruction: in a thread that is not armed, or at an
# instruction that is not a landing point (:func:`_landings`), it returns at
# once in C.  Otherwise :func:`_on_monitored_instruction` decides there, as
# the main thread's pending call does, and the exception it returns is
# raised at that instruction.  Once no preemption is due, every event is
# switched off; the tool id stays held, with no event on (which costs
# nothing), because freeing it makes CPython re-instrument every function
# of the program at its next call (the global monitoring version moves),
# and on 3.14+ give each one it had not instrumented yet 128 bytes of
# instrumentation data, charged to whatever scope runs it.  Only the
# delivery thread switches events on and off.

_armed: dict[int, set[CodeType]] = {}  # thread -> code objects seen running
_monitored: dict[CodeType, bytes] = {}  # code -> landings, events on
_tool: int | None = None  # the sys.monitoring tool id held, if any
# How long before a preemption is due its thread is armed, beyond the
# switch interval: the poll that sees it coming may be the last one before
# it is due (polls are at most MAX_RETRY_PERIOD apart, and each must win the
# GIL from the running thread, up to a switch interval), and the landing
# then owes nothing to when the next poll runs.  Measured on 3.13 with a
# 0.05 s grace: median 2.5 ms after the grace against 8.2 ms when armed
# only once due.  What it costs: INSTRUCTION events on the code objects of
# that stack (the code runs 4-10 times slower) for that long at most.
_ARM_AHEAD: Final = MAX_RETRY_PERIOD + 0.001


_TOOL_NAME: Final = "memlimits_async"


def _still_ours() -> bool:
    """Whether the tool id kept is still this module's.  Held between
    preemptions, it may be freed by someone else (and taken again): then its
    events went with it, and the module forgets it rather than act on
    another tool's id (set_local_events raised in the delivery thread, and
    no thread was preempted any more)."""
    global _tool
    tool = _tool
    if tool is None:
        return False
    monitoring = sys.monitoring  # type: ignore[attr-defined,unused-ignore]
    if monitoring.get_tool(tool) == _TOOL_NAME:
        return True
    _tool = None
    _monitored.clear()
    if _armed:
        _armed.clear()
        _core.monitor_arm(None, (), ())
    return False


def _monitor_tool() -> int | None:
    """The tool id this module holds, taking one if it holds none."""
    global _tool
    if not _still_ours():
        monitoring = sys.monitoring  # type: ignore[attr-defined,unused-ignore]
        for tool in MONITORING_TOOL_IDS:
            if monitoring.get_tool(tool) is None:
                try:
                    monitoring.use_tool_id(tool, _TOOL_NAME)
                except ValueError:  # taken by another thread in between
                    continue
                monitoring.register_callback(
                    tool, monitoring.events.INSTRUCTION, _core.monitor_event
                )
                _tool = tool
                break
    return _tool


def _monitor(armed: dict[int, tuple[set[CodeType], float]] | None) -> None:
    """Arm exactly ``armed`` (thread -> code objects to watch in it, and
    when the preemption is due there); None or empty: switch every event
    off (the tool id stays held: see above)."""
    if not (armed or _monitored or _armed) or not _still_ours():
        return
    tool = _tool
    assert tool is not None
    monitoring = sys.monitoring  # type: ignore[attr-defined,unused-ignore]
    wanted: set[CodeType] = set()
    for codes, _ in (armed or {}).values():
        wanted |= codes
    for code in [code for code in _monitored if code not in wanted]:
        monitoring.set_local_events(tool, code, 0)
        del _monitored[code]
    for code in wanted:
        if code not in _monitored:
            try:
                landings = _landings(code)
            except Exception:  # a layout dis does not know: never land there
                continue
            if any(landings):
                _monitored[code] = landings
                monitoring.set_local_events(tool, code, monitoring.events.INSTRUCTION)
    _armed.clear()
    if armed:
        _armed.update((thread_id, codes) for thread_id, (codes, _) in armed.items())
        _core.monitor_arm(
            _on_monitored_instruction,
            tuple(
                (thread_id, int(ripe_at * 1e9))  # time.monotonic()'s clock, in ns
                for thread_id, (_, ripe_at) in armed.items()
            ),
            tuple(_monitored.items()),
        )
    else:
        _core.monitor_arm(None, (), ())


def _release_monitor_tool() -> None:
    """Switch every event off and free the tool id (for tests that take
    every id themselves)."""
    global _tool
    if not _still_ours():
        return
    tool = _tool
    assert tool is not None
    _monitor(None)
    monitoring = sys.monitoring  # type: ignore[attr-defined,unused-ignore]
    monitoring.register_callback(tool, monitoring.events.INSTRUCTION, None)
    monitoring.free_tool_id(tool)
    _tool = None


def _due_in_thread(
    thread_id: int, frame: FrameType
) -> tuple[set[CodeType], float] | None:
    """From the delivery thread: if a preemption is due in ``thread_id``
    (running ``frame``) within :data:`_ARM_AHEAD`, the code objects of its
    stack where it may land (maybe none for now) and when it is due
    (``time.monotonic()``), else None."""
    context = _core.thread_context(thread_id)
    if context is None:
        return None
    now = time.monotonic()
    for request in _requests_around(context.get(current_account)):
        scope = request.scope
        loop, task = _loop_and_task(scope, thread_id)
        ripe_at = _ripe_at(request, thread_id, task, loop, now)
        if ripe_at <= now + _ARM_AHEAD + sys.getswitchinterval():
            root = root_frame(task) if task else None
            return _body_codes(frame, scope, root), ripe_at
    return None


def _body_codes(
    frame: FrameType, scope: LimitScope, root: FrameType | None
) -> set[CodeType]:
    """The code objects of the frames from ``frame`` out to the scope's body
    where a preemption may land: neither framework nor marked code."""
    _learn_drivers()
    codes: set[CodeType] = set()
    current: FrameType | None = frame
    while current is not None:
        code = current.f_code
        if not (code in _never_here or _is_marked(code) or _is_framework(current)):
            codes.add(code)
        if current is root or current in scope._entry_frames:
            return codes
        outer = current.f_back
        if outer is not None and outer.f_code in _driver_codes:
            return codes
        current = outer
    return set()  # not the scope's body: a loop's or a thread's own code


def _on_monitored_instruction() -> BaseException | None:
    """Runs in an armed thread, before a landing point of a monitored code
    object (the caller's frame): the exception to raise there, or None."""
    running = current_account.get(None)
    if running is None or not _requests or isinstance(sys.exception(), Preempted):
        # Outside every scope, or cleaning up after a Preempted (code that an
        # `except` or `finally` handling it calls): let that finish first.
        return None
    frame = sys._getframe(1)
    thread_id = threading.get_ident()
    now = time.monotonic()
    for request in _requests_around(running):
        scope = request.scope
        loop, task = _loop_and_task(scope, thread_id)
        if _still_ripe(request, thread_id, loop, now) and may_interrupt(
            scope, frame, None, task, awaiter=worker_awaiter(), at_landing=True
        ):
            request._fired()
            return Preempted(scope._preempt_reason())
    return None


def _still_ripe(
    request: PreemptRequest, thread_id: int, loop: LoopHandle | None, now: float
) -> bool:
    """:func:`_ripe` as the delivery thread saw it, from inside the thread:
    the same step (as seen from outside: trio's task is known only inside),
    which has run for the grace."""
    if request.overrun():
        return True
    if now < request.due:
        return False
    if loop is None:
        return True
    step = _steps.get(thread_id)
    asyncio_loop = getattr(loop, "loop", None)
    outside_task = current_task_of(asyncio_loop) if asyncio_loop is not None else None
    return (
        step is not None
        and not step.ended
        and step.task == id(outside_task)
        and _step_ran_for(step, thread_id, now, request.grace)
    )


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


def take_deadline_inbox(
    inbox: collections.deque[tuple[float, int]],
    heap: list[tuple[float, int]],
    live: dict[int, LimitScope],
) -> None:
    """Move the inbox's pairs of scopes still waiting into the heap.

    Most scopes of a server (a request's) have exited by the next tick:
    pushing their pairs too, thousands per tick, held the GIL for
    milliseconds (a server's p99 latency), for pairs that the next
    compaction drops."""
    while inbox:
        entry = inbox.popleft()
        scope = live.get(entry[1])
        if scope is not None and scope._watched_deadline == entry[0]:
            heapq.heappush(heap, entry)


def scan_deadlines() -> None:
    """In the delivery thread: arm the scopes whose deadline has passed."""
    global _next_scan, _deadline_heap
    # First, so that a deadline watched from now on schedules a scan of its
    # own if it is due before the next tick, whatever happens below.
    _next_scan = math.inf
    heap = _deadline_heap
    take_deadline_inbox(_deadline_inbox, heap, _deadlines)
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

_workers: dict[int, object | None] = {}
"""Threads running ``run_sync`` work, and the task awaiting each (see
:func:`worker_awaiter`): any of them may be running a breached scope's code
(their context says whose)."""


def run_fenced(function: Callable[..., T], args: tuple[object, ...]) -> T:
    """Run ``function(*args)`` in this worker thread so that a preemption
    can land only inside it: this frame is a task driver (the frame it
    calls is the outermost one that may be interrupted), and an interrupt
    armed too late is disarmed before the thread goes back to its pool."""
    thread_id = threading.get_ident()
    _workers[thread_id] = worker_awaiter()
    try:
        return function(*args)
    finally:
        _workers.pop(thread_id, None)
        _core.disarm()


def _on_main_thread_call() -> BaseException | bool:
    """Runs at an eval-breaker check of the main thread (a pending call):
    the frame that called it is the code being interrupted.  Returns the
    exception to raise there, True to be called again shortly (a request is
    due but this is not a place to land), or False."""
    running = current_account.get(None)
    if running is None or not _requests:
        return False
    now = time.monotonic()
    again = False
    for request in _requests_around(running):
        scope = request.scope
        loop, task = _loop_and_task(scope, _MAIN_THREAD)  # type: ignore[arg-type]
        if not _ripe(request, _MAIN_THREAD, task, loop, now):  # type: ignore[arg-type]
            continue
        # Only now: sys._getframe makes the frame's object, charged to the
        # running scope and alive as long as the frame (a scope around
        # code that no waiting request concerns counted it as live bytes).
        frame = sys._getframe(1)
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
    *,
    awaiter: object | None = None,
    at_landing: bool = False,
) -> bool:
    """True if raising in ``frame`` (running in ``context``, None for the
    current one, and in ``task``, None for code outside any task, such as a
    worker thread's, then run for ``awaiter`` if known) can only unwind code
    of the scope's body that is not protected (see the module docstring).
    ``at_landing``: the frame is about to run one of its :func:`_landings`,
    where the handlers around it were checked already (rather than at an
    eval-breaker check)."""
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
        return False  # a region opened inside the scope
    if shielded_within(running, account):
        return False  # a shielded scope opened inside it
    root = None
    cancel_scope = scope._cancel_scope
    owner = task if task is not None else awaiter
    if (
        owner is not None
        and cancel_scope is not None
        and not scope_reaches(cancel_scope, owner)
    ):
        # Started inside, but not owned by the scope: nothing inside it
        # would absorb the Preempted (a worker's raises in its awaiter).
        return False
    if task is not None:
        root = root_frame(task)
    return _frames_allow(frame, scope._entry_frames, root, at_landing)


def _frames_allow(
    frame: FrameType,
    entry_frames: tuple[FrameType, ...],
    root: FrameType | None,
    at_landing: bool = False,
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
            if outer.f_code in _loop_driver_codes and not (
                current.f_code.co_flags & _RESUMABLE
            ):
                # A function the loop itself called, between task steps: a
                # Preempted raised there would unwind the scheduler (trio's
                # then fails with TrioInternalError, and its nurseries and
                # epoll object are left broken).
                return False
            break
        current = outer
    else:
        return False  # never reached the scope's body: loop or thread code
    innermost = frame.f_code
    if _is_marked(innermost) or _is_framework(frame):
        _never_here.add(innermost)
        return False
    if _about_to_await(frame) or not (at_landing or _handled_like_its_neighbour(frame)):
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


def _opcodes(*names: str) -> frozenset[int]:
    return frozenset(dis.opmap[name] for name in names if name in dis.opmap)


# Instructions an exception table may place outside the handler range of
# the code around them (cpython#108214, #130279: a loop's jump back), and
# that never raise: the handler in force at one is that of the code before.
_SEE_THROUGH: Final = _opcodes(
    "NOP",
    "NOT_TAKEN",
    "EXTENDED_ARG",
    "JUMP_FORWARD",
    "JUMP_BACKWARD",
    "JUMP_BACKWARD_NO_INTERRUPT",
    "JUMP_BACKWARD_NO_JIT",
)
_NO_FALL_THROUGH: Final = _opcodes(
    "JUMP_FORWARD",
    "JUMP_BACKWARD",
    "JUMP_BACKWARD_NO_INTERRUPT",
    "JUMP_BACKWARD_NO_JIT",
    "RETURN_VALUE",
    "RETURN_CONST",
    "RAISE_VARARGS",
    "RERAISE",
)
_LOOP_BACK: Final = _opcodes("JUMP_BACKWARD", "JUMP_BACKWARD_NO_JIT")
# Never land just before these: the machinery of await, of generators and
# of exception handling, where an exception would cut a protocol in half.
_NOT_BEFORE: Final = _SEE_THROUGH | _opcodes(
    "RESUME",
    "RETURN_GENERATOR",
    "GET_AWAITABLE",
    "SEND",
    "YIELD_VALUE",
    "END_SEND",
    "CLEANUP_THROW",
    "GET_AITER",
    "GET_ANEXT",
    "END_ASYNC_FOR",
    "BEFORE_ASYNC_WITH",
    "PUSH_EXC_INFO",
    "POP_EXCEPT",
    "RERAISE",
    "WITH_EXCEPT_START",
    "CHECK_EXC_MATCH",
    "CHECK_EG_MATCH",
)
_JUMPS: Final = frozenset(getattr(dis, "hasjump", None) or (*dis.hasjrel, *dis.hasjabs))
_POP_EXCEPT: Final = dis.opmap["POP_EXCEPT"]


@functools.lru_cache(maxsize=1024)
def _landings(code: CodeType) -> bytes:
    """Where a preemption decided inside a thread may land in ``code``: one
    byte per code unit, nonzero before the instructions where an exception
    is handled exactly as at the statement boundary it stands for.

    The candidates are the first instruction of each line and the head of
    each loop (where its jump back goes: a loop on one line has no other).
    One is kept only if every way in comes from code under the same
    handler, or from code under none (entering a ``try``): the first
    instruction after a ``with`` or ``try``/``finally`` body runs its exit,
    and landing there would skip it.  Jumps and no-ops are seen through,
    since CPython may range them outside the ``try`` they belong to (the
    cpython#108214 shapes).  Never inside an ``except`` or ``finally``
    handler (from its start to its ``POP_EXCEPT``), nor before the
    instructions of await, generators and exception handling (:data:`_NOT_BEFORE`).
    """
    instructions = list(dis.get_instructions(code))
    index = {each.offset: i for i, each in enumerate(instructions)}
    before: list[list[int]] = [[] for _ in instructions]
    after: list[list[int]] = [[] for _ in instructions]
    for i, each in enumerate(instructions):
        if each.opcode not in _NO_FALL_THROUGH and i + 1 < len(instructions):
            after[i].append(i + 1)
            before[i + 1].append(i)
        if each.opcode in _JUMPS and each.argval in index:
            target = index[each.argval]
            after[i].append(target)
            before[target].append(i)
    ranges = _handler_ranges(code)
    in_handler: set[int] = set()
    stack = [index[target] for _, _, target in ranges if target in index]
    while stack:
        i = stack.pop()
        if i in in_handler:
            continue
        in_handler.add(i)
        if instructions[i].opcode != _POP_EXCEPT:
            stack.extend(after[i])
    candidates = {
        index[offset]
        for offset, line in dis.findlinestarts(code)
        if line is not None and offset in index
    }
    candidates.update(
        index[each.argval]
        for each in instructions
        if each.opcode in _LOOP_BACK and each.argval in index
    )
    landings = bytearray(len(code.co_code) // 2)
    for i in candidates:
        while instructions[i].opcode in _SEE_THROUGH and after[i] == [i + 1]:
            i += 1  # a no-op before the real start
        each = instructions[i]
        if i in in_handler or (
            each.opcode in _NOT_BEFORE
            and not (
                _jump_of_an_empty_loop(i, instructions, index)
                and not _outside_a_try_it_is_in(each, ranges)
            )
        ):
            continue
        handler = _handler_at(ranges, each.offset)
        ways_in = _ways_in(i, before, instructions)
        if ways_in and all(
            _handler_at(ranges, instructions[j].offset) in (handler, -1)
            for j in ways_in
        ):
            landings[each.offset // 2] = 1
    return bytes(landings)


def _jump_of_an_empty_loop(
    i: int, instructions: list[dis.Instruction], index: dict[int, int]
) -> bool:
    """Whether instruction ``i`` is the jump back of a loop with nothing
    else in it (``while True: pass``): no instruction to land before but
    the jump, which is kept when its handler is that of every way in, like
    any other candidate (a jump CPython ranged outside its ``try`` is not)."""
    each = instructions[i]
    if each.opcode not in _LOOP_BACK:
        return False
    head = index.get(each.argval)
    return head is not None and all(
        instructions[k].opcode in _SEE_THROUGH for k in range(head, i + 1)
    )


def _outside_a_try_it_is_in(
    jump: dis.Instruction, ranges: tuple[tuple[int, int, int], ...]
) -> bool:
    """Whether a jump under no handler stands between a range's start and
    its handler: inside a ``try`` (or ``with``) whose range CPython ended
    before the jump, where the code before the loop is under no handler
    either (a ``try`` at the top of a function): both sides read -1 and the
    check on the ways in cannot see it."""
    return _handler_at(ranges, jump.offset) == -1 and any(
        start < jump.offset < target for start, _, target in ranges
    )


def _ways_in(
    i: int, before: list[list[int]], instructions: list[dis.Instruction]
) -> set[int]:
    """The instructions that can run just before instruction ``i``, seen
    through jumps and no-ops."""
    found: set[int] = set()
    seen: set[int] = set()
    stack = list(before[i])
    while stack:
        j = stack.pop()
        if j in seen:
            continue
        seen.add(j)
        if instructions[j].opcode in _SEE_THROUGH:
            stack.extend(before[j])
        else:
            found.add(j)
    return found


def _is_framework(frame: FrameType) -> bool:
    module = frame.f_globals.get("__name__")
    if not isinstance(module, str):
        return False
    top, _, rest = module.partition(".")
    if top == "memlimits_async":
        # Only the core (the package module and its private modules) is
        # framework code; a public integration module (Dask's plugin, ASGI
        # middleware) is a wrapper like a user's: what it calls must stay
        # interruptible.
        return not rest or rest[0] == "_"
    return top in _FRAMEWORK_PACKAGES


def _learn_drivers() -> None:
    """Add the task drivers of the frameworks imported so far."""
    if not _driver_codes:
        _driver_codes.add(run_fenced.__code__)
    if "asyncio" not in _drivers_known and "asyncio" in sys.modules:
        import asyncio.events

        _driver_codes.add(asyncio.events.Handle._run.__code__)
        _loop_driver_codes.add(asyncio.events.Handle._run.__code__)
        _drivers_known.add("asyncio")
    if "trio" not in _drivers_known and "trio" in sys.modules:
        from trio._core import _run as trio_run

        _driver_codes.add(trio_run.unrolled_run.__code__)
        _loop_driver_codes.add(trio_run.unrolled_run.__code__)
        _drivers_known.add("trio")
    # What calls the function handed to a worker thread, so that what it
    # raises goes to the task that awaits it: anyio's (both backends) and
    # trio's to_thread.  The worker's own loop is not the scope's body.
    for module, owner, name, nested in (
        ("anyio._backends._asyncio", "WorkerThread", "run", None),
        (
            "anyio._backends._trio",
            "TrioBackend",
            "run_sync_in_worker_thread",
            "wrapper",
        ),
        ("trio._threads", None, "to_thread_run_sync", "worker_fn"),
    ):
        if module not in _drivers_known and module in sys.modules:
            _drivers_known.add(module)
            found = getattr(sys.modules[module], owner or name, None)
            code = getattr(
                getattr(found, name, None) if owner else found, "__code__", None
            )
            if code is not None and nested is not None:
                code = next(
                    (
                        const
                        for const in code.co_consts
                        if isinstance(const, CodeType) and const.co_name == nested
                    ),
                    None,
                )
            if code is not None:
                _driver_codes.add(code)


def _reset_after_fork() -> None:
    # The poll and the deadline timers lived in the parent's delivery
    # thread, which the child has not: poll again if requests came along,
    # and let the next watched deadline schedule its scan.
    global _poll_scheduled, _next_scan
    _poll_scheduled = False
    _next_scan = math.inf
    _steps.clear()
    # The armed threads are the parent's: the child starts with every
    # event off (and polls to switch them on again if it must).  It keeps
    # the tool id, for the reason above.
    _monitor(None)
    if _requests:
        _start_polling()


os.register_at_fork(after_in_child=_reset_after_fork)
