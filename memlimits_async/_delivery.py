"""Moving a breach from the C meter to the event loop that owns the scope.

The meter records a breach inside an allocator hook, where nothing Python
may run, and wakes this module in two ways (see ``_meter/accounts.c``):

* a pending call on the main thread, run at its next eval-breaker check
  (a few bytecodes after the allocation when the allocating task runs there);
* a semaphore that the *delivery thread* below waits on, for event loops in
  other threads and for a main thread that is blocked in C.

Either way :func:`_drain` runs with the GIL held, takes the callbacks of the
breached accounts (given by ``account.enter(on_breach)``, dropped by
``account.leave()``, so a scope that has exited is never called) and calls
them.  A callback must only hand the work over to its own loop with that
loop's thread- and signal-safe entry point (:class:`LoopHandle`): the pending
call runs in the middle of arbitrary code, exactly like a signal handler.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, Protocol

from ._meter import _core

__all__ = ["LoopHandle", "current_loop_handle", "report_unraisable", "retry_later"]

_thread: threading.Thread | None = None
_thread_lock = threading.Lock()

_WAIT = 0.25  # seconds between ticks of the meter (see _core.tick)
RETRY_PERIOD = 0.002  # seconds between two attempts of a deferred delivery

# Deliveries put off (by an interrupt-safe coroutine) until a later attempt;
# deque appends and pops are atomic, so the loops and the delivery thread
# share it without a lock.
# Entries are (due time, loop, callback), in order of due time.
_retries: collections.deque[tuple[float, LoopHandle, Callable[[], object]]] = (
    collections.deque()
)


class LoopHandle(Protocol):
    """What a scope needs from the event loop of its task."""

    def time(self) -> float:
        """The loop's clock, the one its deadlines use."""

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` on the loop's thread soon.

        Must be safe from any thread and from a signal handler (or a pending
        call) in the loop's own thread.  Does nothing once the loop is gone.
        """


class _AsyncioLoopHandle:
    __slots__ = ("loop",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def time(self) -> float:
        return self.loop.time()

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        with contextlib.suppress(RuntimeError):  # closed loop: its tasks are gone
            self.loop.call_soon_threadsafe(callback)


class _TrioLoopHandle:
    __slots__ = ("token",)

    def __init__(self, token: object) -> None:
        self.token = token

    def time(self) -> float:
        import trio

        return trio.current_time()

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
            _start_delivery()
            asyncio_handle = _last_asyncio_handle = _AsyncioLoopHandle(loop)
        return asyncio_handle
    # Not an asyncio task: a trio task (also trio in guest mode on a host
    # loop, whose steps run as plain callbacks), or no task at all.
    trio = sys.modules.get("trio")
    if trio is not None and _in_trio_task(trio):
        token = trio.lowlevel.current_trio_token()
        trio_handle = _last_trio_handle
        if trio_handle is None or trio_handle.token is not token:
            _start_delivery()
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
    callback run for someone else must not cost the others theirs."""
    sys.unraisablehook(
        SimpleNamespace(
            exc_type=type(exc),
            exc_value=exc,
            exc_traceback=exc.__traceback__,
            err_msg=message,
            object=culprit,
        )
    )


def _drain() -> None:
    for callback in _core.take_breached():
        try:
            callback()
        except Exception as exc:  # nor stop the delivery thread
            report_unraisable(exc, "Exception delivering a breach", callback)


def retry_later(loop: LoopHandle, callback: Callable[[], object]) -> None:
    """Run ``callback`` on ``loop`` in about :data:`RETRY_PERIOD` seconds."""
    _start_delivery()
    _retries.append((time.monotonic() + RETRY_PERIOD, loop, callback))
    if len(_retries) == 1:
        _core.wake_delivery_thread()  # it may be in a 0.25 s wait


def _delivery_thread_main() -> None:
    next_tick = time.monotonic()
    while True:
        wait = _WAIT
        if _retries:
            wait = min(wait, max(_retries[0][0] - time.monotonic(), 0.0))
        if _core.wait_for_breach(wait):
            _drain()
        now = time.monotonic()
        while _retries and _retries[0][0] <= now:
            _, loop, callback = _retries.popleft()
            loop.call_soon_threadsafe(callback)
        if now >= next_tick:
            _core.tick()  # lets the interval rise again; puts lost hooks back
            next_tick = time.monotonic() + _WAIT


def _start_delivery() -> None:
    global _thread
    with _thread_lock:
        if _thread is not None:
            return
        _core.set_breach_handler(_drain)
        thread = threading.Thread(
            target=_delivery_thread_main,
            name="memlimits_async delivery",
            daemon=True,
        )
        thread.start()
        _thread = thread


def _forget_thread_after_fork() -> None:
    # Only the forking thread survives a fork: the next loop seen in the
    # child starts a new delivery thread.
    global _thread, _thread_lock, _last_asyncio_handle, _last_trio_handle
    _thread = None
    _thread_lock = threading.Lock()
    _retries.clear()
    _last_asyncio_handle = _last_trio_handle = None


os.register_at_fork(after_in_child=_forget_thread_after_fork)
