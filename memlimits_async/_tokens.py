"""CancelToken: cancellation at a distance, from any thread or signal handler.

A token is a one-way flag.  ``token.cancel(reason)`` sets it (the first
reason wins; later calls do nothing) and runs the callbacks registered with
``on_cancel``; scopes opened with ``limit_scope(token=...)`` register one that
hands the cancellation to their own event loop.

Invariant, and why there is no lock: ``cancel`` may run in a Python signal
handler, i.e. in the middle of any bytecode of the main thread, including in
the middle of another ``cancel`` or ``on_cancel`` on the same token.  A lock
held by the interrupted code would deadlock it.  So every step that must
happen once is a single call of a built-in dict method, which the GIL makes
atomic: ``setdefault`` picks the one winning cancellation, and ``pop`` hands
each callback to exactly one caller (the winning ``cancel`` or an
``on_cancel`` that arrives late).

A cancellation walks the tree of children with a list, not by recursion: it
may run in a signal handler on top of a deep stack, and a line of children
as deep as the recursion limit would otherwise raise ``RecursionError``
half-way (left unraisable) and leave the deeper ones active.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from collections.abc import Callable
from typing import Final

import anyio

from ._delivery import current_loop_handle, report_unraisable

__all__ = ["CancelToken"]

_CANCELLED: Final = "cancelled"
# Keys of callbacks, unique across tokens (next() is atomic: one C call).
_callback_keys: Final = itertools.count()


class CancelToken:
    """A flag that, once cancelled, cancels every scope watching it.

    Create one per unit of work (a request, a job), pass it to
    ``limit_scope(token=...)``, and call :meth:`cancel` from wherever the
    decision is made: another task, another thread, a signal handler.
    """

    __slots__ = ("__weakref__", "_callbacks", "_state")

    def __init__(self) -> None:
        # "cancelled" -> (winner, reason) once cancelled; set by setdefault.
        self._state: dict[str, tuple[object, str | None]] = {}
        self._callbacks: dict[int, Callable[[str | None], object]] = {}

    def cancel(self, reason: str | None = None) -> bool:
        """Cancel the token; True if this call did it, False if it already was.

        Idempotent, and the first reason wins.  Safe from any thread and from
        a signal handler: it takes no lock.  The callbacks run in the calling
        thread, before this returns.
        """
        if reason is not None and not isinstance(reason, str):
            raise TypeError(
                f"reason must be a str or None, not {type(reason).__name__}"
            )
        if not self._claim(reason):
            return False
        tokens = [self]
        while tokens:
            token = tokens.pop()
            for key in list(token._callbacks):
                callback = token._callbacks.pop(key, None)
                if isinstance(callback, _ChildLink):
                    child = callback.child()
                    if child is not None and child._claim(token.reason):
                        tokens.append(child)  # its callbacks run after these
                elif callback is not None:
                    token._call(callback)
        return True

    def _claim(self, reason: str | None) -> bool:
        """Mark the token cancelled; True for the one call that did it."""
        me = object()
        return self._state.setdefault(_CANCELLED, (me, reason))[0] is me

    @property
    def cancelled(self) -> bool:
        return _CANCELLED in self._state

    @property
    def reason(self) -> str | None:
        """The reason given to the first :meth:`cancel`, or None."""
        return self._state.get(_CANCELLED, (None, None))[1]

    def on_cancel(
        self, callback: Callable[[str | None], object]
    ) -> Callable[[], object]:
        """Call ``callback(reason)`` once, when the token is cancelled (at once
        if it already is).  Returns a function that unregisters it.

        The callback runs in the thread that cancels, possibly inside a signal
        handler: it should only hand the work over (``call_soon_threadsafe``,
        setting a flag), never block or take a lock.
        """
        if not callable(callback):
            raise TypeError("callback must be callable")
        key = next(_callback_keys)
        self._callbacks[key] = callback
        if _CANCELLED in self._state:
            self._fire(key)  # cancelled meanwhile: whoever pops it runs it
        # A partial of dict.pop: unregistering runs no Python frame (a
        # server registers and unregisters one for every request).
        return functools.partial(self._callbacks.pop, key, None)

    def child(self) -> CancelToken:
        """A token cancelled with this one, which can also be cancelled alone.

        The parent keeps no strong reference to the child: a child that is
        dropped unregisters itself.
        """
        child = CancelToken()
        unregister = self.on_cancel(_ChildLink(child))
        weakref.finalize(child, unregister)
        return child

    async def wait(self) -> None:
        """Wait until the token is cancelled (asyncio or trio, any task)."""
        if self.cancelled:
            await anyio.lowlevel.checkpoint()
            return
        loop = current_loop_handle()
        if loop is None:
            raise RuntimeError("CancelToken.wait() must be awaited in a task")
        event = anyio.Event()
        unregister = self.on_cancel(lambda reason: loop.call_soon_threadsafe(event.set))
        try:
            await event.wait()
        finally:
            unregister()

    def _fire(self, key: int) -> None:
        callback = self._callbacks.pop(key, None)
        if callback is not None:
            self._call(callback)

    def _call(self, callback: Callable[[str | None], object]) -> None:
        try:
            callback(self.reason)
        except Exception as exc:
            report_unraisable(exc, "Exception in a CancelToken callback", callback)

    def __repr__(self) -> str:
        if not self.cancelled:
            return "<CancelToken (active)>"
        return f"<CancelToken cancelled: {self.reason!r}>"


class _ChildLink:
    """A parent's callback that cancels a child, which :meth:`CancelToken.cancel`
    recognises so as to go down the tree without recursion.  Holds the child
    weakly: the parent keeps no dropped child alive."""

    __slots__ = ("child",)

    def __init__(self, child: CancelToken) -> None:
        self.child = weakref.ref(child)

    def __call__(self, reason: str | None) -> None:
        # Run by an on_cancel() of an already cancelled parent: one level.
        child = self.child()
        if child is not None:
            child.cancel(reason)
