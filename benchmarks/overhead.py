"""What the allocation meter costs an allocation-heavy program, against tracemalloc.

Run ``python benchmarks/overhead.py`` (``--quick`` for a smoke run).  It prints,
per workload, how much slower the workload runs with the meter live and with
``tracemalloc.start(1)``, as ratios to the same workload without either.

Why it is built this way:

* Each configuration runs in its own fresh interpreter: the meter's allocator
  hooks are never uninstalled once a scope has installed them, so a process
  that has metered once is metered forever.
* ``baseline`` never imports ``memlimits_async``; ``meter`` runs every workload
  inside ``limit_scope(memory="8 GiB")`` (``async with`` in the main task for
  the asyncio workload), so the hooks are installed, samples are attributed to
  a live account and live bytes are tracked.  A limit that large keeps the
  sampling interval at its 64 KiB default (it only drops to limit/1200 when
  that is smaller), which is the configuration the issue's target is about.
* The machine is noisy (2 shared cores), so: configurations are interleaved
  round-robin over several rounds (a slow spell hits all of them alike), each
  process keeps the *minimum* of several repetitions of each workload (outside
  interference only ever adds time), ratios are taken within a round and the
  *median* over rounds is reported.  Absolute times are never compared across
  runs; only ratios are printed.
* A ``control`` workload that allocates nothing shows the noise floor (code
  layout, CPU frequency): it is printed but left out of the geometric mean.
* ``memray``, when the interpreter can import it, is a second reference:
  every workload runs under ``memray.Tracker`` with its default options
  (no native traces, Python allocators not traced one by one) writing to a
  temporary file, as ``memray run`` would.  Without memray the column is
  left out, with a note.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

CONFIGS = ("baseline", "meter", "tracemalloc", "memray", "hooks_idle")
"""Baseline first: every ratio is against it."""
COLUMNS = {
    "meter": "meter (64 KiB, live)",
    "tracemalloc": "tracemalloc.start(1)",
    "memray": "memray.Tracker",
    "hooks_idle": "hooks, no scope",
}
OPTIONAL = {"memray": "memray"}
"""Configurations that need a module the interpreter may not have."""

SCOPE_MEMORY = "8 GiB"
"""Large enough never to breach and to leave the interval at its default."""

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------
# Workloads.  Each takes a size and returns a number derived from what it
# built, so nothing it allocates is pointless; sizes are chosen so that one
# repetition takes roughly 20-40 ms on CPython 3.11 without any hook.


class _Node:
    """A small ordinary class (instance dict, a list attribute)."""

    def __init__(self, value: int, label: str) -> None:
        self.value = value
        self.label = label
        self.children: list[_Node] = []


def w_objects(n: int) -> int:
    """Object churn: many short-lived small instances, a tree at a time."""
    total = 0
    for i in range(n):
        root = _Node(i, "root")
        for j in range(20):
            root.children.append(_Node(j, "leaf"))
        total += len(root.children)
    return total


def w_dicts(n: int) -> int:
    """Dict and list building: rows, an index over them, grouped buckets."""
    rows: list[dict[str, Any]] = []
    for i in range(n):
        rows.append({"id": i, "name": "user", "score": i * 0.5, "tags": ["a", i]})
    index = {row["id"]: row for row in rows}
    buckets: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        buckets.setdefault(row["id"] % 17, []).append(row)
    return len(index) + len(buckets)


_DOC: dict[str, Any] = {
    "users": [
        {
            "id": i,
            "name": f"user{i}",
            "email": f"user{i}@example.org",
            "roles": ["admin", "dev"],
            "meta": {"age": i, "active": bool(i % 2), "score": i * 1.5},
        }
        for i in range(50)
    ],
    "total": 50,
}


def w_json(n: int) -> int:
    """JSON round trips of a nested document (C encoder and decoder)."""
    total = 0
    for _ in range(n):
        total += len(json.loads(json.dumps(_DOC))["users"])
    return total


def w_strings(n: int) -> int:
    """String work: formatting, join, split, partition, case and replace."""
    total = 0
    for i in range(n):
        parts = [f"{k}={i * k:04d}" for k in range(20)]
        line = ",".join(parts)
        pairs = [field.partition("=") for field in line.split(",")]
        total += len(line.upper().replace("=", ":")) + len(pairs)
    return total


def w_control(n: int) -> int:
    """No allocation at all: ``repeat`` yields one object and every
    intermediate int stays below 257, in CPython's small-int cache.  Its ratio
    is the noise floor (code layout, CPU frequency), not the meter's cost."""
    x = 0
    for _ in itertools.repeat(None, n):
        x = ((x ^ 0x5A) + 3) & 127
    return x


async def _small_task(i: int) -> int:
    items: list[dict[str, Any]] = []
    for step in range(5):
        items.append({"task": i, "step": step, "data": [step] * 4})
        await asyncio.sleep(0)
    return len(items)


async def w_asyncio(batches: int) -> int:
    """Many tasks: batches of 200 tasks that build small structures and yield."""
    total = 0
    for _ in range(batches):
        total += sum(await asyncio.gather(*(_small_task(i) for i in range(200))))
    return total


SYNC_WORKLOADS: dict[str, tuple[Callable[[int], int], int]] = {
    "objects": (w_objects, 6000),
    "dicts": (w_dicts, 40000),
    "json": (w_json, 250),
    "strings": (w_strings, 3000),
    "control": (w_control, 1_500_000),
}
ASYNC_WORKLOAD = ("asyncio", w_asyncio, 15)
WORKLOADS = (*SYNC_WORKLOADS, ASYNC_WORKLOAD[0])
CONTROL = "control"


# ---------------------------------------------------------------------------
# Worker: one configuration, one fresh interpreter, JSON on stdout.


def _time_sync(fn: Callable[[int], int], n: int, reps: int) -> list[float]:
    """One warm-up, then ``reps`` timed runs, each after a full collection
    so that no run pays for the garbage of the previous one."""
    fn(n)
    times = []
    for _ in range(reps):
        gc.collect()
        start = time.perf_counter()
        fn(n)
        times.append(time.perf_counter() - start)
    return times


async def _time_async(
    fn: Callable[[int], Awaitable[int]], n: int, reps: int
) -> list[float]:
    await fn(n)
    times = []
    for _ in range(reps):
        gc.collect()
        start = time.perf_counter()
        await fn(n)
        times.append(time.perf_counter() - start)
    return times


def _import_package() -> Any:
    """The package under test: installed, or else this checkout (built in
    place with ``setup.py build_ext --inplace``)."""
    try:
        import memlimits_async
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))
        import memlimits_async
    return memlimits_async


def run_worker(config: str, reps: int, scale: float) -> dict[str, Any]:
    """Run every workload under ``config`` and return min/median times.

    For ``meter`` the scope is entered around the repetitions of each workload
    (not around the whole process), so each workload is charged to an account
    of its own and its estimated allocated bytes can be reported as evidence
    that attribution really happened.  For ``hooks_idle`` one empty scope
    installs the hooks and the workloads then run outside any scope: what
    code pays once some other part of the program has used a scope.
    """
    ml: Any = None
    tracker: Any = None
    capture_dir = capture = Path()
    if config == "tracemalloc":
        import tracemalloc

        tracemalloc.start(1)
    elif config == "memray":
        import memray

        capture_dir = Path(tempfile.mkdtemp(prefix="overhead-memray-"))
        capture = capture_dir / "capture.bin"
        tracker = memray.Tracker(capture)
        tracker.__enter__()
    elif config in ("meter", "hooks_idle"):
        ml = _import_package()
        if config == "hooks_idle":
            with ml.limit_scope():
                pass
    elif config != "baseline":
        raise SystemExit(f"unknown configuration {config!r}")
    metered = config == "meter"

    def scope() -> AbstractContextManager[Any]:
        if not metered:
            return nullcontext()
        return ml.limit_scope(memory=SCOPE_MEMORY)  # type: ignore[no-any-return]

    times: dict[str, list[float]] = {}
    evidence: dict[str, Any] = {}
    allocated: dict[str, int] = {}
    for name, (fn, size) in SYNC_WORKLOADS.items():
        n = max(1, round(size * scale))
        with scope() as sc:
            times[name] = _time_sync(fn, n, reps)
            if metered:
                evidence.setdefault("interval_in_scope", ml.stats().sampling_interval)
        if metered:
            allocated[name] = sc.usage.allocated

    async_name, async_fn, async_size = ASYNC_WORKLOAD
    n_async = max(1, round(async_size * scale))

    async def async_main() -> list[float]:
        if not metered:
            return await _time_async(async_fn, n_async, reps)
        async with ml.limit_scope(memory=SCOPE_MEMORY) as sc:
            result = await _time_async(async_fn, n_async, reps)
        allocated[async_name] = sc.usage.allocated
        return result

    times[async_name] = asyncio.run(async_main())

    if ml is not None:
        st = ml.stats()
        evidence.update(
            allocated_estimate=allocated,
            hooks_installed=st.hooks_installed,
            samples=st.samples,
            unattributed_samples=st.unattributed_samples,
            tracked_blocks=st.tracked_blocks,
            configured_interval=st.configured_sampling_interval,
        )
    if config == "tracemalloc":
        import tracemalloc

        evidence["tracing"] = tracemalloc.is_tracing()
    if config == "baseline":
        evidence["package_imported"] = "memlimits_async" in sys.modules
    if tracker is not None:
        import memray

        tracker.__exit__(None, None, None)
        evidence["capture_bytes"] = capture.stat().st_size
        reader = memray.FileReader(capture)
        evidence["total_allocations"] = reader.metadata.total_allocations
        reader.close()
        shutil.rmtree(capture_dir)
    return {
        "config": config,
        "python": sys.version.split()[0],
        "min": {k: min(v) for k, v in times.items()},
        "median": {k: statistics.median(v) for k, v in times.items()},
        "evidence": evidence,
    }


# ---------------------------------------------------------------------------
# Driver: interleaved rounds of fresh processes, ratios, tables.


def _child_env() -> dict[str, str]:
    """The children's environment, with a fixed hash seed: the same dict and
    set layouts in every configuration and round."""
    env = dict(os.environ)
    env["PYTHONHASHSEED"] = "0"
    return env


def _run_child(
    python: str, config: str, reps: int, scale: float, env: dict[str, str]
) -> dict[str, Any]:
    cmd = [
        python,
        str(Path(__file__).resolve()),
        "--worker",
        config,
        "--reps",
        str(reps),
        "--scale",
        str(scale),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(
            f"worker {config!r} failed (exit {proc.returncode}):\n{proc.stderr}"
        )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def available_configs(python: str) -> tuple[tuple[str, ...], list[str]]:
    """The configurations ``python`` can run, and a note per one left out."""
    configs: list[str] = []
    notes: list[str] = []
    for config in CONFIGS:
        module = OPTIONAL.get(config)
        if module is not None:
            probe = subprocess.run(
                [python, "-c", f"import {module}"], capture_output=True, check=False
            )
            if probe.returncode != 0:
                notes.append(
                    f"{COLUMNS[config]}: left out ({module} is not importable "
                    f"by {python})"
                )
                continue
        configs.append(config)
    return tuple(configs), notes


def _rotations(rounds: int, configs: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    """Round r starts with config r mod len(configs), so no configuration
    always runs first (cold caches) or last (after the others heated the
    CPU)."""
    for r in range(rounds):
        k = r % len(configs)
        yield configs[k:] + configs[:k]


def geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


Results = list[dict[str, dict[str, Any]]]
"""One dict config -> worker result per round."""


def collect(
    python: str, rounds: int, reps: int, scale: float, configs: tuple[str, ...]
) -> Results:
    """Run ``rounds`` interleaved rounds of ``configs``."""
    env = _child_env()
    results: Results = []
    for r, order in enumerate(_rotations(rounds, configs), 1):
        this_round: dict[str, dict[str, Any]] = {}
        for config in order:
            print(f"  round {r}/{rounds}: {config} ...", file=sys.stderr, flush=True)
            this_round[config] = _run_child(python, config, reps, scale, env)
        results.append(this_round)
    return results


def _columns(results: Results) -> list[str]:
    return [c for c in COLUMNS if c in results[0]]


def ratios(results: Results, stat: str = "min") -> dict[str, dict[str, list[float]]]:
    """config -> workload -> one ratio to baseline per round (same round)."""
    out: dict[str, dict[str, list[float]]] = {}
    for config in _columns(results):
        out[config] = {
            w: [rnd[config][stat][w] / rnd["baseline"][stat][w] for rnd in results]
            for w in WORKLOADS
        }
    return out


def summary(results: Results, notes: list[str]) -> dict[str, Any]:
    """The figures of the report: per workload and configuration the median
    ratio over rounds with its range, the geometric means, the target."""
    per_round = ratios(results)
    columns = _columns(results)
    cells = {
        w: {
            c: {
                "median": statistics.median(per_round[c][w]),
                "min": min(per_round[c][w]),
                "max": max(per_round[c][w]),
            }
            for c in columns
        }
        for w in WORKLOADS
    }
    gm = {
        c: geomean([cells[w][c]["median"] for w in WORKLOADS if w != CONTROL])
        for c in columns
    }
    return {
        "python": results[0]["baseline"]["python"],
        "rounds": len(results),
        "columns": {c: COLUMNS[c] for c in columns},
        "workloads": cells,
        "control": CONTROL,
        "geomean": gm,
        "target": {"geomean": 1.05, "met": gm["meter"] <= 1.05},
        "notes": notes,
        "sanity": _evidence(results),
    }


def render(figures: dict[str, Any]) -> str:
    """The table: median ratio over rounds, with the range over rounds."""
    columns = figures["columns"]
    width = 22
    lines = [
        f"Python {figures['python']}: {figures['rounds']} rounds; "
        "ratio = time / baseline time in the same round "
        "(min of repetitions per process), median over rounds [min-max]",
        "",
        "| "
        + " | ".join(
            [f"{'workload':<10}"] + [f"{c:<{width}}" for c in columns.values()]
        )
        + " |",
        "|" + "|".join(["-" * 12] + ["-" * (width + 2)] * len(columns)) + "|",
    ]
    for w, row in figures["workloads"].items():
        cells = [f"({w})" if w == CONTROL else w]
        for config in columns:
            c = row[config]
            cells.append(f"{c['median']:6.3f} [{c['min']:.3f}-{c['max']:.3f}]")
        lines.append(
            f"| {cells[0]:<10} | "
            + " | ".join(f"{c:<{width}}" for c in cells[1:])
            + " |"
        )
    gm = figures["geomean"]
    lines.append(
        f"| {'geomean':<10} | "
        + " | ".join(f"{gm[c]:6.3f}{'':<{width - 6}}" for c in columns)
        + " |"
    )
    verdict = "met" if figures["target"]["met"] else "NOT met"
    lines += [
        "",
        'meter: every workload inside limit_scope(memory="8 GiB"): hooks, '
        "attribution and live tracking on, interval 64 KiB.",
    ]
    if "memray" in columns:
        lines.append(
            "memray.Tracker: every workload under memray's tracker, default "
            "options (no native traces, Python allocators not traced one by "
            "one), capture written to a temporary file."
        )
    lines += [
        "hooks, no scope: hooks installed by an earlier scope, workloads outside "
        "any scope (diagnostic).",
        "(control) allocates nothing: its distance from 1.000 is the noise "
        "floor; it is left out of the geometric means.",
        *figures["notes"],
        f"target: meter geomean <= 1.05 ... {verdict} ({gm['meter']:.4f})",
        "",
        "sanity (last round):",
        *(f"  {line}" for line in figures["sanity"]),
    ]
    return "\n".join(lines)


def _evidence(results: Results) -> list[str]:
    """One line per configuration proving it measured what it claims."""
    last = results[-1]
    meter = last["meter"]["evidence"]
    idle = last["hooks_idle"]["evidence"]
    mib = {w: v / 2**20 for w, v in meter["allocated_estimate"].items()}
    charged = ", ".join(f"{w} {v:.0f}" for w, v in mib.items())
    lines = [
        f"baseline: memlimits_async imported = "
        f"{last['baseline']['evidence']['package_imported']}",
        f"meter: hooks installed = {meter['hooks_installed']}, interval in "
        f"scope = {meter['interval_in_scope']} B, samples charged = "
        f"{meter['samples']}, unattributed = {meter['unattributed_samples']}",
        f"meter: MiB allocated charged to each workload's scope: {charged}",
        f"hooks, no scope: hooks installed = {idle['hooks_installed']}, "
        f"samples charged = {idle['samples']}, unattributed = "
        f"{idle['unattributed_samples']}, tracked blocks = "
        f"{idle['tracked_blocks']}",
        f"tracemalloc: tracing = {last['tracemalloc']['evidence']['tracing']}",
    ]
    if "memray" in last:
        memray = last["memray"]["evidence"]
        lines.append(
            f"memray: allocations recorded = {memray['total_allocations']}, "
            f"capture file {memray['capture_bytes']} B"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help="interleaved rounds (7)")
    parser.add_argument("--reps", type=int, help="repetitions per process (7)")
    parser.add_argument("--scale", type=float, help="multiply workload sizes (1.0)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="defaults of 2 rounds, 3 reps, scale 0.5 (a smoke run)",
    )
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter to benchmark"
    )
    parser.add_argument(
        "--json", type=Path, help="also write the figures and raw results here"
    )
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    defaults = (2, 3, 0.5) if args.quick else (7, 7, 1.0)
    for name, default in zip(("rounds", "reps", "scale"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.worker is not None:
        print(json.dumps(run_worker(args.worker, args.reps, args.scale)))
        return 0
    if args.rounds < 1 or args.reps < 1 or args.scale <= 0:
        parser.error("--rounds and --reps must be >= 1, --scale > 0")
    configs, notes = available_configs(args.python)
    print(
        f"overhead: {args.rounds} rounds x {len(configs)} configs, "
        f"{args.reps} reps, scale {args.scale} ({args.python})",
        file=sys.stderr,
    )
    results = collect(args.python, args.rounds, args.reps, args.scale, configs)
    figures = summary(results, notes)
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {"benchmark": "overhead", "summary": figures, "raw": results},
                indent=1,
            )
        )
    print(render(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
