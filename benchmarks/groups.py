"""What budgeted children cost: spawning, memory, and listing them.

Run ``python benchmarks/groups.py`` (``--quick`` for a smoke run).  For
asyncio and for trio (both through ``anyio.run``) it prints:

* **spawn**: the time to spawn N children (default 10,000) and have every one
  of them running and parked in ``await event.wait()``, in
  ``ml.create_task_group()`` with ``budget=ml.Budget(memory="64 MiB")`` for
  each child, against ``anyio.create_task_group()`` spawning the same
  children;
* **finish**: the time to release them (``event.set()``) and leave the group,
  i.e. every child's wake-up, exit (its scope's exit for the budgeted ones)
  and join;
* **total**: both, the whole life of N short children.  The issue's target:
  the budgeted total at most 1.5x the plain one;
* **memory per idle child**: bytes held per parked child, budgeted and
  plain, and the difference, i.e. what the budget costs beyond the task
  itself (the goal: under 1 KiB).  Measured twice, each in fresh
  interpreters: ``tracemalloc`` (Python objects, exact) and the resident set
  size (everything, C accounts and allocator slack included);
* next to both, **hand-scoped**: a plain anyio group whose children each
  open ``limit_scope(budget=...)`` themselves, i.e. what the budget's scope
  costs by itself, the floor under the budgeted group's numbers;
* **children()**: the time of one ``group.children()`` snapshot of N running
  budgeted children (name, usage, breach), as a dashboard polling every
  second would take it.

Why it is built this way:

* Every variant runs the same children: each increments a shared counter and
  parks on one ``anyio.Event``.  The budget's limit is never reached and is
  large enough not to lower the sampling interval, so what is measured is
  the bookkeeping, not sampling.
* Times are the process's CPU time (``time.process_time``), not the wall
  clock: on a shared machine the other jobs' share of the cores would
  otherwise dominate the spread.
* Everything timed runs in one process per backend and round, interleaved:
  each round runs every variant, in an order rotated from round to round, so
  a slow spell of the shared machine lands on all alike.  Ratios are
  taken within a round; the median over rounds is printed with its range.
  The garbage collector stays on (it is part of the cost of many objects),
  and a full collection runs before each timed variant.
* Memory is measured in fresh interpreters (one per variant and round), after
  a warm-up group of 100 children, so that imports, code paths and the
  meter's tables are paid before the first measurement and one variant's
  freed memory cannot be reused by the other.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
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

BUDGET = ml.Budget(memory="64 MiB")
_clock = time.process_time
"""CPU seconds of this process: what other jobs of a shared machine do to
the wall clock is left out (the meter's delivery thread counts, but it
sleeps here)."""
TARGET_RATIO = 1.5
MEMORY_GOAL = 1024
VARIANTS = ("plain", "scoped", "budgeted")


class _Counter:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


async def _child(started: _Counter, release: anyio.Event) -> None:
    started.value += 1
    await release.wait()


async def _scoped_child(started: _Counter, release: anyio.Event) -> None:
    # _child's body, written out: awaiting _child would add a coroutine, and
    # its ~200 bytes and time would be counted as the scope's.
    with ml.limit_scope(budget=BUDGET):
        started.value += 1
        await release.wait()


async def _all_started(started: _Counter, n: int) -> None:
    while started.value < n:
        await anyio.sleep(0)


Idle = Callable[[Any], Awaitable[None]]
"""Runs while every child is parked; gets the group."""


async def lifetime(variant: str, n: int, idle: Idle) -> tuple[float, float]:
    """Spawn and finish times of ``n`` children of a plain anyio group
    (``"plain"``), of one whose children each open a ``limit_scope`` with the
    budget by hand (``"scoped"``), or of a budgeted group with a budget per
    child (``"budgeted"``)."""
    started, release = _Counter(), anyio.Event()
    begin = _clock()
    group = (
        ml.create_task_group() if variant == "budgeted" else anyio.create_task_group()
    )
    async with group:
        if isinstance(group, ml.BudgetedTaskGroup):
            for _ in range(n):
                group.start_soon(_child, started, release, budget=BUDGET)
        elif variant == "scoped":
            for _ in range(n):
                group.start_soon(_scoped_child, started, release)
        else:
            for _ in range(n):
                group.start_soon(_child, started, release)
        await _all_started(started, n)
        spawned = _clock()
        await idle(group)
        resumed = _clock()
        release.set()
    end = _clock()
    return spawned - begin, end - resumed


async def nothing(*_: object) -> None:
    pass


async def _one_round(n: int, round_no: int, listings: int) -> dict[str, Any]:
    """Inside a running task: spawn/finish seconds of each variant, and the
    best time of one ``children()`` call on the budgeted group."""
    out: dict[str, Any] = {}
    k = round_no % len(VARIANTS)
    order = VARIANTS[k:] + VARIANTS[:k]
    listing_times: list[float] = []

    async def list_children(group: ml.BudgetedTaskGroup) -> None:
        for _ in range(listings):
            start = _clock()
            snapshot = group.children()
            listing_times.append(_clock() - start)
            if len(snapshot) != n or snapshot[0].usage.allocated < 0:
                raise SystemExit(f"children() listed {len(snapshot)} of {n}")

    for variant in VARIANTS:  # warm up both code paths
        await lifetime(variant, min(n, 200), nothing)
    for variant in order:
        gc.collect()
        out[variant] = await lifetime(variant, n, nothing)
    gc.collect()
    await lifetime("budgeted", n, list_children)
    out["children"] = min(listing_times)
    return out


def collect_times(
    backends: list[str], rounds: int, n: int, listings: int
) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
    for r in range(rounds):
        for backend in backends if r % 2 == 0 else backends[::-1]:
            print(f"  round {r + 1}/{rounds}: {backend}", file=sys.stderr, flush=True)
            out[backend].append(anyio.run(_one_round, n, r, listings, backend=backend))
    return out


# ---- memory, in fresh interpreters ----


def rss() -> int:
    """This process's resident set size now, in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _probe(variant: str, n: int, measure: str) -> int:
    """Bytes held per idle child of ``variant`` (run in a fresh interpreter)."""
    await lifetime(variant, 100, nothing)  # imports, code paths, meter tables
    held: list[int] = []

    def reading() -> int:
        if measure == "tracemalloc":
            return tracemalloc.get_traced_memory()[0]
        return rss()

    async def idle(*_: object) -> None:
        gc.collect()
        held.append(reading() - before)

    gc.collect()
    if measure == "tracemalloc":
        tracemalloc.start()
    before = reading()
    await lifetime(variant, n, idle)
    return held[0] // n


def probe_memory(python: str, backend: str, variant: str, n: int, measure: str) -> int:
    result = subprocess.run(
        [
            python,
            str(Path(__file__).resolve()),
            "--probe",
            json.dumps([backend, variant, n, measure]),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"memory probe failed:\n{result.stderr}")
    return int(result.stdout.strip())


def collect_memory(
    backends: list[str], rounds: int, n: int
) -> dict[str, dict[str, dict[str, list[int]]]]:
    """backend -> measure -> variant -> bytes per idle child, per round."""
    out: dict[str, dict[str, dict[str, list[int]]]] = {}
    for backend in backends:
        out[backend] = {}
        for measure in ("tracemalloc", "rss"):
            out[backend][measure] = {variant: [] for variant in VARIANTS}
            for r in range(rounds):
                print(
                    f"  memory {measure} {r + 1}/{rounds}: {backend}",
                    file=sys.stderr,
                    flush=True,
                )
                for variant in VARIANTS[r % 3 :] + VARIANTS[: r % 3]:
                    out[backend][measure][variant].append(
                        probe_memory(sys.executable, backend, variant, n, measure)
                    )
    return out


# ---- the report ----


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _cell(spread: dict[str, float]) -> str:
    return f"{spread['median']:5.2f} [{spread['min']:.2f}-{spread['max']:.2f}]"


PHASES: dict[str, Callable[[tuple[float, float]], float]] = {
    "spawn": lambda pair: pair[0],
    "finish": lambda pair: pair[1],
    "total": lambda pair: pair[0] + pair[1],
}


def summary(
    n: int,
    times: dict[str, list[dict[str, Any]]],
    memory: dict[str, dict[str, dict[str, list[int]]]],
) -> dict[str, Any]:
    """Per backend: per phase the plain and budgeted ms and the ratios to
    plain; the ``children()`` time; bytes per idle child; the target."""
    figures: dict[str, Any] = {
        "python": sys.version.split()[0],
        "n": n,
        "rounds": len(next(iter(times.values()))),
        "backends": {},
    }
    worst = 0.0
    for backend, per_round in times.items():
        phases: dict[str, Any] = {}
        for phase, pick in PHASES.items():
            plain = [pick(r["plain"]) for r in per_round]
            ratios = {
                variant: _spread(
                    [
                        pick(r[variant]) / p
                        for r, p in zip(per_round, plain, strict=True)
                    ]
                )
                for variant in ("budgeted", "scoped")
            }
            if phase == "total":
                worst = max(worst, ratios["budgeted"]["median"])
            phases[phase] = {
                "plain_ms": statistics.median(plain) * 1e3,
                "budgeted_ms": statistics.median(pick(r["budgeted"]) for r in per_round)
                * 1e3,
                "budgeted_ratio": ratios["budgeted"],
                "scoped_ratio": ratios["scoped"],
            }
        listing = statistics.median(r["children"] for r in per_round)
        mem: dict[str, Any] = {}
        for measure, per_variant in memory.get(backend, {}).items():
            mem[measure] = {
                "plain": statistics.median(per_variant["plain"]),
                **{
                    f"more_{variant}": _spread(
                        [
                            b - p
                            for b, p in zip(
                                per_variant[variant], per_variant["plain"], strict=True
                            )
                        ]
                    )
                    for variant in ("budgeted", "scoped")
                },
            }
        figures["backends"][backend] = {
            "phases": phases,
            "children_ms": listing * 1e3,
            "memory": mem,
        }
    figures["target"] = ratio_target(TARGET_RATIO, worst)
    return figures


def render(figures: dict[str, Any]) -> str:
    n = figures["n"]
    lines = [
        f"Python {figures['python']}, anyio.run per backend; {n} children, "
        f"{figures['rounds']} rounds; ms = median over rounds; ratios to plain in "
        "the same round, median [min-max]; hand-scoped = a plain group whose "
        "children open limit_scope(budget=...) themselves (the floor a budget "
        "costs)",
    ]
    for backend, fig in figures["backends"].items():
        lines += [
            "",
            f"{backend}:",
            "",
            f"| {'phase':<8} | {'plain ms':>9} | {'budgeted ms':>11} | "
            f"{'budgeted ratio':<20} | {'hand-scoped ratio':<20} |",
            f"|{'-' * 10}|{'-' * 11}|{'-' * 13}|{'-' * 22}|{'-' * 22}|",
        ]
        for phase, row in fig["phases"].items():
            lines.append(
                f"| {phase:<8} | {row['plain_ms']:9.1f} | "
                f"{row['budgeted_ms']:11.1f} | {_cell(row['budgeted_ratio']):<20} | "
                f"{_cell(row['scoped_ratio']):<20} |"
            )
        listing = fig["children_ms"] / 1e3
        lines += [
            "",
            f"children() on {n} budgeted children: {listing * 1e3:.1f} ms per "
            f"call ({listing / n * 1e9:.0f} ns per child; called every second, "
            f"{listing * 100:.1f} % of one core)",
        ]
        for measure, mem in fig["memory"].items():
            budgeted, scoped = mem["more_budgeted"], mem["more_scoped"]
            lines.append(
                f"memory per idle child ({measure}): plain {mem['plain']:.0f} B; "
                f"more for a budgeted child {budgeted['median']:.0f} B "
                f"[{budgeted['min']:.0f}-{budgeted['max']:.0f}], of which its "
                f"limit_scope (hand-scoped) {scoped['median']:.0f} B"
            )
    target = figures["target"]
    lines += [
        "",
        f"target: spawning and finishing {n} budgeted children <= "
        f"{TARGET_RATIO:g}x a plain anyio task group ... "
        f"{verdict(target['met'])} (worst median {target['worst']:.3f}x)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help="interleaved rounds (9)")
    parser.add_argument("--n", type=int, help="children per group (10000)")
    parser.add_argument(
        "--memory-rounds", type=int, help="fresh interpreters per variant (3)"
    )
    add_run_options(
        parser, "defaults of 3 rounds of 2000 children, 1 memory round (smoke run)"
    )
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe is not None:  # one memory measurement, in this interpreter
        backend, variant, n, measure = json.loads(args.probe)
        print(anyio.run(_probe, variant, n, measure, backend=backend))
        return 0
    fill_counts(
        parser,
        args,
        {"rounds": 3, "n": 2000, "memory_rounds": 1},
        {"rounds": 9, "n": 10_000, "memory_rounds": 3},
    )
    backends = backends_of(args)
    print(
        f"groups: {args.rounds} rounds of {args.n} children, "
        f"{args.memory_rounds} memory rounds, backends {', '.join(backends)}",
        file=sys.stderr,
    )
    times = collect_times(backends, args.rounds, args.n, listings=5)
    memory = collect_memory(backends, args.memory_rounds, args.n)
    figures = summary(args.n, times, memory)
    if args.json is not None:
        args.json.write_text(
            json.dumps({"benchmark": "groups", "summary": figures}, indent=1)
        )
    print(render(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
