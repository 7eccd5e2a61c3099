"""Workloads shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio

import memlimits_async as ml

KIB = 1024
MIB = 1024 * KIB


async def leak_until_cancelled(held: list[bytes], chunk: int = KIB) -> None:
    """Hold ever more memory, with a checkpoint after every append."""
    while True:
        held.append(bytes(chunk))
        await anyio.sleep(0)


def held_bytes(held: list[bytes]) -> int:
    """True bytes held by ``held``: its items and its pointer array."""
    return sum(sys.getsizeof(item) for item in held) + sys.getsizeof(held)


async def churn(total: int, chunk: int = 4 * KIB, per_checkpoint: int = 16) -> None:
    """Allocate and free ``total`` bytes, holding at most a few chunks."""
    allocated = 0
    while allocated < total:
        for _ in range(per_checkpoint):
            block = bytes(chunk)
            allocated += len(block)
            del block
        await anyio.sleep(0)


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a fresh interpreter that imports this very memlimits_async.

    ``-P`` keeps the working directory (a source checkout, maybe without the
    built extension) off ``sys.path``; PYTHONPATH points at the package the
    tests imported, installed or built in place.
    """
    package_parent = str(Path(ml.__file__).resolve().parent.parent)
    return subprocess.run(
        [sys.executable, "-P", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": package_parent},
    )
