"""Moving a breach from the C meter to the event loop that owns the scope.

The meter records a breach inside an allocator hook, where nothing Python
may run, and wakes this module in two ways (see ``_meter/accounts.c``):

* a pending call on the main thread, run at its next eval-breaker check
  (a few bytecodes after the allocation when the allocating task runs there);
* a semaphore that the *delivery thread* below waits on, for event loops in
  other threads and for a main thread that is blocked in C.

Either way :func:`_drain` runs with the GIL held, takes the breached account
ids and calls the callback registered for each.  A callback must only hand
the work over to its own loop with that loop's thread- and signal-safe entry
point (:class:`LoopHandle`): the pending call runs in the middle of arbitrary
code, exactly like a signal handler.

Invariant: the registry maps an account id to its callback from the moment
the scope's account is open until the scope exits; a breach of an account
that is not registered (the scope has exited) is dropped here, and is still
visible on the account itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol

from ._meter import _core

__all__ = ["LoopHandle", "current_loop_handle", "register", "unregister"]

_callbacks: dict[int, Callable[[], None]] = {}
_thread: threading.Thread | None = None
_thread_lock = threading.Lock()

_WAIT_WHILE_SCOPES_OPEN = 0.25  # seconds; also how often lost hooks are noticed
_WAIT_WHILE_IDLE = 5.0


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
    __slots__ = ("_token",)

    def __init__(self, token: object) -> None:
        self._token = token

    def time(self) -> float:
        import trio

        return trio.current_time()

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        import trio

        # TrioToken.run_sync_soon is documented as signal-safe (RLock).
        with contextlib.suppress(trio.RunFinishedError):  # the run is over
            self._token.run_sync_soon(callback)  # type: ignore[attr-defined]


# The handle of the last asyncio loop seen: most programs have one loop, and
# a scope is entered for every request.  (It keeps that loop object alive.)
_last_asyncio_handle: _AsyncioLoopHandle | None = None


def current_loop_handle() -> LoopHandle | None:
    """The loop of the task running this code, or None outside any task."""
    # asyncio first, without raising: it is the common case, and an exception
    # raised and caught here would cost more than the rest of a scope's entry.
    global _last_asyncio_handle
    loop = asyncio._get_running_loop()
    if loop is not None and asyncio.current_task(loop) is not None:
        handle = _last_asyncio_handle
        if handle is None or handle.loop is not loop:
            handle = _last_asyncio_handle = _AsyncioLoopHandle(loop)
        return handle
    # Not an asyncio task: a trio task (also trio in guest mode on a host
    # loop, whose steps run as plain callbacks), or no task at all.
    trio = sys.modules.get("trio")
    if trio is not None and _in_trio_task(trio):
        return _TrioLoopHandle(trio.lowlevel.current_trio_token())
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


def register(account_id: int, callback: Callable[[], None]) -> None:
    """Call ``callback`` (from a pending call or the delivery thread) when
    the account breaches.  Starts the delivery thread on first use."""
    _callbacks[account_id] = callback
    if _thread is None:
        _start_thread()


def unregister(account_id: int) -> None:
    _callbacks.pop(account_id, None)


def _drain() -> None:
    for account_id in _core.take_breached():
        callback = _callbacks.get(account_id)
        if callback is not None:
            callback()


def _delivery_thread_main() -> None:
    while True:
        timeout = _WAIT_WHILE_SCOPES_OPEN if _callbacks else _WAIT_WHILE_IDLE
        if _core.wait_for_breach(timeout):
            _drain()
        if _callbacks:
            _core.install()  # puts the hooks back if tracemalloc removed them


def _start_thread() -> None:
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
    # Only the forking thread survives a fork; the next registration in the
    # child starts a new delivery thread.
    global _thread, _thread_lock
    _thread = None
    _thread_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_thread_after_fork)
