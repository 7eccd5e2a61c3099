"""Many scoped tasks at once, with timeouts that fire or not, and one token.

Run ``python benchmarks/scale.py`` (``--quick`` for a smoke run).  The issue's
"core under real load": N asyncio tasks, each in a scope of its own, next to
the same tasks in ``anyio.move_on_after`` (the reference, ratio 1.00) and in
``asyncio.timeout``.  Scenarios:

* ``a``: every task in a scope with ``timeout=5`` around
  ``await asyncio.sleep(0.5)``: no timeout fires.  Timed: wall time from the
  first spawn until every task is done.  (All tasks are spawned at once, so
  their first steps run in one iteration of the loop: if that takes longer
  than about 4.5 s, as 100,000 scope entries can on a slow or busy machine,
  deadlines are past before the sleeps resume, as in ``b``.  The ``parked``
  column shows how long it took.)
* ``b``: every task in a scope with ``timeout=1`` around
  ``await asyncio.sleep(0.5)``, while one more task, spawned last and in no
  scope, stalls the loop in ``time.sleep(1.5)`` once all the others are
  parked.  When the stall ends every sleep and every deadline is past; anyio
  lets a task whose sleep had ended finish without cancelling it.  Timed:
  wall time from the end of the stall until every task is done.
* ``c``: every task in a scope with ``timeout=0.2`` around
  ``await asyncio.sleep(10)``: every timeout fires.  Timed: wall time from
  the first spawn until every task is done.
* ``d``: every task in ``limit_scope(token=tok)`` around
  ``await anyio.sleep_forever()``, one ``CancelToken`` for all; once all are
  parked, ``tok.cancel()``.  The reference: each task in an
  ``anyio.CancelScope()``, all cancelled in a loop; for asyncio, ``cancel()``
  on each task.  Timed: wall time from the cancellation until every task is
  done.

Variants: ``limit_scope`` with the default configuration (the one the target
is about) and with ``preempt=False``; each runs on asyncio's own loop and on
uvloop (if installed: ``pip install uvloop``).

Every task reports how its scope ended: ``scope.breach.kind`` for
``limit_scope``, ``cancelled_caught`` for anyio, ``TimeoutError`` for
``asyncio.timeout`` (a cancelled task in ``d``).  The counts by kind are
printed next to the times.

The issue's target, with the default configuration: N scoped tasks cost O(N)
whatever fires; ``a`` and ``b`` within 1.3x of anyio's time, with no breach
that anyio would not also report (a scope that ends with a breach where
anyio's ``cancelled_caught`` is False); in ``c`` and ``d`` every scope ends
breached by its timeout or its token.  O(N) is checked as the ratio to
anyio at the largest N over the ratio at the smallest N: at most 1.5.

Why it is built this way:

* Every run (one scenario, size, loop and variant) is a fresh interpreter:
  the garbage collector's state and the memory of one run do not carry over
  to the next, and a pathological run is bounded: after ``--run-timeout``
  seconds (120) it is killed and reported as ``TIMED OUT``, a failing
  verdict.  A run that timed out is not run again in later rounds, nor at a
  larger N.
* Each process warms up first (100 tasks of its own variant, half of them
  with a timeout that fires, and a token's cancellation), then collects
  garbage; the collector stays on during the timed part, as in a real
  program.
* Times are wall-clock (a timeout is a promise about wall time): absolute
  times mean something only next to others of the same table.  Variants run
  in an order rotated from round to round; ratios are taken within a round
  and the median over rounds is printed with its range.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from _package import fill_counts, ml, ratio_target, verdict

try:
    import uvloop

    HAVE_UVLOOP = uvloop is not None
except ImportError:  # optional: pip install uvloop
    HAVE_UVLOOP = False

SCENARIOS = ("a", "b", "c", "d")
LOOPS = ("asyncio", "uvloop")
REFERENCE = "anyio"
VARIANTS = (REFERENCE, "asyncio", "limit_scope", "limit_scope_no_preempt")
JUDGED = "limit_scope"
"""The default configuration: the issue's target is about it."""
SCOPED = ("limit_scope", "limit_scope_no_preempt")
TARGET_RATIO = 1.3
"""``a`` and ``b``: limit_scope's time over anyio's, at most."""
TARGET_SCALING = 1.5
"""The ratio at the largest N over the ratio at the smallest N, at most."""
WARM_UP = 100
RUN_TIMEOUT = 120.0

SIZES = {
    "quick": {
        "a": [2_000, 10_000],
        "b": [4_000, 20_000],
        "c": [2_000, 10_000],
        "d": [3_000, 15_000],
    },
    "full": {
        "a": [10_000, 100_000],
        "b": [20_000, 100_000],
        "c": [10_000, 100_000],
        "d": [6_000, 60_000],
    },
}

# (scope timeout, sleep inside it) of the timeout scenarios.
TIMEOUTS = {"a": (5.0, 0.5), "b": (1.0, 0.5), "c": (0.2, 10.0)}
STALL = 1.5

TITLES = {
    "a": "(a) timeout=5 around asyncio.sleep(0.5): no timeout fires; time = wall "
    "s from the first spawn until all done",
    "b": f"(b) timeout=1 around asyncio.sleep(0.5), the loop stalled once in "
    f"time.sleep({STALL}) after all are parked; time = wall s from the end of "
    "the stall until all done",
    "c": "(c) timeout=0.2 around asyncio.sleep(10): every timeout fires; time = "
    "wall s from the first spawn until all done",
    "d": "(d) one CancelToken for all scopes around anyio.sleep_forever(), "
    "cancelled once all are parked; time = wall s from the cancellation until "
    "all done",
}
TARGETS = {
    "a": f"<= {TARGET_RATIO:g}x, no breach anyio lacks",
    "b": f"<= {TARGET_RATIO:g}x, no breach anyio lacks",
    "c": "every scope TIMEOUT; O(N) below",
    "d": "every scope TOKEN; O(N) below",
}
EXPECTED_KIND = {"c": "TIMEOUT", "d": "TOKEN"}


def label(scenario: str, variant: str) -> str:
    if scenario == "d":
        return {
            REFERENCE: "anyio.CancelScope, cancel() each",
            "asyncio": "asyncio task, cancel() each",
            "limit_scope": "limit_scope(token=tok)",
            "limit_scope_no_preempt": "limit_scope(token=tok, preempt=False)",
        }[variant]
    t = f"{TIMEOUTS[scenario][0]:g}"
    return {
        REFERENCE: f"anyio.move_on_after({t})",
        "asyncio": f"asyncio.timeout({t})",
        "limit_scope": f"limit_scope(timeout={t})",
        "limit_scope_no_preempt": f"limit_scope(timeout={t}, preempt=False)",
    }[variant]


# ---------------------------------------------------------------------------
# One run, in a fresh interpreter.


async def _timed_scope(
    variant: str, timeout: float, work: Callable[[], Awaitable[object]]
) -> str | None:
    """``work()`` in the variant's scope; how the scope ended (None: no breach)."""
    if variant == REFERENCE:
        with anyio.move_on_after(timeout) as cs:
            await work()
        return "cancelled" if cs.cancelled_caught else None
    if variant == "asyncio":
        try:
            async with asyncio.timeout(timeout):
                await work()
        except TimeoutError:
            return "expired"
        return None
    scope = (
        ml.limit_scope(timeout=timeout)
        if variant == "limit_scope"
        else ml.limit_scope(timeout=timeout, preempt=False)
    )
    async with scope:
        await work()
    return None if scope.breach is None else scope.breach.kind.name


class _Cancellable:
    """Scenario ``d``'s scopes: all parked, then cancelled at once."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self.token = ml.CancelToken()
        self.scopes: list[anyio.CancelScope] = []
        self.parked = 0

    async def body(self) -> str | None:
        if self.variant == REFERENCE:
            with anyio.CancelScope() as cs:
                self.scopes.append(cs)
                self.parked += 1
                await anyio.sleep_forever()
            return "cancelled" if cs.cancelled_caught else None
        if self.variant == "asyncio":
            self.parked += 1
            await anyio.sleep_forever()
            return None
        scope = (
            ml.limit_scope(token=self.token)
            if self.variant == "limit_scope"
            else ml.limit_scope(token=self.token, preempt=False)
        )
        async with scope:
            self.parked += 1
            await anyio.sleep_forever()
        return None if scope.breach is None else scope.breach.kind.name

    async def wait_parked(self, n: int) -> None:
        while self.parked < n:
            await asyncio.sleep(0)

    def cancel(self, tasks: list[asyncio.Task[str | None]]) -> None:
        if self.variant == REFERENCE:
            for cs in self.scopes:
                cs.cancel()
        elif self.variant == "asyncio":
            for task in tasks:
                task.cancel()
        else:
            self.token.cancel("scale benchmark")


def _outcomes(tasks: list[asyncio.Task[str | None]]) -> dict[str, Any]:
    """Breach counts by kind, tasks done, and errors (none expected)."""
    breaches: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    done = 0
    for task in tasks:
        if not task.done():
            continue
        done += 1
        if task.cancelled():
            breaches["cancelled"] += 1
        elif (exc := task.exception()) is not None:
            errors[type(exc).__name__] += 1
        elif (kind := task.result()) is not None:
            breaches[kind] += 1
    return {"breaches": dict(breaches), "errors": dict(errors), "done": done}


async def _warm_up(variant: str) -> None:
    """Imports, code paths, the meter's delivery thread: out of the timing."""
    half = WARM_UP // 2
    tasks = [
        asyncio.create_task(_timed_scope(variant, 5.0, lambda: asyncio.sleep(0.001)))
        for _ in range(half)
    ] + [
        asyncio.create_task(_timed_scope(variant, 0.01, lambda: asyncio.sleep(1)))
        for _ in range(half)
    ]
    await asyncio.wait(tasks)
    c = _Cancellable(variant)
    tasks = [asyncio.create_task(c.body()) for _ in range(half)]
    await c.wait_parked(half)
    c.cancel(tasks)
    await asyncio.wait(tasks)


async def _staller(stall: dict[str, float], sleeping: list[int]) -> None:
    stall["start"] = time.perf_counter()
    stall["sleeping"] = sleeping[0]
    time.sleep(STALL)  # blocks the loop: nothing else runs meanwhile
    stall["end"] = time.perf_counter()


async def _run(scenario: str, variant: str, n: int) -> dict[str, Any]:
    await _warm_up(variant)
    gc.collect()
    out: dict[str, Any] = {}
    if scenario == "d":
        c = _Cancellable(variant)
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(c.body()) for _ in range(n)]
        await c.wait_parked(n)
        out["parked_s"] = time.perf_counter() - t0
        gc.collect()
        cpu0 = time.process_time()
        start = time.perf_counter()
        c.cancel(tasks)
    else:
        timeout, sleep = TIMEOUTS[scenario]
        sleeping = [0]
        parked_at = [0.0]

        def work() -> Awaitable[None]:
            sleeping[0] += 1
            if sleeping[0] == n:
                parked_at[0] = time.perf_counter()
            return asyncio.sleep(sleep)

        cpu0 = time.process_time()
        start = t0 = time.perf_counter()
        tasks = [
            asyncio.create_task(_timed_scope(variant, timeout, work)) for _ in range(n)
        ]
        if scenario == "b":
            stall: dict[str, float] = {}
            # Spawned last, so it runs once every task above is parked (it
            # reports how many were, to be sure).
            tasks.append(asyncio.create_task(_staller(stall, sleeping)))
    await asyncio.wait(tasks)
    end = time.perf_counter()
    out["cpu_s"] = time.process_time() - cpu0
    out["wall_s"] = end - t0
    if scenario == "b":
        tasks.pop()  # the staller
        out["sleeping_at_stall"] = stall["sleeping"]
        start = stall["end"]
    if scenario != "d":
        out["parked_s"] = parked_at[0] - t0
    out["time"] = end - start
    out.update(_outcomes(tasks))
    return out


def probe(scenario: str, loop: str, variant: str, n: int) -> dict[str, Any]:
    factory = uvloop.new_event_loop if loop == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_run(scenario, variant, n))


# ---------------------------------------------------------------------------
# The runs, each in a child process with a time bound.


def run_probe(
    scenario: str, loop: str, variant: str, n: int, bound: float
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--probe",
        json.dumps([scenario, loop, variant, n]),
    ]
    began = time.monotonic()
    try:
        result = subprocess.run(
            cmd, capture_output=True, text=True, check=False, timeout=bound
        )
    except subprocess.TimeoutExpired:
        return {"timed_out": bound}
    if result.returncode != 0:
        raise SystemExit(
            f"run {scenario} N={n} {loop} {variant} failed:\n{result.stderr}"
        )
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    out["process_s"] = time.monotonic() - began
    return out


Raw = dict[str, dict[str, dict[str, dict[str, list[dict[str, Any]]]]]]
"""scenario -> str(N) -> loop -> variant -> one result per round."""


def collect(
    scenarios: list[str],
    sizes: dict[str, list[int]],
    loops: list[str],
    rounds: int,
    bound: float,
) -> Raw:
    raw: Raw = {
        s: {str(n): {lp: {v: [] for v in VARIANTS} for lp in loops} for n in sizes[s]}
        for s in scenarios
    }
    # (scenario, loop, variant) -> the smallest N that timed out
    timed_out: dict[tuple[str, str, str], int] = {}
    for r in range(rounds):
        for s in scenarios:
            for n in sizes[s]:
                for lp in loops:
                    k = r % len(VARIANTS)
                    for v in VARIANTS[k:] + VARIANTS[:k]:
                        first = timed_out.get((s, lp, v))
                        if first is not None and n >= first:
                            result = {"timed_out": bound, "not_run": first}
                        else:
                            print(
                                f"  round {r + 1}/{rounds}: ({s}) N={n:,} {lp} "
                                f"{label(s, v)}",
                                file=sys.stderr,
                                flush=True,
                            )
                            result = run_probe(s, lp, v, n, bound)
                            if "timed_out" in result:
                                timed_out[(s, lp, v)] = n
                                print(
                                    f"    TIMED OUT after {bound:g} s",
                                    file=sys.stderr,
                                    flush=True,
                                )
                        raw[s][str(n)][lp][v].append(result)
    return raw


# ---------------------------------------------------------------------------
# Figures and verdicts.


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def _breach_total(result: dict[str, Any]) -> int:
    return sum(result["breaches"].values())


def _row(
    scenario: str, n: int, variant: str, runs: list[dict[str, Any]], ref: list[Any]
) -> dict[str, Any]:
    done = [x for x in runs if "timed_out" not in x]
    row: dict[str, Any] = {
        "label": label(scenario, variant),
        "rounds": len(done),
        "timed_out": None,
        "time": None,
        "ratio": None,
        "breaches": {},
        "errors": {},
        "verdict": None,
        "why": [],
    }
    if len(done) < len(runs):
        row["timed_out"] = max(x["timed_out"] for x in runs if "timed_out" in x)
        skipped = [x["not_run"] for x in runs if "not_run" in x]
        if len(skipped) == len(runs) and min(skipped) < n:
            row["not_run"] = min(skipped)  # a smaller N timed out
    if done:
        row["time"] = _spread([x["time"] for x in done])
        row["cpu_s"] = statistics.median(x["cpu_s"] for x in done)
        row["parked_s"] = statistics.median(x["parked_s"] for x in done)
        kinds = sorted({k for x in done for k in x["breaches"]})
        row["breaches"] = {
            k: [
                min(x["breaches"].get(k, 0) for x in done),
                max(x["breaches"].get(k, 0) for x in done),
            ]
            for k in kinds
        }
        row["errors"] = dict(sum((Counter(x["errors"]) for x in done), Counter()))
        row["done_min"] = min(x["done"] for x in done)
        if scenario == "b":
            row["sleeping_at_stall_min"] = min(x["sleeping_at_stall"] for x in done)
    pairs = [
        (x, b)
        for x, b in zip(runs, ref, strict=True)
        if "timed_out" not in x and "timed_out" not in b
    ]
    if variant != REFERENCE and pairs:
        row["ratio"] = _spread([x["time"] / b["time"] for x, b in pairs])
    if variant in SCOPED:
        row["verdict"], row["why"] = _judge(scenario, n, row, pairs)
    return row


def _judge(
    scenario: str, n: int, row: dict[str, Any], pairs: list[Any]
) -> tuple[bool | None, list[str]]:
    """Whether a limit_scope row meets its scenario's target, and why not."""
    why = []
    if "not_run" in row:
        why.append(f"not run: TIMED OUT at N={row['not_run']:,} already")
    elif row["timed_out"] is not None:
        why.append(f"TIMED OUT after {row['timed_out']:g} s")
    if row["errors"]:
        why.append(f"errors {row['errors']}")
    if row["time"] is not None and row["done_min"] < n:
        why.append(f"only {row['done_min']:,} of {n:,} tasks done")
    if row.get("sleeping_at_stall_min", n) < n:
        # Not the scenario it claims to be: some sleeps began after the stall.
        why.append(f"only {row['sleeping_at_stall_min']:,} parked at the stall")
    if scenario in EXPECTED_KIND:
        kind = EXPECTED_KIND[scenario]
        wrong = {k: v for k, v in row["breaches"].items() if k != kind}
        if row["time"] is not None and row["breaches"].get(kind, [0])[0] < n:
            why.append(f"fewer than {n:,} {kind} breaches")
        if wrong:
            why.append(f"other breaches {wrong}")
    else:
        extra = [
            _breach_total(x) - _breach_total(b)
            for x, b in pairs
            if _breach_total(x) > _breach_total(b)
        ]
        if extra:
            why.append(f"up to {max(extra):,} breaches anyio did not report")
        if row["ratio"] is not None and row["ratio"]["median"] > TARGET_RATIO:
            why.append(f"ratio {row['ratio']['median']:.2f} > {TARGET_RATIO:g}")
    if why:
        return False, why
    if not pairs:
        return None, ["anyio's run timed out: nothing to compare with"]
    return True, []


def summary(raw: Raw, loops: list[str], rounds: int, bound: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "rounds": rounds,
        "run_timeout_s": bound,
        "loops": loops,
        "uvloop_installed": HAVE_UVLOOP,
        "scenarios": {},
        "scaling": [],
    }
    for s, by_n in raw.items():
        rows: dict[str, dict[str, dict[str, Any]]] = {}
        for n_text, by_loop in by_n.items():
            rows[n_text] = {}
            for lp, by_variant in by_loop.items():
                ref = by_variant[REFERENCE]
                rows[n_text][lp] = {
                    v: _row(s, int(n_text), v, runs, ref)
                    for v, runs in by_variant.items()
                }
        out["scenarios"][s] = {
            "title": TITLES[s],
            "target": TARGETS[s],
            "rows": rows,
        }
        sizes = sorted(by_n, key=int)
        if len(sizes) < 2:
            continue
        small, big = sizes[0], sizes[-1]
        for lp in loops:
            for v in SCOPED:
                a, b = rows[small][lp][v], rows[big][lp][v]
                growth = None
                met: bool | None = None
                first_timed_out = next(
                    (int(x) for x, r in ((small, a), (big, b)) if r["timed_out"]), None
                )
                if first_timed_out is not None:
                    met = False
                elif a["ratio"] is not None and b["ratio"] is not None:
                    growth = b["ratio"]["median"] / a["ratio"]["median"]
                    met = growth <= TARGET_SCALING
                out["scaling"].append(
                    {
                        "scenario": s,
                        "loop": lp,
                        "variant": v,
                        "small": int(small),
                        "big": int(big),
                        "growth": growth,
                        "timed_out_at": first_timed_out,
                        "met": met,
                    }
                )
    judged = [
        row[JUDGED]
        for sc in out["scenarios"].values()
        for by_loop in sc["rows"].values()
        for row in by_loop.values()
    ]
    ratios = [
        row[JUDGED]["ratio"]["median"]
        for s in ("a", "b")
        if s in out["scenarios"]
        for by_loop in out["scenarios"][s]["rows"].values()
        for row in by_loop.values()
        if row[JUDGED]["ratio"] is not None
    ]
    target = ratio_target(TARGET_RATIO, max(ratios, default=0.0))
    target["timed_out"] = sum(r["timed_out"] is not None for r in judged)
    scaling = [x for x in out["scaling"] if x["variant"] == JUDGED]
    target["met"] = (
        target["met"]
        and all(r["verdict"] for r in judged)
        and all(x["met"] for x in scaling)
    )
    out["target"] = target
    return out


# ---------------------------------------------------------------------------
# The tables.


def _cell(spread: dict[str, float] | None) -> str:
    if spread is None:
        return "-"
    return f"{spread['median']:.2f} [{spread['min']:.2f}-{spread['max']:.2f}]"


def _breaches(row: dict[str, Any]) -> str:
    if row["time"] is None:
        return "-"
    if not row["breaches"]:
        return "none"
    return ", ".join(
        f"{k} {lo:,}" if lo == hi else f"{k} {lo:,}-{hi:,}"
        for k, (lo, hi) in row["breaches"].items()
    )


def _time(row: dict[str, Any]) -> str:
    if "not_run" in row:
        return f"not run (N={row['not_run']:,} TIMED OUT)"
    if row["time"] is None:
        return f"TIMED OUT after {row['timed_out']:g} s"
    text = f"{row['time']['median']:.3f}"
    if row["timed_out"] is not None:
        text += f" (TIMED OUT after {row['timed_out']:g} s in some rounds)"
    return text


def _verdict(row: dict[str, Any]) -> str:
    if row["verdict"] is None:
        return "-" if not row["why"] else "not checked"
    return verdict(row["verdict"])


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = (c.ljust(w) for c, w in zip(cells, widths, strict=True))
        return "| " + " | ".join(padded) + " |"

    return [
        line(header),
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        *map(line, rows),
    ]


def render(figures: dict[str, Any]) -> str:
    lines = [
        f"Python {figures['python']}; {figures['rounds']} rounds, every run a "
        f"fresh interpreter bounded by {figures['run_timeout_s']:g} s; parked = "
        "s from the first spawn until every task waits in its scope (median); "
        "ratio = time / anyio's time in the same round, median [min-max]; "
        "breaches: scopes that ended breached, by kind, min-max over rounds",
    ]
    if not figures["uvloop_installed"]:
        lines.append("uvloop not installed (pip install uvloop): asyncio's loop only")
    for sc in figures["scenarios"].values():
        lines += ["", sc["title"], ""]
        header = ["N", "loop", "variant", "parked s", "time s", "ratio", "breaches"]
        header += ["target", "verdict"]
        table = []
        for n_text, by_loop in sc["rows"].items():
            for lp, rows in by_loop.items():
                for v, row in rows.items():
                    table.append(
                        [
                            f"{int(n_text):,}",
                            lp,
                            row["label"],
                            "-" if row["time"] is None else f"{row['parked_s']:.3f}",
                            _time(row),
                            "1.00" if v == REFERENCE else _cell(row["ratio"]),
                            _breaches(row),
                            sc["target"] if v in SCOPED else "",
                            _verdict(row) if v in SCOPED else "",
                        ]
                    )
        lines += _table(header, table)
        for n_text, by_loop in sc["rows"].items():
            for lp, rows in by_loop.items():
                for row in rows.values():
                    if row["verdict"] is False:
                        lines.append(
                            f"  N={int(n_text):,} {lp} {row['label']}: "
                            + "; ".join(row["why"])
                        )
    if figures["scaling"]:
        lines += [
            "",
            f"O(N): ratio at the largest N / ratio at the smallest N (target <= "
            f"{TARGET_SCALING:g})",
        ]
        for x in figures["scaling"]:
            if x["growth"] is not None:
                value = f"{x['growth']:.2f}"
            elif x["timed_out_at"] is not None:
                value = f"TIMED OUT at N={x['timed_out_at']:,}"
            else:
                value = "no ratio"
            met = "not checked" if x["met"] is None else verdict(x["met"])
            lines.append(
                f"  ({x['scenario']}) {x['loop']} {label(x['scenario'], x['variant'])}"
                f", N={x['small']:,} -> {x['big']:,}: {value} ... {met}"
            )
    target = figures["target"]
    worst = (
        f"worst median ratio in (a)/(b) {target['worst']:.2f}x"
        if target["worst"]
        else "no ratio in (a)/(b)"
    )
    if target["timed_out"]:
        worst += f"; {target['timed_out']} rows TIMED OUT"
    lines += [
        "",
        f"target: with the default configuration, (a) and (b) within "
        f"{TARGET_RATIO:g}x of anyio.move_on_after and no breach anyio would "
        "not report, every scope of (c) and (d) breached, and O(N) at every "
        f"scenario ... {verdict(target['met'])} ({worst})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help="interleaved rounds (3)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one round of smaller N (a smoke run)",
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="repeatable; default: all",
    )
    parser.add_argument(
        "--loop",
        action="append",
        choices=LOOPS,
        help="repeatable; default: asyncio, and uvloop if installed",
    )
    parser.add_argument(
        "--n",
        type=int,
        action="append",
        help="tasks per run, repeatable: these N for every scenario",
    )
    parser.add_argument(
        "--run-timeout",
        type=float,
        default=RUN_TIMEOUT,
        help=f"seconds one run may take before it is killed ({RUN_TIMEOUT:g})",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe is not None:  # one run, in this fresh interpreter
        print(json.dumps(probe(*json.loads(args.probe))))
        return 0
    fill_counts(parser, args, {"rounds": 1}, {"rounds": 3})
    if args.n is not None and min(args.n) < 1:
        parser.error("--n must be >= 1")
    if not args.run_timeout > 0:
        parser.error("--run-timeout must be > 0")
    if args.loop and "uvloop" in args.loop and not HAVE_UVLOOP:
        parser.error("--loop uvloop: uvloop is not installed (pip install uvloop)")
    loops = args.loop or (["asyncio", "uvloop"] if HAVE_UVLOOP else ["asyncio"])
    scenarios = [s for s in SCENARIOS if s in (args.scenario or SCENARIOS)]
    defaults = SIZES["quick" if args.quick else "full"]
    sizes = {s: sorted(set(args.n)) if args.n else defaults[s] for s in scenarios}
    print(
        f"scale: {args.rounds} rounds of scenarios "
        + ", ".join(
            f"({s}) N={'/'.join(f'{n:,}' for n in sizes[s])}" for s in scenarios
        )
        + f"; loops {', '.join(loops)}; each run bounded by {args.run_timeout:g} s",
        file=sys.stderr,
    )
    raw = collect(scenarios, sizes, loops, args.rounds, args.run_timeout)
    figures = summary(raw, loops, args.rounds, args.run_timeout)
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "benchmark": "scale",
                    "python": sys.version.split()[0],
                    "summary": figures,
                    "raw": raw,
                },
                indent=1,
            )
        )
    print(render(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
