"""Run every benchmark of memlimits_async and print all their tables.

``python benchmarks/run_all.py`` runs, with each interpreter given by
``--python`` (repeatable; default: the one running this script):

* ``overhead.py``: what the meter costs an allocation-heavy program, next to
  ``tracemalloc.start(1)`` and (if installed) memray;
* ``scope_cost.py``: what entering and leaving a ``limit_scope`` costs;
* ``latency.py``: how soon a cancelled token stops a task blocked in
  ``await``, and code that never awaits (preemption);
* ``groups.py``: what budgeted children of a task group cost, and the memory
  per idle scope;
* ``many_tasks.py``: 100,000 concurrent tasks with and without a scope each
  (time and peak RSS);
* ``scale.py``: up to 100,000 scoped tasks whose timeouts fire or not, a
  stalled loop and one token for many scopes, next to ``anyio.move_on_after``
  and ``asyncio.timeout``, on asyncio's loop and uvloop;
* ``accuracy.py --intervals-only``: the meter's estimates against exact
  accounting at several sampling intervals.

Each benchmark runs as a child process of its own, in the interpreter it
measures (most start fresh interpreters of it too), and passes its tables
through.  Each also writes its figures as JSON (``--json``); from those this
script builds one Markdown report, which starts with a description of the
machine and the interpreters.  ``--write-docs`` puts the report into
``docs/performance.md`` between the lines ``<!-- run_all:begin -->`` and
``<!-- run_all:end -->``, leaving the rest of the page alone; without it the
report is printed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
DOCS = REPO_ROOT / "docs" / "performance.md"
BEGIN = "<!-- run_all:begin -->"
END = "<!-- run_all:end -->"
BENCHMARKS = (
    "overhead.py",
    "scope_cost.py",
    "latency.py",
    "groups.py",
    "many_tasks.py",
    "scale.py",
    "accuracy.py",
)
VERSIONS_OF = ("anyio", "trio", "uvloop", "numpy", "scipy", "memray")

_INTERPRETER_PROBE = f"""
import json, platform, sys, sysconfig
from importlib import metadata
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
config = sysconfig.get_config_var("CONFIG_ARGS") or ""
print(json.dumps({{
    "version": platform.python_version(),
    "implementation": platform.python_implementation(),
    "compiler": platform.python_compiler(),
    "build_date": platform.python_build()[1],
    "pgo": "--enable-optimizations" in config,
    "lto": "--with-lto" in config,
    "shared": "--enable-shared" in config,
    "executable": sys.executable,
    "packages": {{name: version(name) for name in {VERSIONS_OF!r}}},
}}))
"""


# ---------------------------------------------------------------------------
# Running.


def _describe_interpreter(python: str) -> dict[str, Any]:
    out = subprocess.run(
        [python, "-c", _INTERPRETER_PROBE],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    info: dict[str, Any] = json.loads(out)
    return info


def _read_proc(path: str, key: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def _now() -> str:
    return f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"


def describe_machine() -> dict[str, Any]:
    """CPU, cores, RAM, kernel, C library, package commit, load, date."""
    flags = _read_proc("/proc/cpuinfo", "flags") or ""
    mem_kib = _read_proc("/proc/meminfo", "MemTotal")
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "not a git checkout"
    return {
        "cpu": _read_proc("/proc/cpuinfo", "model name") or platform.processor(),
        "cpu_mhz": _read_proc("/proc/cpuinfo", "cpu MHz"),
        "hypervisor": "hypervisor" in flags.split(),
        "cpus": os.cpu_count(),
        "ram_gib": int(mem_kib.split()[0]) / 2**20 if mem_kib else None,
        "kernel": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "libc": " ".join(platform.libc_ver()),
        "commit": commit,
        "load_start": os.getloadavg(),
        "start": _now(),
    }


def _command(script: str, python: str, args: argparse.Namespace) -> list[str]:
    cmd = [python, str(HERE / script)]
    if args.quick:
        cmd.append("--quick")
    if script == "accuracy.py":
        return [*cmd, "--intervals-only"]  # a probability study: no --rounds
    if args.rounds is not None:
        cmd += ["--rounds", str(args.rounds)]
    if script == "overhead.py":
        cmd += ["--python", python]
    return cmd


def run(args: argparse.Namespace, results: Path) -> int:
    """Run every benchmark under every interpreter; JSON into ``results``."""
    machine = describe_machine()
    machine["command"] = shlex.join(["python", "benchmarks/run_all.py", *args.argv])
    interpreters = []
    failures = 0
    for i, python in enumerate(args.python or [sys.executable]):
        info = _describe_interpreter(python)
        info["failed"] = []
        begin = time.monotonic()
        for script in BENCHMARKS:
            title = f"== {script} ({python}) "
            print(f"\n{title}{'=' * max(0, 78 - len(title))}\n", flush=True)
            out = results / f"{i}-{script.removesuffix('.py')}.json"
            cmd = [*_command(script, python, args), "--json", str(out)]
            # Progress goes to stderr, tables to stdout; both pass through.
            rc = subprocess.run(cmd, check=False).returncode
            if rc != 0:
                print(f"{script} failed with exit status {rc}", flush=True)
                info["failed"].append(script)
                failures += 1
        info["minutes"] = (time.monotonic() - begin) / 60
        interpreters.append(info)
    machine["load_end"] = os.getloadavg()
    machine["end"] = _now()
    machine["quick"] = args.quick
    machine["interpreters"] = interpreters
    (results / "machine.json").write_text(json.dumps(machine, indent=1))
    return failures


def load(results: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The machine, and per interpreter its description and figures."""
    machine: dict[str, Any] = json.loads((results / "machine.json").read_text())
    runs = []
    for i, info in enumerate(machine["interpreters"]):
        figures: dict[str, Any] = {}
        for script in BENCHMARKS:
            name = script.removesuffix(".py")
            path = results / f"{i}-{name}.json"
            if path.exists():
                figures[name] = json.loads(path.read_text())
        runs.append({"info": info, "figures": figures})
    return machine, runs


# ---------------------------------------------------------------------------
# The Markdown report.


def _spread(s: dict[str, float], digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "not checked"}[met]


def _target_lines(
    have: list[dict[str, Any]],
    target_of: Callable[[dict[str, Any]], dict[str, Any]],
    label: str = "Target",
    *,
    worst: bool = True,
) -> list[str]:
    """One line per interpreter: whether its run met the target (found by
    ``target_of`` in its figures), with the worst median ratio if ``worst``."""
    lines = []
    for r in have:
        target = target_of(r["figures"])
        detail = f" (worst median {target['worst']:.2f}x)" if worst else ""
        lines.append(
            f"{label}, {r['info']['version']}: {_verdict(target['met'])}{detail}."
        )
    return lines


def _machine_section(machine: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
    cpu = machine["cpu"]
    if machine.get("cpu_mhz"):
        cpu += f", {float(machine['cpu_mhz']) / 1000:.1f} GHz"
    ram = f"{machine['ram_gib']:.0f} GiB" if machine.get("ram_gib") else "unknown"
    start, end = machine["load_start"], machine["load_end"]
    minutes = ", ".join(
        f"{r['info']['version']} {r['info']['minutes']:.1f} min" for r in runs
    )
    lines = [
        "### The machine and the run",
        "",
        f"* Command: `{machine['command']}`, package at `{machine['commit']}`.",
        f"* Date: {machine['start']} to {machine['end']}; time per "
        f"interpreter: {minutes}.",
        f"* CPU: {cpu}, {machine['cpus']} logical CPUs"
        + (
            " (a virtual machine: the hypervisor flag is set)"
            if machine["hypervisor"]
            else ""
        )
        + f"; RAM {ram}; {machine['kernel']} ({machine['machine']}), "
        f"{machine['libc']}.",
        f"* Load average (1, 5, 15 min) at the start: "
        f"{', '.join(f'{x:.2f}' for x in start)}; at the end: "
        f"{', '.join(f'{x:.2f}' for x in end)}.  The machine is shared: only "
        "ratios measured side by side in this run mean anything, and absolute "
        "times (ns, µs, ms) only next to others of the same table.",
        "",
    ]
    headers = ["Python", "build", *VERSIONS_OF]
    rows = []
    for r in runs:
        info = r["info"]
        build = [
            f"{info['implementation']}, {info['compiler']}, {info['build_date']}",
            "PGO" if info["pgo"] else "no PGO",
            "LTO" if info["lto"] else "no LTO",
        ]
        if info["shared"]:
            build.append("--enable-shared")
        rows.append(
            [
                info["version"],
                ", ".join(build),
                *(info["packages"].get(n) or "not installed" for n in VERSIONS_OF),
            ]
        )
    lines += _table(headers, rows)
    if machine.get("quick"):
        lines += [
            "",
            "**A `--quick` smoke run**: fewer rounds, smaller workloads; its "
            "numbers are too noisy to quote.",
        ]
    failed = [f"{r['info']['version']}: {s}" for r in runs for s in r["info"]["failed"]]
    if failed:
        lines += ["", f"**Failed, left out below**: {', '.join(failed)}."]
    return lines


def _overhead_section(runs: list[dict[str, Any]]) -> list[str]:
    have = [r for r in runs if "overhead" in r["figures"]]
    if not have:
        return []
    columns: dict[str, str] = {}
    for r in have:
        columns.update(r["figures"]["overhead"]["summary"]["columns"])
    lines = [
        "### Meter overhead (`overhead.py`)",
        "",
        "Time of each workload over the same workload without any tracer, in "
        "the same round; each configuration in fresh interpreters.  Geometric "
        "mean over the workloads (the control loop left out); the target is "
        "meter <= 1.05.",
        "",
    ]
    rows = []
    for r in have:
        fig = r["figures"]["overhead"]["summary"]
        rows.append(
            [
                f"{fig['python']} ({fig['rounds']} rounds)",
                *(
                    f"{fig['geomean'][c]:.3f}" if c in fig["geomean"] else "-"
                    for c in columns
                ),
                _verdict(fig["target"]["met"]),
            ]
        )
    lines += _table(["Python", *(f"`{c}`" for c in columns.values()), "target"], rows)
    for r in have:
        fig = r["figures"]["overhead"]["summary"]
        cols = fig["columns"]
        lines += ["", f"Python {fig['python']}, per workload, median [min-max]:", ""]
        lines += _table(
            ["workload", *(f"`{c}`" for c in cols.values())],
            [
                [
                    f"({w})" if w == fig["control"] else w,
                    *(_spread(row[c], 3) for c in cols),
                ]
                for w, row in fig["workloads"].items()
            ],
        )
        if fig["notes"]:
            lines += ["", *fig["notes"]]
    sanity = have[-1]["figures"]["overhead"]["summary"]["sanity"]
    lines += [
        "",
        f"Sanity, last round of {have[-1]['info']['version']}:",
        "",
        *(f"    {line}" for line in sanity),
    ]
    return lines


def _scope_cost_section(runs: list[dict[str, Any]]) -> list[str]:
    have = [r for r in runs if "scope_cost" in r["figures"]]
    if not have:
        return []
    cols = [
        (r["info"]["version"], backend, rows)
        for r in have
        for backend, rows in r["figures"]["scope_cost"]["summary"]["backends"].items()
    ]
    variants: list[str] = []
    for _, _, rows in cols:
        variants += [v for v in rows if v not in variants]
    table_rows = []
    for variant in variants:
        cells = []
        for _, _, rows in cols:
            if variant not in rows:
                cells.append("-")
                continue
            cell = _spread(rows[variant]["ratio"])
            if variant == have[0]["figures"]["scope_cost"]["summary"]["bare"]:
                cell = f"1.00 ({rows[variant]['ns'] / 1000:.1f} µs)"
            cells.append(cell)
        table_rows.append([f"`{variant}`", *cells])
    lines = [
        "### Scope enter+exit (`scope_cost.py`)",
        "",
        "One enter+exit inside a running task (empty-loop cost subtracted), as "
        "a ratio to a bare `anyio.CancelScope()` in the same round, median "
        "[min-max] over rounds.  The target is every `limit_scope` row <= 2.",
        "",
        *_table(["variant", *(f"{p} {b}" for p, b, _ in cols)], table_rows),
        "",
    ]
    lines += _target_lines(have, lambda f: f["scope_cost"]["summary"]["target"])
    return lines


def _memory_section(runs: list[dict[str, Any]]) -> list[str]:
    have = [r for r in runs if "groups" in r["figures"]]
    if not have:
        return []
    rows = []
    for r in have:
        fig = r["figures"]["groups"]["summary"]
        for backend, b in fig["backends"].items():
            mem = b["memory"]
            tm, rss = mem.get("tracemalloc"), mem.get("rss")
            rows.append(
                [
                    f"{fig['python']} {backend}",
                    f"{tm['plain']:.0f} / {rss['plain']:.0f}" if tm and rss else "-",
                    f"{tm['more_scoped']['median']:.0f} / "
                    f"{rss['more_scoped']['median']:.0f}"
                    if tm and rss
                    else "-",
                    f"{tm['more_budgeted']['median']:.0f} / "
                    f"{rss['more_budgeted']['median']:.0f}"
                    if tm and rss
                    else "-",
                    _spread(b["phases"]["total"]["scoped_ratio"]),
                    _spread(b["phases"]["total"]["budgeted_ratio"]),
                    f"{b['children_ms']:.1f} ms",
                ]
            )
    n = have[0]["figures"]["groups"]["summary"]["n"]
    lines = [
        "### Memory per scope, and budgeted groups (`groups.py`)",
        "",
        f"{n:,} children parked on one event.  Bytes held per idle child "
        "(tracemalloc / RSS, fresh interpreters): a plain anyio group's child, "
        "what a `limit_scope(budget=...)` around the child adds (the memory of "
        "one open idle scope), and what a budgeted child of "
        "`ml.create_task_group()` adds.  Then the time to spawn and finish "
        "them all as a ratio to the plain group (CPU time, same round, median "
        "[min-max]); the target for the budgeted group is <= 1.5.  Last, one "
        "`children()` snapshot of all budgeted children.",
        "",
        *_table(
            [
                "Python, backend",
                "plain child, B",
                "+ scope, B",
                "+ budgeted child, B",
                "hand-scoped time ratio",
                "budgeted time ratio",
                "`children()`",
            ],
            rows,
        ),
        "",
    ]
    lines += _target_lines(
        have, lambda f: f["groups"]["summary"]["target"], "Target (budgeted <= 1.5x)"
    )
    return lines


def _many_tasks_section(runs: list[dict[str, Any]]) -> list[str]:
    have = [r for r in runs if "many_tasks" in r["figures"]]
    if not have:
        return []
    first = have[0]["figures"]["many_tasks"]["summary"]
    rows = []
    for r in have:
        fig = r["figures"]["many_tasks"]["summary"]
        for backend, variants in fig["backends"].items():
            plain = variants["plain"]
            for variant, row in variants.items():
                if variant == "plain":
                    continue
                rows.append(
                    [
                        f"{fig['python']} {backend}",
                        variant,
                        _spread(row["time_ratio"]),
                        _spread(row["peak_rss_ratio"]),
                        f"{plain['peak_mib']:.0f} / {row['peak_mib']:.0f}",
                        f"{plain['bytes_per_task']:.0f} / {row['bytes_per_task']:.0f}",
                        f"{row['more_bytes_per_task']:.0f}",
                        f"{row['live_accounts_parked']:,} / {row['samples']:,}",
                    ]
                )
    lines = [
        f"### {first['n']:,} concurrent tasks (`many_tasks.py`)",
        "",
        f"{first['n']:,} tasks spawned in one task group and parked on one "
        "event, then released and joined; every variant of every round in a "
        "fresh interpreter, after a warm-up group of 100.  `scoped`: each "
        'child\'s body in `limit_scope(budget=Budget(memory="64 MiB"))`; '
        "`budgeted`: `ml.create_task_group()` with that budget per child; both "
        "against a plain anyio task group (no scope anywhere).  Time = CPU time "
        "from the first spawn to the end of the group; peak RSS = `VmHWM` of "
        "the whole process, nothing subtracted.  Ratios to plain in the same "
        f"round, median [min-max] over {first['rounds']} rounds.  Bytes per "
        "task = (peak RSS - RSS before spawning) / tasks.  Sanity: the meter's "
        "live accounts while all were parked, and the samples charged.",
        "",
        *_table(
            [
                "Python, backend",
                "variant",
                "time ratio",
                "peak RSS ratio",
                "peak MiB plain / this",
                "B per task plain / this",
                "+ B per task",
                "sanity: accounts / samples",
            ],
            rows,
        ),
        "",
    ]
    lines += _target_lines(
        have,
        lambda f: f["many_tasks"]["summary"]["target"],
        f"Target (scoped peak RSS <= {first['target']['ratio']:g}x)",
    )
    return lines


def _scale_breaches(row: dict[str, Any]) -> str:
    if row["time"] is None:
        return "-"
    return (
        ", ".join(
            f"{k} {lo:,}" if lo == hi else f"{k} {lo:,}-{hi:,}"
            for k, (lo, hi) in row["breaches"].items()
        )
        or "none"
    )


def _scale_ratio(row: dict[str, Any]) -> str:
    if row["time"] is None:
        return f"TIMED OUT ({row['timed_out']:g} s)"
    return _spread(row["ratio"]) if row["ratio"] else "-"


def _scale_section(runs: list[dict[str, Any]]) -> list[str]:
    have = [r for r in runs if "scale" in r["figures"]]
    if not have:
        return []
    first = have[0]["figures"]["scale"]["summary"]
    rows = []
    for r in have:
        fig = r["figures"]["scale"]["summary"]
        for name, sc in fig["scenarios"].items():
            for n_text, by_loop in sc["rows"].items():
                for loop, row in by_loop.items():
                    ref, ls = row["anyio"], row["limit_scope"]
                    nop = row["limit_scope_no_preempt"]
                    rows.append(
                        [
                            f"{fig['python']} {loop}",
                            f"({name})",
                            f"{int(n_text):,}",
                            "TIMED OUT"
                            if ref["time"] is None
                            else f"{ref['time']['median']:.3f}",
                            _scale_ratio(ls),
                            _scale_ratio(nop),
                            f"{_scale_breaches(ref)} / {_scale_breaches(ls)} / "
                            f"{_scale_breaches(nop)}",
                            _verdict(ls["verdict"]),
                        ]
                    )
    lines = [
        "### Many scoped tasks (`scale.py`)",
        "",
        "N asyncio tasks, each in `limit_scope` (default configuration, and "
        "`preempt=False`), against the same tasks in `anyio.move_on_after` (and "
        "`asyncio.timeout`, in the benchmark's own tables): (a) `timeout=5` "
        "around `sleep(0.5)`, nothing fires, timed from the first spawn; (b) "
        "`timeout=1` around `sleep(0.5)` with the loop stalled 1.5 s in "
        "`time.sleep` once all are parked, timed from the stall's end; (c) "
        "`timeout=0.2` around `sleep(10)`, all fire, timed from the first "
        "spawn; (d) one `CancelToken` for all scopes around `sleep_forever()` "
        "(anyio: a `CancelScope` each, cancelled in a loop), timed from the "
        "cancellation.  Wall time until all are done; every run a fresh "
        f"interpreter, killed after {first['run_timeout_s']:g} s.  Ratios to "
        "anyio in the same round, median [min-max]; breaches: scopes that "
        "ended breached, by kind (anyio: `cancelled_caught`).  The target, for "
        "the default configuration: (a) and (b) within 1.3x with no breach "
        "anyio lacks, every scope of (c) and (d) breached, and O(N) (the ratio "
        "at the largest N at most 1.5x the ratio at the smallest).",
        "",
        *_table(
            [
                "Python, loop",
                "scenario",
                "N",
                "anyio s",
                "`limit_scope` ratio",
                "`preempt=False` ratio",
                "breaches: anyio / `limit_scope` / `preempt=False`",
                "verdict",
            ],
            rows,
        ),
        "",
    ]
    for r in have:
        fig = r["figures"]["scale"]["summary"]
        growth = [
            f"({x['scenario']}) {x['loop']} "
            + (
                f"{x['growth']:.2f}"
                if x["growth"] is not None
                else f"TIMED OUT at N={x['timed_out_at']:,}"
                if x["timed_out_at"] is not None
                else "-"
            )
            for x in fig["scaling"]
            if x["variant"] == "limit_scope"
        ]
        if growth:
            lines.append(
                f"O(N), {fig['python']}, `limit_scope` ratio at the largest N "
                f"over the smallest: {', '.join(growth)}."
            )
    lines += [""] if len(lines) > 1 and lines[-1] else []
    lines += _target_lines(
        have, lambda f: f["scale"]["summary"]["target"], "Target (default config)"
    )
    return lines


def _latency_section(runs: list[dict[str, Any]]) -> list[str]:
    have = [r for r in runs if "latency" in r["figures"]]
    if not have:
        return []
    rows = []
    for r in have:
        fig = r["figures"]["latency"]["summary"]
        by_key = {(x["backend"], x["source"], x["kind"]): x for x in fig["rows"]}
        for (backend, source, kind), token in by_key.items():
            if kind != "token":
                continue
            ref = by_key[(backend, source, "reference")]
            rows.append(
                [
                    f"{fig['python']} {backend}",
                    source,
                    f"{token['median_us']:.0f} / {token['p99_us']:.0f}",
                    f"{ref['median_us']:.0f} / {ref['p99_us']:.0f}",
                    _spread(token["ratio"]),
                ]
            )
    lines = [
        "### Cancellation latency (`latency.py`)",
        "",
        "From `tok.cancel()` to the first statement after the "
        "`limit_scope(token=tok)` of a task blocked in `await`, cancelled from "
        "another task or another thread; the reference is a bare "
        "`anyio.CancelScope` cancelled by `scope.cancel()` (from a thread: "
        "`from_thread.run_sync(scope.cancel)`).  µs, pooled over rounds; the "
        "ratio of medians is taken within a round, median [min-max].  The "
        "target is a token median under 1 ms.",
        "",
        *_table(
            [
                "Python, backend",
                "cancelled from",
                "token median / p99 µs",
                "reference median / p99 µs",
                "ratio",
            ],
            rows,
        ),
        "",
    ]
    lines += _target_lines(
        have, lambda f: f["latency"]["summary"]["target"], worst=False
    )
    prows = []
    for r in have:
        pre = r["figures"]["latency"]["preempt"]
        for x in pre["rows"]:
            prows.append(
                [
                    f"{pre['python']} {x['backend']}",
                    x["where"],
                    f"{x['median_us']:.0f} / {x['p90_us']:.0f} / {x['p99_us']:.0f}",
                    f"{x['reference_median_us']:.0f}",
                    f"{x['ratio']:.2f}",
                ]
            )
    lines += [
        "",
        "Preemption: the same token stopping code that never awaits (a "
        "CPU-bound loop under `limit_scope(token=tok, preempt=0)`, cancelled "
        "from another thread; in the rows after a grace, `preempt=0.05` and "
        "the latency counted from the end of the grace); the reference is "
        "that token stopping a body blocked in `await`, in the same loop.  "
        "Target: p99 under 10 ms.",
        "",
        *_table(
            [
                "Python, backend",
                "body runs on",
                "median / p90 / p99 µs",
                "reference median µs",
                "ratio of medians",
            ],
            prows,
        ),
        "",
    ]
    lines += _target_lines(
        have, lambda f: f["latency"]["preempt"]["target"], worst=False
    )
    return lines


def _accuracy_section(runs: list[dict[str, Any]]) -> list[str]:
    have = [r for r in runs if "accuracy" in r["figures"]]
    if not have:
        return []
    first = have[0]["figures"]["accuracy"]["intervals"]
    keys = [(row["interval"], row["quantity"]) for row in first["rows"]]
    rows = []
    for interval, quantity in keys:
        cells = [f"{interval // 1024} KiB", f"`{quantity}`"]
        for r in have:
            fig = r["figures"]["accuracy"]["intervals"]
            row = next(
                x
                for x in fig["rows"]
                if (x["interval"], x["quantity"]) == (interval, quantity)
            )
            cells.append(
                f"{row['mean']:.3f} ± {row['se']:.3f}; {row['sd']:.3f} "
                f"({row['model_sd']:.3f}); {row['min']:.2f}-{row['max']:.2f}"
            )
        rows.append(cells)
    exact = "; ".join(
        f"{fig['python']}: allocated {fig['rows'][0]['exact_bytes'] / 2**20:.2f} "
        f"MiB, live {fig['rows'][1]['exact_bytes'] / 2**20:.2f} MiB, spread over "
        f"{fig['exact_trials']} runs {fig['exact_spread']['allocated']:.2%} / "
        f"{fig['exact_spread']['live']:.2%}"
        for fig in (r["figures"]["accuracy"]["intervals"] for r in have)
    )
    return [
        "### Accuracy at several sampling intervals (`accuracy.py --intervals-only`)",
        "",
        f"One trial keeps a 1 KiB `bytes` and decodes a small JSON document per "
        f"step, {first['steps']} steps, in a `limit_scope()` without limits at "
        "the interval set by `configure(sampling_interval=R)`; the scope's "
        "`usage` at exit is divided by the same trial's in exact mode "
        "(`sampling_interval=1`, every allocation charged with its size: the "
        f"ground truth).  {first['rows'][0]['trials']} trials per interval, each "
        "interval in fresh processes.  Each cell: mean ± standard error of "
        "estimate/exact; its sd (the model's sqrt(R/T) in parentheses); min-max.",
        "",
        *_table(
            ["R", "usage", *(r["info"]["version"] for r in have)],
            rows,
        ),
        "",
        f"Exact mode: {exact}.",
    ]


SECTIONS: tuple[Callable[[list[dict[str, Any]]], list[str]], ...] = (
    _overhead_section,
    _scope_cost_section,
    _memory_section,
    _many_tasks_section,
    _scale_section,
    _latency_section,
    _accuracy_section,
)


def report(machine: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    lines = [
        "<!-- Generated by benchmarks/run_all.py --write-docs: do not edit by "
        "hand, run it again. -->",
        "",
        *_machine_section(machine, runs),
    ]
    for section in SECTIONS:
        part = section(runs)
        if part:
            lines += ["", *part]
    return "\n".join(lines) + "\n"


def write_docs(text: str, path: Path = DOCS) -> None:
    """Replace what is between the markers of ``path`` with ``text``."""
    page = path.read_text()
    if (
        page.count(BEGIN) != 1
        or page.count(END) != 1
        or page.index(BEGIN) > page.index(END)
    ):
        raise SystemExit(
            f"{path}: needs one line {BEGIN} followed by one line {END}; the "
            "report goes between them"
        )
    head, rest = page.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--python",
        action="append",
        help="interpreter to benchmark (repeatable; default: this one)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run (~1 min)")
    parser.add_argument(
        "--rounds", type=int, help="interleaved rounds (default: each script's)"
    )
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help=f"put the report into {DOCS.relative_to(REPO_ROOT)} between its "
        "markers (else print it)",
    )
    parser.add_argument(
        "--results", type=Path, help="keep every benchmark's JSON in this directory"
    )
    parser.add_argument(
        "--from-results",
        type=Path,
        help="run nothing: build the report from an earlier --results directory",
    )
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    failures = 0
    if args.from_results is not None:
        results = args.from_results
    else:
        results = args.results or Path(tempfile.mkdtemp(prefix="run_all-"))
        results.mkdir(parents=True, exist_ok=True)
        failures = run(args, results)
    text = report(*load(results))
    if args.write_docs:
        write_docs(text)
        print(f"\nreport written into {DOCS}", flush=True)
    else:
        print(f"\n{'=' * 78}\n\n{text}", flush=True)
    if args.results is None and args.from_results is None:
        for path in results.iterdir():
            path.unlink()
        results.rmdir()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
