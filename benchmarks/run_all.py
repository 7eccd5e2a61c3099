"""Run every benchmark of memlimits_async and print all their tables.

``python benchmarks/run_all.py`` runs ``overhead.py`` (what the meter costs an
allocation-heavy program), then ``scope_cost.py`` (what entering and leaving
a ``limit_scope`` costs), ``latency.py`` (how soon a cancelled token stops
a task blocked in ``await``) and ``groups.py`` (what budgeted children of a
task group cost), each with the interpreter given by ``--python``
(repeatable; default: the one running this script), so one command covers
several CPython versions.  Each benchmark runs as a child process of its own:
``overhead.py`` needs fresh interpreters anyway (the allocator hooks are never
uninstalled), and ``scope_cost.py`` and ``latency.py`` must run in the
interpreter they measure (``groups.py`` also starts fresh ones of it to
measure memory).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("overhead.py", "scope_cost.py", "latency.py", "groups.py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--python",
        action="append",
        help="interpreter to benchmark (repeatable; default: this one)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run (~10 s)")
    parser.add_argument(
        "--rounds", type=int, help="interleaved rounds (default: each script's)"
    )
    args = parser.parse_args(argv)
    extra: list[str] = []
    if args.quick:
        extra.append("--quick")
    if args.rounds is not None:
        extra += ["--rounds", str(args.rounds)]
    failures = 0
    for python in args.python or [sys.executable]:
        for script in BENCHMARKS:
            title = f"== {script} ({python}) "
            print(f"\n{title}{'=' * max(0, 78 - len(title))}\n", flush=True)
            cmd = [python, str(HERE / script), *extra]
            if script == "overhead.py":
                cmd += ["--python", python]
            # Progress goes to stderr, tables to stdout; both pass through.
            rc = subprocess.run(cmd, check=False).returncode
            if rc != 0:
                print(f"{script} failed with exit status {rc}", flush=True)
                failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
