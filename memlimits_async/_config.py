"""Process-wide settings of the meter and its counters."""

from __future__ import annotations

from dataclasses import dataclass

from ._meter import _core
from ._preempt import parse_preempt, set_default_grace
from ._units import parse_size

__all__ = ["MeterStats", "configure", "stats"]

_MAX_TRACEBACK_LIMIT = 1000  # SITES_MAX_TRACEBACK_LIMIT in meter.h


def configure(
    *,
    sampling_interval: int | str | None = None,
    preempt: float | bool | None = None,
    traceback_limit: int | None = None,
) -> None:
    """Change process-wide settings; arguments left out are unchanged.

    :param sampling_interval: mean number of bytes between two samples when
        no small limit is in force (default 64 KiB).  While a scope with a
        limit L is open the interval drops to about L/1200 (never below
        512 bytes, never above this value), which keeps limits down to about
        600 KiB within +-20% except with probability < 1e-9; see
        docs/accuracy.md.  ``1`` means exact
        accounting: every allocation is charged with its exact size (slow;
        meant for tests).
    :param preempt: the default grace of scopes opened without
        ``preempt=``: seconds a breached body may run without reaching a
        checkpoint before it is preempted (default 0.05); ``False`` turns
        preemption off for them (docs/preemption.md).
    :param traceback_limit: frames of the allocating stack recorded with
        each sample, for snapshots and breach reports (default 16; 0 turns
        stack capture off).  Takes effect for samples taken from now on
        (docs/sites.md).
    """
    # Everything is checked before anything changes.
    interval = None
    if sampling_interval is not None:
        interval = parse_size(sampling_interval, name="sampling_interval")
        if interval < 1:
            raise ValueError("sampling_interval must be at least 1 byte")
    grace = parse_preempt(preempt) if preempt is not None else None
    if traceback_limit is not None:
        if isinstance(traceback_limit, bool) or not isinstance(traceback_limit, int):
            raise TypeError(
                f"traceback_limit must be an int, not {type(traceback_limit).__name__}"
            )
        if not 0 <= traceback_limit <= _MAX_TRACEBACK_LIMIT:
            raise ValueError(
                f"traceback_limit must be between 0 and {_MAX_TRACEBACK_LIMIT}, "
                f"got {traceback_limit}"
            )
    if interval is not None:
        _core.set_sampling_interval(interval)
    if preempt is not None:
        set_default_grace(grace)
    if traceback_limit is not None:
        _core.set_traceback_limit(traceback_limit)


@dataclass(frozen=True, slots=True)
class MeterStats:
    """Counters of the meter, for monitoring and tests."""

    hooks_installed: bool
    """True once the first scope has installed the allocator hooks."""
    hook_reinstalls: int
    """Times the hooks were found removed (tracemalloc.stop()) and put back."""
    numpy_buffers_metered: bool
    """True once numpy's default data handler is wrapped, so that numpy
    array buffers are metered (numpy imported, and a scope entered since)."""
    samples: int
    """Samples charged to some scope."""
    unattributed_samples: int
    """Samples taken outside any scope (recorded only for the global limit)."""
    dropped_samples: int
    """Samples lost because the block table could not grow (out of memory)."""
    tracked_blocks: int
    """Sampled blocks alive now, whose free will be credited."""
    table_capacity: int
    live_accounts: int
    """Accounts (one per scope) not yet freed: those of open scopes, and of
    closed scopes whose sampled blocks are still alive, and their ancestors."""
    filter_false_positives: int
    """Frees that passed the filter but were not tracked."""
    sampling_interval: int
    """Effective mean interval between samples, in bytes."""
    configured_sampling_interval: int
    min_adaptive_interval: int
    samples_per_limit: int
    """Samples the adaptive interval aims to take per limit."""
    traceback_limit: int
    """Frames recorded per sample (``configure(traceback_limit=...)``)."""
    tracebacks: int
    """Distinct allocating stacks interned (released when nothing refers to
    them any more, at the periodic upkeep)."""
    metered_heap: int
    """Estimated bytes held in sampled blocks: those allocated inside scopes,
    and, while a global memory limit is set, outside them too (the global
    limit's ``"heap"`` measure)."""
    refused_requests: int = 0
    """Requests of 1 MiB or more refused because each alone would have
    passed a memory limit (docs/limit-scope.md)."""


def stats() -> MeterStats:
    """A snapshot of the meter's counters."""
    raw = _core.stats()
    return MeterStats(
        hooks_installed=bool(raw["installed"]),
        hook_reinstalls=raw["reinstalls"],
        numpy_buffers_metered=bool(raw["numpy_handler"]),
        samples=raw["samples"],
        unattributed_samples=raw["unattributed_samples"],
        dropped_samples=raw["dropped_samples"],
        tracked_blocks=raw["tracked_blocks"],
        table_capacity=raw["table_capacity"],
        live_accounts=raw["live_accounts"],
        filter_false_positives=raw["filter_false_positives"],
        sampling_interval=raw["sampling_interval"],
        configured_sampling_interval=raw["configured_sampling_interval"],
        min_adaptive_interval=raw["min_adaptive_interval"],
        samples_per_limit=raw["samples_per_limit"],
        traceback_limit=raw["traceback_limit"],
        tracebacks=raw["tracebacks"],
        metered_heap=max(raw["global_live"], 0),
        refused_requests=raw["refused_requests"],
    )
