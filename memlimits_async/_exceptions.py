"""Exceptions raised by scopes opened with ``raise_on_breach=True``."""

from __future__ import annotations

from ._accounts import Breach, BreachKind

__all__ = [
    "AllocationLimitReached",
    "LimitReached",
    "MemoryLimitReached",
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
