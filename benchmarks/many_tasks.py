"""100,000 concurrent tasks on one loop, with and without a scope each.

Run ``python benchmarks/many_tasks.py`` (``--quick`` for a smoke run).  For
asyncio and for trio (both through ``anyio.run``) it spawns N tasks (default
100,000) in one task group, waits until every one of them is running and
parked in ``await event.wait()``, then releases them and leaves the group.
Variants, the same children as ``groups.py``:

* ``plain`` (the denominator): a plain ``anyio.create_task_group()``, no
  scope anywhere (the meter's hooks are never installed);
* ``scoped``: the same group, each child's body inside
  ``limit_scope(budget=Budget(memory="64 MiB"))``, a limit never reached and
  large enough to leave the sampling interval at its 64 KiB default;
* ``budgeted``: ``ml.create_task_group()`` with ``budget=Budget(memory="64
  MiB")`` per child (the group opens the child's scope).

Per variant it reports the time (spawn until all parked, plus release and
join) and the **peak resident set size**, each as a ratio to ``plain`` in the
same round, and the peak's increment over the interpreter's own resident set
before spawning, per task.  The issue's target: 100,000 scoped tasks run with
peak RSS at most 1.3x the unscoped run.

Why it is built this way:

* Every variant of every round runs in a fresh interpreter: peak RSS can
  only be read per process, and one variant's freed memory must not be
  reused by the next.  Peak RSS is ``VmHWM`` from ``/proc/self/status``: the
  high-water mark of this process's own address space.  (``ru_maxrss`` can
  carry over the RSS of the process that forked it, when the fork shares
  its memory until ``exec``.)  Nothing is subtracted from it: the ratio is
  whole process against whole process, as a user would see it.
* Before the baseline reading, each process runs a warm-up group of 100
  children of its own variant (imports, code paths, the meter's tables and
  delivery thread for the scoped ones) and a full collection.  The plain
  variant imports the package too (it never opens a scope), so both start
  from the same modules.
* Times are the process's CPU time, as in ``groups.py``.  Variants and
  backends run in an order rotated from round to round; ratios are taken
  within a round and the median over rounds is printed with its range.
* A ``sanity`` line shows the scoped variants really metered: the meter's
  live accounts while every child was parked (one per child) and the samples
  charged during the run.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
from _package import (
    add_run_options,
    backends_of,
    fill_counts,
    ml,
    ratio_target,
    verdict,
)
from groups import VARIANTS, lifetime, nothing, rss

BASE = VARIANTS[0]
"""``plain``: every ratio is against it."""
SCOPED = VARIANTS[1:]
TARGET_RSS_RATIO = 1.3
TARGET_TASKS = 100_000
WARM_UP = 100


def peak_rss() -> int:
    """This process's peak resident set size so far (``VmHWM``), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


async def _probe(variant: str, n: int) -> dict[str, Any]:
    """One variant in this (fresh) interpreter: times, RSS, meter evidence."""
    await lifetime(variant, WARM_UP, nothing)
    gc.collect()
    baseline = rss()
    samples_before = ml.stats().samples
    parked: dict[str, int] = {}

    async def idle(*_: object) -> None:
        parked["rss"] = rss()
        parked["live_accounts"] = ml.stats().live_accounts

    spawn, finish = await lifetime(variant, n, idle)
    st = ml.stats()
    return {
        "spawn": spawn,
        "finish": finish,
        "baseline_rss": baseline,
        "parked_rss": parked["rss"],
        "peak_rss": peak_rss(),
        "live_accounts_parked": parked["live_accounts"],
        "samples": st.samples - samples_before,
        "hooks_installed": st.hooks_installed,
        "interval": st.sampling_interval,
    }


def run_probe(backend: str, variant: str, n: int) -> dict[str, Any]:
    result = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--probe",
            json.dumps([backend, variant, n]),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"probe {backend} {variant} failed:\n{result.stderr}")
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def collect(
    backends: list[str], rounds: int, n: int
) -> dict[str, list[dict[str, dict[str, Any]]]]:
    """backend -> one {variant: probe result} per round."""
    combos = [(b, v) for b in backends for v in VARIANTS]
    out: dict[str, list[dict[str, dict[str, Any]]]] = {b: [] for b in backends}
    for r in range(rounds):
        k = r % len(combos)
        this_round: dict[str, dict[str, dict[str, Any]]] = {b: {} for b in backends}
        for backend, variant in combos[k:] + combos[:k]:
            print(
                f"  round {r + 1}/{rounds}: {backend} {variant}",
                file=sys.stderr,
                flush=True,
            )
            this_round[backend][variant] = run_probe(backend, variant, n)
        for backend in backends:
            out[backend].append(this_round[backend])
    return out


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def summary(n: int, results: dict[str, list[dict[str, dict[str, Any]]]]) -> Any:
    """The figures of the report, per backend and variant."""
    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "n": n,
        "rounds": len(next(iter(results.values()))),
        "backends": {},
    }
    worst = 0.0
    for backend, per_round in results.items():
        rows: dict[str, Any] = {}
        for variant in VARIANTS:
            runs = [r[variant] for r in per_round]
            row: dict[str, Any] = {
                "seconds": statistics.median(x["spawn"] + x["finish"] for x in runs),
                "baseline_mib": statistics.median(x["baseline_rss"] for x in runs)
                / 2**20,
                "peak_mib": statistics.median(x["peak_rss"] for x in runs) / 2**20,
                "bytes_per_task": statistics.median(
                    (x["peak_rss"] - x["baseline_rss"]) / n for x in runs
                ),
                "live_accounts_parked": min(x["live_accounts_parked"] for x in runs),
                "samples": min(x["samples"] for x in runs),
                "hooks_installed": all(x["hooks_installed"] for x in runs),
                "interval": max(x["interval"] for x in runs),
            }
            if variant != BASE:
                base = [r[BASE] for r in per_round]
                row["time_ratio"] = _spread(
                    [
                        (x["spawn"] + x["finish"]) / (b["spawn"] + b["finish"])
                        for x, b in zip(runs, base, strict=True)
                    ]
                )
                row["peak_rss_ratio"] = _spread(
                    [
                        x["peak_rss"] / b["peak_rss"]
                        for x, b in zip(runs, base, strict=True)
                    ]
                )
                row["more_bytes_per_task"] = statistics.median(
                    (
                        x["peak_rss"]
                        - x["baseline_rss"]
                        - b["peak_rss"]
                        + b["baseline_rss"]
                    )
                    / n
                    for x, b in zip(runs, base, strict=True)
                )
                if variant == "scoped":
                    worst = max(worst, row["peak_rss_ratio"]["median"])
            rows[variant] = row
        out["backends"][backend] = rows
    # Judged at the target's size only: the interpreter's own memory weighs
    # more in a smaller run.
    out["target"] = ratio_target(TARGET_RSS_RATIO, worst)
    if n != TARGET_TASKS:
        out["target"]["met"] = None
    return out


def _cell(spread: dict[str, float]) -> str:
    return f"{spread['median']:5.2f} [{spread['min']:.2f}-{spread['max']:.2f}]"


def render(figures: Any) -> str:
    n, rounds = figures["n"], figures["rounds"]
    lines = [
        f"Python {sys.version.split()[0]}, anyio.run per backend; {n:,} tasks "
        f"parked at once in one task group, each variant in a fresh interpreter, "
        f"{rounds} rounds; ratios to plain in the same round, median [min-max]; "
        "time = CPU s from the first spawn until all parked, plus release and "
        "join; peak = VmHWM of the whole process; per task = (peak - RSS "
        "before spawning) / tasks",
    ]
    for backend, rows in figures["backends"].items():
        lines += [
            "",
            f"{backend}:",
            "",
            f"| {'variant':<9} | {'time s':>6} | {'time ratio':<18} | "
            f"{'peak MiB':>8} | {'peak RSS ratio':<18} | {'B per task':>10} | "
            f"{'more B per task':>15} |",
            f"|{'-' * 11}|{'-' * 8}|{'-' * 20}|{'-' * 10}|{'-' * 20}|{'-' * 12}|"
            f"{'-' * 17}|",
        ]
        for variant in VARIANTS:
            row = rows[variant]
            plain = variant == BASE
            lines.append(
                f"| {variant:<9} | {row['seconds']:6.2f} | "
                f"{' 1.00' if plain else _cell(row['time_ratio']):<18} | "
                f"{row['peak_mib']:8.1f} | "
                f"{' 1.00' if plain else _cell(row['peak_rss_ratio']):<18} | "
                f"{row['bytes_per_task']:10.0f} | "
                f"{'-' if plain else format(row['more_bytes_per_task'], '.0f'):>15} |"
            )
        lines.append(
            "RSS before spawning, MiB: "
            + ", ".join(f"{v} {rows[v]['baseline_mib']:.1f}" for v in VARIANTS)
        )
        lines.append("sanity (every round):")
        lines += [
            f"  {v}: hooks installed = {rows[v]['hooks_installed']}, live "
            f"accounts while parked >= {rows[v]['live_accounts_parked']:,}, "
            f"samples charged during the run >= {rows[v]['samples']:,}, "
            f"interval {rows[v]['interval']} B"
            for v in VARIANTS
        ]
    target = figures["target"]
    if n != TARGET_TASKS:
        judged = f"not checked (the target is about {TARGET_TASKS:,} tasks)"
    else:
        judged = verdict(target["met"])
    lines += [
        "",
        f"target: {TARGET_TASKS:,} scoped tasks with peak RSS <= "
        f"{target['ratio']:g}x the unscoped run ... {judged} (worst median "
        f"{target['worst']:.3f}x, scoped variant, {n:,} tasks)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help="interleaved rounds (3)")
    parser.add_argument("--n", type=int, help="tasks parked at once (100000)")
    add_run_options(parser, "defaults of 2 rounds of 10000 tasks (a smoke run)")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe is not None:  # one variant, in this fresh interpreter
        backend, variant, n = json.loads(args.probe)
        print(json.dumps(anyio.run(_probe, variant, n, backend=backend)))
        return 0
    fill_counts(parser, args, {"rounds": 2, "n": 10_000}, {"rounds": 3, "n": 100_000})
    backends = backends_of(args)
    print(
        f"many_tasks: {args.rounds} rounds of {args.n} tasks x "
        f"{len(VARIANTS)} variants, backends {', '.join(backends)}",
        file=sys.stderr,
    )
    results = collect(backends, args.rounds, args.n)
    figures = summary(args.n, results)
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "benchmark": "many_tasks",
                    "python": sys.version.split()[0],
                    "summary": figures,
                    "raw": results,
                },
                indent=1,
            )
        )
    print(render(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
