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
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar, TypeVarTuple

import anyio.to_thread

from ._preempt import run_fenced
from ._scope import LimitScope

if TYPE_CHECKING:
    from anyio import CapacityLimiter

    from ._budget import Budget

__all__ = ["run_sync"]

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
