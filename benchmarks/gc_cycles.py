"""Live bytes held by reference cycles, as a memory limit sees them.

The table "The garbage collector and live bytes" in docs/python-versions.md
comes from this script, run once per Python:

    python benchmarks/gc_cycles.py

A scope with ``memory="10 MiB"`` runs a body that makes 1,600 two-object
cycles, each holding a 64 KiB payload (100 MiB in all, never more than
128 KiB reachable).  Bytes held only by cycles stay live until the
collector runs, and the limit counts them: the peak that the scope saw and
whether it breached depend on the collector of the running Python.  The
body never reaches a checkpoint and preemption is off, so it runs to its
end whatever it breaches; accounting is exact (``sampling_interval=1``),
so the figures are bytes, not estimates, and the machine's load does not
change them.
"""

from __future__ import annotations

import asyncio
import gc
import platform

import memlimits_async as ml

CYCLES = 1_600
PAYLOAD = 64 * 1024
MIB = 1 << 20


class Node:
    __slots__ = ("other", "payload")

    def __init__(self, payload: int) -> None:
        self.other: Node | None = None
        self.payload = bytearray(payload)


def make_cycles() -> None:
    for _ in range(CYCLES):
        first, second = Node(PAYLOAD), Node(0)
        first.other, second.other = second, first


async def measure() -> tuple[int, bool]:
    async with ml.limit_scope(memory="10 MiB", preempt=False) as scope:
        make_cycles()
    return scope.usage.peak_live, scope.breached


def main() -> None:
    ml.configure(sampling_interval=1)
    gc.collect()
    peak, breached = asyncio.run(measure())
    threshold = gc.get_threshold()[0]
    print("| Python | gen-0 threshold | peak live bytes seen | breached |")
    print("|---|---|---|---|")
    print(
        f"| {platform.python_version()} | {threshold} | {peak / MIB:.1f} MiB "
        f"| {'yes' if breached else 'no'} |"
    )


if __name__ == "__main__":
    main()
