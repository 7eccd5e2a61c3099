"""A pool of workers under a supervisor: one job leaks, its worker is stopped
by its budget and restarted, and the other workers never notice.

* Four workers (``worker-1`` .. ``worker-4``) take jobs from one queue.  Each
  is a permanent child of a ``Supervisor`` with a budget of 4 MiB of live
  memory, renewed at every start.
* Twenty-four jobs each build and summarise about 1 MiB of strings; job 13
  keeps every buffer it makes.  Its worker passes 4 MiB, is stopped
  (``breached MEMORY``) and restarted; the job is reported as stopped, and
  every other job finishes exactly once.
* When every job is accounted for the pool is shut down: in reverse start
  order, each worker is asked to stop (``trap_shutdown()``), finishes the job
  in hand if it has one, and leaves (``stopped``).

The lines starting with ``event`` are the supervisor's event log.

Run:  python examples/supervised_workers.py [--backend asyncio|trio]
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

import memlimits_async as ml

KIB = 1024
WORKERS = 4
JOBS = 24
LEAKY_JOB = 13
BUDGET = ml.Budget(memory="4 MiB")


async def run_job(number: int) -> int:
    """Build about 1 MiB of strings, a few at a time, and summarise them."""
    if number == LEAKY_JOB:
        kept: list[bytes] = []
        while True:  # the bug: nothing is ever let go
            kept.append(bytes(256 * KIB))
            await anyio.sleep(0)
    lines: list[str] = []
    for start in range(0, 20_000, 2_000):
        lines.extend(
            f"job {number} line {index}" for index in range(start, start + 2_000)
        )
        await anyio.sleep(0)
    return sum(map(len, lines))


@dataclass
class Pool:
    """What the workers did, and what the supervisor said about them."""

    finished: dict[int, str] = field(default_factory=dict)  # job -> worker
    stopped: dict[int, str] = field(default_factory=dict)
    in_hand: dict[str, int] = field(default_factory=dict)  # worker -> job
    restarts: dict[str, int] = field(default_factory=dict)
    all_done: anyio.Event = field(default_factory=anyio.Event)

    def on_event(self, event: ml.SupervisorEvent) -> None:
        print(f"event {event}")
        if event.kind is ml.EventKind.BREACHED and event.child is not None:
            job = self.in_hand.pop(event.child)
            self.stopped[job] = event.child
            usage = event.usage
            peak = ml.format_size(usage.peak_live) if usage is not None else "?"
            print(f"job {job}: stopped with {event.child} (peak {peak} live)")
            self._check_done()
        if event.kind is ml.EventKind.RESTARTED and event.child is not None:
            self.restarts[event.child] = self.restarts.get(event.child, 0) + 1

    def job_done(self, job: int, worker: str, result: int) -> None:
        del self.in_hand[worker]
        assert job not in self.finished, f"job {job} ran twice"
        self.finished[job] = worker
        print(f"job {job}: finished by {worker} ({result} characters)")
        self._check_done()

    def _check_done(self) -> None:
        if len(self.finished) + len(self.stopped) == JOBS:
            self.all_done.set()


async def worker(name: str, jobs: MemoryObjectReceiveStream[int], pool: Pool) -> None:
    """Take jobs until the supervisor asks this worker to stop."""
    stop = ml.trap_shutdown()
    while True:
        async with ml.limit_scope(token=stop) as waiting:  # idle: stop at once
            job = await jobs.receive()
        if waiting.breached:
            return
        pool.in_hand[name] = job
        pool.job_done(job, name, await run_job(job))  # a job in hand is finished
        if stop.cancelled:
            return


async def main() -> None:
    send, receive = anyio.create_memory_object_stream[int](math.inf)
    pool = Pool()
    supervisor = ml.Supervisor(
        [
            ml.ChildSpec(name, worker, (name, receive, pool), budget=BUDGET)
            for name in (f"worker-{number}" for number in range(1, WORKERS + 1))
        ],
        name="pool",
        max_restarts=3,
        period=10,
        on_event=pool.on_event,
    )
    async with anyio.create_task_group() as group:
        await group.start(supervisor.run)
        for job in range(1, JOBS + 1):
            send.send_nowait(job)
        await pool.all_done.wait()
        group.cancel_scope.cancel()  # shuts the pool down, gracefully

    restarted = ", ".join(f"{name} x{n}" for name, n in sorted(pool.restarts.items()))
    stopped = ", ".join(f"job {job}" for job in sorted(pool.stopped))
    print(
        f"summary: {len(pool.finished)} of {JOBS} jobs finished, each once; "
        f"stopped by a budget: {stopped}; restarted: {restarted}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    anyio.run(main, backend=parser.parse_args().backend)
