"""Allocation sites: where the bytes of a scope were allocated.

At every sample the meter records the allocating Python stack (up to
``configure(traceback_limit=...)`` frames), interned so that a stack seen
again costs nothing, attached to the sampled block (for live bytes) and
counted by every account it is charged to (for allocated bytes).  This module
turns those records into :class:`Snapshot` objects shaped like
``tracemalloc.Snapshot``: ``statistics("lineno" | "filename" | "traceback",
cumulative=...)`` and ``compare_to(...)``, for live or allocated bytes.

The numbers are estimates from Poisson byte sampling: each :class:`Statistic`
carries its ``size`` (estimated bytes), ``count`` (the samples behind it) and
``size_sd``, the estimate's standard error, sqrt(R x size) for a mean
sampling interval R (0 when sampling is exact).  docs/sites.md says how close
that is.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, overload

from ._meter import _core
from ._units import format_size

if TYPE_CHECKING:
    from ._scope import LimitScope

__all__ = [
    "Frame",
    "OpenScope",
    "Snapshot",
    "Statistic",
    "StatisticDiff",
    "Trace",
    "Traceback",
    "account_snapshot",
    "open_scopes",
    "process_snapshot",
    "top_sites",
]

Measure = Literal["live", "allocated"]
KeyType = Literal["lineno", "filename", "traceback"]

_FORMAT = "memlimits_async.Snapshot/1"


@dataclass(frozen=True, slots=True, order=True)
class Frame:
    """One frame of an allocating stack."""

    filename: str
    lineno: int
    name: str = ""
    """The function's qualified name (``co_qualname``); empty in
    ``"filename"`` statistics."""

    def __str__(self) -> str:
        return f"{self.filename}:{self.lineno}"


class Traceback(Sequence[Frame]):
    """An allocating stack, oldest frame first, like ``tracemalloc.Traceback``.

    ``Traceback(frames)`` takes the frames *most recent first* (the order in
    which they are recorded, as ``tracemalloc.Traceback`` does); indexing and
    iteration go from the oldest frame to the most recent.  ``truncated`` is
    True when the stack was deeper than the traceback limit (the oldest
    frames are the ones left out)."""

    __slots__ = ("_frames", "truncated")

    def __init__(self, frames: Iterable[Frame], truncated: bool = False) -> None:
        self._frames: tuple[Frame, ...] = tuple(frames)
        for frame in self._frames:
            if not isinstance(frame, Frame):
                raise TypeError(
                    f"frames must hold Frame objects, not {type(frame).__name__}"
                )
        self.truncated = bool(truncated)

    def __reduce__(self) -> tuple[object, ...]:
        # Slots and no __getstate__: pickle protocols 0 and 1 refuse it,
        # and it travels in a LimitReached's breach (its top sites).
        return (self.__class__, (self._frames, self.truncated))

    @property
    def most_recent(self) -> Frame | None:
        """The allocating frame (None for an allocation made with no Python
        frame on the stack)."""
        return self._frames[0] if self._frames else None

    def __len__(self) -> int:
        return len(self._frames)

    @overload
    def __getitem__(self, index: int) -> Frame: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Frame]: ...
    def __getitem__(self, index: int | slice) -> Frame | Sequence[Frame]:
        return self._frames[::-1][index]

    def __iter__(self) -> Iterator[Frame]:
        return reversed(self._frames)

    def __hash__(self) -> int:
        return hash((self._frames, self.truncated))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Traceback):
            return NotImplemented
        return self._frames == other._frames and self.truncated == other.truncated

    def __lt__(self, other: Traceback) -> bool:
        return (self._frames, self.truncated) < (other._frames, other.truncated)

    def __str__(self) -> str:
        frame = self.most_recent
        return "<no Python frame>" if frame is None else str(frame)

    def __repr__(self) -> str:
        return f"<Traceback {tuple(self)!r}{' truncated' if self.truncated else ''}>"

    def format(
        self, limit: int | None = None, most_recent_first: bool = False
    ) -> list[str]:
        """Lines like ``traceback.format_list``'s (without source lines),
        oldest first unless ``most_recent_first``; ``limit`` as in
        ``tracemalloc.Traceback.format``."""
        frames: list[Frame] = list(self._frames if most_recent_first else self)
        if limit is not None:
            frames = frames[:limit] if limit > 0 else frames[limit:]
        return [
            f'  File "{frame.filename}", line {frame.lineno}, in {frame.name or "?"}'
            for frame in frames
        ]


@dataclass(frozen=True, slots=True)
class Trace:
    """What one allocating stack accounts for in a snapshot."""

    traceback: Traceback
    live: int
    """Estimated bytes allocated here and still alive."""
    live_samples: int
    live_variance: float
    allocated: int
    """Estimated bytes allocated here in all (cumulative)."""
    allocated_samples: int
    allocated_variance: float
    group: str = ""
    """In a process snapshot: the open scope (and its tasks) the bytes are
    charged to, or ``"outside open scopes"``; empty in a scope's snapshot."""


@dataclass(frozen=True, slots=True)
class Statistic:
    """Bytes of one site, as ``tracemalloc.Statistic``, estimated."""

    traceback: Traceback
    size: int
    """Estimated bytes."""
    count: int
    """Samples behind the estimate (not blocks: a sample is one block that a
    mark fell in, and stands for about ``size / count`` bytes)."""
    size_sd: float
    """Standard error of ``size``: sqrt(R x size) for a mean sampling
    interval R; 0 when sampling is exact (``sampling_interval=1``)."""

    def __str__(self) -> str:
        return (
            f"{self.traceback}: size={format_size(self.size)} "
            f"(+-{format_size(round(self.size_sd))}), count={self.count}"
        )

    def describe(self) -> str:
        """``"38 MiB from app/report.py:88 (build_rows)"``."""
        frame = self.traceback.most_recent
        if frame is None:
            where = "code with no Python frame"
        else:
            where = f"{_short_path(frame.filename)}:{frame.lineno}"
            if frame.name:
                where += f" ({frame.name})"
        return f"{format_size(self.size)} from {where}"


@dataclass(frozen=True, slots=True)
class StatisticDiff:
    """The change of one site between two snapshots, as
    ``tracemalloc.StatisticDiff``."""

    traceback: Traceback
    size: int
    size_diff: int
    count: int
    count_diff: int
    size_sd: float
    size_diff_sd: float
    """Standard error of ``size_diff``, treating the two estimates as
    independent (an upper bound when the same blocks are in both)."""

    def __str__(self) -> str:
        return (
            f"{self.traceback}: size={format_size(self.size)} "
            f"({'+' if self.size_diff >= 0 else '-'}"
            f"{format_size(abs(self.size_diff))}), count={self.count} "
            f"({self.count_diff:+d})"
        )


def _short_path(filename: str) -> str:
    try:
        relative = os.path.relpath(filename)
    except ValueError:  # another drive
        return filename
    return filename if relative.startswith("..") else relative


def _check_path(path: object, name: str) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or a path, not {type(path).__name__}")


def _check_measure(measure: object) -> Measure:
    if not isinstance(measure, str):
        raise TypeError(f"measure must be a str, not {type(measure).__name__}")
    if measure == "live":
        return "live"
    if measure == "allocated":
        return "allocated"
    raise ValueError(f"measure must be 'live' or 'allocated', got {measure!r}")


def _keys(traceback: Traceback, key_type: str, cumulative: bool) -> Iterable[Traceback]:
    frames = traceback._frames
    if not isinstance(key_type, str):
        raise TypeError(f"key_type must be a str, not {type(key_type).__name__}")
    if key_type == "traceback":
        if cumulative:
            raise ValueError("cumulative mode cannot be used with key_type 'traceback'")
        return (traceback,)
    if key_type == "lineno":
        if not frames:
            return (Traceback(()),)
        # Keyed by file and line only, as tracemalloc keys them: one line
        # can hold several functions' code (a lambda, a comprehension before
        # 3.12), and is one site.  _Named puts a function's name back.
        if cumulative:
            lines = {(f.filename, f.lineno): f.name for f in reversed(frames)}
        else:
            lines = {(frames[0].filename, frames[0].lineno): frames[0].name}
        return [
            _LineKey((Frame(filename, lineno),), function)
            for (filename, lineno), function in lines.items()
        ]
    if key_type == "filename":
        if not frames:
            return (Traceback(()),)
        names = {f.filename for f in frames} if cumulative else {frames[0].filename}
        return [Traceback((Frame(name, 0),)) for name in names]
    raise ValueError(
        f"key_type must be 'lineno', 'filename' or 'traceback', got {key_type!r}"
    )


class _LineKey(Traceback):
    """A ``"lineno"`` key: equal for equal file and line, carrying the name
    of a function that allocated there (not part of the key)."""

    __slots__ = ("function",)

    def __init__(self, frames: Iterable[Frame], function: str) -> None:
        super().__init__(frames)
        self.function = function


class _Names:
    """The name to show for each line key: that of the function that put
    the most bytes there (ties: the first name in order, for stability)."""

    def __init__(self) -> None:
        self._best: dict[Traceback, tuple[float, str]] = {}
        self._by_name: dict[tuple[Traceback, str], float] = {}

    def add(self, key: Traceback, size: float) -> None:
        if not isinstance(key, _LineKey):
            return
        total = self._by_name.get((key, key.function), 0) + size
        self._by_name[key, key.function] = total
        best = self._best.get(key)
        if (
            best is None
            or total > best[0]
            or (total == best[0] and key.function < best[1])
        ):
            self._best[key] = (total, key.function)

    def named(self, key: Traceback) -> Traceback:
        best = self._best.get(key)
        if best is None:
            return key
        frame = key._frames[0]
        return Traceback((Frame(frame.filename, frame.lineno, best[1]),))


class Snapshot:
    """Sampled allocation sites of a scope (``scope.snapshot()``) or of the
    process (``ml.snapshot()``), shaped like ``tracemalloc.Snapshot``."""

    def __init__(
        self,
        traces: Iterable[Trace],
        traceback_limit: int,
        sampling_interval: int,
    ) -> None:
        self.traces: tuple[Trace, ...] = tuple(traces)
        for trace in self.traces:
            if not isinstance(trace, Trace):
                raise TypeError(
                    f"traces must hold Trace objects, not {type(trace).__name__}"
                )
        for name, value, least in (
            ("traceback_limit", traceback_limit, 0),
            ("sampling_interval", sampling_interval, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
            if value < least:
                raise ValueError(f"{name} must be at least {least}, got {value}")
        self.traceback_limit = traceback_limit
        """Frames recorded per sample when the snapshot was taken."""
        self.sampling_interval = sampling_interval
        """The mean sampling interval (bytes) in force when it was taken."""

    def __repr__(self) -> str:
        return (
            f"<Snapshot {len(self.traces)} sites, live "
            f"{format_size(self.total('live'))}, allocated "
            f"{format_size(self.total('allocated'))}>"
        )

    def total(self, measure: Measure = "live") -> int:
        """Estimated bytes over all sites."""
        _check_measure(measure)
        return sum(getattr(trace, measure) for trace in self.traces)

    def groups(self) -> list[str]:
        """The groups of a process snapshot (open scopes, and what is
        outside them), largest live first."""
        sizes: dict[str, int] = {}
        for trace in self.traces:
            sizes[trace.group] = sizes.get(trace.group, 0) + trace.live
        return sorted(sizes, key=lambda group: -sizes[group])

    def filter(self, predicate: Callable[[Trace], bool]) -> Snapshot:
        """A snapshot of the traces for which ``predicate(trace)`` is true."""
        if not callable(predicate):
            raise TypeError(
                f"predicate must be callable, not {type(predicate).__name__}"
            )
        return Snapshot(
            [trace for trace in self.traces if predicate(trace)],
            self.traceback_limit,
            self.sampling_interval,
        )

    def filter_files(
        self, include: str | None = None, exclude: str | None = None
    ) -> Snapshot:
        """Keep traces whose allocating frame's filename matches ``include``
        (an ``fnmatch`` pattern) and not ``exclude``."""
        for name, pattern in (("include", include), ("exclude", exclude)):
            if pattern is not None and not isinstance(pattern, str):
                raise TypeError(
                    f"{name} must be a str or None, not {type(pattern).__name__}"
                )

        def keep(trace: Trace) -> bool:
            frame = trace.traceback.most_recent
            name = frame.filename if frame is not None else ""
            if include is not None and not fnmatch.fnmatch(name, include):
                return False
            return exclude is None or not fnmatch.fnmatch(name, exclude)

        return self.filter(keep)

    def group(self, name: str) -> Snapshot:
        """The part of a process snapshot charged to one group."""
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, not {type(name).__name__}")
        return self.filter(lambda trace: trace.group == name)

    def _group_by(
        self, key_type: str, cumulative: bool, measure: Measure, names: _Names
    ) -> dict[Traceback, list[float]]:
        if not isinstance(cumulative, bool):
            raise TypeError(
                f"cumulative must be a bool, not {type(cumulative).__name__}"
            )
        sums: dict[Traceback, list[float]] = {}
        for trace in self.traces:
            if measure == "live":
                size, count, var = trace.live, trace.live_samples, trace.live_variance
            else:
                size = trace.allocated
                count = trace.allocated_samples
                var = trace.allocated_variance
            if count == 0:
                continue
            for key in _keys(trace.traceback, key_type, cumulative):
                names.add(key, size)
                entry = sums.get(key)
                if entry is None:
                    sums[key] = [size, count, var]
                else:
                    entry[0] += size
                    entry[1] += count
                    entry[2] += var
        if not sums and key_type not in ("lineno", "filename", "traceback"):
            _keys(Traceback(()), key_type, cumulative)  # raises the ValueError
        return sums

    def statistics(
        self,
        key_type: KeyType,
        cumulative: bool = False,
        *,
        measure: Measure = "live",
    ) -> list[Statistic]:
        """Estimated bytes by site, largest first, as
        ``tracemalloc.Snapshot.statistics``: ``key_type`` ``"lineno"`` (the
        allocating line), ``"filename"`` or ``"traceback"`` (the whole
        recorded stack); ``cumulative`` counts every frame of a stack, not
        only the most recent.  ``measure``: ``"live"`` bytes (still held)
        or ``"allocated"`` bytes (cumulative, freed or not)."""
        measure = _check_measure(measure)
        names = _Names()
        stats = [
            Statistic(names.named(key), int(size), int(count), math.sqrt(var))
            for key, (size, count, var) in self._group_by(
                key_type, cumulative, measure, names
            ).items()
        ]
        stats.sort(key=lambda s: (s.size, s.count, s.traceback), reverse=True)
        return stats

    def compare_to(
        self,
        old_snapshot: Snapshot,
        key_type: KeyType,
        cumulative: bool = False,
        *,
        measure: Measure = "live",
    ) -> list[StatisticDiff]:
        """Differences from ``old_snapshot``, largest change first, as
        ``tracemalloc.Snapshot.compare_to``."""
        if not isinstance(old_snapshot, Snapshot):
            raise TypeError(
                f"old_snapshot must be a Snapshot, not {type(old_snapshot).__name__}"
            )
        measure = _check_measure(measure)
        names = _Names()
        new = self._group_by(key_type, cumulative, measure, names)
        old = old_snapshot._group_by(key_type, cumulative, measure, names)
        diffs = []
        for key in new.keys() | old.keys():
            size, count, var = new.get(key, (0, 0, 0.0))
            old_size, old_count, old_var = old.get(key, (0, 0, 0.0))
            diffs.append(
                StatisticDiff(
                    names.named(key),
                    int(size),
                    int(size - old_size),
                    int(count),
                    int(count - old_count),
                    math.sqrt(var),
                    math.sqrt(var + old_var),
                )
            )
        diffs.sort(
            key=lambda d: (
                abs(d.size_diff),
                d.size,
                abs(d.count_diff),
                d.count,
                d.traceback,
            ),
            reverse=True,
        )
        return diffs

    # ---- files ----

    def flamegraph(
        self,
        path: str | os.PathLike[str],
        measure: Measure = "live",
        *,
        title: str | None = None,
    ) -> None:
        """Write a flame graph of the snapshot's ``measure`` bytes to
        ``path``: one self-contained HTML file (data, style and script
        inline; nothing is fetched), with the bytes, share and samples of
        every stack on hover and click-to-zoom.  Also
        ``python -m memlimits_async flamegraph FILE`` for a dumped
        snapshot."""
        _check_path(path, "path")
        page = self.flamegraph_html(measure, title=title)
        with open(path, "w", encoding="utf-8") as file:
            file.write(page)

    def flamegraph_html(
        self, measure: Measure = "live", *, title: str | None = None
    ) -> str:
        """The page :meth:`flamegraph` writes, as a string: to serve it, or
        to put it in a page of one's own (``memlimits-async run --report``
        does, in a sandboxed frame)."""
        measure = _check_measure(measure)
        if title is not None and not isinstance(title, str):
            raise TypeError(f"title must be a str or None, not {type(title).__name__}")
        from . import _flamegraph

        return _flamegraph.render(self, measure, title)

    def dump(self, filename: str | os.PathLike[str]) -> None:
        """Write the snapshot to a file (JSON), for :meth:`load`, another
        process, or ``python -m memlimits_async flamegraph``."""
        _check_path(filename, "filename")
        tables: dict[Traceback, int] = {}
        tracebacks: list[Any] = []
        traces = []
        for trace in self.traces:
            index = tables.get(trace.traceback)
            if index is None:
                index = tables[trace.traceback] = len(tracebacks)
                tracebacks.append(
                    [
                        [
                            [f.filename, f.lineno, f.name]
                            for f in trace.traceback._frames
                        ],
                        trace.traceback.truncated,
                    ]
                )
            traces.append(
                [
                    index,
                    trace.live,
                    trace.live_samples,
                    trace.live_variance,
                    trace.allocated,
                    trace.allocated_samples,
                    trace.allocated_variance,
                    trace.group,
                ]
            )
        document = {
            "format": _FORMAT,
            "traceback_limit": self.traceback_limit,
            "sampling_interval": self.sampling_interval,
            "tracebacks": tracebacks,
            "traces": traces,
        }
        with open(filename, "w", encoding="utf-8") as file:
            json.dump(document, file, separators=(",", ":"))

    @staticmethod
    def load(filename: str | os.PathLike[str]) -> Snapshot:
        """Read a snapshot written by :meth:`dump`."""
        _check_path(filename, "filename")
        with open(filename, encoding="utf-8") as file:
            try:
                document = json.load(file)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{os.fspath(filename)!r} is not a snapshot: {error}"
                ) from None
        if not isinstance(document, dict) or document.get("format") != _FORMAT:
            raise ValueError(
                f"{os.fspath(filename)!r} is not a snapshot written by Snapshot.dump()"
            )
        try:
            tracebacks = [
                Traceback(
                    (
                        Frame(str(name), int(line), str(func))
                        for name, line, func in frames
                    ),
                    bool(truncated),
                )
                for frames, truncated in document["tracebacks"]
            ]
            traces = [
                Trace(
                    tracebacks[index],
                    int(live),
                    int(live_samples),
                    float(live_var),
                    int(allocated),
                    int(allocated_samples),
                    float(allocated_var),
                    str(group),
                )
                for (
                    index,
                    live,
                    live_samples,
                    live_var,
                    allocated,
                    allocated_samples,
                    allocated_var,
                    group,
                ) in document["traces"]
            ]
            return Snapshot(
                traces,
                int(document["traceback_limit"]),
                int(document["sampling_interval"]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise ValueError(
                f"{os.fspath(filename)!r} is a damaged snapshot: {error!r}"
            ) from None


# ---- from the meter ----

_Raw = tuple[tuple[tuple[str, int, str], ...], bool, int, int, float]


def _traceback_of(
    frames: tuple[tuple[str, int, str], ...],
    truncated: bool,
    cache: dict[int, Traceback],
) -> Traceback:
    # The meter hands out one tuple per interned stack per call: cache by it.
    traceback = cache.get(id(frames))
    if traceback is None:
        traceback = cache[id(frames)] = Traceback(
            (Frame(filename, lineno, name) for filename, lineno, name in frames),
            truncated,
        )
    return traceback


def _traces(
    live: list[_Raw], allocated: list[_Raw], group: str, cache: dict[int, Traceback]
) -> list[Trace]:
    by_tb: dict[Traceback, list[Any]] = {}
    for frames, truncated, size, count, var in live:
        tb = _traceback_of(frames, truncated, cache)
        by_tb[tb] = [size, count, var, 0, 0, 0.0]
    for frames, truncated, size, count, var in allocated:
        tb = _traceback_of(frames, truncated, cache)
        entry = by_tb.get(tb)
        if entry is None:
            by_tb[tb] = [0, 0, 0.0, size, count, var]
        else:
            entry[3:] = [size, count, var]
    return [_trace(tb, values, group) for tb, values in by_tb.items()]


def _trace(tb: Traceback, values: list[Any], group: str) -> Trace:
    live, live_samples, live_var, allocated, allocated_samples, allocated_var = values
    return Trace(
        tb,
        live,
        live_samples,
        live_var,
        allocated,
        allocated_samples,
        allocated_var,
        group,
    )


def _settings() -> tuple[int, int]:
    raw = _core.stats()
    return raw["traceback_limit"], raw["sampling_interval"]


def account_snapshot(account: Any) -> Snapshot:
    """The sites of one account (a scope's), live and allocated."""
    limit, interval = _settings()
    if account is None:
        return Snapshot((), limit, interval)
    live, allocated = account.sites()
    return Snapshot(_traces(live, allocated, "", {}), limit, interval)


OUTSIDE = "outside open scopes"


def _tasks_by_account(loop: Any = None) -> dict[int, list[str]]:
    """Names of the tasks of ``loop`` (default: this thread's event loop),
    by the id of every account current in their context (best effort:
    asyncio from 3.12, where a task's context can be read, and trio)."""
    contexts: list[tuple[str, Any]] = []
    if loop is None:
        loop = asyncio._get_running_loop()
    if loop is not None:
        try:
            # Any thread may ask: all_tasks copies the task set and retries
            # when it changes meanwhile (3.12, 3.13), or reads it under the
            # GIL in C (3.14+).
            tasks = asyncio.all_tasks(loop)
        except RuntimeError:  # it kept changing (3.12, 3.13: 1000 tries)
            tasks = set()
        for task in tasks:
            get_context = getattr(task, "get_context", None)
            if get_context is not None:
                contexts.append((task.get_name(), get_context()))
    else:
        import sys

        trio = sys.modules.get("trio")
        if trio is not None:
            try:
                root = trio.lowlevel.current_root_task()
            except RuntimeError:
                root = None
            pending = [root] if root is not None else []
            while pending:
                task = pending.pop()
                contexts.append((task.name, task.context))
                for nursery in task.child_nurseries:
                    pending.extend(nursery.child_tasks)
    names: dict[int, list[str]] = {}
    for name, context in contexts:
        account = context.get(_core.current_account)
        while account is not None:
            names.setdefault(id(account), []).append(name)
            account = account.outer
    return names


@dataclass(frozen=True)
class OpenScope:
    """A limit scope open somewhere in the process (:func:`open_scopes`)."""

    scope: LimitScope
    tasks: tuple[str, ...]
    """The names of the tasks it is current in, directly or around an inner
    scope, sorted (tasks of one event loop only: see :func:`open_scopes`)."""


def open_scopes(loop: asyncio.AbstractEventLoop | None = None) -> list[OpenScope]:
    """Every limit scope open in the process, in any thread or task (in no
    particular order), each with the names of the tasks it is current in.

    The tasks named are those of ``loop``, or by default of the event loop
    running in the calling thread (asyncio from 3.12, where a task's context
    can be read, or trio's run): a monitor thread passes the loop it
    watches.  A scope entered outside any task, or in another loop's tasks,
    has none.  What ``memlimits-async top`` shows of a process it attaches
    to.
    """
    from ._scope import LimitScope

    if loop is not None and not isinstance(loop, asyncio.AbstractEventLoop):
        raise TypeError(
            f"loop must be an asyncio event loop or None, not {type(loop).__name__}"
        )
    tasks = _tasks_by_account(loop)
    return [
        OpenScope(listener, tuple(sorted(tasks.get(id(account), ()))))
        for account, listener, _outer, _live, _allocated in _core.process_sites()
        if account is not None and isinstance(listener, LimitScope)
    ]


def _label(scope: object, account: object, tasks: dict[int, list[str]]) -> str:
    if scope is None:
        text = f"limit_scope at {id(account):#x} (outside any task)"
    else:
        text = repr(scope).replace(">", f" at {id(scope):#x}>", 1)
    names = tasks.get(id(account))
    if names:
        shown = ", ".join(sorted(names)[:5])
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        text += f" in task{'s' if len(names) > 1 else ''} {shown}{more}"
    return text


def process_snapshot() -> Snapshot:
    """Sites of the whole process, grouped by the open scope that holds them.

    Live bytes go to the innermost open scope of the block's account;
    allocated bytes to the innermost open scope that was current (an outer
    scope's group leaves out what its open inner scopes allocated)."""
    limit, interval = _settings()
    groups = _core.process_sites()
    tasks = _tasks_by_account()
    cache: dict[int, Traceback] = {}
    inclusive: dict[int, dict[Traceback, list[Any]]] = {}
    parents: dict[int, int | None] = {}
    labels: dict[int, str] = {}
    raw_live: dict[int, list[_Raw]] = {}
    for account, listener, outer, live, allocated in groups:
        key = 0 if account is None else id(account)
        labels[key] = OUTSIDE if account is None else _label(listener, account, tasks)
        parents[key] = None if outer is None else id(outer)
        raw_live[key] = live
        inclusive[key] = {
            _traceback_of(frames, truncated, cache): [size, count, var]
            for frames, truncated, size, count, var in allocated
        }
    # An account's samples are counted in every enclosing account too: take
    # out what open inner scopes allocated, so that each sample is in one
    # group only.
    own = {
        key: {tb: list(v) for tb, v in table.items()}
        for key, table in inclusive.items()
    }
    for key, parent in parents.items():
        if parent is None or parent not in own:
            continue
        for tb, (size, count, var) in inclusive[key].items():
            entry = own[parent].get(tb)
            if entry is not None:
                entry[0] -= size
                entry[1] -= count
                entry[2] = max(entry[2] - var, 0.0)
    traces: list[Trace] = []
    for key, label in labels.items():
        by_tb: dict[Traceback, list[Any]] = {}
        for frames, truncated, size, count, var in raw_live[key]:
            by_tb[_traceback_of(frames, truncated, cache)] = [
                size,
                count,
                var,
                0,
                0,
                0.0,
            ]
        for tb, (size, count, var) in own[key].items():
            if count <= 0:
                continue
            entry = by_tb.get(tb)
            if entry is None:
                by_tb[tb] = [0, 0, 0.0, size, count, var]
            else:
                entry[3:] = [size, count, var]
        traces.extend(_trace(tb, values, label) for tb, values in by_tb.items())
    return Snapshot(traces, limit, interval)


def top_sites(account: Any, measure: Measure, n: int = 3) -> tuple[Statistic, ...]:
    """The ``n`` largest allocating lines of an account, for breach reports."""
    if account is None or _core.stats()["traceback_limit"] == 0:
        return ()
    live, allocated = account.sites()
    cache: dict[int, Traceback] = {}
    raw = live if measure == "live" else allocated
    sums: dict[Traceback, list[float]] = {}
    names = _Names()
    for frames, truncated, size, count, var in raw:
        tb = _traceback_of(frames, truncated, cache)
        for key in _keys(tb, "lineno", False):
            names.add(key, size)
            entry = sums.setdefault(key, [0, 0, 0.0])
            entry[0] += size
            entry[1] += count
            entry[2] += var
    stats = sorted(
        (
            Statistic(names.named(key), int(s), int(c), math.sqrt(v))
            for key, (s, c, v) in sums.items()
            if not _in_this_package(key)
        ),
        key=lambda s: (s.size, s.count, s.traceback),
        reverse=True,
    )
    return tuple(stats[:n])


_PACKAGE_DIR: Final = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _in_this_package(key: Traceback) -> bool:
    """A line of this package's own code (a wrapper's frame, a scope's
    bookkeeping): what the budget tool itself allocated is not where the
    user's memory went, so breach reports leave it out (snapshots keep it)."""
    frames = key._frames
    return bool(frames) and os.path.abspath(frames[0].filename).startswith(_PACKAGE_DIR)
