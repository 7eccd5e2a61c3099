"""Moving a breach from the C meter to the event loop that owns the scope.

The meter records a breach inside an allocator hook, where nothing Python
may run, and wakes this module in two ways (see ``_meter/accounts.c``):

* a pending call on the main thread, run at its next eval-breaker check
  (a few bytecodes after the allocation when the allocating task runs there);
* a semaphore that the *delivery thread* below waits on, for event loops in
  other threads and for a main thread that is blocked in C.

Either way :func:`_drain` runs with the GIL held, takes the listeners of the
breached accounts (given by ``account.enter(listener)``, dropped by
``account.leave()``, so a scope that has exited is never told) and calls
their ``_on_breach()``, which must only hand the work over to its own loop
with that loop's thread- and signal-safe entry point (:class:`LoopHandle`):
the pending call runs in the middle of arbitrary code, exactly like a signal
handler.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import SimpleNamespace, TracebackType
from typing import Any, Protocol

import anyio

from ._meter import _core

__all__ = [
    "TICK",
    "CancelScopeLike",
    "LoopHandle",
    "call_later",
    "current_loop_handle",
    "on_tick",
    "report_unraisable",
    "retry_later",
    "start_delivery",
]

_thread: threading.Thread | None = None
# Claimed, never waited for, by the one caller that starts the thread: a
# non-blocking acquire is an atomic test-and-set.  A lock waited for here
# would deadlock a pending call or signal handler that interrupts its holder
# and comes back (a breach drained during the start arms a timer).
_start_claim = threading.Lock()

TICK = 0.25  # seconds between ticks of the delivery thread (see _core.tick)
RETRY_PERIOD = 0.002  # seconds between two attempts of a deferred delivery

# Timers of the delivery thread, (due time, callback), handed over through a
# deque: its appends and pops are atomic, so loops, other threads and signal
# handlers add timers without a lock (a lock could deadlock a signal handler
# that interrupts its holder); the thread keeps them in a heap of its own.
_timer_inbox: collections.deque[tuple[float, Callable[[], object]]] = (
    collections.deque()
)


class CancelScopeLike(Protocol):
    """What a scope needs of a cancel scope: anyio's, or trio's own."""

    deadline: float
    shield: bool

    @property
    def cancel_called(self) -> bool: ...

    @property
    def cancelled_caught(self) -> bool: ...

    def cancel(self, reason: str | None = None) -> None: ...

    def __enter__(self) -> object: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...


class LoopHandle(Protocol):
    """What a scope needs from the event loop of its task."""

    thread_id: int
    """The thread the loop runs in."""

    cancel_scope_type: Callable[..., CancelScopeLike]
    """Makes cancel scopes for the loop's tasks (called with no argument, or
    with ``deadline=`` and ``shield=``): the class itself rather than
    ``anyio.CancelScope``, whose every call looks up the running library
    (a third of a scope's entry and exit)."""

    time: Callable[[], float]
    """The loop's clock, the one its deadlines use: the loop's own function
    (no frame of ours around it: a scope reads it at entry and exit)."""

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` on the loop's thread soon.

        Must be safe from any thread and from a signal handler (or a pending
        call) in the loop's own thread.  Does nothing once the loop is gone.
        """


class _AsyncioLoopHandle:
    __slots__ = ("cancel_scope_type", "loop", "thread_id", "time")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.time = loop.time
        self.thread_id = threading.get_ident()  # made on the loop's thread
        # anyio's asyncio backend class, which anyio.CancelScope() returns.
        self.cancel_scope_type: Callable[..., CancelScopeLike] = type(
            anyio.CancelScope()
        )

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        with contextlib.suppress(RuntimeError):  # closed loop: its tasks are gone
            self.loop.call_soon_threadsafe(callback)


class _TrioLoopHandle:
    __slots__ = ("cancel_scope_type", "thread_id", "time", "token")

    def __init__(self, token: object) -> None:
        import trio

        self.token = token
        self.time = trio.current_time
        self.thread_id = threading.get_ident()  # made on the loop's thread
        # anyio's trio backend wraps trio's scope and adds nothing we use.
        self.cancel_scope_type: Callable[..., CancelScopeLike] = trio.CancelScope

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        import trio

        # TrioToken.run_sync_soon is documented as signal-safe (RLock).
        with contextlib.suppress(trio.RunFinishedError):  # the run is over
            self.token.run_sync_soon(callback)  # type: ignore[attr-defined]


# The handle of the last loop seen (one per library): most programs have one
# loop, and a scope is entered for every request.  (This keeps that loop or
# trio token alive.)
_last_asyncio_handle: _AsyncioLoopHandle | None = None
_last_trio_handle: _TrioLoopHandle | None = None


def current_loop_handle() -> LoopHandle | None:
    """The loop of the task running this code, or None outside any task.

    A scope that gets a handle will wait for breaches: the first handle of a
    loop starts the delivery thread.
    """
    global _last_asyncio_handle, _last_trio_handle
    # asyncio first, without raising: it is the common case, and an exception
    # raised and caught here would cost more than the rest of a scope's entry.
    loop = asyncio._get_running_loop()
    if loop is not None and asyncio.current_task(loop) is not None:
        asyncio_handle = _last_asyncio_handle
        if asyncio_handle is None or asyncio_handle.loop is not loop:
            start_delivery()
            asyncio_handle = _last_asyncio_handle = _AsyncioLoopHandle(loop)
        return asyncio_handle
    # Not an asyncio task: a trio task (also trio in guest mode on a host
    # loop, whose steps run as plain callbacks), or no task at all.
    trio = sys.modules.get("trio")
    if trio is not None and _in_trio_task(trio):
        token = trio.lowlevel.current_trio_token()
        trio_handle = _last_trio_handle
        if trio_handle is None or trio_handle.token is not token:
            start_delivery()
            trio_handle = _last_trio_handle = _TrioLoopHandle(token)
        return trio_handle
    return None


def _in_trio_task(trio: Any) -> bool:
    in_trio_task = getattr(trio.lowlevel, "in_trio_task", None)
    if in_trio_task is not None:
        return bool(in_trio_task())
    try:  # trio < 0.23
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


def report_unraisable(exc: BaseException, message: str, culprit: object) -> None:
    """Report an exception that has nowhere to go, like a finalizer's: a
    callback run for someone else must not cost the others theirs.

    A hook set by the program (pytest's) gets it; CPython's default hook
    accepts only its own C argument type, so what it would print is printed
    here instead."""
    hook = sys.unraisablehook
    if hook is not sys.__unraisablehook__:
        args = SimpleNamespace(
            exc_type=type(exc),
            exc_value=exc,
            exc_traceback=exc.__traceback__,
            err_msg=message,
            object=culprit,
        )
        with contextlib.suppress(Exception):
            hook(args)
            return
    stderr = sys.stderr
    if stderr is not None:
        with contextlib.suppress(Exception):
            print(f"{message}: {culprit!r}", file=stderr)
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=stderr)


def _drain() -> None:
    for listener in _core.take_breached():
        try:
            listener._on_breach()
        except Exception as exc:  # nor stop the delivery thread
            report_unraisable(exc, "Exception delivering a breach", listener)


# Run by the delivery thread at every tick (every 0.25 s).
_tick_callbacks: list[Callable[[], object]] = []


def on_tick(callback: Callable[[], object]) -> None:
    """Run ``callback()`` in the delivery thread at every tick (0.25 s)."""
    _tick_callbacks.append(callback)


def call_later(delay: float, callback: Callable[[], object]) -> None:
    """Run ``callback()`` in the delivery thread in ``delay`` seconds.

    Safe from any thread and from a signal handler or pending call, so it
    never starts the thread (that takes threading's own locks and waits for
    the new thread): the scope the callback is for started it on entry,
    and a callback added before it runs waits for it.  The callback must
    be quick: it delays every breach delivered after it.
    """
    _timer_inbox.append((time.monotonic() + delay, callback))
    _core.wake_delivery_thread()  # it may be in a longer wait


def retry_later(loop: LoopHandle, callback: Callable[[], object]) -> None:
    """Run ``callback`` on ``loop`` in about :data:`RETRY_PERIOD` seconds."""
    call_later(RETRY_PERIOD, lambda: loop.call_soon_threadsafe(callback))


def _delivery_thread_main() -> None:
    timers: list[tuple[float, int, Callable[[], object]]] = []
    order = itertools.count()  # ties never compare the callbacks
    next_tick = time.monotonic()
    while True:
        while _timer_inbox:
            due, callback = _timer_inbox.popleft()
            heapq.heappush(timers, (due, next(order), callback))
        wait = TICK
        if timers:
            wait = min(wait, max(timers[0][0] - time.monotonic(), 0.0))
        if _core.wait_for_breach(wait):
            _drain()
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            callback = heapq.heappop(timers)[2]
            try:
                callback()
            except Exception as exc:
                report_unraisable(exc, "Exception in a delivery timer", callback)
        if now >= next_tick:
            for callback in (_core.tick, *_tick_callbacks):
                try:
                    # _core.tick lets the interval rise again and puts lost
                    # hooks back (its RuntimeWarning may be an error: -W error)
                    callback()
                except Exception as exc:
                    report_unraisable(exc, "Exception in the delivery tick", callback)
            next_tick = time.monotonic() + TICK


def start_delivery() -> None:
    """Start the delivery thread unless it runs or is being started.

    Ordinary code only (a scope's entry), never a pending call or a signal
    handler: starting a thread takes threading's locks, which the
    interrupted code may hold.  It never waits, so one that interrupts a
    start in progress returns at once and the start goes on."""
    global _thread
    if _thread is not None or not _start_claim.acquire(blocking=False):
        return
    try:
        # No thread can start once the interpreter is finalizing (a scope
        # in a __del__ run at exit): 3.12+ raise, 3.11 waits forever.
        if sys.is_finalizing():
            _start_claim.release()
            return
        _core.set_breach_handler(_drain)
        thread = threading.Thread(
            target=_delivery_thread_main,
            name="memlimits_async delivery",
            daemon=True,
        )
        thread.start()
    except BaseException:
        _start_claim.release()  # the next scope entry tries again
        raise
    _thread = thread


def _restart_after_fork() -> None:
    # Only the forking thread survives a fork.  Its open scopes go on in
    # the child, and may breach there: if the parent had a delivery thread
    # (so they may wait for breaches), the child starts its own at once,
    # here in ordinary code, since the timers their breaches arm come from
    # pending calls, which must not start it.  Otherwise the next scope
    # entry starts it.  (Nothing runs the bodies of the other threads'
    # scopes in the child: their accounts are charged only by contexts
    # copied from them.)
    global _thread, _start_claim, _last_asyncio_handle, _last_trio_handle
    parent_had_thread = _thread is not None
    _thread = None
    _start_claim = threading.Lock()
    _timer_inbox.clear()
    _last_asyncio_handle = _last_trio_handle = None
    if parent_had_thread and _core.current_account.get(None) is not None:
        start_delivery()


os.register_at_fork(after_in_child=_restart_after_fork)
