"""The Python face of the C meter's accounts: what a scope is charged.

An :class:`OpenAccount` is a C account made current in this context (through
the meter's ContextVar), so that every allocation sampled in this context,
and in tasks and threads that copy it, is charged to it and to every
enclosing account.  This module turns the meter's raw tuples into
:class:`Usage` and :class:`Breach` values; it knows nothing of event loops.
"""

from __future__ import annotations

import atexit
import enum
import warnings
from contextvars import Token
from dataclasses import dataclass

from ._meter import _core
from ._units import format_size

__all__ = ["Breach", "BreachKind", "OpenAccount", "Usage", "ensure_hooks"]

# Samples taken while the interpreter is being torn down are not charged.
atexit.register(_core.disable_attribution)


class BreachKind(enum.Enum):
    """Which limit stopped a scope."""

    MEMORY = "memory"
    """Live bytes held by the scope's tasks passed ``memory``."""
    ALLOCATIONS = "allocations"
    """Cumulative bytes allocated by the scope's tasks passed ``allocations``."""
    TIMEOUT = "timeout"
    """The scope's ``timeout`` expired."""


@dataclass(frozen=True, slots=True)
class Usage:
    """Bytes charged to a scope, estimated by sampling (exact at interval 1)."""

    allocated: int
    """Cumulative bytes allocated (a realloc counts its whole new size)."""
    live: int
    """Bytes allocated in the scope and not freed yet."""
    peak_live: int
    """Highest ``live`` seen while sampling."""


@dataclass(frozen=True, slots=True)
class Breach:
    """What fired: kind, the limit, what was observed, and a sentence."""

    kind: BreachKind
    limit: int | float | None
    """Bytes for MEMORY and ALLOCATIONS, seconds for TIMEOUT."""
    observed: int | float | None
    """The estimate (bytes) or elapsed time (seconds) when it fired."""
    reason: str


_KIND_OF_CODE = {
    _core.BREACH_MEMORY: BreachKind.MEMORY,
    _core.BREACH_ALLOCATIONS: BreachKind.ALLOCATIONS,
}

_WHAT_IS_COUNTED = {
    BreachKind.MEMORY: "live",
    BreachKind.ALLOCATIONS: "allocated",
}


def _byte_breach(kind: BreachKind, limit: int, observed: int) -> Breach:
    over = observed - limit
    share = f" ({over / limit:.1%})" if limit else ""
    reason = (
        f"{kind.value} limit of {format_size(limit)} exceeded: about "
        f"{format_size(observed)} {_WHAT_IS_COUNTED[kind]}, "
        f"{format_size(over)} over{share}"
    )
    return Breach(kind, limit, observed, reason)


def ensure_hooks() -> None:
    """Install the allocator hooks, or install them again if they were lost.

    They are lost when tracemalloc was started before them and is then
    stopped: it restores the allocators it saved, which do not include ours.
    """
    _core.install()
    if not _core.check_hooks():
        warnings.warn(
            "memlimits_async: the allocator hooks had been removed (by "
            "tracemalloc.stop() after tracemalloc was started before "
            "memlimits_async?) and were installed again; live-bytes "
            "estimates of scopes open at that time restart from zero",
            RuntimeWarning,
            stacklevel=2,
        )


class OpenAccount:
    """A C account, and the switch that makes it current in this context.

    :meth:`enter` and :meth:`close` must run in the same context (the
    ContextVar token is reset in :meth:`close`), like entering and exiting a
    cancel scope in the same task.  Only what runs between them is charged,
    so callers enter last and close first.
    """

    __slots__ = ("_account", "_token")

    def __init__(
        self, *, memory: int | None, allocations: int | None, notify: bool
    ) -> None:
        """``notify``: queue a breach for the delivery layer (a loop owns the
        scope); otherwise it is only recorded, and read at exit."""
        ensure_hooks()
        parent = _core.current_account.get(None)
        self._account = _core.Account(parent, memory, allocations, notify)
        self._token: Token[_core.Account | None] | None = None

    @property
    def id(self) -> int:
        return self._account.id

    def enter(self) -> None:
        """Charge this context's allocations to the account from now on."""
        self._token = _core.enter(self._account)

    def usage(self) -> Usage:
        allocated, live, peak_live = self._account.usage()
        # Live can dip below zero by a few samples after the hooks were
        # re-installed; nothing can hold fewer than zero bytes.
        return Usage(allocated, max(live, 0), peak_live)

    def breach(self) -> Breach | None:
        record = self._account.breach()
        if record is None:
            return None
        code, limit, observed = record
        return _byte_breach(_KIND_OF_CODE[code], limit, observed)

    def close(self) -> None:
        """Stop charging this context and stop checking limits (idempotent).

        Blocks allocated in the scope and still alive keep counting in the
        enclosing accounts until they are freed.
        """
        if self._token is not None:
            _core.leave(self._token)
            self._token = None
        self._account.close()
