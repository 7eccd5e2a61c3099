"""An example suite for the pytest plugin (run: examples/pytest_budgets.py).

Every test gets the 64 MB default of pytest.ini; the markers change it.
The tests named ``test_runaway_*`` and ``test_quadratic`` fail on purpose.
Their loops are bounded so that the suite ends even without the plugin.
"""

from __future__ import annotations

import asyncio

import anyio
import pytest


def test_parses_a_small_file() -> None:
    rows = [line.split(",") for line in ["a,b,c"] * 10_000]
    assert len(rows) == 10_000


@pytest.mark.limit_memory("24 MB")
def test_runaway_sync() -> None:
    cache: list[bytearray] = []
    for _ in range(5_000):  # 500 MB if nothing stops it
        cache.append(bytearray(100_000))


@pytest.mark.asyncio
@pytest.mark.limit_memory("24 MB")
async def test_runaway_asyncio() -> None:
    cache: list[bytearray] = []
    for _ in range(5_000):
        cache.append(bytearray(100_000))
        await asyncio.sleep(0)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_runaway_anyio(anyio_backend: str) -> None:
    cache: list[bytearray] = []
    for _ in range(5_000):  # the 64 MB default stops it
        cache.append(bytearray(100_000))
        await anyio.sleep(0)


@pytest.mark.limit_allocations("20 MB")
def test_quadratic() -> None:
    # Peaks at 1 MB but copies 50 MB: only an allocation budget sees it.
    data = b""
    for _ in range(100):
        data = data + bytes(10_000)
    assert len(data) == 1_000_000


@pytest.mark.no_memlimits
def test_needs_a_lot() -> None:
    assert len(bytearray(100_000_000)) == 100_000_000


@pytest.mark.limit_time(0.5)
def test_finishes_in_time() -> None:
    assert sum(range(100_000)) > 0
