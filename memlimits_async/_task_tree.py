"""Which task runs now, and whether a cancel scope's cancellation reaches it.

Preemption raises :class:`~memlimits_async.Preempted` in running code, and
the scope that asked for it absorbs it on exit.  So it may land only in a
task whose failure flows back into that scope: the task that entered it, or
a task started inside it in a task group or nursery (a group collects its
children's exceptions and raises them in its host, inside the scope).  A
task started with a bare ``asyncio.create_task`` inside the scope is charged
to it (it copies the context) but outlives it, and nothing absorbs an
exception raised there: its awaiter, maybe outside the scope, would get it.
"Reached by the scope's cancellation" is exactly that line, and it is the
one anyio and trio draw: cancelling the scope cancels the first kind of
task, never the second.

Neither anyio, trio nor asyncio says publicly which tasks a scope reaches;
each keeps it in a structure of its own, read here and nowhere else:

* anyio on asyncio: every task it knows has a ``TaskState`` whose
  ``cancel_scope`` is the innermost scope it runs in, linked outwards by
  ``_parent_scope``;
* asyncio's own ``TaskGroup`` children, which anyio does not know: the
  group's done-callback on the child names the group, whose
  ``_parent_task`` is the task that opened it;
* trio: a task's ``_cancel_status`` and the scope's, and
  ``CancelStatus.encloses`` (anyio's trio scopes wrap trio's).

Work handed to a worker thread belongs to the task that awaits it: what
the work raises is raised there.  Inside the thread, anyio (asyncio
backend) keeps the cancel scope the call runs under in a thread-local (its
``_host_task`` awaits the call), and trio the task to wake with the result
(:func:`worker_awaiter`).

Where the structure is not what this module expects (a future release),
:func:`scope_reaches` answers True, the behaviour before this check existed:
preemption keeps working in the scope's own task, at the price of also
landing in fire-and-forget tasks.  ``tests/test_preempt.py`` checks each
structure on the installed versions, so that a change is seen in CI.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

__all__ = ["current_task_of", "root_frame", "scope_reaches", "worker_awaiter"]

# Tasks between a task and the one that opened its group, at most: a chain
# of task groups this deep is a bug or a cycle, not a program.
_MAX_DEPTH = 1000


def current_task_of(loop: object | None) -> object | None:
    """The task running now on ``loop`` (an asyncio loop), or on this
    thread's trio run when ``loop`` is None; None between steps."""
    if loop is not None:
        return asyncio.current_task(loop)  # type: ignore[arg-type]
    trio = sys.modules.get("trio")
    if trio is None:
        return None
    try:
        task: object = trio.lowlevel.current_task()
    except RuntimeError:  # no trio run in this thread
        return None
    return task


def root_frame(task: object) -> FrameType | None:
    """The outermost frame of ``task``: its coroutine's.  Everything a task
    runs is called from there, whoever drives it (asyncio's ``Handle._run``
    in Python, uvloop's in C, trio's run loop)."""
    coro = (
        task.get_coro()
        if isinstance(task, asyncio.Task)
        else getattr(task, "coro", None)
    )
    return getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)


def worker_awaiter() -> object | None:
    """In a worker thread of anyio or trio, the task awaiting the call it
    runs now; None in any other thread, when nothing awaits it any more
    (abandoned on cancellation: its outcome is discarded), or when the
    structure is not what this module expects."""
    anyio_asyncio = sys.modules.get("anyio._backends._asyncio")
    if anyio_asyncio is not None:
        threadlocals = getattr(anyio_asyncio, "threadlocals", None)
        cancel_scope = getattr(threadlocals, "current_cancel_scope", None)
        if cancel_scope is not None:
            task: object = getattr(cancel_scope, "_host_task", None)
            return task
    trio_threads = sys.modules.get("trio._threads")
    if trio_threads is not None:
        parent_data = getattr(trio_threads, "PARENT_TASK_DATA", None)
        register = getattr(parent_data, "task_register", None)
        if isinstance(register, list) and register:
            task = register[0]
            return task
    return None


def scope_reaches(cancel_scope: object, task: object) -> bool:
    """True if cancelling ``cancel_scope`` cancels ``task`` (see above)."""
    try:
        if isinstance(task, asyncio.Task):
            return _asyncio_scope_reaches(cancel_scope, task)
        return _trio_scope_reaches(cancel_scope, task)
    except AttributeError:  # not the structure this module knows
        return True


def _asyncio_scope_reaches(cancel_scope: object, task: asyncio.Task[Any]) -> bool:
    anyio_asyncio = sys.modules.get("anyio._backends._asyncio")
    task_states = getattr(anyio_asyncio, "_task_states", None)
    if task_states is None:
        return True  # our scopes are anyio's: it must be there
    for _ in range(_MAX_DEPTH):
        state = task_states.get(task)
        if state is not None:
            scope = state.cancel_scope
            while scope is not None:
                if scope is cancel_scope:
                    return True
                scope = scope._parent_scope
        parent = _task_group_parent(task)
        if parent is None:
            return False
        task = parent
    return False


def _task_group_parent(task: asyncio.Task[Any]) -> asyncio.Task[Any] | None:
    """The task that opened the ``asyncio.TaskGroup`` ``task`` belongs to."""
    on_done = getattr(asyncio.TaskGroup, "_on_task_done", None)
    callbacks: Sequence[tuple[Any, object]] = task._callbacks or ()
    for callback, _context in callbacks:
        if getattr(callback, "__func__", None) is on_done:
            parent = callback.__self__._parent_task
            return parent if isinstance(parent, asyncio.Task) else None
    return None


def _trio_scope_reaches(cancel_scope: object, task: object) -> bool:
    # anyio's trio backend wraps a trio scope (a private, name-mangled slot).
    original = getattr(cancel_scope, "_CancelScope__original", cancel_scope)
    scope_status = original._cancel_status  # type: ignore[attr-defined]
    task_status = task._cancel_status  # type: ignore[attr-defined]
    if scope_status is None or task_status is None:
        return False  # the scope is not entered (any more)
    return bool(scope_status.encloses(task_status))
