# distributed's Client is partly untyped.
# mypy: disallow-untyped-calls=False
"""Per-task budgets and real cancellation on a Dask cluster.

A LocalCluster of two worker processes (127.0.0.1, no dashboard), each
limited to 1 GiB (Dask pauses a worker at 80% of that and restarts it at
95%), runs with memlimits_async's worker plugin:

* a batch of ordinary tasks completes under the worker-wide default budget;
* a leaking task annotated with a 64 MiB budget fails with
  MemoryLimitReached, while the task beside it on the same worker finishes
  and the worker stays far below its pause threshold;
* a runaway computation is cancelled from the client: it is stopped where
  it runs, its ``finally`` block runs, and its thread takes the next task;
* each worker reports its tasks' usage; stops are also Dask events.

Run:  python examples/dask_budgets.py   (needs the [dask] extra)
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import dask
import psutil
from distributed import Client, LocalCluster

from memlimits_async.dask import PLUGIN_NAME, BudgetPlugin, task_usage

MIB = 1 << 20


def square(x: int) -> int:
    return x * x


def leak(chunks: int) -> int:
    """Hold one more MiB at each step: 2 GiB, unless stopped."""
    held = [bytearray(MIB) for _ in range(chunks)]
    return len(held)


def steady(steps: int) -> int:
    """A well-behaved neighbour: a MiB at a time, freed at once."""
    total = 0
    for _ in range(steps):
        total += len(bytearray(MIB))
        time.sleep(0.01)
    return total


def runaway(mark: str, seconds: float) -> int:
    """Computes without a checkpoint; its ``finally`` (where real code
    releases locks, files and connections) leaves a mark: when it ran, and
    in which thread."""
    x = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            x += 1
    finally:
        Path(mark).write_text(f"{time.time()!r} {threading.get_ident()}")
    return x


def thread_ident() -> int:
    return threading.get_ident()


def main() -> None:
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=2,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            memory_limit="1 GiB",
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(BudgetPlugin(memory="256 MiB", timeout=300))
        first, _ = sorted(client.scheduler_info()["workers"])
        pid = client.run(os.getpid, workers=[first])[first]

        squares = client.map(square, range(100))
        print(f"batch: {sum(client.gather(squares))} (sum of 100 squares)")

        peak = 0
        with dask.annotate(memory="64 MiB"):
            leaking = client.submit(leak, 2048, workers=[first], pure=False)
        neighbour = client.submit(steady, 100, workers=[first], pure=False)
        while not (leaking.done() and neighbour.done()):
            peak = max(peak, psutil.Process(pid).memory_info().rss)
            time.sleep(0.002)
        try:
            leaking.result()
        except Exception as exc:  # MemoryLimitReached (see docs/dask.md)
            print(f"leak: stopped: {exc}")
        print(f"neighbour: finished, {neighbour.result() // MIB} MiB churned")
        print(
            f"worker RSS peak: {peak / MIB:.0f} MiB "
            f"(pauses at {0.8 * 1024:.0f} MiB, restarts at {0.95 * 1024:.0f} MiB)"
        )

        # Both threads of the worker busy, then one of them cancelled.
        marks = Path(tempfile.mkdtemp())
        spinning = [
            client.submit(runaway, str(marks / str(n)), 60, workers=[first], pure=False)
            for n in range(2)
        ]
        time.sleep(1.0)
        asked = time.time()
        spinning[0].cancel()
        deadline = time.monotonic() + 30
        while not ((marks / "0").exists() and (mark := (marks / "0").read_text())):
            if time.monotonic() > deadline:
                raise SystemExit("the cancelled task was not stopped")
            time.sleep(0.002)
        stopped_at, thread = mark.split()
        print(
            f"runaway: cancelled, its finally ran "
            f"{1000 * (float(stopped_at) - asked):.0f} ms after the client asked"
        )
        after = client.submit(thread_ident, workers=[first], pure=False)
        print(f"next task ran in the freed thread: {after.result() == int(thread)}")
        spinning[1].cancel()
        while not (marks / "1").exists() and time.monotonic() < deadline:
            time.sleep(0.01)

        print("tasks that did not simply finish, as the workers saw them:")
        for reports in task_usage(client, ended=True).values():
            for report in reports:
                if report.state == "finished":
                    continue
                reason = report.breach.reason if report.breach else ""
                print(
                    f"  {report.key.split('-')[0]:<8} {report.state:<9} "
                    f"peak {report.usage.peak_live / MIB:6.1f} MiB  {reason}"
                )
        stops = [message for _, message in client.get_events(PLUGIN_NAME)]
        print(f"events logged under {PLUGIN_NAME!r}: {len(stops)}")


if __name__ == "__main__":
    main()
