"""Four tasks, four budgets, one table.

Each task runs in its own ``limit_scope``; they share one event loop:

* ``leaky``     keeps every buffer it makes, and is stopped by ``memory``;
* ``steady``    works within all of its budgets and finishes;
* ``churner``   frees what it makes, but allocates far too much in total,
                and is stopped by ``allocations``;
* ``sleepy``    waits on something slow, and is stopped by ``timeout``.

Run:  python examples/demo.py [--backend asyncio|trio]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

import memlimits_async as ml

KIB = 1024


async def leaky() -> str:
    held: list[bytes] = []
    while True:
        held.append(bytes(16 * KIB))
        await anyio.sleep(0)


async def steady() -> str:
    total = 0
    for round_number in range(200):
        record = {"round": round_number, "values": list(range(100))}
        total += len(json.dumps(record))
        await anyio.sleep(0)
    return f"encoded {total} bytes of JSON"


async def churner() -> str:
    while True:
        for _ in range(64):
            scratch = [str(number) for number in range(256)]
            del scratch
        await anyio.sleep(0)


async def sleepy() -> str:
    await anyio.sleep(3600)
    return "woke up"


@dataclass(frozen=True)
class Job:
    name: str
    work: Callable[[], Awaitable[str]]
    memory: str | None = None
    allocations: str | None = None
    timeout: float | None = None

    def budget(self) -> str:
        limits = {"memory": self.memory, "allocations": self.allocations}
        parts = [f"{key}={value}" for key, value in limits.items() if value]
        if self.timeout is not None:
            parts.append(f"timeout={self.timeout:g} s")
        return ", ".join(parts)


JOBS = [
    Job("leaky", leaky, memory="8 MiB"),
    Job("steady", steady, memory="8 MiB", allocations="256 MiB", timeout=30),
    Job("churner", churner, memory="8 MiB", allocations="64 MiB"),
    Job("sleepy", sleepy, timeout=0.2),
]


async def main() -> None:
    rows: list[tuple[str, str, ml.LimitScope, str]] = []

    async def run(job: Job) -> None:
        result = "cancelled"
        async with ml.limit_scope(
            memory=job.memory, allocations=job.allocations, timeout=job.timeout
        ) as scope:
            result = await job.work()
        rows.append((job.name, job.budget(), scope, result))

    async with anyio.create_task_group() as tg:
        for job in JOBS:
            tg.start_soon(run, job)

    header = f"{'task':<8} {'budget':<48} {'allocated':>10} {'peak live':>10}  outcome"
    print(header)
    print("-" * len(header))
    for name, budget, scope, result in sorted(rows):
        usage = scope.usage
        outcome = scope.breach.kind.name if scope.breach else "finished"
        print(
            f"{name:<8} {budget:<48} {ml.format_size(usage.allocated):>10} "
            f"{ml.format_size(usage.peak_live):>10}  {outcome}"
        )
        print(f"{'':<8} -> {scope.breach.reason if scope.breach else result}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    anyio.run(main, backend=parser.parse_args().backend)
