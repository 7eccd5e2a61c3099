"""The pytest plugin's cost on a whole suite, against plain pytest and
pytest-memray, in one run.

Run ``python benchmarks/pytest_plugin.py`` (``--quick`` for a smoke run).
Three ways of running the same suite, each in a fresh ``python -m pytest``
process, in interleaved rounds whose order rotates:

* **plain**: ``-p no:memlimits_async -p no:memray``;
* **memlimits**: the plugin with default limits on every test
  (``--limit-memory 1 GB --limit-allocations 100 GB --limit-time 60``,
  pytest-memray off), so each test runs in its own scope;
* **memray**: pytest-memray's ``--memray`` (this plugin off), if installed.

``--intervals "8 KiB,512,1"`` adds the plugin run again with
``--memlimits-sampling-interval`` at each of these sizes (1: exact
accounting), the finer figures ``--memlimits-fail-on-increase`` can compare
(docs/pytest.md); ``--without-memray`` leaves pytest-memray out.

The suite is generated (``--tests`` tests, a third each of sync,
pytest-asyncio and anyio tests, each allocating and freeing a few thousand
small objects and a few larger buffers), or given with ``--suite PATH`` (a
folder of tests, e.g. an unpacked sdist's tests: then every test that passes
plain should pass under the plugin; the outcome counts are printed for each
way).  Wall time of the whole process, interpreter start included, and
its CPU time (user + system, from ``getrusage`` of the children: steadier
than wall time on a shared machine); the ratio to plain is taken within
each round (wall: ``median [min-max]``).  The issue's target: at most
1.10x.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUITE = """
import asyncio

import anyio
import pytest


def work(n):
    rows = [str(i) * 3 for i in range(n)]
    blocks = [bytearray(50_000) for _ in range(20)]
    return len(rows) + len(blocks)


@pytest.mark.parametrize("n", range({count}))
def test_sync(n):
    assert work(2_000 + n) > 0


@pytest.mark.asyncio
@pytest.mark.parametrize("n", range({count}))
async def test_asyncio(n):
    await asyncio.sleep(0)
    assert work(2_000 + n) > 0


@pytest.mark.anyio
@pytest.mark.parametrize("n", range({count}))
async def test_anyio(n, anyio_backend):
    await anyio.sleep(0)
    assert work(2_000 + n) > 0


@pytest.fixture
def anyio_backend():
    return "asyncio"
"""

INI = """
[pytest]
asyncio_default_fixture_loop_scope = function
"""

WAYS = {
    "plain": ["-p", "no:memlimits_async", "-p", "no:memray"],
    "memlimits": [
        "-p",
        "no:memray",
        "--limit-memory",
        "1 GB",
        "--limit-allocations",
        "100 GB",
        "--limit-time",
        "60",
    ],
    "memray": ["-p", "no:memlimits_async", "--memray"],
}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(folder: Path, extra: list[str]) -> tuple[float, float, str]:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    cpu = _children_cpu()
    started = time.perf_counter()
    done = subprocess.run(
        [*command, *extra],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    elapsed = time.perf_counter() - started
    cpu = _children_cpu() - cpu
    lines = done.stdout.strip().splitlines()
    summary = lines[-1] if lines else done.stderr.strip()[-200:]
    return elapsed, cpu, re.sub(r" in [0-9.]+s.*", "", summary).strip("= ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tests", type=int, default=600, help="generated tests")
    parser.add_argument("--suite", type=Path, help="run this folder instead")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--intervals",
        default="",
        help="also run the plugin at these sampling intervals (comma-separated)",
    )
    parser.add_argument("--without-memray", action="store_true")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    count = max(1, (60 if args.quick else args.tests) // 3)
    ways = dict(WAYS)
    for size in filter(None, (each.strip() for each in args.intervals.split(","))):
        ways[f"R={size}"] = [*WAYS["memlimits"], "--memlimits-sampling-interval", size]
    if args.without_memray:
        del ways["memray"]
    elif importlib.util.find_spec("pytest_memray") is None:
        print("pytest-memray is not installed: measured without it")
        del ways["memray"]
    with tempfile.TemporaryDirectory() as temporary:
        if args.suite is not None:
            folder = args.suite.resolve()
        else:
            folder = Path(temporary)
            (folder / "test_generated.py").write_text(SUITE.format(count=count))
            (folder / "pytest.ini").write_text(INI)
        times: dict[str, list[float]] = {way: [] for way in ways}
        cpus: dict[str, list[float]] = {way: [] for way in ways}
        outcomes: dict[str, set[str]] = {way: set() for way in ways}
        names = list(ways)
        for index in range(rounds):
            order = names[index % len(names) :] + names[: index % len(names)]
            for way in order:
                elapsed, cpu, summary = run_once(folder, ways[way])
                times[way].append(elapsed)
                cpus[way].append(cpu)
                outcomes[way].add(summary)
    print(f"suite: {args.suite or f'{3 * count} generated tests'}, {rounds} rounds")
    header = "wall: median s, ratio [min-max]"
    print(f"{'way':10} {header:>34} {'CPU: median s, ratio':>24}  outcome")
    figures = {}
    for way in ways:
        ratios = [t / p for t, p in zip(times[way], times["plain"], strict=True)]
        cpu_ratios = [c / p for c, p in zip(cpus[way], cpus["plain"], strict=True)]
        median = statistics.median(ratios)
        cpu_median = statistics.median(cpu_ratios)
        print(
            f"{way:10} {statistics.median(times[way]):12.2f} "
            f"{median:7.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"
            f" {statistics.median(cpus[way]):15.2f} {cpu_median:7.2f}x"
            f"  {' | '.join(sorted(outcomes[way]))}"
        )
        figures[way] = {
            "seconds": times[way],
            "cpu_seconds": cpus[way],
            "ratio_median": median,
            "cpu_ratio_median": cpu_median,
            "outcomes": sorted(outcomes[way]),
        }
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
