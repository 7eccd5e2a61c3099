"""Reference-leak run: the test suite repeated in one process, looking for growth.

    python tools/refleak.py [--quick] [--rounds N] [--warmup W] [--tracemalloc]
                            [TEST-PATH-OR-PYTEST-ARG ...]

One pytest session collects the given tests (default: the whole suite) once
and runs them W + N times over (a "round" each, every fixture torn down at
its end).  After each round it collects garbage and reads:

* ``refs``: ``sys.gettotalrefcount()``, on a debug build of CPython only
  (``--with-pydebug``; the README says how to get one): every reference that
  the C meter takes and never gives back shows here;
* ``blocks``: ``sys.getallocatedblocks()``, the blocks pymalloc holds (every
  object that is never freed, container or not);
* ``gc_objects``: objects tracked by the garbage collector, counted by type
  to name what grows;
* ``tracked_blocks``, ``accounts``, ``tracebacks``: the meter's sampled
  blocks, live C accounts and interned allocating stacks still referred to
  (``_core.stats()``, ``_core.collect_tracebacks()``), which no
  Python-level count sees;
* ``fds`` and ``threads``: open file descriptors and live threads;
* with ``--tracemalloc``: bytes and blocks allocated from memlimits_async's
  own Python files (the tests that start and stop tracemalloc themselves are
  then left out).

The first W rounds are warm-up (caches fill, lazy imports happen), the last
of them the baseline.  A counter leaks if it grew in every judged round (a
small steady leak grows every time; noise goes up and down), or if it grew
on average by more than its noise allowance: EVERY_ROUND and NOISE_PER_ROUND
below, with the noise measured.  Exit status 1 if something leaks or a test
failed, else 0.  Tests that run a subprocess run too, but what leaks in the
subprocess is out of sight here.

``--quick``: the modules that exercise the meter in this process, 2 + 4
rounds (about 30 s on a release build); default: every module, 2 + 5 rounds
(seven times as long as the suite; a debug build is slower again).
"""

from __future__ import annotations

import argparse
import array
import collections
import gc
import itertools
import os
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
# The modules that drive the meter, scopes, tokens, the global limit, hook
# re-installation and delivery in this process (few or no subprocesses).
QUICK = [
    "test_exact.py",
    "test_scope.py",
    "test_sync.py",
    "test_tokens.py",
    "test_masking.py",
    "test_global_limit.py",
    "test_tracemalloc.py",
    "test_bad_input.py",
    "test_units.py",
    "test_huge_allocations.py",
    "test_refuse.py",
    "test_sites.py",
]
# Tests that start or stop tracemalloc themselves.
USES_TRACEMALLOC = ["test_tracemalloc.py", "test_sites.py"]
# How a counter is judged over the judged rounds.  Noise measured at steady
# state, from round to round: refs within +-6 (debug build 3.11), blocks
# within +-2 (3.13), gc_objects, fds 0, threads 0 (once +1 for a thread still
# ending, with its 42 blocks and 23 objects, on 3.12); tracked_blocks within +-8
# and accounts within +-5 over the whole suite (samples that happen to be
# alive, or parked in a free list, when they are read, and the closed
# accounts those keep); a leak of one object per test is hundreds per round.
#
# A counter leaks if it grew by at least EVERY_ROUND[name] in every judged
# round (a small steady leak: noise around a level goes up and down), or on
# average (least-squares slope) by more than NOISE_PER_ROUND[name] per round
# (a larger leak half hidden by noise).
EVERY_ROUND = {
    "refs": 1,
    "blocks": 3,
    "gc_objects": 1,
    "tracked_blocks": 3,
    "tracebacks": 3,
    "accounts": 3,
    "fds": 1,
    "threads": 1,
    "tracemalloc_blocks": 2,
}
NOISE_PER_ROUND: dict[str, float] = {
    "refs": 50,
    "blocks": 50,
    "gc_objects": 20,
    "tracked_blocks": 5,
    # Each tracked block, and each account's table of allocated bytes by
    # stack, holds interned stacks: samples alive by chance and closed
    # scopes not yet collected move it by up to 200 a round (3.13), 300 on
    # 3.14 and 3.15, where 4 judged rounds (--quick) gave least-squares
    # slopes of +70 and +103 with no growth (10 rounds on 3.15: deltas
    # +220 to -153, no trend).  A stack leaked per test would be over 400
    # every round (--quick runs 418 tests).
    "tracebacks": 150,
    "accounts": 5,
    # A thread or file still closing when the counters are read: once, not
    # every round (0.3 per round at most for a single step over 5 rounds).
    "fds": 0.5,
    "threads": 0.5,
    "tracemalloc_bytes": 2048,
    "tracemalloc_blocks": 20,
}


def use_in_place_build() -> None:
    """Import memlimits_async from this checkout if it is built in place for
    this interpreter (as ``python -m pytest`` from the checkout would), else
    from wherever it is installed."""
    import importlib.machinery

    meter = ROOT / "memlimits_async" / "_meter"
    if any(
        (meter / f"_core{suffix}").exists()
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
    ):
        sys.path.insert(0, str(ROOT))


def clear_caches() -> None:
    """Empty the caches that fill as a function of what ran (as regrtest)."""
    import linecache
    import re as re_module
    import typing

    re_module.purge()
    linecache.clearcache()
    for cleanup in getattr(typing, "_cleanups", []):
        cleanup()
    # 3.13 deprecated sys._clear_type_cache() for _clear_internal_caches()
    # (which regrtest calls) and warns at every call.
    clear_internal = getattr(sys, "_clear_internal_caches", None)
    (clear_internal or sys._clear_type_cache)()
    for _ in range(5):
        if gc.collect() == 0:
            break


def meter_counters() -> dict[str, int]:
    from memlimits_async._meter import _core

    # Interned stacks no block or account refers to any more go now, as at
    # the meter's upkeep: what is left is what something still holds.
    tracebacks = _core.collect_tracebacks()
    raw = _core.stats()
    counters = {"tracked_blocks": raw["tracked_blocks"], "tracebacks": tracebacks}
    if "live_accounts" in raw:
        counters["accounts"] = raw["live_accounts"]
    return counters


def measure(use_tracemalloc: bool) -> tuple[dict[str, int], collections.Counter[str]]:
    clear_caches()
    by_type = collections.Counter(
        sys.intern(f"{type(o).__module__}.{type(o).__qualname__}")
        for o in gc.get_objects()
    )
    counters: dict[str, int] = {}
    gettotalrefcount: Callable[[], int] | None = getattr(sys, "gettotalrefcount", None)
    if gettotalrefcount is not None:
        counters["refs"] = gettotalrefcount()
    counters["blocks"] = sys.getallocatedblocks()
    counters["gc_objects"] = sum(by_type.values())
    counters.update(meter_counters())
    counters["fds"] = len(os.listdir("/proc/self/fd"))
    counters["threads"] = threading.active_count()
    if use_tracemalloc and tracemalloc.is_tracing():
        package = str(ROOT / "memlimits_async")
        import memlimits_async

        installed = str(Path(memlimits_async.__file__).parent)
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [
                tracemalloc.Filter(True, package + "/*"),
                tracemalloc.Filter(True, installed + "/*"),
            ]
        )
        stats = snapshot.statistics("filename")
        counters["tracemalloc_bytes"] = sum(s.size for s in stats)
        counters["tracemalloc_blocks"] = sum(s.count for s in stats)
    return counters, by_type


def slope(values: Sequence[int]) -> float:
    """Least-squares growth per round."""
    n = len(values)
    mean_x = (n - 1) / 2
    mean_y = sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    den = sum((i - mean_x) ** 2 for i in range(n))
    return num / den if den else 0.0


# Extensions built for a release CPython, whose Py_DECREF does not count a
# debug build's total down while the objects they create count it up: numpy
# reads as one reference leaked per array, with or without the meter.
RELEASE_BUILT = ("numpy",)


def judge(series: dict[str, list[int]]) -> list[str]:
    """The counters that leak (EVERY_ROUND, NOISE_PER_ROUND)."""
    leaks = []
    for name, values in series.items():
        deltas = [b - a for a, b in itertools.pairwise(values)]
        if not deltas:
            continue
        growth = slope(values)
        allowance = NOISE_PER_ROUND.get(name, 0)
        step = EVERY_ROUND.get(name)
        if (step is not None and min(deltas) >= step) or growth > allowance:
            leaks.append(
                f"{name}: deltas {deltas}, {growth:+.1f} per round on average "
                f"(noise allowed: {allowance}"
                + (f"; a leak if >= {step} in every round)" if step else ")")
            )
    return leaks


class Repeater:
    """pytest plugin: the collected tests, run again and again in one session.

    Collection happens once, so collecting does not add to what is measured.
    Each round runs every selected test and ends with a teardown of every
    fixture (session-scoped ones included, as at the end of a session), then
    the counters are read.  The terminal reporter keeps the reports of the
    last round and of every failure (it would keep them all), and items do
    not accumulate captured-output sections over their runs.
    """

    def __init__(self, rounds: int, warmup: int, use_tracemalloc: bool) -> None:
        self.rounds = rounds
        self.warmup = warmup
        self.use_tracemalloc = use_tracemalloc
        # Fixed-size storage, set up at the base round, so that keeping the
        # results does not grow what they count: one slot per judged round
        # and the base.
        self.series: dict[str, array.array[int]] = {}
        self.judged = 0
        # gc objects by type: the last round's counts, and the growth of the
        # types that grew in every judged round so far (type names interned,
        # so that each round's keys are the previous round's strings).
        self.last_types: collections.Counter[str] = collections.Counter()
        self.growing: dict[str, int] = {}
        self.failed_rounds = 0

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        if (
            session.testsfailed
            and not session.config.option.continue_on_collection_errors
        ):
            raise session.Interrupted(f"{session.testsfailed} errors in collection")
        if session.config.option.collectonly:
            return True
        items = session.items
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        for round_ in range(self.rounds):
            started = time.monotonic()
            failed_before = session.testsfailed
            if reporter is not None:  # one round's reports, and every failure
                for category in list(reporter.stats):
                    if category not in ("failed", "error"):
                        del reporter.stats[category]
            for i, item in enumerate(items):
                item._report_sections = []
                nextitem = items[i + 1] if i + 1 < len(items) else None
                item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
                if session.shouldfail or session.shouldstop:
                    raise session.Failed(str(session.shouldfail or session.shouldstop))
            counters, by_type = measure(self.use_tracemalloc)
            if round_ == self.warmup - 1:
                # The last warm-up round is the base.  The bookkeeping is set
                # up before the base is read, so that what it holds is in
                # the base, never in a delta.
                self.start(counters, by_type)
                del by_type
                counters, by_type = measure(self.use_tracemalloc)
            if round_ >= self.warmup - 1:
                self.record(counters, by_type)
            self.last_types = by_type
            del by_type
            failures = session.testsfailed - failed_before
            self.failed_rounds += failures > 0
            kind = "warm-up" if round_ < self.warmup else "judged"
            shown = " ".join(f"{k}={v}" for k, v in counters.items())
            print(
                f"\nrefleak: round {round_ + 1} ({kind}): {len(items)} tests, "
                f"{failures} failed, {time.monotonic() - started:.1f} s, {shown}",
                flush=True,
            )
        return True

    def start(
        self, counters: dict[str, int], by_type: collections.Counter[str]
    ) -> None:
        slots = self.rounds - self.warmup + 1
        for name in counters:
            self.series[name] = array.array("q", bytes(8 * slots))
        self.growing = dict.fromkeys(by_type, 0)

    def record(
        self, counters: dict[str, int], by_type: collections.Counter[str]
    ) -> None:
        for name, value in counters.items():
            self.series[name][self.judged] = value
        if self.judged > 0:
            last = self.last_types
            for name in list(self.growing):
                grew = by_type[name] - last[name]
                if grew > 0:
                    self.growing[name] += grew
                else:
                    del self.growing[name]
        self.judged += 1

    def results(self) -> dict[str, list[int]]:
        return {name: list(a[: self.judged]) for name, a in self.series.items()}

    def growing_types(self, limit: int = 15) -> list[str]:
        """Types whose number of gc objects grew in every judged round."""
        names = sorted(self.growing, key=lambda n: -self.growing[n])[:limit]
        return [f"  {n}: +{self.growing[n]}, now {self.last_types[n]}" for n in names]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="in-process modules")
    parser.add_argument("--rounds", type=int, help="judged rounds (default 5, quick 4)")
    parser.add_argument("--warmup", type=int, default=2, help="rounds not judged")
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="also count what memlimits_async's Python files allocate",
    )
    parser.add_argument("pytest_args", nargs="*", help="test paths, pytest options")
    args = parser.parse_args(argv)
    rounds = args.rounds or (4 if args.quick else 5)
    if rounds < 2 or args.warmup < 1:
        parser.error("--rounds must be at least 2 and --warmup at least 1")

    os.chdir(ROOT)
    pytest_args = list(args.pytest_args)
    if not any(not a.startswith("-") for a in pytest_args):
        modules = (
            QUICK if args.quick else sorted(p.name for p in TESTS.glob("test_*.py"))
        )
        if args.tracemalloc:
            modules = [m for m in modules if m not in USES_TRACEMALLOC]
        pytest_args += [f"tests/{m}" for m in modules]
    pytest_args = ["-q", "-p", "no:cacheprovider", "--no-header", *pytest_args]

    use_in_place_build()
    import memlimits_async

    print(
        f"refleak: Python {sys.version.split()[0]}"
        f"{' (debug build)' if hasattr(sys, 'gettotalrefcount') else ''}, "
        f"memlimits_async from {Path(memlimits_async.__file__).parent}, "
        f"{args.warmup} warm-up + {rounds} judged rounds of: "
        f"pytest {' '.join(pytest_args)}",
        flush=True,
    )
    if args.tracemalloc:
        tracemalloc.start(1)
    repeater = Repeater(args.warmup + rounds, args.warmup, args.tracemalloc)
    rc = pytest.main(pytest_args, plugins=[repeater])
    if args.tracemalloc:
        tracemalloc.stop()

    series = repeater.results()
    for name, values in series.items():
        deltas = [b - a for a, b in itertools.pairwise(values)]
        print(f"refleak: {name:>18}: deltas per round {deltas}")
    if rc != 0 or repeater.failed_rounds or len(next(iter(series.values()), [])) < 2:
        print(f"refleak: FAILED: the tests did not pass (pytest exit {int(rc)})")
        return 1
    distorting = [name for name in RELEASE_BUILT if name in sys.modules]
    if "refs" in series and distorting:
        print(
            f"refleak: refs not judged: {', '.join(distorting)}, built for a "
            "release CPython, was loaded (the other counters still are; leave "
            "out its tests to judge refs)"
        )
        del series["refs"]
    leaks = judge(series)
    if leaks:
        print("refleak: FAILED: growth with the number of rounds:")
        for leak in leaks:
            print(f"  {leak}")
        types_ = repeater.growing_types()
        if types_:
            print("refleak: gc objects whose number grew in every judged round:")
            print("\n".join(types_))
        return 1
    print("refleak: no growth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
