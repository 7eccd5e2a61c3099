"""The Python face of the C meter's accounts: what a scope is charged.

An :data:`Account` is a C account that can be made current in a context
(through the meter's ContextVar), so that every allocation sampled in that
context, and in tasks and threads that copy it, is charged to it and to every
enclosing account.  This module opens accounts and turns the meter's raw
tuples into :class:`Usage` and :class:`Breach` values; it knows nothing of
event loops.
"""

from __future__ import annotations

import atexit
import enum
from dataclasses import dataclass

from ._meter import _core
from ._sites import Statistic, top_sites
from ._units import format_size

__all__ = [
    "Account",
    "Breach",
    "BreachKind",
    "Usage",
    "breach_from",
    "current_account",
    "interrupted",
    "usage_from",
]

# Samples taken while the interpreter is being torn down are not charged.
atexit.register(_core.disable_attribution)


class BreachKind(enum.Enum):
    """Which limit stopped a scope."""

    MEMORY = "memory"
    """Live bytes held by the scope's tasks passed ``memory``."""
    ALLOCATIONS = "allocations"
    """Cumulative bytes allocated by the scope's tasks passed ``allocations``."""
    GLOBAL_MEMORY = "global memory"
    """The process passed the global memory limit while the scope, which
    takes part in it (``global_memory=True``), was allocating."""
    TOKEN = "token"
    """A cancel token watched by the scope was cancelled."""
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
    top_sites: tuple[Statistic, ...] = ()
    """For a byte limit: the largest allocating lines of the scope when the
    breach was reported (live bytes for MEMORY and GLOBAL_MEMORY, allocated
    bytes for ALLOCATIONS), largest first, at most three; empty when stack
    capture is off (``configure(traceback_limit=0)``).  ``reason`` names
    them too."""
    refused: int = 0
    """For MEMORY and GLOBAL_MEMORY: the size in bytes of the single request
    that was refused because it alone would have passed the limit (the
    allocation failed with ``MemoryError``; ``observed`` is then the bytes it
    would have made), or 0 when a sampled allocation passed the limit."""


_KIND_OF_CODE = {
    _core.BREACH_MEMORY: BreachKind.MEMORY,
    _core.BREACH_ALLOCATIONS: BreachKind.ALLOCATIONS,
    _core.BREACH_GLOBAL_MEMORY: BreachKind.GLOBAL_MEMORY,
}

_WHAT_IS_COUNTED = {
    BreachKind.MEMORY: "live",
    BreachKind.ALLOCATIONS: "allocated",
    BreachKind.GLOBAL_MEMORY: "held by the process",
}


def _byte_breach(
    code: int,
    limit: int,
    observed: int,
    refused: int = 0,
    account: Account | None = None,
) -> Breach:
    kind = _KIND_OF_CODE[code]
    if refused:
        # observed: what the request would have made; without it, about
        # that much less (more for a realloc, whose old block it frees).
        held = max(observed - refused, 0)
        reason = (
            f"{kind.value} limit of {format_size(limit)} exceeded: a request "
            f"of {format_size(refused)} was refused; about {format_size(held)} "
            f"{_WHAT_IS_COUNTED[kind]}"
        )
    else:
        over = observed - limit
        share = f" ({over / limit:.1%})" if limit else ""
        reason = (
            f"{kind.value} limit of {format_size(limit)} exceeded: about "
            f"{format_size(observed)} {_WHAT_IS_COUNTED[kind]}, "
            f"{format_size(over)} over{share}"
        )
    sites: tuple[Statistic, ...] = ()
    if account is not None:
        sites = top_sites(
            account, "allocated" if kind is BreachKind.ALLOCATIONS else "live"
        )
        if sites:
            reason += "; " + ", ".join(site.describe() for site in sites)
    return Breach(kind, limit, observed, reason, sites, refused)


current_account = _core.current_account
"""The ContextVar that holds the account current in a context (or None)."""

interrupted = _core.interrupted
"""``interrupted()``: True if an account current here, or one of its
ancestors, was marked with ``account.mark_interrupted()`` and is not left."""

Account = _core.Account
"""An account of the C meter: ``Account(memory_limit, allocation_limit)``, a
child of the account current in this context.  Creating one installs the
allocator hooks (again, with a ``RuntimeWarning``, if tracemalloc removed
them).

``account.enter(listener)`` makes it current in this context, so that every
allocation sampled here, and in tasks and threads that copy this context, is
charged to it and to its ancestors; ``listener._on_breach()`` (unless
``listener`` is None) is called by the delivery layer soon after the account
passes a limit.  ``account.leave()``, in the context of its ``enter()`` (not
a copy of it) where it is current, undoes that and closes the account: it
keeps counting the blocks charged to it until they are freed, and never
breaches again; it returns the breach record (as ``account.breach()``) and
keeps the usage of that moment for ``account.usage_at_leave()``.  Only what
runs between the two is charged, so callers enter last and leave
first."""


def usage_from(raw: tuple[int, int, int]) -> Usage:
    """A :class:`Usage` from ``account.usage()``, read earlier."""
    allocated, live, peak_live = raw
    # Live can dip below zero by a few samples after the hooks were
    # re-installed; nothing can hold fewer than zero bytes.
    return Usage(allocated, max(live, 0), peak_live)


def breach_from(
    record: tuple[int, int, int, int], account: Account | None = None
) -> Breach:
    """A :class:`Breach` from a record returned by ``account.breach()``;
    with the account, it names the account's top allocation sites now."""
    code, limit, observed, refused = record
    return _byte_breach(code, limit, observed, refused, account)
