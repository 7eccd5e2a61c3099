"""Task functions for test_dask.py, in a module of their own so that worker
processes import them by name (pytest puts tests/ on sys.path, which
spawned workers inherit) instead of the test module with its fixtures."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import TracebackType

MIB = 1 << 20


def leak(chunks: int) -> int:
    """Hold one more MiB at each step, without pause."""
    held = []
    for _ in range(chunks):
        held.append(bytearray(MIB))
    return len(held)


def steady(steps: int) -> int:
    """Allocate and free a MiB at a time, slowly; a checksum of the work."""
    total = 0
    for step in range(steps):
        block = bytearray(MIB)
        block[0] = step % 256
        total += block[0] + len(block)
        time.sleep(0.02)
    return total


def hold(megabytes: int, release: str) -> int:
    """Hold ``megabytes`` until the file ``release`` exists."""
    held = [bytearray(MIB) for _ in range(megabytes)]
    deadline = time.monotonic() + 120  # never hang a test for good
    while not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(held)


def inc(x: int) -> int:
    return x + 1


def thread_ident() -> int:
    return threading.get_ident()


class _Exit:
    """A context manager whose ``__exit__`` leaves a mark."""

    def __init__(self, mark: Path) -> None:
        self.mark = mark

    def __enter__(self) -> None:
        pass

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.mark.write_text(type(exc).__name__ if exc is not None else "none")


def spin(base: str, seconds: float, calls: bool = True) -> int:
    """Compute for up to ``seconds`` without a checkpoint.  Writes
    ``base.started`` (thread ident), then, on the way out however it ends,
    ``base.exit`` from a ``with`` and ``base.finally`` (thread ident, the
    time the ``finally`` began) from a ``finally`` that takes its time."""
    marks = Path(base)
    marks.with_suffix(".started").write_text(str(threading.get_ident()))
    x = 0
    with _Exit(marks.with_suffix(".exit")):
        try:
            if calls:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    x += 1
            else:
                limit = int(seconds * 20_000_000)  # a few ns an iteration at best
                while x < limit:
                    x += 1
        finally:
            began = time.time()
            time.sleep(0.2)  # a cleanup that takes a while is not cut short
            marks.with_suffix(".finally").write_text(
                f"{threading.get_ident()} {began!r}"
            )
    return x


async def aspin(base: str, seconds: float) -> int:
    """A coroutine task that awaits now and then, for up to ``seconds``."""
    marks = Path(base)
    marks.with_suffix(".started").write_text(str(threading.get_ident()))
    steps = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(0.005)
            steps += 1
    finally:
        marks.with_suffix(".finally").write_text(
            f"{threading.get_ident()} {time.time()!r}"
        )
    return steps


async def aleak(chunks: int) -> int:
    """A coroutine task that holds one more MiB at each step."""
    held = []
    for _ in range(chunks):
        held.append(bytearray(MIB))
        await asyncio.sleep(0)
    return len(held)


async def acompute(base: str) -> int:
    """A coroutine task that computes without awaiting until something
    stops it (or ``base.release`` appears, which no test writes: a cap of
    two minutes keeps a failing test from holding the worker for good).
    Writes ``base.started``, then ``base.exit`` from a ``with``: the name of
    the exception it left by, or ``none`` if it ran to its end."""
    marks = Path(base)
    marks.with_suffix(".started").write_text(str(threading.get_ident()))
    release = marks.with_suffix(".release")
    x = 0
    with _Exit(marks.with_suffix(".exit")):
        deadline = time.monotonic() + 120
        while not release.exists() and time.monotonic() < deadline:
            x += 1
    return x


def first_run_spins(base: str) -> int:
    """Spins up to a minute on its first run (``base.started`` absent),
    returns 42 at once on any later run."""
    started = Path(base).with_suffix(".started")
    if started.exists():
        return 42
    started.write_text(str(threading.get_ident()))
    deadline = time.monotonic() + 60
    x = 0
    while time.monotonic() < deadline:
        x += 1
    return x
