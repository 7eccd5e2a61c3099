"""How long a token cancellation takes to stop a task blocked in ``await``.

Run ``python benchmarks/latency.py`` (``--quick`` for a smoke run).  It prints,
for asyncio and for trio (both through ``anyio.run``), the latency from
``token.cancel()`` to the end of the ``limit_scope(token=...)`` it cancels,
next to the same latency for a bare ``anyio.CancelScope`` cancelled by
``scope.cancel()``.  The issue's target is a median under 1 ms.

What one trial measures:

* A fresh task enters ``async with limit_scope(token=tok)`` and blocks in
  ``await anyio.sleep_forever()``; it is parked before anything is cancelled
  (the driver waits for an event the task sets right before it blocks).
* The canceller reads ``time.perf_counter()`` and calls ``tok.cancel()`` at
  once.  ``task``: the canceller is another task of the same loop, which then
  waits for the scoped task to finish.  ``thread``: the canceller is another
  OS thread, already running and waiting for work, so thread start-up is not
  measured.
* The scoped task reads ``time.perf_counter()`` on the first statement after
  its ``async with`` block.  The latency is the difference (``perf_counter``
  is one system-wide monotonic clock, so the two threads' readings compare).
  It covers the token's callback handing the cancellation to the loop
  (``call_soon_threadsafe`` / ``TrioToken.run_sync_soon``), the loop
  iterations until the task is woken with the cancellation, and the scope's
  exit.
* The reference is a bare ``anyio.CancelScope`` around the same
  ``sleep_forever()``: cancelled by ``scope.cancel()`` from another task for
  ``task``, and by ``anyio.from_thread.run_sync(scope.cancel)`` for
  ``thread`` (a cancel scope may not be cancelled from another thread
  directly; that is anyio's own way to do it).  Its latency is anyio's (and
  the loop's) own cost of cancellation, the floor ours is built on.

Why it is built this way:

* Token and reference trials alternate, and the runs are split into
  interleaved rounds (each round runs every backend in its own
  ``anyio.run``, in an order alternated from round to round), so a slow spell
  of the shared machine lands on both alike.  The ratio is taken within a
  round, and the median over rounds is printed with its range.
* Latencies are pooled over rounds for the median, p90 and p99.  A latency is
  a wake-up time, not a throughput, so nothing is subtracted and interference
  is kept: p99 shows how bad a slow spell gets.  Only the medians carry the
  target.
* Every loop does a few unrecorded trials of each kind first (code paths,
  the meter's delivery thread, anyio's thread-call machinery).  Every trial
  checks that it measured a cancellation: the token scope must report a
  ``BreachKind.TOKEN`` breach and the reference scope ``cancelled_caught``.
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
from _package import backends_of, fill_counts, ml
from anyio.abc import TaskGroup
from anyio.lowlevel import EventLoopToken

SOURCES = ("task", "thread")
TOKEN = "token"
REFERENCE = "reference"
LABELS = {
    (TOKEN, "task"): "limit_scope(token=tok); tok.cancel()",
    (REFERENCE, "task"): "anyio.CancelScope; scope.cancel()",
    (TOKEN, "thread"): "limit_scope(token=tok); tok.cancel()",
    (REFERENCE, "thread"): "anyio.CancelScope; from_thread.run_sync(scope.cancel)",
}
TARGET_US = 1000.0
WARM_UP = 20  # unrecorded trials of each variant at the start of every loop

Key = tuple[str, str]  # (TOKEN or REFERENCE, source)
Latencies = dict[Key, list[float]]  # seconds, one list per variant


class _Trial:
    """One cancellation: what to call to cancel, and the two timestamps."""

    __slots__ = ("blocked", "cancel", "cancel_at", "done", "exit_at")

    def __init__(self) -> None:
        self.blocked = anyio.Event()  # set right before the task blocks
        self.done = anyio.Event()
        self.cancel: Callable[[], object] = _not_blocked_yet
        self.cancel_at = 0.0
        self.exit_at = 0.0


def _not_blocked_yet() -> None:
    raise RuntimeError("cancelled before the task blocked")


class _Canceller(threading.Thread):
    """An OS thread that cancels the trials it is handed, one at a time."""

    def __init__(self) -> None:
        super().__init__(name="latency-canceller", daemon=True)
        self.trials: queue.SimpleQueue[_Trial | None] = queue.SimpleQueue()

    def run(self) -> None:
        while (trial := self.trials.get()) is not None:
            trial.cancel_at = time.perf_counter()
            trial.cancel()


async def _token_victim(trial: _Trial) -> None:
    token = ml.CancelToken()
    trial.cancel = token.cancel
    async with ml.limit_scope(token=token) as scope:
        trial.blocked.set()
        await anyio.sleep_forever()
    trial.exit_at = time.perf_counter()
    if scope.breach is None or scope.breach.kind is not ml.BreachKind.TOKEN:
        raise RuntimeError(f"the token scope ended without a TOKEN breach: {scope}")
    trial.done.set()


async def _reference_victim(trial: _Trial, loop_token: EventLoopToken | None) -> None:
    with anyio.CancelScope() as scope:
        if loop_token is None:
            trial.cancel = scope.cancel
        else:  # from another thread: anyio's thread-safe entry point
            trial.cancel = lambda: anyio.from_thread.run_sync(
                scope.cancel, token=loop_token
            )
        trial.blocked.set()
        await anyio.sleep_forever()
    trial.exit_at = time.perf_counter()
    if not scope.cancelled_caught:
        raise RuntimeError("the reference scope ended without being cancelled")
    trial.done.set()


async def _one_trial(
    tg: TaskGroup, key: Key, canceller: _Canceller, loop_token: EventLoopToken
) -> float:
    """Start a blocked task, cancel it from ``key``'s source; the latency."""
    kind, source = key
    trial = _Trial()
    if kind == TOKEN:
        tg.start_soon(_token_victim, trial)
    else:
        tg.start_soon(
            _reference_victim, trial, loop_token if source == "thread" else None
        )
    await trial.blocked.wait()  # the task set it, then blocked at once
    if source == "task":
        trial.cancel_at = time.perf_counter()
        trial.cancel()
    else:
        canceller.trials.put(trial)
    await trial.done.wait()
    return trial.exit_at - trial.cancel_at


def _schedule(n_task: int, n_thread: int, flip: bool) -> list[Key]:
    """Token and reference alternate; thread trials spread among task ones."""
    out: list[Key] = []
    for i in range(n_task):
        for source, due in (
            ("task", True),
            ("thread", (i + 1) * n_thread // n_task > i * n_thread // n_task),
        ):
            if due:
                pair = [(TOKEN, source), (REFERENCE, source)]
                out += pair[::-1] if (i % 2 == 1) != flip else pair
    return out


async def _one_round(n_task: int, n_thread: int, flip: bool) -> Latencies:
    """Inside a running loop: the latencies of every trial of one round."""
    loop_token = anyio.lowlevel.current_token()
    canceller = _Canceller()
    canceller.start()
    out: Latencies = {(kind, s): [] for s in SOURCES for kind in (TOKEN, REFERENCE)}
    try:
        async with anyio.create_task_group() as tg:
            for key in _schedule(WARM_UP, WARM_UP, flip):
                await _one_trial(tg, key, canceller, loop_token)
            for key in _schedule(n_task, n_thread, flip):
                out[key].append(await _one_trial(tg, key, canceller, loop_token))
    finally:
        canceller.trials.put(None)
        # It only waits on its queue now: joining blocks the loop for as long
        # as the thread takes to see the None (bounded, in case a failed trial
        # left it waiting for this very loop).
        canceller.join(timeout=5)
    return out


def _chunks(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal integers."""
    return [total * (i + 1) // parts - total * i // parts for i in range(parts)]


def collect(
    backends: list[str], rounds: int, n_task: int, n_thread: int
) -> dict[str, list[Latencies]]:
    """backend -> one {variant: latencies in seconds} per round."""
    out: dict[str, list[Latencies]] = {b: [] for b in backends}
    task_chunks = _chunks(n_task, rounds)
    thread_chunks = _chunks(n_thread, rounds)
    for r in range(rounds):
        for backend in backends if r % 2 == 0 else backends[::-1]:
            print(f"  round {r + 1}/{rounds}: {backend}", file=sys.stderr, flush=True)
            out[backend].append(
                anyio.run(
                    _one_round,
                    max(1, task_chunks[r]),
                    max(1, thread_chunks[r]),
                    r % 2 == 1,
                    backend=backend,
                )
            )
    return out


def _percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summary(results: dict[str, list[Latencies]]) -> dict[str, Any]:
    """Per backend, source and kind: pooled median, p90 and p99 in µs; for
    the token rows the ratio to the reference (within a round, median over
    rounds with its range); the target."""
    rows: list[dict[str, Any]] = []
    worst: tuple[float, str] = (0.0, "")
    for backend, per_round in results.items():
        for source in SOURCES:
            ratios = [
                statistics.median(r[(TOKEN, source)])
                / statistics.median(r[(REFERENCE, source)])
                for r in per_round
            ]
            for kind in (TOKEN, REFERENCE):
                pooled = sorted(x for r in per_round for x in r[(kind, source)])
                median = statistics.median(pooled)
                row: dict[str, Any] = {
                    "backend": backend,
                    "source": source,
                    "kind": kind,
                    "label": LABELS[(kind, source)],
                    "n": len(pooled),
                    "median_us": median * 1e6,
                    "p90_us": _percentile(pooled, 90) * 1e6,
                    "p99_us": _percentile(pooled, 99) * 1e6,
                }
                if kind == TOKEN:
                    worst = max(worst, (median, f"{backend}, {source}"))
                    row["ratio"] = {
                        "median": statistics.median(ratios),
                        "min": min(ratios),
                        "max": max(ratios),
                    }
                rows.append(row)
    worst_s, where = worst
    return {
        "python": sys.version.split()[0],
        "rounds": len(next(iter(results.values()))),
        "rows": rows,
        "target": {
            "median_us": TARGET_US,
            "worst_us": worst_s * 1e6,
            "where": where,
            "met": worst_s < TARGET_US / 1e6,
        },
    }


def render(figures: dict[str, Any]) -> str:
    """Per backend and source: token and reference latencies, and their ratio."""
    lines = [
        f"Python {figures['python']}, anyio.run per backend; {figures['rounds']} "
        "interleaved rounds; latency = perf_counter() at the first statement "
        "after the scope - perf_counter() just before the cancel call, in µs, "
        "pooled over rounds; ratio = token median / reference median within "
        "a round, median over rounds [min-max]",
        "",
        f"| {'backend':<7} | {'source':<6} | {'scope; cancelled by':<53} | "
        f"{'n':>5} | {'median':>8} | {'p90':>8} | {'p99':>8} | {'ratio':<18} |",
        f"|{'-' * 9}|{'-' * 8}|{'-' * 55}|{'-' * 7}|{'-' * 10}|{'-' * 10}|"
        f"{'-' * 10}|{'-' * 20}|",
    ]
    for row in figures["rows"]:
        if "ratio" in row:
            r = row["ratio"]
            cell = f"{r['median']:5.2f} [{r['min']:.2f}-{r['max']:.2f}]"
        else:
            cell = " 1.00"
        lines.append(
            f"| {row['backend']:<7} | {row['source']:<6} | {row['label']:<53} | "
            f"{row['n']:5d} | {row['median_us']:8.1f} | {row['p90_us']:8.1f} | "
            f"{row['p99_us']:8.1f} | {cell:<18} |"
        )
    target = figures["target"]
    verdict = "met" if target["met"] else "NOT met"
    lines += [
        "",
        f"target: median token-cancel latency < {TARGET_US:g} µs on every "
        f"backend, from a task and from a thread ... {verdict} "
        f"(worst median {target['worst_us']:.1f} µs: {target['where']})",
        "sanity: every token scope reported a TOKEN breach and every reference "
        "scope caught its cancellation (a trial that does not stops the run)",
    ]
    return "\n".join(lines)


def _run_other_pythons(pythons: list[str], forwarded: list[str]) -> int:
    """Run this script under each interpreter; tables pass through."""
    failures = 0
    for python in pythons:
        title = f"== latency.py ({python}) "
        print(f"\n{title}{'=' * max(0, 78 - len(title))}\n", flush=True)
        rc = subprocess.run(
            [python, str(Path(__file__).resolve()), *forwarded], check=False
        ).returncode
        if rc != 0:
            print(f"latency.py failed with exit status {rc}", flush=True)
            failures += 1
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--n", type=int, help="same-loop cancellations per variant and backend (2000)"
    )
    parser.add_argument(
        "--n-thread",
        type=int,
        help="cross-thread cancellations per variant and backend (500)",
    )
    parser.add_argument(
        "--rounds", type=int, help="interleaved rounds the trials are split into (5)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="defaults of 3 rounds, 150 and 60 trials (a smoke run)",
    )
    parser.add_argument(
        "--backend",
        action="append",
        choices=("asyncio", "trio"),
        help="repeatable; default: asyncio, and trio if installed",
    )
    parser.add_argument(
        "--python",
        action="append",
        help="run under this interpreter instead (repeatable; default: this one)",
    )
    parser.add_argument(
        "--json", type=Path, help="also write the figures here (not with --python)"
    )
    args = parser.parse_args(argv)
    if args.json is not None and args.python:
        parser.error("--json needs one interpreter: run each without --python")
    fill_counts(
        parser,
        args,
        {"rounds": 3, "n": 150, "n_thread": 60},
        {"rounds": 5, "n": 2000, "n_thread": 500},
    )
    # Every round runs at least one trial of each variant.
    args.n, args.n_thread = max(args.n, args.rounds), max(args.n_thread, args.rounds)
    if args.python:
        forwarded = [
            "--rounds",
            str(args.rounds),
            "--n",
            str(args.n),
            "--n-thread",
            str(args.n_thread),
        ]
        for backend in args.backend or ():
            forwarded += ["--backend", backend]
        return _run_other_pythons(args.python, forwarded)
    backends = backends_of(args)
    print(
        f"latency: {args.rounds} rounds, {args.n} same-loop and {args.n_thread} "
        f"cross-thread cancellations per variant, backends {', '.join(backends)}",
        file=sys.stderr,
    )
    figures = summary(collect(backends, args.rounds, args.n, args.n_thread))
    print(render(figures))
    # Then the same cancellation of code that never awaits (preemption).
    import preempt_latency

    preempt = preempt_latency.summary(
        preempt_latency.collect(60 if args.quick else 200)
    )
    print()
    print(preempt_latency.render(preempt))
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {"benchmark": "latency", "summary": figures, "preempt": preempt},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
