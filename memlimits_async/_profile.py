"""A profiler that runs with the limits: sample more often for a while.

The meter's samples are what a sampling heap profiler records, so profiling
is only a matter of taking more of them: ``with ml.profile("4 KiB"):`` keeps
the mean sampling interval at 4 KiB or less while it runs (after
memprof-limits, whose Memprof runs alongside its limits).  Every sample
weighs the interval it was drawn with, so limit estimates stay unbiased,
only more precise, and limits keep working throughout; when the last
profile ends the interval rises back at the meter's next upkeep (at once
here).
"""

from __future__ import annotations

from types import TracebackType

from ._meter import _core
from ._units import parse_size

__all__ = ["Profile", "profile"]


class Profile:
    """Keep the sampling interval at most ``sampling_interval`` while active.

    Use it as ``with`` or ``async with`` (or call :meth:`start` and
    :meth:`stop`), around the code to profile, then read
    ``scope.snapshot()`` or ``ml.snapshot()``.  The interval is
    process-wide, as the meter's countdowns are per thread, not per scope:
    code outside the scope is sampled more often too (and pays for it), and
    its estimates get better as well.  Profiles nest: the smallest interval
    asked for wins.
    """

    __slots__ = ("_active", "sampling_interval")

    def __init__(self, sampling_interval: int | str = "4 KiB") -> None:
        interval = parse_size(sampling_interval, name="sampling_interval")
        if interval < 1:
            raise ValueError("sampling_interval must be at least 1 byte")
        self.sampling_interval = interval
        """The mean interval asked for, in bytes."""
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    def start(self) -> None:
        if self._active:
            raise RuntimeError("this profile is already running")
        _core.install()
        _core.request_interval(self.sampling_interval)
        self._active = True

    def stop(self) -> None:
        """End the request; the interval goes back to what the limits in
        force and ``configure(sampling_interval=...)`` ask for."""
        if not self._active:
            raise RuntimeError("this profile is not running")
        self._active = False
        _core.release_interval(self.sampling_interval)
        _core.tick()  # let the interval rise now, not at the next upkeep

    def __enter__(self) -> Profile:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Profile:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def __repr__(self) -> str:
        state = "active" if self._active else "inactive"
        return f"<Profile sampling_interval={self.sampling_interval} ({state})>"


profile = Profile
"""``profile(sampling_interval="4 KiB")``: a :class:`Profile`."""
