"""Exceptions raised by scopes opened with ``raise_on_breach=True``."""

from __future__ import annotations

from ._accounts import Breach, BreachKind

__all__ = [
    "AllocationLimitReached",
    "LimitReached",
    "MemoryLimitReached",
    "Preempted",
    "TimeLimitReached",
    "TokenCancelled",
    "exception_for",
]


class LimitReached(Exception):
    """A scope's own limit, token or timeout stopped it.

    Raised when the scope exits, after the cancellation has been absorbed, so
    an ``except LimitReached`` around the ``async with`` sees it whatever the
    body did with the cancellation.  ``breach`` says what fired.
    """

    def __init__(self, breach: Breach) -> None:
        super().__init__(breach.reason)
        self.breach = breach

    def __reduce__(self) -> tuple[object, ...]:
        # BaseException's would rebuild it from args (the reason alone):
        # multiprocessing, Dask and pytest-xdist pickle exceptions.  The
        # state (breach, __notes__) is restored as BaseException's does.
        return (self.__class__, (self.breach,), self.__dict__)


class Preempted(BaseException):
    """Raised *inside* a breached scope's body that did not reach a
    checkpoint within its grace period (``preempt=``), at a point where it
    is safe (see docs/preemption.md).

    A ``BaseException``, so that ``except Exception`` does not swallow it.
    The scope that was breached absorbs it on exit, also from an exception
    group of a task group or nursery in between, and reports its breach;
    it never leaves that scope.  Do not catch it; if you must (to clean up),
    re-raise it.
    """


class MemoryLimitReached(LimitReached, MemoryError):
    """``memory``, or the global memory limit, was passed."""


class AllocationLimitReached(LimitReached):
    """``allocations`` was passed."""


class TokenCancelled(LimitReached):
    """A cancel token watched by the scope was cancelled."""


class TimeLimitReached(LimitReached, TimeoutError):
    """``timeout`` expired."""


_EXCEPTION_OF_KIND: dict[BreachKind, type[LimitReached]] = {
    BreachKind.MEMORY: MemoryLimitReached,
    BreachKind.ALLOCATIONS: AllocationLimitReached,
    BreachKind.GLOBAL_MEMORY: MemoryLimitReached,
    BreachKind.TOKEN: TokenCancelled,
    BreachKind.TIMEOUT: TimeLimitReached,
}


def exception_for(breach: Breach) -> LimitReached:
    return _EXCEPTION_OF_KIND[breach.kind](breach)
