"""The process-wide memory limit, memprof-limits style.

``set_global_memory_limit("2 GiB")`` sets a limit on the whole process;
scopes opened with ``limit_scope(global_memory=True)`` take part in it.  The
policy, enforced by the C meter (``charge_global`` in accounts.c):

* the measure is either the *metered heap* (bytes allocated through
  Python's MEM and OBJ allocators, sampled like every scope's, since the
  limit was set or inside scopes, and not freed yet) or the process's
  *resident set size* read from ``/proc/self/statm`` by a thread every
  ``rss_poll_interval`` seconds;
* while the measure is over the limit, each sample of an allocation stops
  the innermost participating scope around the allocating code; a sample
  taken in code outside any participating scope stops nothing;
* a participant that does not allocate while the process is over the limit
  is never stopped.  So the scopes stopped are the ones that keep
  allocating, each with probability proportional to the bytes it allocates
  (statistically the heaviest allocators), and once they have let go of
  their memory nobody else keeps failing: memprof-limits' trap, where every
  participant fails while the heap stays over, cannot happen to a scope
  that is not allocating.
"""

from __future__ import annotations

import os
import threading
from typing import Final, Literal

from ._meter import _core
from ._units import parse_size

__all__ = ["global_memory_limit", "set_global_memory_limit"]

_MEASURES: Final = ("heap", "rss")
_STATM: Final = "/proc/self/statm"
_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

_lock = threading.Lock()
_limit: int | None = None
_measure: str = "heap"
_poller: _RssPoller | None = None


def set_global_memory_limit(
    limit: int | str | None,
    *,
    measure: Literal["heap", "rss"] = "heap",
    rss_poll_interval: float = 0.01,
) -> None:
    """Set (or, with None, remove) the process-wide memory limit.

    :param limit: bytes (int, or a string such as ``"2 GiB"``) or None.
    :param measure: ``"heap"`` (default): the bytes allocated through
        Python's allocators, estimated by the meter from the moment the
        limit is set (set it at start-up); breaches are as prompt as a
        scope's ``memory`` limit.  ``"rss"``: the resident set size of the
        process, which also sees memory that C libraries allocate behind
        Python's back; it is read every ``rss_poll_interval`` seconds, so a
        breach comes up to that much later, at the next sampled allocation
        of a participant.  Linux only.
    :param rss_poll_interval: seconds between two reads of the RSS.
    """
    size = None if limit is None else parse_size(limit, name="limit")
    if measure not in _MEASURES:
        raise ValueError(f"measure must be 'heap' or 'rss', got {measure!r}")
    if isinstance(rss_poll_interval, bool) or not isinstance(
        rss_poll_interval, int | float
    ):
        raise TypeError(
            "rss_poll_interval must be a number of seconds, not "
            f"{type(rss_poll_interval).__name__}"
        )
    # Not math.isfinite: it overflows on a huge int.  The poller waits with
    # a lock timeout, which must not exceed threading.TIMEOUT_MAX.
    if not (0 < rss_poll_interval <= threading.TIMEOUT_MAX):
        raise ValueError(
            f"rss_poll_interval must be > 0 and at most threading.TIMEOUT_MAX "
            f"seconds, got {rss_poll_interval!r}"
        )
    global _limit, _measure, _poller
    with _lock:
        first_rss = None
        if size is not None and measure == "rss":
            first_rss = _read_rss()  # fails here, before anything changes
        _stop_poller()
        _core.set_global_measure(-1)
        _core.set_global_memory_limit(size)
        _limit, _measure = size, measure
        if first_rss is not None:
            _core.set_global_measure(first_rss)
            _poller = _RssPoller(rss_poll_interval)
            _poller.start()


def global_memory_limit() -> tuple[int, str] | None:
    """``(limit in bytes, measure)`` of the global memory limit, or None."""
    limit = _limit
    return None if limit is None else (limit, _measure)


def _read_rss() -> int:
    try:
        with open(_STATM, "rb") as statm:
            resident_pages = int(statm.read().split()[1])
    except OSError as exc:
        raise ValueError(
            f"measure='rss' needs {_STATM} (Linux), which cannot be read: {exc}"
        ) from None
    return resident_pages * _PAGE_SIZE


class _RssPoller(threading.Thread):
    """Reads the RSS for the meter every ``interval`` seconds."""

    def __init__(self, interval: float) -> None:
        super().__init__(name="memlimits_async RSS poller", daemon=True)
        self.interval = interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                _core.set_global_measure(_read_rss())
            except ValueError:  # /proc went away (chroot, shutdown)
                return


def _stop_poller() -> None:
    global _poller
    if _poller is not None:
        _poller.stopped.set()
        _poller = None


def _restart_poller_after_fork() -> None:
    # The poller thread did not survive the fork; the child's own RSS is
    # what counts there.
    global _lock, _poller
    _lock = threading.Lock()
    if _poller is not None:
        _poller = _RssPoller(_poller.interval)
        _poller.start()


os.register_at_fork(after_in_child=_restart_poller_after_fork)
