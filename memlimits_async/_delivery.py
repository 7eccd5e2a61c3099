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
from typing import Protocol

from ._accounts import ensure_hooks
from ._meter import _core

__all__ = ["LoopHandle", "current_loop_handle", "register", "unregister"]

_callbacks: dict[int, Callable[[], None]] = {}
_thread: threading.Thread | None = None
_thread_lock = threading.Lock()

_WAIT_WHILE_SCOPES_OPEN = 0.25  # seconds; also how often lost hooks are noticed
_WAIT_WHILE_IDLE = 5.0


class LoopHandle(Protocol):
    """The one thing delivery needs from an event loop."""

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` on the loop's thread soon.

        Must be safe from any thread and from a signal handler (or a pending
        call) in the loop's own thread.  Does nothing once the loop is gone.
        """


class _AsyncioLoopHandle:
    __slots__ = ("_loop",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        with contextlib.suppress(RuntimeError):  # closed loop: its tasks are gone
            self._loop.call_soon_threadsafe(callback)


class _TrioLoopHandle:
    __slots__ = ("_token",)

    def __init__(self, token: object) -> None:
        self._token = token

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        import trio

        # TrioToken.run_sync_soon is documented as signal-safe (RLock).
        with contextlib.suppress(trio.RunFinishedError):  # the run is over
            self._token.run_sync_soon(callback)  # type: ignore[attr-defined]


def current_loop_handle() -> LoopHandle | None:
    """The loop of the task running this code, or None outside any task."""
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            pass  # trio is imported but this is not a trio task
        else:
            return _TrioLoopHandle(trio.lowlevel.current_trio_token())
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    if asyncio.current_task(loop) is None:
        return None  # a plain callback on the loop, not a task
    return _AsyncioLoopHandle(loop)


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
            ensure_hooks()


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
