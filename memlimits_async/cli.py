"""The ``memlimits-async`` command: run an asyncio program with per-task budgets.

```sh
memlimits-async run --task-memory "50 MiB" --tasks 'handler-*' server.py --port 8080
python -m memlimits_async run --json tasks.json -m mypackage.worker
```

``run`` runs a script (or ``-m module``) unchanged, as ``python`` would, and
places every task started on an asyncio event loop in a limit scope of its
own, with the budgets given on the command line.  A breached task is
cancelled like any cancelled task (its awaiter gets ``CancelledError``) and a
line on stderr says which task, and why.  See docs/cli.md.

Built only on memlimits_async's public API, like any user's integration.
Subcommands are added with :func:`add_subcommand` (each a function that
fills its parser and returns the function that runs it).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import contextvars
import fnmatch
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import json
import math
import os
import runpy
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from types import ModuleType, TracebackType
from typing import IO, Any, Final, TypeVar

import memlimits_async as ml

__all__ = [
    "RunOptions",
    "TaskRecord",
    "Tracker",
    "add_subcommand",
    "main",
]

PROG: Final = "memlimits-async"

T = TypeVar("T")

# Options of ``run`` that take a value: the command line is split where the
# program starts (its script, or ``-m module``) before argparse sees it, so
# that the program's own options are never taken for ours.
_RUN_VALUE_OPTIONS: Final = frozenset(
    {
        "--task-memory",
        "--task-allocations",
        "--task-timeout",
        "--tasks",
        "--global-memory",
        "--json",
        "--report",
    }
)


class _Parser(argparse.ArgumentParser):
    """argparse, with errors on stderr and status 2 (its default), and no
    abbreviations: an abbreviated option would be split wrongly from the
    program's arguments."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(**kwargs)


# --------------------------------------------------------------------------
# Per-task records

# The scope of the budgeted task running here (tasks copy it from the task
# that started them).
_task_scope: contextvars.ContextVar[ml.LimitScope | None] = contextvars.ContextVar(
    "memlimits_async.cli.task_scope", default=None
)


@dataclass(slots=True, eq=False)  # kept in a set, by identity
class TaskRecord:
    """One budgeted task, as the tool saw it."""

    name: str
    started: float  # time.monotonic()
    scope: ml.LimitScope | None = None
    ended: float | None = None
    breach: ml.Breach | None = None

    def current_usage(self) -> ml.Usage:
        if self.scope is not None:
            return self.scope.usage
        return ml.Usage(0, 0, 0)

    def duration(self, now: float | None = None) -> float:
        end = self.ended if self.ended is not None else (now or time.monotonic())
        return max(0.0, end - self.started)

    def as_json(self) -> dict[str, object]:
        usage = self.current_usage()
        breach = self.breach
        return {
            "name": self.name,
            "peak_live": usage.peak_live,
            "allocated": usage.allocated,
            "duration": round(self.duration(), 6),
            "finished": self.ended is not None,
            "breaches": []
            if breach is None
            else [
                {
                    "kind": breach.kind.value,
                    "limit": breach.limit,
                    "observed": breach.observed,
                    "reason": breach.reason,
                }
            ],
        }


@dataclass(frozen=True, slots=True)
class RunOptions:
    """The budgets ``run`` gives each selected task."""

    memory: int | None = None
    allocations: int | None = None
    timeout: float | None = None
    patterns: tuple[str, ...] = ()
    global_memory: bool = False

    def selects(self, name: str) -> bool:
        return not self.patterns or any(
            fnmatch.fnmatchcase(name, pattern) for pattern in self.patterns
        )


@dataclass(slots=True)
class Tracker:
    """Puts every task created on asyncio's loops in a limit scope.

    ``install()`` wraps ``asyncio.BaseEventLoop.create_task`` (and
    ``uvloop.Loop.create_task``, once the program imports uvloop), through
    which ``asyncio.create_task``, ``ensure_future``, ``gather``,
    ``TaskGroup`` and anyio start tasks on those loops; the coroutine is
    wrapped before the loop's task factory sees it, so any factory the
    program sets (``eager_task_factory`` included) is kept and composes with
    it.
    """

    options: RunOptions
    stderr: IO[str] = field(default_factory=lambda: sys.stderr)
    keep_ended: bool = True  # every task's record, for --json
    track: bool = True  # records of running tasks, for --top and --json
    records: list[TaskRecord] = field(default_factory=list)
    live: set[TaskRecord] = field(default_factory=set)
    breach_count: int = 0
    last_breached: TaskRecord | None = None
    recently_breached: deque[TaskRecord] = field(
        default_factory=lambda: deque(maxlen=50)
    )
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Where breach lines go instead of stderr (the live view, when stderr
    # is the terminal it draws on: lines print above the table).
    report_to: Callable[[str], None] | None = None
    # The classes whose create_task is wrapped, with the original.
    _patched: list[tuple[type, Callable[..., asyncio.Task[Any]]]] = field(
        default_factory=list
    )
    _hook: _AfterImport | None = None

    def install(self) -> None:
        if self._patched:
            return
        self._patch(asyncio.BaseEventLoop)
        # uvloop's Loop is not an asyncio.BaseEventLoop, but its Python
        # class's create_task is what every task of it is started through
        # (asyncio.create_task, TaskGroup, uvloop.run's main task): patched
        # when the program imports uvloop, which it does after this.
        uvloop = sys.modules.get("uvloop")
        if uvloop is not None:
            self._patch(uvloop.Loop)
        else:
            self._hook = _AfterImport("uvloop", lambda module: self._patch(module.Loop))
            sys.meta_path.insert(0, self._hook)

    def _patch(self, cls: type) -> None:
        original: Callable[..., asyncio.Task[Any]] = cls.create_task  # type: ignore[attr-defined]
        tracker = self

        def create_task(
            loop: asyncio.AbstractEventLoop,
            coro: Any,
            *args: Any,
            **kwargs: Any,
        ) -> asyncio.Task[Any]:
            if not inspect.iscoroutine(coro) or _is_asyncios_own(coro):
                # Not the program's: asyncio's housekeeping (shutting down
                # async generators and the executor), or something asyncio
                # itself will refuse as it would without the tool.
                return original(loop, coro, *args, **kwargs)
            name = kwargs.get("name")
            if name is None and _NAMED_AFTER_THE_FACTORY:
                name = _name_set_after_the_factory(loop)
            if name is not None and not tracker.options.selects(str(name)):
                return original(loop, coro, *args, **kwargs)
            wrapper = tracker._budgeted(
                _Unstarted(coro), None if name is None else str(name)
            )
            # Repr, ``asyncio ps`` and debuggers name the program's coroutine.
            wrapper.__name__ = coro.__name__  # type: ignore[attr-defined]
            wrapper.__qualname__ = coro.__qualname__  # type: ignore[attr-defined]
            return original(loop, wrapper, *args, **kwargs)

        self._patched.append((cls, original))
        cls.create_task = create_task  # type: ignore[attr-defined]

    def uninstall(self) -> None:
        if self._hook is not None:
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self._hook)
            self._hook = None
        while self._patched:
            cls, original = self._patched.pop()
            cls.create_task = original  # type: ignore[attr-defined]

    async def _budgeted(self, holder: _Unstarted, name: str | None) -> Any:
        coro = holder.coro
        holder.coro = None  # started: the holder closes nothing
        assert coro is not None
        if name is None:
            task = asyncio.current_task()
            name = task.get_name() if task is not None else "?"
            if not self.options.selects(name):
                return await coro
        options = self.options
        record: TaskRecord | None = None
        if self.track:
            record = TaskRecord(name, time.monotonic())
            self.live.add(record)  # a set: one operation under the GIL
            if self.keep_ended:
                self.records.append(record)
        parent = _task_scope.get()
        if parent is not None:
            # The task's budget is its own, not a share of its parent's.
            # Where the program opened a scope of its own around the
            # create_task call, the task stays inside it (RuntimeError).
            # (Not contextlib.suppress: this runs for every task.)
            try:  # noqa: SIM105
                parent.step_outside()
            except RuntimeError:
                pass
        finished = False
        scope = ml.limit_scope(
            memory=options.memory,
            allocations=options.allocations,
            timeout=options.timeout,
            global_memory=options.global_memory,
        )
        try:
            async with scope:
                if record is not None:
                    record.scope = scope
                _task_scope.set(scope)
                result = await coro
                finished = True
        finally:
            if record is not None:
                record.ended = time.monotonic()
                self.live.discard(record)
            if scope.breached:
                if record is None:
                    record = TaskRecord(name, 0.0, scope, 0.0)
                record.breach = scope.breach
                self._breached(record)
        if not finished:
            # The scope swallowed its own cancellation: the task ends
            # cancelled, as any task whose cancellation reaches its end.
            breach = scope.breach
            raise asyncio.CancelledError(None if breach is None else breach.reason)
        return result

    def _breached(self, record: TaskRecord) -> None:
        with self.lock:
            self.breach_count += 1
            self.last_breached = record
            self.recently_breached.append(record)
        self._report(record)

    def _report(self, record: TaskRecord) -> None:
        breach = record.breach
        if breach is None:
            return
        line = (
            f"{PROG}: task {record.name!r} stopped by its {breach.kind.value} "
            f"limit: {breach.reason}"
        )
        if self.report_to is not None:
            self.report_to(line)
            return
        with contextlib.suppress(Exception):
            print(line, file=self.stderr, flush=True)

    def snapshot(self, breached_since: float = math.inf) -> list[TaskRecord]:
        """The running tasks' records, and those of tasks that a breach
        stopped after ``breached_since`` (for the live view)."""
        with self.lock:
            return [
                *list(self.live),
                *(
                    record
                    for record in self.recently_breached
                    if record.ended is not None and record.ended >= breached_since
                ),
            ]


_ASYNCIO_DIR: Final = os.path.dirname(asyncio.__file__) + os.sep

# On 3.12, ``asyncio.create_task(coro, name=...)`` and
# ``TaskGroup.create_task`` call ``loop.create_task(coro)`` without the name
# and set it once the loop's task factory has returned the task; so does
# ``loop.create_task`` itself around the factory.  An eager task
# (``eager_task_factory``) runs its first step inside the factory, before it
# has its name, and would be selected (``--tasks``) by its default name
# ``Task-N``.  3.13 passes the name on to the factory.
_NAMED_AFTER_THE_FACTORY: Final = sys.version_info[:2] == (3, 12)
_SETTERS_OF_THE_NAME: Final = (
    frozenset(
        {asyncio.tasks.create_task.__code__, asyncio.TaskGroup.create_task.__code__}
    )
    if _NAMED_AFTER_THE_FACTORY
    else frozenset()
)


def _name_set_after_the_factory(loop: asyncio.AbstractEventLoop) -> str | None:
    """The name that the caller of ``loop.create_task`` will give the task,
    when the task may start before it is given (3.12, a task factory set)."""
    if loop.get_task_factory() is None:
        return None  # the task starts later, named
    caller = sys._getframe(2)  # above the tool's create_task
    if caller.f_code not in _SETTERS_OF_THE_NAME:
        return None
    name = caller.f_locals.get("name")
    return None if name is None else str(name)


def _is_asyncios_own(coro: Coroutine[Any, Any, Any]) -> bool:
    code = getattr(coro, "cr_code", None)
    return code is not None and code.co_filename.startswith(_ASYNCIO_DIR)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``then(module)`` once the module ``name`` has been imported
    (found by the finders after this one, loaded by its own loader)."""

    def __init__(self, name: str, then: Callable[[ModuleType], object]) -> None:
        self.name = name
        self.then = then

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)  # once, and not for the search below
        spec = importlib.util.find_spec(fullname)
        loader = None if spec is None else spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module
        then = self.then

        def exec_then(module: ModuleType) -> None:
            exec_module(module)
            then(module)

        loader.exec_module = exec_then  # type: ignore[method-assign]
        return spec


class _Unstarted:
    """The program's coroutine, until the wrapper starts it.

    A task cancelled before its first step never runs the wrapper, so the
    program's coroutine would be collected unawaited (a RuntimeWarning the
    same program does not give without the tool): the holder, dropped with
    the wrapper, closes it as asyncio would have."""

    __slots__ = ("coro",)

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.coro: Coroutine[Any, Any, Any] | None = coro

    def __del__(self) -> None:
        if self.coro is not None:
            self.coro.close()


# --------------------------------------------------------------------------
# --top: the live view


_COLUMNS: Final = (
    "task",
    "live",
    "peak",
    "alloc/s",
    "allocated",
    "memory limit",
    "alloc limit",
    "age",
    "breach",
)

_SORT_KEYS: Final = {
    "l": "live",
    "p": "peak",
    "a": "allocated",
    "r": "rate",
    "n": "name",
    "d": "age",
}


@dataclass(frozen=True, slots=True)
class TaskSample:
    """One task in a :class:`Snapshot`."""

    key: int  # stable while the task lives (for rates)
    name: str
    live: int
    peak: int
    allocated: int
    age: float
    ended: bool
    breach: str  # the breach's kind, "" if none
    # The row's own limits, where rows have different ones (scopes seen by
    # `top PID` in a process that run did not start); else the snapshot's.
    memory_limit: int | None = None
    allocation_limit: int | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the live view shows, from this process or another one."""

    tasks: list[TaskSample]
    memory: int | None
    allocations: int | None
    breach_count: int
    last_breach: str

    def as_json(self) -> dict[str, object]:
        return {
            "tasks": [list(_sample_fields(task)) for task in self.tasks],
            "memory": self.memory,
            "allocations": self.allocations,
            "breach_count": self.breach_count,
            "last_breach": self.last_breach,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Snapshot:
        return cls(
            [TaskSample(*task) for task in data["tasks"]],
            data["memory"],
            data["allocations"],
            data["breach_count"],
            data["last_breach"],
        )


def _sample_fields(task: TaskSample) -> tuple[object, ...]:
    return (
        task.key,
        task.name,
        task.live,
        task.peak,
        task.allocated,
        task.age,
        task.ended,
        task.breach,
        task.memory_limit,
        task.allocation_limit,
    )


def take_snapshot(tracker: Tracker) -> Snapshot:
    """The running tasks of ``tracker``, and those a breach stopped in the
    last 10 seconds."""
    now = time.monotonic()
    tasks = []
    for record in tracker.snapshot(breached_since=now - 10):
        usage = record.current_usage()
        tasks.append(
            TaskSample(
                id(record),
                record.name,
                usage.live,
                usage.peak_live,
                usage.allocated,
                record.duration(now),
                record.ended is not None,
                "" if record.breach is None else record.breach.kind.value,
            )
        )
    last = tracker.last_breached
    last_breach = (
        ""
        if last is None or last.breach is None
        else f"{last.name}: {last.breach.reason}"
    )
    return Snapshot(
        tasks,
        tracker.options.memory,
        tracker.options.allocations,
        tracker.breach_count,
        last_breach,
    )


@dataclass(slots=True)
class _Row:
    name: str
    live: int
    peak: int
    allocated: int
    rate: float
    age: float
    breach: str
    memory_limit: int | None
    allocation_limit: int | None


class _Screen:
    """The terminal the live view draws on, with the table kept as its last
    lines: what the program writes there through ``sys.stdout`` and
    ``sys.stderr`` (see :class:`_ScreenStream`) and the breach lines go
    above the table, which is erased, and drawn again below them.  Without
    this the table is drawn over the program's lines: the cursor moves up
    over lines the view does not know were printed, and erases them.

    Shared by the view's thread and every thread of the program that
    writes.  The program's side allocates nothing of its own (the frame and
    its erasing sequence are bytes the view's thread made), so that a
    task's ``print`` is charged what it would be without the view.
    """

    def __init__(self, fd: int, encoding: str, interval: float) -> None:
        from rich.control import Control
        from rich.segment import ControlType

        # rich's control sequences, as bytes made once: the program's side
        # writes them with its lines.
        self._hide_cursor = Control.show_cursor(False).segment.text.encode()
        self._show_cursor = Control.show_cursor(True).segment.text.encode()
        self._erase_line = Control((ControlType.ERASE_IN_LINE, 2)).segment.text.encode()
        self._cursor_up = Control((ControlType.CURSOR_UP, 1)).segment.text.encode()
        self.fd = fd
        self.encoding = encoding
        self.interval = interval
        # Reentrant: a signal handler may print while its thread writes.
        self.lock = threading.RLock()
        self.pid = os.getpid()
        self.active = True  # False: writes go straight through
        self._frame = b""
        self._erase = b""  # from the end of the frame to its first column
        self._shown = False
        # When the program began the line it has not ended yet (None: the
        # cursor is at the start of a line); never while the frame shows.
        self._open_line: float | None = None
        self._put(self._hide_cursor)  # no cursor blinking at the end of the table

    def _put(self, data: bytes) -> None:
        written = os.write(self.fd, data)
        while written < len(data):
            data = data[written:]
            written = os.write(self.fd, data)

    def _show(self, force: bool) -> None:
        """Draw the frame below what is on the terminal, unless it shows or
        the program's last line is unfinished: that line is left alone for
        a refresh interval (the rest of it usually follows at once, as
        ``print`` writes the line, then its end), then ended."""
        if self._shown or not self._frame:
            return
        if self._open_line is not None:
            if not force and time.monotonic() - self._open_line < self.interval:
                return
            self._put(b"\n")
            self._open_line = None
        self._put(self._frame)
        self._shown = True

    def program_write(self, stream: Any, data: Any, newline: str | bytes) -> int:
        """``stream.write(data)`` above the frame."""
        written: int
        if not self.active or os.getpid() != self.pid:
            # A forked child has no view; the lock may be held by a thread
            # that the child does not have.
            written = stream.write(data)
            return written
        with self.lock:
            if not self.active:
                written = stream.write(data)
                return written
            if self._shown:
                self._shown = False
                self._put(self._erase)
            try:
                written = stream.write(data)
                stream.flush()  # before the frame, written through another file
                if len(data):
                    if data[-1:] == newline:
                        self._open_line = None
                    elif self._open_line is None:
                        self._open_line = time.monotonic()
            finally:
                self._show(force=False)
        return written

    def print_above(self, text: str) -> bool:
        """Write the line ``text`` above the frame; False once the view has
        closed (the terminal may be closed too)."""
        data = text.encode(self.encoding, "replace") + b"\n"
        if os.getpid() != self.pid:
            return False
        with self.lock:
            if not self.active:
                return False
            out = self._erase if self._shown else b""
            self._shown = False
            if self._open_line is not None:
                out += b"\n"
                self._open_line = None
            self._put(out + data)
            self._show(force=False)
        return True

    def draw(self, frame: bytes, height: int, force: bool = False) -> None:
        """Replace the frame, ``height`` lines (the cursor left at the end
        of the last one)."""
        line = self._erase_line
        erase = b"\r" + line + (self._cursor_up + line) * (height - 1)
        with self.lock:
            if not self.active:
                return
            if self._shown:
                # Erased and drawn in one write: no blank screen in between.
                self._put(self._erase + frame)
                self._frame, self._erase = frame, erase
                return
            self._frame, self._erase = frame, erase
            self._show(force)

    def close(self, trailer: bytes = b"") -> None:
        """Leave the frame where it is, below everything, and write
        ``trailer`` after it; writes go straight through from now on."""
        with self.lock:
            if not self.active:
                return
            self._show(force=True)
            self._put((b"\n" if self._shown else b"") + trailer + self._show_cursor)
            self._shown = False
            self.active = False


class _ScreenStream:
    """``sys.stdout`` or ``sys.stderr`` while the live view draws on the
    terminal it writes to: its writes (and those to its ``buffer``) go
    above the table; everything else is the stream's own."""

    def __init__(self, stream: Any, screen: _Screen, newline: str | bytes) -> None:
        self._stream = stream
        self._screen = screen
        self._newline = newline
        self._binary: _ScreenStream | None = None

    def write(self, data: Any) -> int:
        return self._screen.program_write(self._stream, data, self._newline)

    def writelines(self, lines: Iterable[Any]) -> None:
        for line in lines:
            self.write(line)

    @property
    def buffer(self) -> Any:
        if self._binary is None:
            self._binary = _ScreenStream(self._stream.buffer, self._screen, b"\n")
        return self._binary

    def __getattr__(self, name: str) -> Any:
        if name in ("_stream", "_screen", "_newline", "_binary"):
            raise AttributeError(name)  # not set yet (copy, pickle)
        return getattr(self._stream, name)


def _on_terminal(stream: Any, fd: int, controlling: bool) -> bool:
    """Whether ``stream`` writes to the terminal ``fd`` is open on (which is
    ``/dev/tty``, the controlling terminal, if ``controlling``)."""
    try:
        own = stream.fileno()
        if not os.isatty(own):
            return False
        if controlling:
            # /dev/tty's own device is not the terminal's: a terminal other
            # than the controlling one has no foreground process group.
            os.tcgetpgrp(own)
            return True
        return os.fstat(own).st_rdev == os.fstat(fd).st_rdev
    except (AttributeError, OSError, ValueError):
        return False


class TopView:
    """The running tasks, refreshed every second on the terminal.

    Drawn with rich on ``/dev/tty`` (or stderr when there is no terminal),
    as the last lines on it: when the program's stdout or stderr is that
    terminal, what it writes through ``sys.stdout`` and ``sys.stderr`` goes
    above the table (see :class:`_Screen`), as do the breach lines; when
    the program ends, the last frame stays below its output.  Keys are
    read from ``/dev/tty`` in cbreak mode: ``l`` ``p`` ``a`` ``r`` ``n``
    ``d`` sort by live, peak, allocated, allocation rate, name, age; ``q``
    closes the view (the program runs on).  It runs in a thread of its own,
    outside every scope, so nothing it allocates is charged to a task.
    """

    def __init__(
        self,
        tracker: Tracker | None,
        source: Callable[[], Snapshot] | None = None,
        interval: float = 1.0,
    ) -> None:
        self.tracker = tracker
        if source is None:
            assert tracker is not None
            source = functools.partial(take_snapshot, tracker)
        self.source = source
        self.interval = interval
        self.ended = ""  # why the view stopped by itself
        self.sort = "live"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tty: IO[str] | None = None
        self._tty_fd: int | None = None
        self._saved_mode: list[Any] | None = None
        self._console: Any = None  # rich's, set by _open
        self._screen: _Screen | None = None  # None: not a terminal
        self._red = ("", "")  # around a breach line, if the terminal has colours
        self._breaches = 0  # the breach count of the frame drawn last
        self._seen: dict[int, tuple[float, int]] = {}
        # The program's streams the view replaced: (name, ours, theirs).
        self._streams: list[tuple[str, _ScreenStream, Any]] = []

    def _open(self) -> None:
        from rich.console import Console

        try:
            self._tty = open("/dev/tty", "w")  # noqa: SIM115 (closed in _close)
        except OSError:
            self._tty = None
        else:
            self._cbreak()
        out = self._tty or sys.stderr
        self._console = Console(file=out)
        if _is_terminal(out):
            with contextlib.suppress(OSError, ValueError):
                self._screen = _Screen(
                    out.fileno(), out.encoding or "utf-8", self.interval
                )
        if self._console.color_system is not None and not self._console.no_color:
            from rich.color import ColorSystem
            from rich.style import Style

            start, _, end = (
                Style(color="red").render("\0", color_system=ColorSystem.STANDARD)
            ).partition("\0")
            self._red = (start, end)

    def _close(self) -> None:
        self._restore()
        if self._tty is not None:
            with contextlib.suppress(OSError):
                self._tty.close()
            self._tty = None

    def start(self) -> None:
        self._open()
        screen = self._screen
        if self.tracker is not None and screen is not None:
            for name in ("stdout", "stderr"):
                theirs = getattr(sys, name)
                if _on_terminal(theirs, screen.fd, self._tty is not None):
                    ours = _ScreenStream(theirs, screen, "\n")
                    setattr(sys, name, ours)
                    self._streams.append((name, ours, theirs))
            if any(name == "stderr" for name, _, _ in self._streams):
                self.tracker.report_to = self._report
        self._thread = threading.Thread(
            target=contextvars.Context().run,
            args=(self._loop,),
            name="memlimits-async top",
            daemon=True,
        )
        self._thread.start()

    def _report(self, line: str) -> None:
        screen = self._screen
        if screen is None or not screen.print_above(self._red[0] + line + self._red[1]):
            assert self.tracker is not None
            with contextlib.suppress(Exception):
                print(line, file=self.tracker.stderr, flush=True)

    def run_here(self) -> None:
        """Show the view in this thread until ``q``, Ctrl-C, or the source
        fails (the process watched ended)."""
        self._open()
        try:
            self._loop()
        finally:
            self._close()

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        if self.tracker is not None:
            self.tracker.report_to = None
        for name, ours, theirs in self._streams:
            if getattr(sys, name) is ours:
                setattr(sys, name, theirs)
        self._streams.clear()
        if thread is not None and thread.is_alive():
            # Stuck writing to the terminal: leave it the file, and let the
            # program's writes past it.
            if self._screen is not None:
                self._screen.active = False
            self._restore()
            return
        self._close()

    def _cbreak(self) -> None:
        try:
            import termios
            import tty

            fd = os.open("/dev/tty", os.O_RDONLY | os.O_NONBLOCK)
            self._saved_mode = termios.tcgetattr(fd)
            tty.setcbreak(fd)
            self._tty_fd = fd
        except (OSError, ImportError):
            self._tty_fd = None
        except Exception:  # termios.error: not a terminal
            self._tty_fd = None

    def _restore(self) -> None:
        fd = self._tty_fd
        if fd is None:
            return
        self._tty_fd = None
        with contextlib.suppress(Exception):
            import termios

            if self._saved_mode is not None:
                termios.tcsetattr(fd, termios.TCSADRAIN, self._saved_mode)
        with contextlib.suppress(OSError):
            os.close(fd)

    def _keys(self, timeout: float) -> str:
        fd = self._tty_fd
        if fd is None:
            self._stop.wait(timeout)
            return ""
        import select

        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return ""
        try:
            return os.read(fd, 64).decode(errors="replace")
        except OSError:
            return ""

    def rows(self, snapshot: Snapshot, now: float) -> list[_Row]:
        rows = []
        seen: dict[int, tuple[float, int]] = {}
        for task in snapshot.tasks:
            then, before = self._seen.get(task.key, (now - task.age, 0))
            if task.ended or now - then <= 0:
                # Ended, or first seen just now by an attached view that
                # cannot tell when the scope was entered: no rate yet.
                rate = 0.0
            else:
                rate = (task.allocated - before) / max(now - then, 1e-3)
            seen[task.key] = (now, task.allocated)
            rows.append(
                _Row(
                    task.name,
                    task.live,
                    task.peak,
                    task.allocated,
                    rate,
                    task.age,
                    task.breach,
                    task.memory_limit,
                    task.allocation_limit,
                )
            )
        self._seen = seen
        key_of: dict[str, Callable[[_Row], Any]] = {
            "live": lambda row: -row.live,
            "peak": lambda row: -row.peak,
            "allocated": lambda row: -row.allocated,
            "rate": lambda row: -row.rate,
            "name": lambda row: row.name,
            "age": lambda row: -row.age,
        }
        rows.sort(key=key_of[self.sort])
        return rows

    def render(self, now: float, height: int) -> Any:
        from rich.console import Group
        from rich.text import Text

        snapshot = self.source()
        self._breaches = snapshot.breach_count
        rows = self.rows(snapshot, now)
        limit = "-" if snapshot.memory is None else ml.format_size(snapshot.memory)
        allocations = (
            "-"
            if snapshot.allocations is None
            else ml.format_size(snapshot.allocations)
        )
        running = [row for row in rows if not row.breach]
        total = sum(row.live for row in running)
        breaches = snapshot.breach_count
        title = Text.assemble(
            (f"{PROG} top", "bold"),
            f"  {len(running)} tasks running, {ml.format_size(total)} live, "
            f"{breaches} breaches  sorted by {self.sort}",
        )
        # Plain aligned text, not a rich Table: a Table measures every cell
        # of every row at each refresh, about 0.4 ms a row.
        shown = rows[: max(1, height - 5)]
        cells = [
            (
                row.name,
                ml.format_size(row.live),
                ml.format_size(row.peak),
                f"{ml.format_size(int(row.rate))}/s",
                ml.format_size(row.allocated),
                limit if row.memory_limit is None else ml.format_size(row.memory_limit),
                allocations
                if row.allocation_limit is None
                else ml.format_size(row.allocation_limit),
                f"{row.age:.1f}s",
                row.breach,
            )
            for row in shown
        ]
        headers = _COLUMNS
        widths = [
            max([len(header), *(len(cell[i]) for cell in cells)])
            for i, header in enumerate(headers)
        ]
        widths[0] = min(widths[0], 40)

        def line(values: Sequence[str]) -> str:
            name = values[0]
            if len(name) > widths[0]:
                name = name[: widths[0] - 1] + "\u2026"
            parts = [name.ljust(widths[0])]
            parts += [
                v.rjust(w) for v, w in zip(values[1:-1], widths[1:-1], strict=True)
            ]
            parts.append(values[-1].ljust(widths[-1]))
            return " " + "  ".join(parts)

        table = Text(no_wrap=True, overflow="crop")
        table.append(line(headers) + "\n", style="bold reverse")
        for row, cell in zip(shown, cells, strict=True):
            table.append(line(cell) + "\n", style="red" if row.breach else "")
        table.rstrip()
        last = snapshot.last_breach
        footer = Text(
            "keys: l live  p peak  a allocated  r rate  n name  d age  q quit"
            + (f"\nlast breach: {last}" if last else ""),
            style="dim",
        )
        return Group(title, table, footer)

    def _fit(self, console: Any) -> None:
        # The terminal's own size: rich would read COLUMNS/LINES or stdout,
        # which may be the program's redirected output.
        if self._screen is None:
            return
        with contextlib.suppress(OSError, ValueError):
            size = os.get_terminal_size(self._screen.fd)
            console.size = (size.columns, size.lines)

    def _frame(self, console: Any, view: Any) -> tuple[bytes, int]:
        """``view`` drawn for the terminal, and its height in lines."""
        assert self._screen is not None
        with console.capture() as capture:
            console.print(view)
        # At most the terminal's height: the cursor cannot go up past its
        # top to erase the frame.
        lines = capture.get().rstrip("\n").split("\n")[: max(1, console.height)]
        return "\n".join(lines).encode(self._screen.encoding, "replace"), len(lines)

    def _loop(self) -> None:
        console = self._console
        screen = self._screen
        closed = False
        view: Any = None
        try:
            while not self._stop.is_set():
                self._fit(console)
                now = time.monotonic()
                try:
                    view = self.render(now, console.height)
                except (OSError, ValueError) as exc:  # the other process ended
                    self.ended = f"the process is gone ({exc})"
                    break
                if screen is not None:
                    screen.draw(*self._frame(console, view))
                deadline = now + self.interval
                while not self._stop.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    # Without keys to read, sleep until the next refresh
                    # (stop() wakes it); with them, look at stop() ten
                    # times a second.
                    keys = self._keys(left if self._tty_fd is None else min(left, 0.1))
                    if "q" in keys:
                        closed = True
                        self._stop.set()
                        break
                    for key in keys:
                        if key in _SORT_KEYS:
                            self.sort = _SORT_KEYS[key]
                            deadline = 0.0  # redraw now
        finally:
            self._end(view, closed)

    def _end(self, view: Any, closed: bool) -> None:
        """Leave the last frame on the terminal, below everything."""
        console = self._console
        screen = self._screen
        message = ""
        try:
            if closed:
                message = f"{PROG}: live view closed" + (
                    "; the program runs on\n" if self.tracker is not None else "\n"
                )
                if self.tracker is not None:
                    self.tracker.report_to = None  # to stderr, below the view
                self._restore()
            elif (
                self.tracker is not None and self.tracker.breach_count != self._breaches
            ):
                # Breach lines printed after the frame drawn last: a frame
                # that shows those tasks stopped, not running.
                self._fit(console)
                view = self.render(time.monotonic(), console.height)
                if screen is not None:
                    screen.draw(*self._frame(console, view))
        finally:
            if screen is not None:
                screen.close(message.encode(screen.encoding, "replace"))
            elif view is not None:
                # Not a terminal: the last frame only.
                with contextlib.suppress(OSError, ValueError):
                    console.print(view)


# --------------------------------------------------------------------------
# Attach: `memlimits-async top PID`

ATTACH_ENV: Final = "MEMLIMITS_ASYNC_ATTACH"
"""Set to 1 in the environment of ``memlimits-async run`` (or pass
``--attachable``) to let ``memlimits-async top PID`` attach."""

# sys.remote_exec (PEP 768): on 3.14+, `top PID` makes a process that
# imported memlimits_async open its endpoint, with no opt-in.
CAN_REMOTE_EXEC: Final = hasattr(sys, "remote_exec")

# The tracker of the program `run` is running in this process, if any: what
# an endpoint opened on request (`top PID` through sys.remote_exec) shows.
_active_tracker: Tracker | None = None


def socket_path(pid: int, uid: int | None = None) -> str:
    """Where the process ``pid`` listens for ``top PID``: a Unix socket in
    a folder of its user's own (mode 0700) under the temporary directory,
    never a network port.  ``uid``: the process's user (default ours)."""
    if uid is None:
        uid = os.getuid()
    return os.path.join(tempfile.gettempdir(), f"memlimits-async-{uid}", f"{pid}.sock")


class Endpoint:
    """The in-process end of ``top PID``: answers each line ``snapshot`` on
    a connection with one line of JSON (a :class:`Snapshot` from
    ``source``).

    The socket is made in a folder only this process's user may enter, and
    is itself readable and writable by that user only.  Its threads run
    outside every scope, so what they allocate is charged to no task."""

    def __init__(self, source: Callable[[], Snapshot], path: str) -> None:
        self.source = source
        self.path = path
        folder = os.path.dirname(path)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        info = os.lstat(folder)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise OSError(f"{folder} is not a folder of this user's own")
        os.chmod(folder, 0o700)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a dead process's, with our pid
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._server.bind(path)
            os.chmod(path, 0o600)
            self._server.listen(4)
        except OSError:
            self._server.close()
            raise
        self._thread = threading.Thread(
            target=contextvars.Context().run,
            args=(self._accept,),
            name="memlimits-async attach",
            daemon=True,
        )
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return  # closed
            threading.Thread(
                target=contextvars.Context().run,
                args=(self._serve, connection),
                daemon=True,
            ).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection, connection.makefile("rw") as stream:
            for request in stream:
                if request.strip() != "snapshot":
                    break
                data = self.source().as_json()
                stream.write(json.dumps(data) + "\n")
                stream.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._server.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class OpenScopes:
    """Snapshots of the open limit scopes of this process, named by the
    tasks of ``loop`` inside them: what ``top PID`` shows of a process that
    ``run`` did not start with records (attached through
    ``sys.remote_exec``).

    With ``tracker`` (``run`` started the process without ``--attachable``,
    ``--top`` or ``--json``), only the scopes ``run`` gives its tasks, each
    named by its task, as ``--top`` shows them.  A scope shows until it
    exits, so a breached one only until its task has been cancelled."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop | None, tracker: Tracker | None
    ) -> None:
        self.loop = loop
        self.tracker = tracker
        self._first_seen: dict[int, float] = {}

    def _tasks(self) -> list[tuple[str, contextvars.Context]]:
        loop = self.loop
        if loop is None or loop.is_closed():
            return []
        try:
            # Any thread may call all_tasks (see ml.open_scopes).
            tasks = asyncio.all_tasks(loop)
        except RuntimeError:
            return []
        contexts = []
        for task in tasks:
            get_context = getattr(task, "get_context", None)  # 3.12+
            if get_context is not None:
                contexts.append((task.get_name(), get_context()))
        return contexts

    def __call__(self) -> Snapshot:
        now = time.monotonic()
        seen: dict[int, float] = {}
        tasks: list[TaskSample] = []

        def sample(key: int, name: str, scope: ml.LimitScope, own: bool) -> None:
            first = seen[key] = self._first_seen.get(key, now)
            usage = scope.usage
            breach = scope.breach
            tasks.append(
                TaskSample(
                    key,
                    name,
                    usage.live,
                    usage.peak_live,
                    usage.allocated,
                    now - first,
                    False,
                    "" if breach is None else breach.kind.value,
                    scope.memory if own else None,
                    scope.allocations if own else None,
                )
            )

        tracker = self.tracker
        if tracker is not None:
            for name, context in self._tasks():
                scope = context.get(_task_scope)
                if scope is not None:
                    sample(id(scope), name, scope, False)
            last = tracker.last_breached
            last_breach = (
                ""
                if last is None or last.breach is None
                else f"{last.name}: {last.breach.reason}"
            )
            self._first_seen = seen
            return Snapshot(
                tasks,
                tracker.options.memory,
                tracker.options.allocations,
                tracker.breach_count,
                last_breach,
            )
        breached = 0
        for open_scope in ml.open_scopes(self.loop):
            inside = open_scope.tasks
            if not inside:
                label = "(outside any task)"
            elif len(inside) == 1:
                label = inside[0]
            else:
                label = f"{inside[0]} +{len(inside) - 1} tasks"
            sample(id(open_scope.scope), label, open_scope.scope, True)
            breached += open_scope.scope.breached
        self._first_seen = seen
        return Snapshot(tasks, None, None, breached, "")


def open_attach_endpoint(path: str) -> None:
    """Open this process's endpoint for ``top PID`` at ``path``, unless it
    is open; run in the main thread by the script ``top PID`` hands over
    with ``sys.remote_exec``."""
    global _attach_endpoint
    if _attach_endpoint is not None:
        return
    tracker = _active_tracker
    source: Callable[[], Snapshot]
    if tracker is not None and tracker.track:
        source = functools.partial(take_snapshot, tracker)
    else:
        # The loop running in this (the main) thread, whose tasks name the
        # scopes: the script runs between two of its steps.
        source = OpenScopes(asyncio._get_running_loop(), tracker)
    _attach_endpoint = Endpoint(source, path)
    atexit.register(_attach_endpoint.close)


_attach_endpoint: Endpoint | None = None

# Run in the attached process's main thread (sys.remote_exec), in an empty
# context so that no scope is charged for it; it imports memlimits_async
# only where the process has already, and leaves a word beside the socket
# when it cannot open it.
_REMOTE_SCRIPT: Final = """\
import contextvars as _contextvars


def _memlimits_async_attach(path):
    import os
    import sys

    if "memlimits_async" not in sys.modules:
        status = "it has not imported memlimits_async"
    else:
        try:
            from memlimits_async import cli

            cli.open_attach_endpoint(path)
            return
        except Exception as exc:
            status = f"it could not open its endpoint: {exc!r}"
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(path + ".status", "w") as out:
            out.write(status)
    except OSError:
        pass


_contextvars.Context().run(_memlimits_async_attach, @PATH@)
del _memlimits_async_attach, _contextvars
"""


class AttachError(Exception):
    """``top PID`` cannot attach; the message says why."""


class RemoteSource:
    """Snapshots from another process's :class:`Endpoint`."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.settimeout(timeout)
        try:
            self._socket.connect(path)
        except OSError:
            self._socket.close()
            raise
        self._stream = self._socket.makefile("rw")

    def __call__(self) -> Snapshot:
        self._stream.write("snapshot\n")
        self._stream.flush()
        line = self._stream.readline()
        if not line:
            raise ConnectionError("the connection was closed")
        return Snapshot.from_json(json.loads(line))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._stream.close()
            self._socket.close()


def attach(pid: int, wait: float = 10.0) -> RemoteSource:
    """Connect to the endpoint of process ``pid``: the one it opened
    (``run --attachable``), else, on 3.14+, one it is made to open through
    ``sys.remote_exec``, waiting up to ``wait`` seconds for it.

    :raises AttachError: with the reason, when it cannot."""
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        raise AttachError(f"no process {pid}") from None
    except OSError:
        uid = os.getuid()
    path = socket_path(pid, uid)
    try:
        return _connect(path)
    except (OSError, ValueError) as exc:
        opted_out = exc
    if not CAN_REMOTE_EXEC:
        raise AttachError(
            f"process {pid} does not listen ({opted_out}); "
            f"before Python 3.14 only a process started with `{PROG} run "
            f"--attachable ...` or {ATTACH_ENV}=1 in its environment can be "
            f"attached to"
        )
    return _attach_remotely(pid, uid, path, wait)


def _connect(path: str) -> RemoteSource:
    source = RemoteSource(path)
    try:
        source()
    except (OSError, ValueError):
        source.close()
        raise
    return source


def _attach_remotely(pid: int, uid: int, path: str, wait: float) -> RemoteSource:
    status = path + ".status"
    with contextlib.suppress(OSError):
        os.unlink(status)
    # Made with O_EXCL and a random name, mode 0600; it holds no secret.
    fd, script = tempfile.mkstemp(prefix="memlimits-async-attach-", suffix=".py")
    with open(fd, "w") as out:
        out.write(_REMOTE_SCRIPT.replace("@PATH@", repr(path)))
    if uid != os.getuid():
        os.chmod(script, 0o644)  # another user's process (we are root)
    read = False
    try:
        try:
            sys.remote_exec(pid, script)  # type: ignore[attr-defined,unused-ignore]
        except PermissionError as exc:
            read = True  # never will be
            raise AttachError(
                f"not allowed to attach to process {pid} ({exc}): "
                "sys.remote_exec needs the right to ptrace it (the same user "
                "with /proc/sys/kernel/yama/ptrace_scope 0, or root)"
            ) from None
        except (OSError, RuntimeError, ValueError) as exc:
            read = True
            raise AttachError(
                f"cannot attach to process {pid} through sys.remote_exec: "
                f"{exc} (it must run Python {sys.version_info[0]}."
                f"{sys.version_info[1]}, with remote debugging enabled)"
            ) from None
        deadline = time.monotonic() + wait
        # The script runs when the process's main thread next runs Python
        # code: at once in a busy program, after the call it is blocked in
        # otherwise (an event loop waiting for I/O or a timer).
        while True:
            if os.path.exists(path):
                try:
                    source = _connect(path)
                except (OSError, ValueError):
                    pass  # still being opened
                else:
                    read = True
                    return source
            with contextlib.suppress(OSError), open(status) as said:
                read = True
                raise AttachError(f"cannot attach to process {pid}: {said.read()}")
            if time.monotonic() >= deadline:
                raise AttachError(
                    f"process {pid} did not open its endpoint within {wait:g} s: "
                    "its main thread has run no Python code since (blocked "
                    "waiting for I/O or in a call?), or it is not a Python "
                    "process; try again with a longer --wait"
                )
            time.sleep(0.05)
    finally:
        if read:
            with contextlib.suppress(OSError):
                os.unlink(script)
        else:
            # The process may still run it, once its main thread wakes: it
            # then finds a script that only removes itself (replaced in one
            # step, so that it never reads half of either).
            with contextlib.suppress(OSError):
                fd, noop = tempfile.mkstemp(
                    prefix="memlimits-async-attach-", suffix=".py"
                )
                with open(fd, "w") as out:
                    out.write(
                        f"import os\ntry:\n    os.unlink({script!r})\n"
                        "except OSError:\n    pass\n"
                    )
                os.chmod(noop, os.stat(script).st_mode)
                os.replace(noop, script)


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# --------------------------------------------------------------------------
# The command line


Runner = Callable[[argparse.Namespace, argparse.ArgumentParser], int]
_SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Runner]]] = {}


def add_subcommand(
    name: str, help: str
) -> Callable[
    [Callable[[argparse.ArgumentParser], Runner]],
    Callable[[argparse.ArgumentParser], Runner],
]:
    """Register a subcommand: the decorated function adds its options to the
    parser it is given and returns the function that runs it (which returns
    the exit status)."""

    def register(
        setup: Callable[[argparse.ArgumentParser], Runner],
    ) -> Callable[[argparse.ArgumentParser], Runner]:
        _SUBCOMMANDS[name] = (help, setup)
        return setup

    return register


def _size(parser: argparse.ArgumentParser, option: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return ml.parse_size(text, name=option)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))  # it names the option


def _seconds(
    parser: argparse.ArgumentParser, option: str, text: str | None
) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        parser.error(f"argument {option}: not a number of seconds: {text!r}")
    if not value >= 0 or value == float("inf"):
        parser.error(f"argument {option}: must be a finite number >= 0, got {text!r}")
    return value


@add_subcommand("run", "run a Python program with a limit scope around every task")
def _setup_run(parser: argparse.ArgumentParser) -> Runner:
    parser.usage = f"{PROG} run [options] (script.py | -m module) [args ...]"
    budgets = parser.add_argument_group("budgets of each selected task")
    budgets.add_argument(
        "--task-memory", metavar="SIZE", help='live bytes, e.g. "50 MiB"'
    )
    budgets.add_argument(
        "--task-allocations", metavar="SIZE", help="cumulative bytes allocated"
    )
    budgets.add_argument("--task-timeout", metavar="SECONDS", help="seconds")
    budgets.add_argument(
        "--tasks",
        metavar="PATTERN",
        action="append",
        default=[],
        help="budget only tasks whose name matches (fnmatch; repeatable)",
    )
    budgets.add_argument(
        "--global-memory",
        metavar="SIZE",
        help="process-wide limit; selected tasks take part in it",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--json", metavar="FILE", help="write per-task records to FILE at exit"
    )
    output.add_argument(
        "--report",
        metavar="FILE.html",
        help="write a self-contained HTML report of the tasks at exit",
    )
    output.add_argument(
        "--attachable",
        action="store_true",
        help=f"let `{PROG} top PID` attach (a Unix socket; also {ATTACH_ENV}=1)",
    )
    output.add_argument(
        "--top",
        action="store_true",
        help="live view of the tasks on the terminal (needs the [cli] extra)",
    )
    # Never reached (the command line is split at -m first): for --help.
    parser.add_argument("-m", dest="module", metavar="module", help="run a module")
    return _run


def _split_run(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Our options, and what is left: ``[script, *args]`` or ``['-m', module,
    *args]``."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return list(argv[:i]), list(argv[i + 1 :])
        if arg == "-m":
            return list(argv[:i]), list(argv[i:])
        if arg.startswith("-m") and not arg.startswith("--"):
            return list(argv[:i]), ["-m", arg[2:], *argv[i + 1 :]]
        if arg.startswith("-") and arg != "-":
            i += 2 if arg in _RUN_VALUE_OPTIONS else 1
            continue
        return list(argv[:i]), list(argv[i:])
    return list(argv), []


def _run(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    program: list[str] = ns.program
    options = RunOptions(
        memory=_size(parser, "--task-memory", ns.task_memory),
        allocations=_size(parser, "--task-allocations", ns.task_allocations),
        timeout=_seconds(parser, "--task-timeout", ns.task_timeout),
        patterns=tuple(ns.tasks),
        global_memory=ns.global_memory is not None,
    )
    global_limit = _size(parser, "--global-memory", ns.global_memory)
    if not program:
        parser.error("the program to run is missing: a script, or -m module")
    if program[0] == "-m":
        if len(program) < 2 or not program[1]:
            parser.error("argument -m: expected a module name")
        _set_program_path(os.getcwd())
        module: str | None = program[1]
        args = program[2:]
        try:
            found = importlib.util.find_spec(program[1]) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            parser.error(f"no module named {program[1]!r}")
        path = None
    else:
        module = None
        path, args = program[0], program[1:]
        if not os.path.isfile(path):
            parser.error(f"can't open file {path!r}: no such file")
        _set_program_path(os.path.dirname(os.path.realpath(path)))
    if ns.top:
        try:
            import rich  # noqa: F401
        except ImportError:
            parser.error("--top needs rich: pip install 'memlimits_async[cli]'")
    json_path: str | None = ns.json
    report_path: str | None = ns.report
    for option, out_path in (("--json", json_path), ("--report", report_path)):
        if out_path is not None:
            try:
                with open(out_path, "a"):
                    pass
            except OSError as exc:
                parser.error(f"argument {option}: cannot write {out_path!r}: {exc}")

    atexit.register(_sigint_at_exit)  # before the program registers any
    if global_limit is not None:
        ml.set_global_memory_limit(global_limit)
    keep = json_path is not None or report_path is not None
    attachable = ns.attachable or os.environ.get(ATTACH_ENV, "") not in ("", "0")
    tracker = Tracker(options, keep_ended=keep, track=keep or ns.top or attachable)
    endpoint: Endpoint | None = None
    if attachable:
        try:
            endpoint = Endpoint(
                functools.partial(take_snapshot, tracker), socket_path(os.getpid())
            )
        except OSError as exc:
            parser.error(f"argument --attachable: cannot listen: {exc}")
    started = time.time()
    global _active_tracker
    _active_tracker = tracker
    tracker.install()
    view = TopView(tracker) if ns.top else None
    if view is not None:
        view.start()
    try:
        return _run_program(module, path, args)
    finally:
        if view is not None:
            view.stop()
        if endpoint is not None:
            endpoint.close()
        tracker.uninstall()
        _active_tracker = None
        if json_path is not None:
            _write_json(json_path, tracker)
        if report_path is not None:
            _write_report(report_path, tracker, program, started)


def _set_program_path(directory: str) -> None:
    """Put on ``sys.path`` what ``python`` puts there for the program.

    ``sys.path[0]`` is the tool's own entry (the console script's folder, or
    the working directory of ``python -m memlimits_async``): the program's
    replaces it.  Under ``python -P`` there is no such entry to replace."""
    if sys.flags.safe_path:
        sys.path.insert(0, directory)
    else:
        sys.path[0] = directory


def _write_json(path: str, tracker: Tracker) -> None:
    with tracker.lock:
        records = [record.as_json() for record in tracker.records]
    data = {"tasks": records}
    try:
        with open(path, "w") as out:
            json.dump(data, out, indent=1)
            out.write("\n")
    except OSError as exc:
        print(f"{PROG}: could not write {path!r}: {exc}", file=sys.stderr)


_REPORT_STYLE: Final = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
code { background: #f3f3f3; padding: 0 .3em; }
table { border-collapse: collapse; } caption { text-align: left; margin: .5em 0; }
th, td { padding: .25em .8em; border-bottom: 1px solid #ddd; }
th { background: #eee; text-align: left; } td.n { text-align: right; }
th, td:not(:last-child) { white-space: nowrap; }
tr.breach td { background: #fde8e8; }
iframe { width: 100%; border: 1px solid #ddd; }
"""

# Where a task's own stack starts: below the tool's wrapper (each step of
# the task), or at the loop's callback handle (callbacks the loop runs in
# the task's context, such as a future's).  The frames before it (the
# tool's, runpy's, the event loop's) are the same in every stack.
_WRAPPER_FRAME: Final = (__file__, "Tracker._budgeted")
_CALLBACK_FRAME: Final = (os.path.join(_ASYNCIO_DIR, "events.py"), "Handle._run")
_BOOKKEEPING: Final = ml.Frame("", 0, f"({PROG} run's own bookkeeping)")


def tasks_snapshot(records: Sequence[TaskRecord]) -> ml.Snapshot:
    """The allocation sites of the tasks' scopes, merged, each stack from the
    task's own coroutine down (the event loop's and the tool's frames
    left out), so that tasks running the same coroutine add up."""
    merged: dict[ml.Traceback, list[Any]] = {}
    limit, interval = 0, 1
    for record in records:
        if record.scope is None:
            continue
        snapshot = record.scope.snapshot()
        limit, interval = snapshot.traceback_limit, snapshot.sampling_interval
        for trace in snapshot.traces:
            key = _task_stack(trace.traceback)
            entry = merged.get(key)
            if entry is None:
                entry = merged[key] = [0, 0, 0.0, 0, 0, 0.0]
            entry[0] += trace.live
            entry[1] += trace.live_samples
            entry[2] += trace.live_variance
            entry[3] += trace.allocated
            entry[4] += trace.allocated_samples
            entry[5] += trace.allocated_variance
    return ml.Snapshot(
        (ml.Trace(key, *values) for key, values in merged.items()), limit, interval
    )


def _task_stack(traceback: ml.Traceback) -> ml.Traceback:
    frames = list(traceback)
    for i in range(len(frames) - 1, -1, -1):
        where = (frames[i].filename, frames[i].name)
        if where == _WRAPPER_FRAME:
            own = frames[i + 1 :] or [_BOOKKEEPING]
        elif where == _CALLBACK_FRAME:
            own = frames[i:]
        else:
            continue
        # Traceback() takes the most recent frame first.
        return ml.Traceback(reversed(own))
    return traceback  # cut short before either (traceback_limit)


def _flamegraph_section(records: Sequence[TaskRecord], title: str) -> str:
    """The flame graph of the tasks' allocated bytes: the package's page
    (as ``Snapshot.flamegraph`` writes it, its data and script inline), in
    a sandboxed inline frame so that its style and script keep to it."""
    from html import escape

    snapshot = tasks_snapshot(records)
    page = snapshot.flamegraph_html("allocated", title=title)
    # Tall enough for the deepest stack without a scroll bar: the page's
    # heading, search bar and hover box, then 18 pixels a row (the root,
    # and one per frame).
    rows = 1 + max(
        (
            len(trace.traceback) + trace.traceback.truncated
            for trace in snapshot.traces
            if trace.allocated_samples > 0
        ),
        default=0,
    )
    height = 200 + 18 * rows
    return (
        f"<h2>Where the tasks allocated</h2>\n"
        f"<p>Bytes allocated by the tasks above, by allocating stack (from "
        f"each task's coroutine down; tasks running the same coroutine add "
        f"up), estimated from the meter's samples.  Hover a box for its "
        f"bytes, click to zoom.</p>\n"
        f'<iframe title="flame graph" sandbox="allow-scripts" '
        f'style="height: {height}px" srcdoc="{escape(page, quote=True)}">'
        f"</iframe>"
    )


def _write_report(
    path: str, tracker: Tracker, program: Sequence[str], started: float
) -> None:
    """A self-contained HTML page (nothing fetched): the per-task table,
    largest peak first, and the flame graph of the tasks' allocations."""
    from html import escape

    with tracker.lock:
        records = list(tracker.records)
    usages = {id(record): record.current_usage() for record in records}
    records.sort(key=lambda record: -usages[id(record)].peak_live)
    breached = sum(1 for record in records if record.breach is not None)
    options = tracker.options
    limits = ", ".join(
        f"{name} {value}"
        for name, value in (
            ("memory", options.memory and ml.format_size(options.memory)),
            (
                "allocations",
                options.allocations and ml.format_size(options.allocations),
            ),
            ("timeout", options.timeout and f"{options.timeout:g} s"),
        )
        if value
    )
    rows = []
    for record in records:
        usage = usages[id(record)]
        breach = record.breach
        rows.append(
            "<tr{}><td>{}</td><td class=n>{}</td><td class=n>{}</td>"
            "<td class=n>{:.3f} s{}</td><td>{}</td><td>{}</td></tr>".format(
                " class=breach" if breach else "",
                escape(record.name),
                ml.format_size(usage.peak_live),
                ml.format_size(usage.allocated),
                record.duration(),
                "" if record.ended is not None else " (running)",
                "" if breach is None else escape(breach.kind.value),
                "" if breach is None else escape(breach.reason),
            )
        )
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    flamegraph = _flamegraph_section(
        records, f"{PROG} run {' '.join(program)}: bytes allocated by the tasks"
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{escape(PROG)} report: {escape(" ".join(program))}</title>
<style>{_REPORT_STYLE}</style></head><body>
<h1>{escape(PROG)} run <code>{escape(" ".join(program))}</code></h1>
<p>Started {when}, ran {time.time() - started:.2f} s.
{len(records)} tasks, {breached} stopped by a breach.
Limits per task: {escape(limits) or "none"}{
        "; task names matching " + escape(" or ".join(options.patterns))
        if options.patterns
        else ""
    }.</p>
<table><caption>Tasks, largest peak of live bytes first (estimates from
sampling)</caption>
<thead><tr><th>task</th><th>peak live</th><th>allocated</th><th>duration</th>
<th>breach</th><th>reason</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
{flamegraph}
</body></html>
"""
    try:
        with open(path, "w", encoding="utf-8") as out:
            out.write(page)
    except OSError as exc:
        print(f"{PROG}: could not write {path!r}: {exc}", file=sys.stderr)


def _run_program(module: str | None, path: str | None, args: list[str]) -> int:
    """Run the program as ``python`` would; return its exit status.  A
    ``SystemExit`` propagates (``python`` exits with it); an uncaught
    ``KeyboardInterrupt`` ends the process by SIGINT, as ``python`` does."""
    if module is not None:
        sys.argv = [module, *args]  # run_module puts the module's path first
    else:
        assert path is not None
        sys.argv = [path, *args]
    try:
        if module is not None:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(path, run_name="__main__")  # type: ignore[arg-type]
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        _print_program_traceback(exc)
        return 1
    return 0


_OUR_FILES: Final = frozenset({__file__, runpy.__file__, "<frozen runpy>"})


def _program_traceback(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` without the frames of this module and runpy (the tool's, not
    the program's): the traceback ``python`` would have printed, but for
    asyncio's frames."""
    kept: list[TracebackType] = []
    while tb is not None:
        if tb.tb_frame.f_code.co_filename not in _OUR_FILES:
            kept.append(tb)
        tb = tb.tb_next
    for each, after in zip(kept, [*kept[1:], None], strict=True):
        each.tb_next = after
    return kept[0] if kept else None


def _print_program_traceback(exc: BaseException) -> None:
    seen: set[int] = set()
    each: BaseException | None = exc
    while each is not None and id(each) not in seen:
        seen.add(id(each))
        each.__traceback__ = _program_traceback(each.__traceback__)
        each = each.__cause__ or each.__context__
    tb = exc.__traceback__
    try:
        sys.excepthook(type(exc), exc, tb)
    except Exception:
        traceback.print_exception(type(exc), exc, tb)


_exit_by_sigint = False


def _sigint_at_exit() -> None:
    # What python does after an uncaught KeyboardInterrupt, once the
    # program's atexit handlers have run (this one was registered before
    # them, so it runs after them): end by SIGINT, so that the parent sees
    # the process killed by it (a shell says 130).
    if not _exit_by_sigint:
        return
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    with contextlib.suppress(Exception):
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)


@add_subcommand("top", "watch the tasks of a running process")
def _setup_top(parser: argparse.ArgumentParser) -> Runner:
    parser.description = (
        "Show the live view of --top for a running process: one started with "
        f"`{PROG} run --attachable` (or {ATTACH_ENV}=1), or on Python 3.14+ "
        "any process that imported memlimits_async (through sys.remote_exec)."
    )
    parser.add_argument("pid", help="the process id")
    parser.add_argument(
        "--wait",
        metavar="SECONDS",
        default="10",
        help="on 3.14+, how long to wait for the process to open its "
        "endpoint (it does so when its main thread next runs Python code; "
        "default 10)",
    )
    return _top


def _top(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        pid = int(ns.pid)
        if pid <= 0:
            raise ValueError
    except ValueError:
        parser.error(f"argument pid: not a process id: {ns.pid!r}")
    wait = _seconds(parser, "--wait", ns.wait)
    assert wait is not None
    try:
        import rich  # noqa: F401
    except ImportError:
        parser.error("top needs rich: pip install 'memlimits_async[cli]'")
    try:
        source = attach(pid, wait)
    except AttachError as exc:
        parser.error(str(exc))
    view = TopView(None, source)
    try:
        view.run_here()
    except KeyboardInterrupt:
        pass
    finally:
        source.close()
    if view.ended:
        print(f"{PROG}: {view.ended}", file=sys.stderr)
    return 0


@add_subcommand(
    "flamegraph", "write a snapshot (from Snapshot.dump()) as an HTML flame graph"
)
def _setup_flamegraph(parser: argparse.ArgumentParser) -> Runner:
    parser.description = (
        "Write a snapshot saved with Snapshot.dump() as one self-contained "
        "HTML file (no network needed to view it): a flame graph of its "
        "live or allocated bytes by allocating stack."
    )
    parser.add_argument("file", metavar="FILE", help="a snapshot written by dump()")
    parser.add_argument(
        "-o",
        "--output",
        metavar="HTML",
        help="where to write the page (default: FILE with the suffix .html)",
    )
    parser.add_argument(
        "--measure",
        choices=("live", "allocated"),
        default="live",
        help="bytes still held (live, the default) or all bytes allocated",
    )
    parser.add_argument("--title", help="the page's title")
    return _flamegraph


def _flamegraph(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    output = ns.output
    if output is None:
        root, _ext = os.path.splitext(ns.file)
        output = root + ".html"
    if os.path.abspath(output) == os.path.abspath(ns.file):
        parser.error(f"the output would overwrite the snapshot {ns.file!r}")
    try:
        snapshot = ml.Snapshot.load(ns.file)
    except FileNotFoundError:
        parser.error(f"no such file: {ns.file!r}")
    except (OSError, ValueError, UnicodeDecodeError) as error:
        parser.error(f"cannot read {ns.file!r}: {error}")
    try:
        snapshot.flamegraph(output, ns.measure, title=ns.title)
    except OSError as error:
        parser.error(f"cannot write {output!r}: {error}")
    print(output)
    return 0


def build_parser() -> tuple[
    argparse.ArgumentParser, dict[str, argparse.ArgumentParser]
]:
    parser = _Parser(
        prog=PROG,
        description="Run and watch asyncio programs with per-task memory budgets.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="command")
    parsers: dict[str, argparse.ArgumentParser] = {}
    for name, (help_text, setup) in _SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, allow_abbrev=False)
        sub.set_defaults(_runner=setup(sub))
        parsers[name] = sub
    return parser, parsers


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the
    exit status.  Bad input exits with status 2 and a message."""
    if argv is None:
        argv = sys.argv[1:]
    parser, parsers = build_parser()
    if argv and argv[0] == "run":
        ours, program = _split_run(argv[1:])
        ns = parser.parse_args(["run", *ours])
        ns.program = program
    else:
        ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: a command is required", file=sys.stderr)
        return 2
    runner: Runner = ns._runner
    try:
        return runner(ns, parsers[ns.command])
    except KeyboardInterrupt as exc:
        global _exit_by_sigint
        _print_program_traceback(exc)
        _exit_by_sigint = True
        return 130


def console_main() -> None:
    """The ``memlimits-async`` console script."""
    sys.exit(main())
