"""The process-wide memory limit and the scopes that take part in it."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest

import memlimits_async as ml
from helpers import KIB, MIB, run_python
from memlimits_async import _global_limit

pytestmark = pytest.mark.filterwarnings("error")


@pytest.fixture
def no_global_limit_after() -> Iterator[None]:
    try:
        yield
    finally:
        ml.set_global_memory_limit(None)


def _metered_heap() -> int:
    return ml.stats().metered_heap


@pytest.mark.anyio
async def test_the_allocating_participant_is_stopped_and_nobody_else(
    exact_accounting: None, no_global_limit_after: None
) -> None:
    # Exact accounting: the metered heap is exact, so the policy is checked
    # deterministically (the sampled case has its own test below).
    ml.set_global_memory_limit(_metered_heap() + 8 * MIB)
    quiet_holds: list[bytes] = []
    outsider_holds: list[bytes] = []
    stopped_allocating = anyio.Event()
    quiet_may_allocate = anyio.Event()
    log: list[str] = []

    async def quiet_participant() -> ml.LimitScope:
        async with ml.limit_scope(global_memory=True) as scope:
            quiet_holds.append(bytes(2 * MIB))
            await quiet_may_allocate.wait()  # holds memory, allocates nothing
            log.append("quiet wakes up over the limit")
            quiet_holds.append(bytes(64 * 1024))  # now it allocates: stopped
            await anyio.sleep(1)
            log.append("never")
        return scope

    async def allocating_participant() -> ml.LimitScope:
        held: list[bytes] = []
        async with ml.limit_scope(global_memory=True) as scope:
            while True:
                held.append(bytes(256 * 1024))
                await anyio.sleep(0)
        stopped_allocating.set()
        return scope

    async def outsider() -> ml.LimitScope:
        await stopped_allocating.wait()
        async with ml.limit_scope() as scope:  # not taking part
            for _ in range(40):  # 10 MiB more while over the limit
                outsider_holds.append(bytes(256 * 1024))
                await anyio.sleep(0)
        log.append("outsider finished")
        quiet_may_allocate.set()
        return scope

    scopes: dict[str, ml.LimitScope] = {}

    async def run(name: str, fn: object) -> None:
        scopes[name] = await fn()  # type: ignore[operator]

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "quiet", quiet_participant)
        await anyio.sleep(0.01)
        tg.start_soon(run, "allocating", allocating_participant)
        tg.start_soon(run, "outsider", outsider)

    breach = scopes["allocating"].breach
    assert breach is not None and breach.kind is ml.BreachKind.GLOBAL_MEMORY
    assert breach.observed is not None and breach.limit is not None
    assert breach.observed > breach.limit
    assert "global memory limit" in breach.reason
    assert not scopes["outsider"].breached
    assert log == ["outsider finished", "quiet wakes up over the limit"]
    quiet = scopes["quiet"].breach
    assert quiet is not None and quiet.kind is ml.BreachKind.GLOBAL_MEMORY


@pytest.mark.anyio
async def test_sampled_global_limit_stops_a_leak_near_the_limit(
    no_global_limit_after: None,
) -> None:
    # The interval drops to about limit/1200 while the limit is set, as for a
    # scope's limit.  The heap already metered (`start`) is a fixed estimate,
    # so the leak crosses the limit when the estimate of its own 16 MiB does;
    # an interval of at most 8 KiB takes >= 2048 samples of them, and with
    # 1200 already the leak is stopped within +-20% except with probability
    # < 1e-10 per side (docs/accuracy.md): < 1e-9 in all.
    start = _metered_heap()
    limit = start + 16 * MIB
    ml.configure(sampling_interval="8 KiB")
    try:
        ml.set_global_memory_limit(limit)
        assert ml.stats().sampling_interval <= 8 * 1024
        held: list[bytes] = []
        async with ml.limit_scope(global_memory=True) as scope:
            while True:
                held.append(bytes(16 * 1024))
                await anyio.sleep(0)
    finally:
        ml.configure(sampling_interval="64 KiB")
    assert scope.breach is not None
    assert scope.breach.kind is ml.BreachKind.GLOBAL_MEMORY
    truly_added = 16 * 1024 * len(held)
    assert 0.8 * 16 * MIB < truly_added < 1.2 * 16 * MIB + 2 * MIB


def test_sync_participant_reports_at_exit(
    exact_accounting: None, no_global_limit_after: None
) -> None:
    ml.set_global_memory_limit(_metered_heap() + MIB)
    with ml.limit_scope(global_memory=True) as scope:
        # Pieces under 1 MiB: sampled, never refused (tests/test_refuse.py).
        held = [bytes(512 * KIB) for _ in range(4)]
    del held
    assert scope.breach is not None
    assert scope.breach.kind is ml.BreachKind.GLOBAL_MEMORY
    assert scope.breach.refused == 0


def test_raise_on_breach_raises_memory_limit_reached(
    exact_accounting: None, no_global_limit_after: None
) -> None:
    ml.set_global_memory_limit(_metered_heap() + MIB)
    with pytest.raises(ml.MemoryLimitReached, match="global memory limit"):
        with ml.limit_scope(global_memory=True, raise_on_breach=True):
            held = [bytes(512 * KIB) for _ in range(4)]
    del held


def test_without_a_limit_participants_are_never_stopped(
    exact_accounting: None,
) -> None:
    assert ml.global_memory_limit() is None
    with ml.limit_scope(global_memory=True) as scope:
        held = bytes(4 * MIB)
    del held
    assert not scope.breached


@pytest.mark.anyio
async def test_rss_measure_stops_memory_the_meter_cannot_see(
    no_global_limit_after: None,
) -> None:
    # Memory taken behind Python's allocators (mmap, as a C library would)
    # is invisible to the heap measure but counts in the RSS.
    import mmap

    rss = _global_limit._read_rss()
    ml.set_global_memory_limit(rss + 64 * MIB, measure="rss", rss_poll_interval=0.005)
    assert ml.global_memory_limit() == (rss + 64 * MIB, "rss")
    maps: list[mmap.mmap] = []
    try:
        async with ml.limit_scope(global_memory=True) as scope:
            for _ in range(400):  # up to 400 MiB; stopped long before
                region = mmap.mmap(-1, MIB)
                region.write(b"\x01" * MIB)  # resident now
                maps.append(region)
                await anyio.sleep(0.002)
        assert scope.breach is not None
        assert scope.breach.kind is ml.BreachKind.GLOBAL_MEMORY
        assert scope.breach.observed is not None
        assert scope.breach.observed > rss + 64 * MIB
        assert len(maps) < 400
    finally:
        for region in maps:
            region.close()


def test_failed_rss_setup_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, no_global_limit_after: None
) -> None:
    ml.set_global_memory_limit("1 GiB")
    monkeypatch.setattr(_global_limit, "_STATM", "/nonexistent/statm")
    with pytest.raises(ValueError, match="measure='rss' needs"):
        ml.set_global_memory_limit("2 GiB", measure="rss")
    assert ml.global_memory_limit() == (1 << 30, "heap")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"limit": "lots"}, ValueError, "limit"),
        ({"limit": -1}, ValueError, "limit"),
        ({"limit": 1.5j}, TypeError, "limit"),
        ({"limit": "1 GiB", "measure": "vms"}, ValueError, "measure"),
        ({"limit": "1 GiB", "rss_poll_interval": 0}, ValueError, "rss_poll_interval"),
        ({"limit": "1 GiB", "rss_poll_interval": "1"}, TypeError, "rss_poll_interval"),
        (
            {"limit": "1 GiB", "rss_poll_interval": float("nan")},
            ValueError,
            "rss_poll_interval",
        ),
    ],
)
def test_bad_global_limit_arguments(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        ml.set_global_memory_limit(**kwargs)  # type: ignore[arg-type]
    assert ml.global_memory_limit() is None


def test_global_memory_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="global_memory must be a bool"):
        ml.limit_scope(global_memory=1)  # type: ignore[arg-type]


def test_rss_poller_follows_a_fork() -> None:
    script = """
import os, sys
import memlimits_async as ml
from memlimits_async import _global_limit
ml.set_global_memory_limit("64 GiB", measure="rss")
pid = os.fork()
if pid == 0:
    alive = _global_limit._poller is not None and _global_limit._poller.is_alive()
    os._exit(0 if alive else 1)
_, status = os.waitpid(pid, 0)
print("child poller alive" if os.waitstatus_to_exitcode(status) == 0 else "dead")
"""
    result = run_python("-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "child poller alive"
