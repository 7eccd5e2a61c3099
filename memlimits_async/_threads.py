"""run_sync: synchronous work in a worker thread, with the budget following it.

``await ml.run_sync(fn, *args, budget=ml.Budget(memory="200 MiB"))`` runs
``fn(*args)`` in anyio's worker thread pool (its limiter, the caller's
context copied into the thread), so that:

* the thread's allocations are charged to the caller's scopes, and to the
  budget's own scope opened around the call, because the context that holds
  their accounts is copied into the thread;
* a breach of that budget, or of any scope around the call, whose work does
  not stop by itself is preempted *inside* ``fn``: the worker runs it behind
  a fence (``_preempt.run_fenced``) that lets the interrupt land only in
  ``fn``'s frames and disarms one that comes too late;
* the awaiting task learns of it through its scopes: a breach of ``budget``
  raises the matching :class:`LimitReached` from ``run_sync``; a breach of a
  scope around it is reported by that scope, as for any other work.

A thread blocked in C (``time.sleep``, a socket read, a lock) cannot be
interrupted until the call returns.  With ``abandon_on_cancel=True`` the
awaiting task does not wait for it: on cancellation it moves on at once and
the thread finishes (or is interrupted) on its own, its result discarded.

``threads_inherit_context()``: plain ``threading.Thread`` objects started
while it is in force start in a copy of their starter's context, as every
thread does on Python 3.14 with ``-X thread_inherit_context=1``, so that
what they allocate is charged to the scopes current where they were started.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import sys
import threading
from collections.abc import Callable
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, TypeVarTuple

import anyio.to_thread

from ._preempt import run_fenced
from ._scope import LimitScope

if TYPE_CHECKING:
    from anyio import CapacityLimiter

    from ._budget import Budget

__all__ = ["run_sync", "threads_inherit_context"]

T = TypeVar("T")
Args = TypeVarTuple("Args")


async def run_sync(
    function: Callable[[*Args], T],
    *args: *Args,
    budget: Budget | None = None,
    abandon_on_cancel: bool = False,
    limiter: CapacityLimiter | None = None,
) -> T:
    """Run ``function(*args)`` in a worker thread under ``budget`` and the
    scopes around the call, and return its result.

    :param budget: limits for this call alone (memory, allocations, timeout,
        token, preempt); passing one raises the matching
        :class:`LimitReached` subclass from this call.
    :param abandon_on_cancel: on cancellation, return at once instead of
        waiting for the thread (which goes on until it returns or, for a
        breach, is preempted), like anyio's argument of the same name.
    :param limiter: an anyio ``CapacityLimiter`` (default: anyio's).
    """
    if not callable(function):
        raise TypeError(f"function must be callable, not {type(function).__name__}")
    if not isinstance(abandon_on_cancel, bool):
        raise TypeError(
            f"abandon_on_cancel must be a bool, not {type(abandon_on_cancel).__name__}"
        )
    scope: contextlib.AbstractAsyncContextManager[object]
    if budget is None:
        scope = contextlib.nullcontext()
    else:
        scope = LimitScope(budget=budget, raise_on_breach=True)
    async with scope:
        return await anyio.to_thread.run_sync(
            run_fenced,
            function,
            args,
            abandon_on_cancel=abandon_on_cancel,
            limiter=limiter,
        )
    raise AssertionError("unreachable: a budget's breach raises")  # for mypy


# Whether a thread started in this context starts in a copy of it.  A context
# variable, not a global switch: threads started elsewhere at the same time
# (a server's other requests, pytest's own) are left alone, and a thread that
# inherits the context inherits the switch too, as under 3.14's flag.
_inherit: ContextVar[bool] = ContextVar(
    "memlimits_async.threads_inherit_context", default=False
)
_hook_lock = threading.Lock()
_hooked = False


class _ThreadsInheritContext:
    """The context manager that :func:`threads_inherit_context` returns."""

    __slots__ = ("_enabled", "_token")

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._token: contextvars.Token[bool] | None = None

    def __enter__(self) -> None:
        if self._token is not None:
            raise RuntimeError("threads_inherit_context() is already entered")
        if self._enabled:
            _hook_thread_start()
        self._token = _inherit.set(self._enabled)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token, self._token = self._token, None
        if token is None:
            raise RuntimeError("threads_inherit_context() is not entered")
        _inherit.reset(token)


def threads_inherit_context(enabled: bool = True) -> _ThreadsInheritContext:
    """Start the ``threading.Thread`` objects started inside the ``with``
    block (and, in turn, those they start) in a copy of the starting
    context, so that their allocations are charged to the scopes current
    where they were started, as ``run_sync``, ``anyio.to_thread`` and
    ``asyncio.to_thread`` work always is.

    ``with ml.threads_inherit_context():`` around code that starts plain
    threads inside a scope; ``threads_inherit_context(False)`` turns it off
    again for a block inside.  A context manager, entered and exited in the
    same context (a task, a thread, or plain code), once per object.

    This is what Python 3.14 does for every thread with
    ``-X thread_inherit_context=1`` (the default of free-threaded builds);
    with that flag set, threads inherit the context anyway.  A thread given
    a ``context=`` of its own (3.14) keeps it.  Elsewhere (3.11 to 3.13, and
    3.14 without the flag) a thread starts in an empty context, charged to
    no scope; the first entry with ``enabled=True`` wraps
    ``threading.Thread.start``, once and for good, so that a thread started
    in a context where this is in force runs its ``run()`` in a copy of
    that context (threads started anywhere else are unchanged, at the cost
    of one context-variable read per start).

    Only threads of the ``threading`` module (``Thread``, its subclasses,
    ``Timer``, the workers a ``concurrent.futures.ThreadPoolExecutor``
    starts when it needs one) are concerned, not ``_thread.start_new_thread``.
    A pool's worker runs in the context of the code that made the pool start
    it, for as long as it lives: work later submitted to it from elsewhere
    is charged there.  Such a thread is metered, and its allocations can
    breach the scope, whose cancellation or preemption then stops the task
    or thread that entered the scope, not the started thread (which runs on
    until its own end: docs/preemption.md, "Threads").
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, not {type(enabled).__name__}")
    return _ThreadsInheritContext(enabled)


def _hook_thread_start() -> None:
    global _hooked
    with _hook_lock:
        if _hooked:
            return
        _hooked = True
        start = threading.Thread.start

        @functools.wraps(start)
        def start_in_context(self: threading.Thread) -> None:
            if not _inherit.get() or _inherits_anyway(self):
                start(self)
                return
            _run_in_context(self, contextvars.copy_context(), start)

        threading.Thread.start = start_in_context  # type: ignore[method-assign]


def _inherits_anyway(thread: threading.Thread) -> bool:
    """3.14: the interpreter copies the context itself under its flag, and a
    thread given ``context=`` keeps that one."""
    return bool(getattr(sys.flags, "thread_inherit_context", 0)) or (
        getattr(thread, "_context", None) is not None
    )


def _run_in_context(
    thread: threading.Thread,
    context: contextvars.Context,
    start: Callable[[threading.Thread], None],
) -> None:
    # ``run`` is replaced on the instance, not the class, so that a
    # subclass's own ``run`` is the one called, in the context.
    had_own_run = "run" in thread.__dict__
    own_run: Any = thread.__dict__.get("run")
    run = thread.run

    def run_in_context() -> None:
        try:
            context.run(run)
        finally:
            # The context holds the scope's account: let it go with the run,
            # not with the Thread object, which its starter may keep.
            _restore_run(thread, had_own_run, own_run)

    thread.run = run_in_context  # type: ignore[method-assign]
    try:
        start(thread)
    except BaseException:
        _restore_run(thread, had_own_run, own_run)
        raise


def _restore_run(thread: threading.Thread, had_own_run: bool, own_run: Any) -> None:
    if had_own_run:
        thread.run = own_run  # type: ignore[method-assign]
    else:
        thread.__dict__.pop("run", None)
