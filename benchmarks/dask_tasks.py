# distributed's Client and LocalCluster are partly untyped.
# mypy: disallow-untyped-calls=False
"""memlimits_async.dask on a real LocalCluster: cost, cancel latency, RSS.

Run ``python benchmarks/dask_tasks.py`` (``--quick`` for a smoke run; needs
the ``[dask]`` extra).  On one ``distributed.LocalCluster`` (two worker
processes with their nannies, two threads each, 1 GiB each, 127.0.0.1, no
dashboard), in one run, it prints:

* **tasks**: the wall time of N small tasks (default 1,000 ``inc`` calls,
  submitted with ``client.map`` and gathered) with budgets (the plugin
  registered, every task annotated with ``memory``, ``allocations`` and
  ``timeout``) and without (no plugin), in interleaved rounds whose order
  alternates; the ratio is taken within each round and printed as
  ``median [min-max]``.  The issue's target: at most 1.10x.
* **per task in the worker thread**: the CPU time of calling a task's run
  spec as the worker does, plain and as the plugin runs it (scope, token,
  records), in this process: what the plugin adds to each task, without
  Dask's own cost around it (about a millisecond a task on this cluster).
* **cancel**: for M trials, a task computing without a checkpoint is
  cancelled from the client (``future.cancel()``); the time from that call
  to the start of the task's ``finally`` block (written by the task, read
  back from a file: one clock, one machine), split at the moment the
  worker's state machine learnt of the cancellation (its story's
  timestamp): Dask's messaging (client, scheduler, worker) and the stop
  itself (the plugin's token, the preemption in the worker thread); once
  with the worker's other thread idle, once with it computing too (a fully
  loaded worker: the threads take turns holding the GIL).  The issue's
  target: stopped within 100 ms.
* **leak**: a task that would hold 2 GiB, with a 100 MiB budget: where the
  breach fired, the bytes it held at its peak, and the worker process's RSS
  (polled every 2 ms from this process) against the worker's pause
  threshold (80% of its memory limit) and terminate threshold (95%).

Wall time, not CPU time: the work is spread over five processes.  Run it on
an idle machine for figures to quote; ``--rounds`` for a noisy one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import dask
import psutil
from _package import fill_counts, ml, ratio_target, verdict
from dask.task_spec import Task
from distributed import Client, LocalCluster

from memlimits_async.dask import PLUGIN_NAME, BudgetPlugin, task_usage

MIB = 1 << 20
WORKER_MEMORY = 1 << 30
TARGET_RATIO = 1.10
TARGET_CANCEL = 0.100  # seconds


def inc(x: int) -> int:
    return x + 1


def spin(base: str, seconds: float) -> int:
    marks = Path(base)
    marks.with_suffix(".started").write_text("started")
    x = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            x += 1
    finally:
        marks.with_suffix(".finally").write_text(repr(time.time()))
    return x


def leak(chunks: int) -> int:
    held = [bytearray(MIB) for _ in range(chunks)]
    return len(held)


def cancelled_at(key: str, dask_worker: Any) -> float | None:
    """When the worker moved the task out of executing (its story)."""
    for event in dask_worker.state.story(key):
        if event[1:3] == ("executing", "released"):
            return float(event[-1])
    return None


def wait_for(path: Path, timeout: float = 120.0) -> str:
    """The text of ``path`` once a task has written it (never empty)."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and (text := path.read_text())):
        if time.monotonic() > deadline:
            raise SystemExit(f"{path.name} never appeared")
        time.sleep(0.001)
    return text


def registered(client: Client) -> bool:
    plugins = client.run(lambda dask_worker: PLUGIN_NAME in dask_worker.plugins)
    return all(plugins.values())


def time_batch(client: Client, n: int, budgeted: bool) -> float:
    """Seconds to run ``n`` small tasks, with or without the plugin (which
    is registered anew, or removed, before the clock starts)."""
    if budgeted:
        client.register_plugin(BudgetPlugin())
        annotations = {"memory": "50 MiB", "allocations": "1 GiB", "timeout": 60}
    else:
        if registered(client):
            client.unregister_worker_plugin(PLUGIN_NAME)
        annotations = {}
    assert registered(client) == budgeted
    start = time.perf_counter()
    with dask.annotate(**annotations):
        futures = client.map(inc, range(n), pure=False)
    results = client.gather(futures)
    elapsed = time.perf_counter() - start
    assert results == list(range(1, n + 1))
    if budgeted:  # the plugin saw every task
        ended = sum(len(reports) for reports in task_usage(client, ended=True).values())
        assert ended >= min(n, 1000), ended
    del futures
    return elapsed


def cancel_trials(
    client: Client, worker: str, marks: Path, trials: int, busy: bool
) -> dict[str, Any]:
    """Cancel a computing task ``trials`` times; with ``busy``, while the
    worker's other thread computes too (holding the GIL half the time)."""
    neighbour = None
    if busy:
        base = marks / "neighbour"
        neighbour = client.submit(spin, str(base), 600, workers=[worker], pure=False)
        wait_for(base.with_suffix(".started"))
    totals: list[float] = []
    messaging: list[float] = []
    stops: list[float] = []
    for trial in range(trials):
        base = marks / f"spin-{busy}-{trial}"
        future = client.submit(spin, str(base), 60, workers=[worker], pure=False)
        wait_for(base.with_suffix(".started"))
        time.sleep(0.1)
        asked = time.time()
        future.cancel()
        began = float(wait_for(base.with_suffix(".finally")))
        learnt = client.run(cancelled_at, str(future.key), workers=[worker])[worker]
        totals.append(began - asked)
        if learnt is not None:
            messaging.append(learnt - asked)
            stops.append(began - learnt)
        del future
    if neighbour is not None:
        neighbour.cancel()
        wait_for((marks / "neighbour").with_suffix(".finally"))
    ms = [1000 * each for each in totals]
    print(
        f"\ncancel to finally, {trials} trials, the worker's other thread "
        f"{'computing' if busy else 'idle'} (ms)"
    )
    print(f"  total            median {statistics.median(ms):.1f}, max {max(ms):.1f}")
    if stops:
        print(
            f"  Dask's messaging median {1000 * statistics.median(messaging):.1f},"
            f" max {1000 * max(messaging):.1f}"
        )
        print(
            f"  the stop itself  median {1000 * statistics.median(stops):.1f},"
            f" max {1000 * max(stops):.1f}"
        )
    met = statistics.median(totals) <= TARGET_CANCEL
    print(
        f"target: median cancel to finally <= {1000 * TARGET_CANCEL:.0f} ms: "
        f"{verdict(met)}"
    )
    return {
        "total_s": totals,
        "messaging_s": messaging,
        "stop_s": stops,
        "target": {"seconds": TARGET_CANCEL, "met": met},
    }


def wrapper_cost(rounds: int, calls: int = 20_000) -> dict[str, Any]:
    """CPU seconds per call of a task's run spec, plain and as the plugin
    runs it (its scope, token and records: the plugin's private ``_run``,
    which the worker reaches through the wrapped run spec), in this
    thread, interleaved rounds."""
    plugin = BudgetPlugin()
    budget = ml.Budget(memory="50 MiB", allocations="1 GiB", timeout=60)
    task = Task("inc-0", inc, 1)
    plain: list[float] = []
    wrapped: list[float] = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(calls):
            task({})
        plain.append((time.process_time() - start) / calls)
        start = time.process_time()
        for _ in range(calls):
            plugin._run(task, budget, {})
        wrapped.append((time.process_time() - start) / calls)
    extra = statistics.median(w - p for w, p in zip(wrapped, plain, strict=True))
    print(f"\nin the worker thread, per task ({calls} calls x {rounds} rounds, us)")
    print(f"  plain run spec   {1e6 * statistics.median(plain):.1f}")
    print(f"  under the plugin {1e6 * statistics.median(wrapped):.1f}")
    print(f"  added            {1e6 * extra:.1f}")
    return {"plain_s": plain, "wrapped_s": wrapped, "added_s": extra}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, 5 cancels")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 7)")
    parser.add_argument("--n", type=int, help="tasks per batch (default 1000)")
    parser.add_argument("--cancels", type=int, help="cancel trials (default 20)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    fill_counts(
        parser,
        args,
        quick={"rounds": 3, "n": 1000, "cancels": 5},
        full={"rounds": 7, "n": 1000, "cancels": 20},
    )
    figures: dict[str, Any] = {"python": sys.version.split()[0]}
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=2,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            memory_limit=WORKER_MEMORY,
        ) as cluster,
        Client(cluster) as client,
    ):
        first = sorted(client.scheduler_info()["workers"])[0]
        print("warming up", file=sys.stderr)
        time_batch(client, args.n, True)
        time_batch(client, args.n, False)

        # ---- tasks ----
        plain: list[float] = []
        budgeted: list[float] = []
        for round_ in range(args.rounds):
            order = (False, True) if round_ % 2 == 0 else (True, False)
            for each in order:
                (budgeted if each else plain).append(time_batch(client, args.n, each))
            print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr)
        ratios = [b / p for b, p in zip(budgeted, plain, strict=True)]
        worst = statistics.median(ratios)
        print(f"\n{args.n} small tasks, {args.rounds} interleaved rounds (seconds)")
        print(f"  without budgets  {spread(plain)}")
        print(f"  with budgets     {spread(budgeted)}")
        print(f"  ratio            {spread(ratios)}")
        per_task = statistics.median(
            (b - p) / args.n for b, p in zip(budgeted, plain, strict=True)
        )
        print(f"  difference per task: {per_task * 1e6:.1f} us (median)")
        target = ratio_target(TARGET_RATIO, worst)
        print(
            f"target: median ratio <= {TARGET_RATIO:.2f}: "
            f"{verdict(bool(target['met']))}"
        )
        figures["tasks"] = {
            "n": args.n,
            "plain_s": plain,
            "budgeted_s": budgeted,
            "ratios": ratios,
            "median_ratio": worst,
            "per_task_us": per_task * 1e6,
            "target": target,
        }

        figures["wrapper"] = wrapper_cost(args.rounds)

        # ---- cancel ----
        client.register_plugin(BudgetPlugin())
        marks = Path(tempfile.mkdtemp())
        figures["cancel"] = {}
        for busy in (False, True):
            figures["cancel"]["busy" if busy else "idle"] = cancel_trials(
                client, first, marks, args.cancels, busy
            )

        # ---- leak ----
        pid = client.run(os.getpid, workers=[first])[first]
        process = psutil.Process(pid)
        before = process.memory_info().rss
        peak = before
        stop = threading.Event()

        def poll() -> None:
            nonlocal peak
            while not stop.wait(0.002):
                peak = max(peak, process.memory_info().rss)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        with dask.annotate(memory="100 MiB"):
            leaking = client.submit(leak, 2048, workers=[first], pure=False)
        try:
            leaking.result(timeout=120)
            raise SystemExit("the leak was not stopped")
        except Exception as exc:
            if "memory limit" not in str(exc):
                raise
        stop.set()
        poller.join()
        (report,) = [
            each
            for each in task_usage(client, ended=True)[first]
            if each.key == str(leaking.key)
        ]
        assert report.breach is not None and report.breach.observed is not None
        pause, terminate = 0.80 * WORKER_MEMORY, 0.95 * WORKER_MEMORY
        print("\na task that would hold 2 GiB, budget 100 MiB (MiB)")
        print(f"  breach fired at     {report.breach.observed / MIB:.1f}")
        print(f"  task's peak live    {report.usage.peak_live / MIB:.1f}")
        print(f"  worker RSS before   {before / MIB:.0f}")
        print(f"  worker RSS peak     {peak / MIB:.0f}")
        print(f"  pause threshold     {pause / MIB:.0f} (80% of 1 GiB)")
        print(f"  terminate threshold {terminate / MIB:.0f} (95%)")
        figures["leak"] = {
            "budget": 100 * MIB,
            "observed": report.breach.observed,
            "peak_live": report.usage.peak_live,
            "rss_before": before,
            "rss_peak": peak,
            "pause": pause,
            "terminate": terminate,
        }
    figures["memlimits_async"] = getattr(ml, "__version__", "checkout")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
