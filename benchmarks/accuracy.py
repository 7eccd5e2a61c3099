"""How accurately a sampled ``limit_scope(memory=...)`` stops a task, measured.

Run ``python benchmarks/accuracy.py`` (``--quick`` for a smoke run).  The
probabilities in docs/accuracy.md are computed from a model (marks form a
Poisson process over the allocated bytes); this script checks that model
against real scopes, real allocator hooks and a real event loop, with no
simulation anywhere:

(a) **Build-up.**  A task appends 1 KiB ``bytes`` objects to a list under
    ``memory="10 MiB"`` (a checkpoint every 8 appends) until the scope
    cancels it.  What it truly held at that moment (items plus the list's own
    storage, from ``sys.getsizeof``) is recorded.  The target: never stopped
    before it holds 8 MiB, always stopped before it holds 12 MiB.

(b) **Churn.**  A task builds an 8 MiB structure under ``memory="10 MiB"``
    and keeps it while it allocates and frees about 1 GiB more: each step
    decodes a small JSON document (dicts, lists, str, int, float: realistic
    small objects) and allocates one transient buffer, both dropped at the
    end of the step.  The task never truly holds more than 8 MiB plus one
    step's worth, so every stop is a *false stop*.  Variants differ only in
    the buffer size (16-64 KiB, 256 KiB, 1 MiB), because for a live-bytes
    limit the risk grows with how many bytes are transiently live (each step
    re-draws their sample count; see docs/accuracy.md, "Live limits under
    churn").

(c) **Estimate against exact, at several intervals.**  A task keeps a 1 KiB
    ``bytes`` and decodes one small JSON document per step, 2048 steps
    (27-29 MiB allocated, 2.1 MiB still held at the end), inside a
    ``limit_scope()`` without limits, with the sampling interval set by
    ``configure(sampling_interval=R)`` for R = 4 KiB, 64 KiB (the default)
    and 512 KiB.  The scope's ``usage.allocated`` and ``usage.live`` at exit
    are compared with the same trial in exact mode (R = 1, every allocation
    charged with its exact size), the ground truth: mean and spread of
    estimate / exact, next to the model's relative sd ``sqrt(R / T)``.
    Each interval (and the exact mode) runs in fresh worker processes, so no
    countdown drawn at one interval leaks into another; a warm-up trial
    precedes the measured ones.  ``--intervals-only`` runs this part alone
    (what ``run_all.py`` does).

Why it is built this way:

* Trials run in 2 worker processes (both cores), started with *spawn*, so
  that each seeds its own sampler.  A forked child inherits the sampler's
  random state of a parent that has metered anything (the meter's fork
  handler does not reseed it), and the workers' trials would then be
  identical instead of independent.
* "True" bytes of the churn step are calibrated in each worker with the
  meter's exact mode (``configure(sampling_interval=1)``: every allocation
  charged with its exact size), so they mean exactly what the sampled
  estimate estimates: bytes requested from CPython's MEM and OBJ allocators.
* A pilot round times one trial of each kind first; when the requested trial
  counts would not fit in ``--budget-minutes`` they are cut down, and the
  report says so.
* With scipy installed, each row also shows what the model predicts, so a
  disagreement between model and meter is visible at a glance.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import Any, TypeVar

import anyio

_T = TypeVar("_T")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    # Running from a checkout: import the package next to this script.  With
    # spawn, workers receive the parent's sys.path, so this covers them too.
    sys.path.insert(0, str(REPO_ROOT))

import memlimits_async  # noqa: E402
from memlimits_async import configure, limit_scope, stats  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

LIMIT = 10 * MiB
"""The limit of the issue's target."""
LOW, HIGH = 8 * MiB, 12 * MiB
"""The target band: stopped before 12 MiB truly held, and not before 8 MiB."""
HOLD = 8 * MiB
"""What the churn task keeps for its whole life."""
ITEM_PAYLOAD = 1 * KiB
"""Payload of each appended ``bytes`` object (1057 bytes with its header)."""
CHECKPOINT_EVERY = 8
"""Steps between two ``await anyio.sleep(0)``: where a cancellation lands."""
BUILDUP_GIVE_UP = 4 * LIMIT
"""A build-up still running here was never stopped: record it and move on."""

BYTES_HEADER = sys.getsizeof(b"")
"""Bytes of a ``bytes`` object beyond its payload (33 on 64-bit CPython)."""

_DOC = json.dumps(
    {
        "id": 12345,
        "user": {"name": "Ada Lovelace", "email": "ada@example.org", "score": 0.97},
        "tags": ["async", "memory", "limits", "sampling", "poisson"],
        "items": [
            {"sku": f"SKU-{i:05d}", "qty": i % 7, "price": i * 1.25, "ok": i % 2 == 0}
            for i in range(24)
        ],
        "note": "x" * 300,
    }
)
"""A request-sized document: decoding it creates ~150 small objects."""


@dataclass(frozen=True, slots=True)
class Variant:
    """One churn workload: the transient buffer sizes its steps cycle through."""

    key: str
    """Short name for ``--variant``."""
    name: str
    buffer_sizes: tuple[int, ...]


def _mixed_buffer_sizes() -> tuple[int, ...]:
    """16-64 KiB, fixed seed: every trial and worker churns the same sizes."""
    rng = Random(20240601)
    return tuple(rng.randrange(16 * KiB, 64 * KiB + 1) for _ in range(997))


VARIANTS = (
    Variant("mix", "small objects + 16-64 KiB buffers", _mixed_buffer_sizes()),
    Variant("256k", "small objects + 256 KiB buffers", (256 * KiB,)),
    Variant("1m", "small objects + 1 MiB buffers", (1 * MiB,)),
)


# ---------------------------------------------------------------------------
# Workloads (run in the worker processes).


def _churn_step(buffer_size: int) -> int:
    """Allocate one step's transient objects; all of them die on return.

    The buffer is a local, so it is freed before the next step allocates its
    own: rebinding one variable (``buf = bytes(n)`` in a loop) would keep two
    buffers alive at once and double the transient peak.
    """
    doc = json.loads(_DOC)
    buffer = bytes(buffer_size)
    return len(doc) + len(buffer)


def _bytes_object_size(payload: int) -> int:
    """Bytes CPython requests for ``bytes(payload)`` (0: the shared empty one)."""
    return BYTES_HEADER + payload if payload else 0


def _held_size(held: list[bytes]) -> int:
    """True bytes of the held structure: its items plus the list's storage."""
    return sum(map(sys.getsizeof, held)) + sys.getsizeof(held)


@dataclass(frozen=True, slots=True)
class Calibration:
    """Exact-mode measurements of one churn step, made once per worker."""

    step_bytes: int
    """Bytes one step allocates besides its buffer (JSON objects, overhead)."""
    step_peak: int
    """Most bytes one step holds at once besides its buffer."""


_calibration: Calibration | None = None


def _calibrate() -> Calibration:
    """Measure the churn step exactly (sampling interval 1), then restore."""
    global _calibration
    if _calibration is not None:
        return _calibration
    configured = stats().configured_sampling_interval
    steps = 200
    configure(sampling_interval=1)
    try:
        _churn_step(0)  # warm up: lazily created caches are not per-step work
        with limit_scope() as total:
            for _ in range(steps):
                _churn_step(0)
        with limit_scope() as one:
            _churn_step(0)
    finally:
        configure(sampling_interval=configured)
    _calibration = Calibration(
        step_bytes=round(total.usage.allocated / steps),
        step_peak=one.usage.peak_live,
    )
    return _calibration


@dataclass(frozen=True, slots=True)
class BuildupResult:
    """One build-up trial, as seen from outside the scope after it exited."""

    stopped: bool
    true_held: int
    """Bytes the task truly held when it was stopped (or gave up)."""
    observed: int
    """The estimate that breached the limit (0 if never stopped)."""
    interval: int
    seconds: float


@dataclass(frozen=True, slots=True)
class ChurnResult:
    """One churn trial; any stop is false, since the truth stays below 0.91 L."""

    stopped: bool
    stopped_while_building: bool
    true_held: int
    """True bytes of the held structure (at the stop, or at the end)."""
    churned: int
    """True bytes allocated and freed by the churn steps."""
    estimated_allocated: int
    """What the meter estimated the scope allocated in total (cross-check)."""
    observed: int
    interval: int
    seconds: float


async def _buildup_trial() -> BuildupResult:
    """Append until cancelled; the truth at the stop is measured afterwards.

    Nothing is freed, so the live estimate moves like a counter and the stop
    point follows the Erlang law of docs/accuracy.md.  The checkpoint every
    few appends bounds how far the task runs on between the breach and its
    cancellation.
    """
    held: list[bytes] = []
    start = time.perf_counter()
    interval = 0
    with limit_scope(memory=LIMIT) as scope:
        interval = stats().sampling_interval
        while len(held) * (BYTES_HEADER + ITEM_PAYLOAD) < BUILDUP_GIVE_UP:
            for _ in range(CHECKPOINT_EVERY):
                held.append(bytes(ITEM_PAYLOAD))
            await anyio.sleep(0)
    breach = scope.breach
    observed = breach.observed if breach is not None else 0
    return BuildupResult(
        stopped=scope.breached,
        true_held=_held_size(held),
        observed=int(observed or 0),
        interval=interval,
        seconds=time.perf_counter() - start,
    )


async def _churn_trial(variant: Variant, volume: int) -> ChurnResult:
    """Hold HOLD bytes, then churn ``volume`` bytes through ``variant``'s steps.

    The held structure is built inside the scope on every trial, so its
    sample count, the main source of false stops, is drawn afresh each time.
    """
    calibration = _calibrate()
    sizes = variant.buffer_sizes
    held: list[bytes] = []
    churned = 0
    step = 0
    building = True
    interval = 0
    start = time.perf_counter()
    with limit_scope(memory=LIMIT) as scope:
        interval = stats().sampling_interval
        item = BYTES_HEADER + ITEM_PAYLOAD
        while len(held) * item + sys.getsizeof(held) < HOLD:
            for _ in range(CHECKPOINT_EVERY):
                held.append(bytes(ITEM_PAYLOAD))
            await anyio.sleep(0)
        building = False
        while churned < volume:
            for _ in range(CHECKPOINT_EVERY):
                size = sizes[step % len(sizes)]
                step += 1
                _churn_step(size)
                churned += calibration.step_bytes + _bytes_object_size(size)
            await anyio.sleep(0)
    breach = scope.breach
    observed = breach.observed if breach is not None else 0
    return ChurnResult(
        stopped=scope.breached,
        stopped_while_building=scope.breached and building,
        true_held=_held_size(held),
        churned=churned,
        estimated_allocated=scope.usage.allocated,
        observed=int(observed or 0),
        interval=interval,
        seconds=time.perf_counter() - start,
    )


def run_buildup_chunk(trials: int, backend: str) -> list[BuildupResult]:
    """Worker entry point: ``trials`` build-up trials in one event loop."""

    async def main() -> list[BuildupResult]:
        return [await _buildup_trial() for _ in range(trials)]

    return anyio.run(main, backend=backend)


def run_churn_chunk(
    variant: Variant, volume: int, trials: int, backend: str
) -> tuple[Calibration, list[ChurnResult]]:
    """Worker entry point: ``trials`` churn trials in one event loop."""

    async def main() -> list[ChurnResult]:
        return [await _churn_trial(variant, volume) for _ in range(trials)]

    results = anyio.run(main, backend=backend)
    return _calibrate(), results


INTERVALS = (4 * KiB, 64 * KiB, 512 * KiB)
"""Sampling intervals compared with the exact mode in (c)."""
INTERVAL_STEPS = 2048
"""Steps of one (c) trial: keep a 1 KiB ``bytes``, decode one JSON document."""


@dataclass(frozen=True, slots=True)
class IntervalResult:
    """One (c) trial: what the scope reported at exit."""

    interval: int
    """The sampling interval in force inside the scope."""
    allocated: int
    live: int
    held: int
    """True bytes of the held structure, from ``sys.getsizeof``."""


async def _interval_trial() -> IntervalResult:
    """Keep 1 KiB and decode one document per step, in a scope without limits
    (so the interval is the configured one)."""
    held: list[bytes] = []
    with limit_scope() as scope:
        interval = stats().sampling_interval
        for step in range(INTERVAL_STEPS):
            held.append(bytes(ITEM_PAYLOAD))
            _churn_step(0)
            if step % CHECKPOINT_EVERY == 0:
                await anyio.sleep(0)
    usage = scope.usage
    return IntervalResult(interval, usage.allocated, usage.live, _held_size(held))


def run_interval_chunk(
    interval: int, trials: int, backend: str
) -> list[IntervalResult]:
    """Worker entry point (a fresh process): one warm-up trial, then
    ``trials`` trials, all at ``interval`` (1: exact mode)."""
    configure(sampling_interval=interval)

    async def main() -> list[IntervalResult]:
        await _interval_trial()  # caches, code paths, any earlier countdown
        return [await _interval_trial() for _ in range(trials)]

    results = anyio.run(main, backend=backend)
    wrong = {r.interval for r in results} - {interval}
    if wrong:
        raise RuntimeError(f"asked for interval {interval}, scopes saw {wrong}")
    return results


def _interval_study(
    trials: int, exact_trials: int, workers: int, backend: str
) -> dict[int, list[IntervalResult]]:
    """interval -> results, 1 (exact) included; every chunk in a fresh process."""
    context = multiprocessing.get_context("spawn")
    plan = [(1, exact_trials), *((r, trials) for r in INTERVALS)]
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=context, max_tasks_per_child=1
    ) as pool:
        futures = {
            interval: [
                pool.submit(run_interval_chunk, interval, n, backend)
                for n in _chunks(count, workers)
                if n > 0
            ]
            for interval, count in plan
        }
        return {
            interval: [
                r for chunk in _gather(chunks, f"interval {interval}") for r in chunk
            ]
            for interval, chunks in futures.items()
        }


def interval_summary(results: dict[int, list[IntervalResult]]) -> dict[str, Any]:
    """Per interval and quantity: estimate / exact (mean, its standard
    error, sd, min, max) and the model's relative sd sqrt(R / exact)."""
    exact = results[1]
    truth = {
        "allocated": statistics.median(r.allocated for r in exact),
        "live": statistics.median(r.live for r in exact),
    }
    spread = {
        q: (max(getattr(r, q) for r in exact) - min(getattr(r, q) for r in exact))
        / truth[q]
        for q in truth
    }
    rows: list[dict[str, Any]] = []
    for interval, runs in results.items():
        if interval == 1:
            continue
        for quantity, true in truth.items():
            ratios = [getattr(r, quantity) / true for r in runs]
            sd = statistics.stdev(ratios) if len(ratios) > 1 else math.nan
            rows.append(
                {
                    "interval": interval,
                    "quantity": quantity,
                    "trials": len(runs),
                    "exact_bytes": true,
                    "mean": statistics.fmean(ratios),
                    "se": sd / math.sqrt(len(ratios)),
                    "sd": sd,
                    "model_sd": math.sqrt(interval / true),
                    "min": min(ratios),
                    "max": max(ratios),
                }
            )
    return {
        "python": platform.python_version(),
        "steps": INTERVAL_STEPS,
        "exact_trials": len(exact),
        "exact_spread": spread,
        "held_getsizeof": statistics.median(r.held for r in exact),
        "rows": rows,
    }


def _report_intervals(figures: dict[str, Any]) -> str:
    rows = [
        [
            f"{row['interval'] // KiB} KiB",
            row["quantity"],
            str(row["trials"]),
            _mib(row["exact_bytes"]),
            f"{row['mean']:.4f} ± {row['se']:.4f}",
            f"{row['sd']:.4f}",
            f"{row['model_sd']:.4f}",
            f"{row['min']:.3f}-{row['max']:.3f}",
        ]
        for row in figures["rows"]
    ]
    headers = [
        "R",
        "usage",
        "trials",
        "exact MiB",
        "estimate/exact: mean ± se",
        "sd",
        "model sd sqrt(R/T)",
        "min-max",
    ]
    spread = figures["exact_spread"]
    return "\n".join(
        [
            _table(headers, rows),
            "",
            f"exact (R = 1): {figures['exact_trials']} trials, max - min = "
            f"{spread['allocated']:.2%} of allocated, {spread['live']:.2%} of "
            f"live; the held structure by sys.getsizeof: "
            f"{_mib(figures['held_getsizeof'])} MiB",
        ]
    )


# ---------------------------------------------------------------------------
# The model (docs/accuracy.md), for the "predicted" columns.


def _marks_needed(interval: int) -> int:
    """Marks whose estimate exceeds LIMIT: breach iff marks * R > LIMIT."""
    return LIMIT // interval + 1


def predicted_buildup_outside(interval: int) -> float | None:
    """P(stopped before LOW) + P(not stopped by HIGH), exact Poisson tails."""
    try:
        from scipy.stats import poisson
    except ImportError:
        return None
    n = _marks_needed(interval)
    early = float(poisson.sf(n - 1, LOW / interval))
    late = float(poisson.cdf(n - 1, HIGH / interval))
    return early + late


def predicted_false_stop(
    interval: int, held: int, transients: Sequence[int], steps: float
) -> float | None:
    """P(some step's transient marks lift the estimate over the limit).

    The held structure's mark count H ~ Poisson(held/R) is drawn once.  Each
    step then holds ``t`` transient bytes at its peak (``transients`` is one
    cycle of the per-step peaks, repeated for ``steps`` steps) and draws its
    own Poisson(t/R) marks on them, independently of every other step.  So
    P = E_H[1 - prod_steps P(Poisson(t/R) < n - H)].  This treats every step
    as "allocate t bytes, then free them all", which is what a step does.
    """
    try:
        import numpy as np
        from scipy.stats import poisson
    except ImportError:
        return None
    n = _marks_needed(interval)
    h = np.arange(0, n + 1)
    weights = poisson.pmf(h, held / interval)
    repeats = steps / len(transients)
    log_survive = np.zeros(len(h))
    for t, count in Counter(transients).items():
        per_step = poisson.sf(n - h - 1, t / interval)  # P(marks >= n - H)
        log_survive += count * repeats * np.log1p(-np.minimum(per_step, 1 - 1e-16))
    breached = float(np.sum(weights * -np.expm1(log_survive)))
    return breached + float(poisson.sf(n, held / interval))  # H > n: held alone


# ---------------------------------------------------------------------------
# Orchestration and report (parent process).


def _chunks(total: int, workers: int) -> list[int]:
    """Split ``total`` trials into ~4 chunks per worker, for load balance."""
    if total <= 0:
        return []
    pieces = min(total, max(1, workers * 4))
    base, extra = divmod(total, pieces)
    return [base + (1 if i < extra else 0) for i in range(pieces)]


def _mib(n: float) -> str:
    return f"{n / MiB:.3f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, so that it can be pasted into docs/accuracy.md."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
        for r in rows
    ]
    return "\n".join([line + " |", sep, *body])


def _expected(probability: float | None, trials: int) -> str:
    if probability is None:
        return "n/a (no scipy)"
    return f"{probability:.2g} ({probability * trials:.2g} expected)"


def _gather(futures: list[Future[_T]], label: str) -> list[_T]:
    done: list[_T] = []
    for i, future in enumerate(futures, 1):
        done.append(future.result())
        print(f"  {label}: chunk {i}/{len(futures)} done", file=sys.stderr, flush=True)
    return done


def _report_buildup(results: list[BuildupResult], wall: float) -> str:
    held = [r.true_held for r in results if r.stopped]
    never = sum(not r.stopped for r in results)
    outside = sum(not (LOW <= r.true_held < HIGH) for r in results)
    interval = results[0].interval
    n = _marks_needed(interval)
    # Stopped at the n-th mark: the stop point is Erlang(n, R) (no frees).
    mean, sd = n * interval, math.sqrt(n) * interval
    rows = [
        [
            str(len(results)),
            str(interval),
            _mib(min(held)) if held else "-",
            _mib(statistics.median(held)) if held else "-",
            _mib(max(held)) if held else "-",
            f"{_mib(statistics.fmean(held))} / {_mib(statistics.stdev(held))}"
            if len(held) > 1
            else "-",
            f"{_mib(mean)} / {_mib(sd)}",
            f"{outside} (never stopped: {never})",
            _expected(predicted_buildup_outside(interval), len(results)),
            f"{wall:.1f}",
        ]
    ]
    headers = [
        "runs",
        "R (B)",
        "min MiB",
        "median MiB",
        "max MiB",
        "mean / sd MiB",
        "model mean / sd",
        "outside [8, 12) MiB",
        "model P(outside)",
        "wall s",
    ]
    return _table(headers, rows)


def _report_churn(
    rows_in: list[tuple[Variant, Calibration, list[ChurnResult]]],
    walls: dict[str, float],
) -> str:
    rows: list[list[str]] = []
    for variant, calibration, results in rows_in:
        transients = [
            calibration.step_peak + _bytes_object_size(b) for b in variant.buffer_sizes
        ]
        transient = max(transients)
        mean_buffer = statistics.fmean(map(_bytes_object_size, variant.buffer_sizes))
        step_bytes = calibration.step_bytes + mean_buffer
        stops = [r for r in results if r.stopped]
        churned = statistics.fmean(r.churned for r in results)
        held = statistics.fmean(r.true_held for r in results)
        estimated = statistics.fmean(r.estimated_allocated for r in results)
        interval = results[0].interval
        prediction = predicted_false_stop(
            interval, int(held), transients, churned / step_bytes
        )
        stop_detail = (
            f"{len(stops)} ({sum(r.stopped_while_building for r in stops)} in build)"
        )
        rows.append(
            [
                variant.name,
                f"{min(transients) / KiB:.0f}-{transient / KiB:.0f} KiB"
                if min(transients) != transient
                else f"{transient / KiB:.0f} KiB",
                f"{_mib(held)} + {transient / MiB:.2f}",
                f"{churned / GiB:.3f} / {estimated / GiB:.3f}",
                str(len(results)),
                stop_detail,
                _expected(prediction, len(results)),
                f"{statistics.fmean(r.seconds for r in results):.3f}",
                f"{walls[variant.name]:.0f}",
            ]
        )
    headers = [
        "churn variant",
        "transient peak",
        "true peak MiB (held + transient)",
        "churned GiB true / estimated",
        "trials",
        "false stops",
        "model P(false stop)",
        "s / trial",
        "wall s",
    ]
    return _table(headers, rows)


def _false_stop_details(
    rows: list[tuple[Variant, Calibration, list[ChurnResult]]],
) -> str:
    """One line per false stop (at most 10 per variant): what the meter saw."""
    lines: list[str] = []
    for variant, _, results in rows:
        stops = [r for r in results if r.stopped]
        for r in stops[:10]:
            lines.append(
                f"  {variant.key}: stopped after {r.churned / MiB:.0f} MiB churned, "
                f"estimate {_mib(r.observed)} MiB, true held {_mib(r.true_held)} MiB"
            )
    return "\nfalse stops:\n" + "\n".join(lines) if lines else "\nfalse stops: none"


def _describe_package() -> str:
    """Which build is measured: the meter changes, and so could its numbers."""
    where = Path(memlimits_async.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "not a git checkout"
    return f"{where} ({commit})"


def _limit_study(
    args: argparse.Namespace, volume: int, workers: int, variants: list[Variant]
) -> dict[str, str]:
    """(a) and (b): print their reports; return their tables for --json."""
    tables: dict[str, str] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        # Pilot: one trial of each kind, to time them before committing.
        pilot_buildup = pool.submit(
            run_buildup_chunk, min(1, args.buildup_trials), args.backend
        )
        pilot_churn = {
            v.name: pool.submit(run_churn_chunk, v, volume, 1, args.backend)
            for v in variants
        }
        pilot_b = pilot_buildup.result()
        pilot_c = {name: f.result() for name, f in pilot_churn.items()}
        per_trial = {name: res[1][0].seconds for name, res in pilot_c.items()}
        estimate = sum(per_trial.values()) * args.trials / workers
        print(
            "pilot: one churn trial (while the other pilots ran) takes "
            + ", ".join(f"{s:.2f} s ({n})" for n, s in per_trial.items())
            + f"; {args.trials} trials per variant need about "
            f"{estimate / 60:.1f} min on {workers} workers"
        )
        trials = args.trials
        if estimate > args.budget_minutes * 60:
            trials = max(1, int(args.trials * args.budget_minutes * 60 / estimate))
            print(
                f"NOTE: over the {args.budget_minutes:g} min budget: running "
                f"{trials} churn trials per variant instead of {args.trials}"
            )
        print(file=sys.stderr)

        start = time.perf_counter()
        buildup_futures = [
            pool.submit(run_buildup_chunk, n, args.backend)
            for n in _chunks(args.buildup_trials - 1, workers)
        ]
        buildup = pilot_b + [
            r for chunk in _gather(buildup_futures, "build-up") for r in chunk
        ]
        buildup_wall = time.perf_counter() - start

        churn_rows: list[tuple[Variant, Calibration, list[ChurnResult]]] = []
        walls: dict[str, float] = {}
        for variant in variants:
            start = time.perf_counter()
            futures = [
                pool.submit(run_churn_chunk, variant, volume, n, args.backend)
                for n in _chunks(trials - 1, workers)
            ]
            calibration, first = pilot_c[variant.name]
            results = list(first)
            for _, chunk in _gather(futures, variant.name):
                results.extend(chunk)
            walls[variant.name] = time.perf_counter() - start + per_trial[variant.name]
            churn_rows.append((variant, calibration, results))

    if buildup:
        print("\n(a) steady build-up under memory=10 MiB: true bytes held at stop\n")
        tables["buildup"] = _report_buildup(buildup, buildup_wall)
        print(tables["buildup"])
    if churn_rows:
        print(
            f"\n(b) holding {HOLD // MiB} MiB while churning "
            f"{volume / GiB:g} GiB under memory=10 MiB: false stops\n"
        )
        tables["churn"] = _report_churn(churn_rows, walls)
        print(tables["churn"])
        print(_false_stop_details(churn_rows))
    return tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--trials", type=int, default=1000, help="churn trials per variant (1000)"
    )
    parser.add_argument(
        "--buildup-trials", type=int, default=1000, help="build-up trials (1000)"
    )
    parser.add_argument(
        "--volume-mib",
        type=int,
        default=1024,
        help="bytes churned per trial, MiB (1024 = 1 GiB)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        choices=[v.key for v in VARIANTS],
        help="churn variant to run (repeatable; default: all)",
    )
    parser.add_argument("--workers", type=int, default=2, help="processes (2)")
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=20.0,
        help="cut churn trials down to fit this wall time (20)",
    )
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument(
        "--interval-trials",
        type=int,
        help="(c): trials per sampling interval (300; --quick 40)",
    )
    parser.add_argument(
        "--exact-trials", type=int, help="(c): exact-mode trials (10; --quick 4)"
    )
    parser.add_argument(
        "--intervals-only", action="store_true", help="run (c) alone (~30 s)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 100 build-ups, 40 churn trials of 128 MiB per variant, "
        "40 trials per interval",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.buildup_trials, args.volume_mib = 40, 100, 128
    for name, full, quick in (("interval_trials", 300, 40), ("exact_trials", 10, 4)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.interval_trials < 2 or args.exact_trials < 1:
        parser.error("--interval-trials must be >= 2 and --exact-trials >= 1")
    volume = args.volume_mib * MiB
    workers = max(1, args.workers)
    variants = [v for v in VARIANTS if args.variant is None or v.key in args.variant]
    if args.trials <= 0:
        variants = []

    command = shlex.join(["python", "benchmarks/accuracy.py", *sys.argv[1:]])
    print(f"command: {command}")
    print(f"date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(
        f"python: {platform.python_version()} ({platform.machine()}), "
        f"backend {args.backend}, {workers} worker processes, "
        f"{os.cpu_count()} CPUs"
    )
    print(f"package: {_describe_package()}")
    if not args.intervals_only:
        print(f"limit: memory={LIMIT // MiB} MiB; churn holds {HOLD // MiB} MiB\n")

    begin = time.perf_counter()
    figures: dict[str, Any] = {"benchmark": "accuracy"}
    if not args.intervals_only:
        figures.update(_limit_study(args, volume, workers, variants))
    intervals = interval_summary(
        _interval_study(args.interval_trials, args.exact_trials, workers, args.backend)
    )
    figures["intervals"] = intervals
    print(
        f"\n(c) estimate / exact at several sampling intervals ({INTERVAL_STEPS} "
        "steps of: keep 1 KiB, decode one JSON document)\n"
    )
    print(_report_intervals(intervals))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1))
    print(f"\ntotal wall time: {time.perf_counter() - begin:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
