"""Shared fixtures.

``anyio_backend`` runs every ``@pytest.mark.anyio`` test on asyncio, on
asyncio with uvloop's loop (which drives tasks from C, as under uvicorn) and
on trio (anyio's pytest plugin); native asyncio tests use pytest-asyncio and
native trio tests call ``trio.run`` themselves.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import memlimits_async as ml

DEFAULT_INTERVAL = "64 KiB"


try:
    import uvloop  # noqa: F401

    UVLOOP: list[object] = [
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")
    ]
except ImportError:  # not in the test extra for this platform
    UVLOOP = []


@pytest.fixture(params=["asyncio", *UVLOOP, "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return request.param


def _refill_free_lists() -> None:
    """CPython keeps freed small tuples, floats, lists and dicts in free
    lists for reuse, and a collection of the oldest generation empties them
    (as tools/refleak.py does between rounds).  A block a scope allocated
    and that its object then left in a free list stays charged to the scope
    (the memory is held), so an exact test whose body makes, say, a call's
    1-tuple of arguments would be charged 48 bytes more after a collection
    than in a warm program: it would be when the scope's own entry took the
    one tuple left.  Park a few of each outside any scope first."""
    parked: list[object] = []
    for i in range(32):
        parked += [(i,), (i, i), (i, i, i), float(i) + 0.5, [i], {i: i}]
    del parked


@pytest.fixture
def exact_accounting() -> Iterator[None]:
    """Charge every allocation with its exact size (sampling interval 1)."""
    _refill_free_lists()
    ml.configure(sampling_interval=1)
    try:
        yield
    finally:
        ml.configure(sampling_interval=DEFAULT_INTERVAL)


@pytest.fixture(autouse=True)
def _no_scope_leaks_between_tests() -> Iterator[None]:
    """Every test must leave the sampling interval and the context as found."""
    from memlimits_async._meter import _core

    assert _core.current_account.get(None) is None
    yield
    assert _core.current_account.get(None) is None
    stats = ml.stats()
    assert stats.configured_sampling_interval == ml.parse_size(
        DEFAULT_INTERVAL, name="x"
    )
