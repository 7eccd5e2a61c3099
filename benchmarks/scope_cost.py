"""What entering and leaving a ``limit_scope`` costs, next to a bare cancel scope.

Run ``python benchmarks/scope_cost.py`` (``--quick`` for a smoke run).  It
prints, for asyncio and for trio (both through ``anyio.run``), the time of one
enter+exit of each kind of scope inside a running task, and its ratio to a bare
``anyio.CancelScope()``.  The issue's target is a ratio of at most 2.

Why it is built this way:

* A ``limit_scope`` *is* a cancel scope plus an account, so a bare
  ``anyio.CancelScope()`` is the honest yardstick; ``anyio.move_on_after(5)``
  (a cancel scope with a deadline) and, on asyncio, ``asyncio.timeout(5)`` are
  printed as references for "a scope with a budget".  anyio 4's cancel scopes
  have no ``async with``, so those references are timed as ``with``.
* Everything runs in one process, interleaved: each round runs every variant
  once per backend, in an order rotated from round to round, so that a slow
  spell of the shared machine lands on all variants alike.  Each variant keeps
  the fastest of several batches in a round (interference only adds time);
  ratios are taken within a round, and the median over rounds is printed.
* The cost of the loop itself (an empty loop of the same length) is
  subtracted, so ratios compare the scopes and not the ``for`` statement.
* The meter's hooks are installed (by a warm-up scope) before anything is
  timed and ``trio`` is imported from the start, so every variant, including
  the bare cancel scope, runs in the same process state.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
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

Variant = Callable[[int], Awaitable[None]]
BARE = "with anyio.CancelScope()"
TARGETED = (
    "with limit_scope()",
    "async with limit_scope()",
    'with limit_scope(memory="50 MiB")',
    'async with limit_scope(memory="50 MiB")',
)
TARGET_RATIO = 2.0
# A limit scope with a timeout beside the scopes it replaces when porting
# (docs/limit-scope.md, "Coming from anyio / trio / asyncio"): each pair is
# (limit_scope variant, reference), compared within a round.
TIMEOUT_SCOPES = ("with limit_scope(timeout=5)", "async with limit_scope(timeout=5)")
TIMEOUT_REFERENCES = ("with anyio.move_on_after(5)", "async with asyncio.timeout(5)")


async def _empty(n: int) -> None:
    for _ in itertools.repeat(None, n):
        pass


async def _bare(n: int) -> None:
    for _ in itertools.repeat(None, n):
        with anyio.CancelScope():
            pass


async def _move_on_after(n: int) -> None:
    for _ in itertools.repeat(None, n):
        with anyio.move_on_after(5):
            pass


async def _asyncio_timeout(n: int) -> None:
    for _ in itertools.repeat(None, n):
        async with asyncio.timeout(5):
            pass


async def _ls_with(n: int) -> None:
    for _ in itertools.repeat(None, n):
        with ml.limit_scope():
            pass


async def _ls_async_with(n: int) -> None:
    for _ in itertools.repeat(None, n):
        async with ml.limit_scope():
            pass


async def _ls50_with(n: int) -> None:
    for _ in itertools.repeat(None, n):
        with ml.limit_scope(memory="50 MiB"):
            pass


async def _ls50_async_with(n: int) -> None:
    for _ in itertools.repeat(None, n):
        async with ml.limit_scope(memory="50 MiB"):
            pass


async def _ls_timeout_with(n: int) -> None:
    for _ in itertools.repeat(None, n):
        with ml.limit_scope(timeout=5):
            pass


async def _ls_timeout_async_with(n: int) -> None:
    for _ in itertools.repeat(None, n):
        async with ml.limit_scope(timeout=5):
            pass


def variants(backend: str) -> dict[str, Variant]:
    """The variants timed on ``backend``; ``asyncio.timeout`` only on asyncio."""
    out: dict[str, Variant] = {
        "(empty loop)": _empty,
        BARE: _bare,
        "with anyio.move_on_after(5)": _move_on_after,
        TARGETED[0]: _ls_with,
        TARGETED[1]: _ls_async_with,
        TARGETED[2]: _ls50_with,
        TARGETED[3]: _ls50_async_with,
        TIMEOUT_SCOPES[0]: _ls_timeout_with,
        TIMEOUT_SCOPES[1]: _ls_timeout_async_with,
    }
    if backend == "asyncio":
        out["async with asyncio.timeout(5)"] = _asyncio_timeout
    return out


async def _one_round(
    backend: str, round_no: int, n: int, batches: int
) -> dict[str, float]:
    """Inside a running task: best ns per iteration of each variant."""
    table = variants(backend)
    names = list(table)
    k = round_no % len(names)
    best: dict[str, float] = {}
    for name in names[k:] + names[:k]:
        fn = table[name]
        await fn(max(1, n // 10))  # warm up this code path
        times = []
        for _ in range(batches):
            start = time.perf_counter_ns()
            await fn(n)
            times.append((time.perf_counter_ns() - start) / n)
        best[name] = min(times)
    return best


def collect(
    backends: list[str], rounds: int, n: int, batches: int
) -> dict[str, list[dict[str, float]]]:
    """backend -> one {variant: net ns per enter+exit} per round."""
    for backend in backends:  # install the hooks, start the delivery thread
        anyio.run(_warm_up, backend=backend)
    out: dict[str, list[dict[str, float]]] = {b: [] for b in backends}
    for r in range(rounds):
        for backend in backends if r % 2 == 0 else backends[::-1]:
            print(f"  round {r + 1}/{rounds}: {backend}", file=sys.stderr, flush=True)
            raw = anyio.run(_one_round, backend, r, n, batches, backend=backend)
            loop = raw.pop("(empty loop)")
            out[backend].append({k: v - loop for k, v in raw.items()})
    return out


async def _warm_up() -> None:
    async with ml.limit_scope(memory="50 MiB"):
        await anyio.sleep(0)
    if not ml.stats().hooks_installed:
        raise SystemExit("the meter's hooks are not installed after a scope")


def summary(results: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Per backend and variant: median net ns, and the ratio to the bare
    cancel scope (median over rounds with its range); the target."""
    figures: dict[str, Any] = {
        "python": sys.version.split()[0],
        "rounds": len(next(iter(results.values()))),
        "bare": BARE,
        "targeted": list(TARGETED),
        "backends": {},
        "versus": {},
    }
    worst = 0.0
    for backend, rounds in results.items():
        rows: dict[str, Any] = {}
        for name in rounds[0]:
            rs = [r[name] / r[BARE] for r in rounds]
            rows[name] = {
                "ns": statistics.median(r[name] for r in rounds),
                "ratio": {
                    "median": statistics.median(rs),
                    "min": min(rs),
                    "max": max(rs),
                },
            }
            if name in TARGETED:
                worst = max(worst, rows[name]["ratio"]["median"])
        figures["backends"][backend] = rows
        figures["versus"][backend] = _versus(rounds)
    figures["target"] = ratio_target(TARGET_RATIO, worst)
    return figures


def _ratio(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def _versus(rounds: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Each limit scope with a timeout against each timeout scope it replaces
    (those timed on this backend): ratios within a round, over rounds."""
    return {
        scope: {
            reference: _ratio([r[scope] / r[reference] for r in rounds])
            for reference in TIMEOUT_REFERENCES
            if reference in rounds[0]
        }
        for scope in TIMEOUT_SCOPES
        if scope in rounds[0]
    }


def render(figures: dict[str, Any]) -> str:
    """Per backend: median net ns and median ratio to the bare cancel scope."""
    lines = [
        f"Python {figures['python']}, anyio.run per backend, inside a task; "
        f"{figures['rounds']} rounds; ns = one enter+exit, "
        "empty-loop cost subtracted; ratio to "
        f"`{BARE}` in the same round, median over rounds [min-max]",
    ]
    for backend, rows in figures["backends"].items():
        lines += [
            "",
            f"{backend}:",
            "",
            f"| {'variant':<40} | {'ns':>7} | {'ratio':<20} |",
            f"|{'-' * 42}|{'-' * 9}|{'-' * 22}|",
        ]
        for name, row in rows.items():
            r = row["ratio"]
            cell = f"{r['median']:5.2f} [{r['min']:.2f}-{r['max']:.2f}]"
            lines.append(f"| {name:<40} | {row['ns']:7.0f} | {cell:<20} |")
        versus = figures.get("versus", {}).get(backend, {})
        if versus:
            lines += [
                "",
                "ratio of a limit scope with a timeout to the scope it replaces:",
            ]
        for scope, references in versus.items():
            for reference, r in references.items():
                lines.append(
                    f"  {scope} / {reference}: {r['median']:.2f} "
                    f"[{r['min']:.2f}-{r['max']:.2f}]"
                )
    target = figures["target"]
    lines += [
        "",
        f"target: every limit_scope variant <= {TARGET_RATIO:g}x a bare "
        f"anyio.CancelScope ... {verdict(target['met'])} (worst median "
        f"{target['worst']:.3f}x)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help="interleaved rounds (9)")
    parser.add_argument("--n", type=int, help="enter+exit per batch (2000)")
    parser.add_argument("--batches", type=int, help="batches per round (5)")
    add_run_options(parser, "defaults of 3 rounds, 3 batches of 500 (a smoke run)")
    args = parser.parse_args(argv)
    fill_counts(
        parser,
        args,
        {"rounds": 3, "n": 500, "batches": 3},
        {"rounds": 9, "n": 2000, "batches": 5},
    )
    backends = backends_of(args)
    print(
        f"scope_cost: {args.rounds} rounds, {args.batches} batches of {args.n}, "
        f"backends {', '.join(backends)}",
        file=sys.stderr,
    )
    figures = summary(collect(backends, args.rounds, args.n, args.batches))
    if args.json is not None:
        args.json.write_text(
            json.dumps({"benchmark": "scope_cost", "summary": figures}, indent=1)
        )
    print(render(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
