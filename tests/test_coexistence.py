"""Other users of the allocators in the same process: tracemalloc started
and stopped many times in either order, memray, numpy, and every
``PYTHONMALLOC`` allocator.

Hooks are installed once per process and never removed, so each order of
installation runs in a fresh interpreter (``run_python``).  The numpy tests
run in this process: numpy's array buffers bypass the hooked domains.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import json
import sys
from collections.abc import Callable, Iterator
from textwrap import dedent
from typing import Any

import pytest

import memlimits_async as ml
from helpers import run_python

PRELUDE = """
import sys, tracemalloc, warnings
import anyio
import memlimits_async as ml

def measured(size, slack=0):
    # A scope is charged exactly what its body allocates (interval 1);
    # `slack`: what another tool's own bookkeeping adds in the same context.
    with ml.limit_scope() as scope:
        block = bytes(size)
    extra = scope.usage.live - sys.getsizeof(block)
    assert 0 <= extra <= slack, (scope.usage, sys.getsizeof(block))
    return extra

async def leak():
    held = []
    async with ml.limit_scope(memory="1 MiB") as scope:
        while True:
            held.append(bytes(1024))
            await anyio.sleep(0)
    return scope

def breaches():
    return anyio.run(leak).breached and anyio.run(leak, backend="trio").breached
"""


def run(body: str, *args: str) -> str:
    code = PRELUDE + "ml.configure(sampling_interval=1)\n" + dedent(body)
    result = run_python(*args, "-W", "error::RuntimeWarning", "-c", code)
    assert result.returncode == 0, result.stderr
    return result.stdout


# ---- tracemalloc, repeatedly ----


def test_tracemalloc_started_and_stopped_many_times_after_the_meter() -> None:
    out = run(
        """
        measured(1000)                          # our hooks go in first
        for frames in (1, 5, 1, 25, 1):
            tracemalloc.start(frames)           # wraps our hooks
            measured(10_000 + frames)
            block = bytes(123_456)              # tracemalloc sees it through us
            assert tracemalloc.get_object_traceback(block) is not None
            # Blocks allocated on one side of a start or stop and freed on
            # the other are credited exactly (the metered heap holds only
            # the blocks charged to scopes).
            with ml.limit_scope():
                kept = bytes(50_000 + frames)
            size, heap = sys.getsizeof(kept), ml.stats().metered_heap
            tracemalloc.stop()                  # puts our hooks back on top
            del kept
            assert heap - ml.stats().metered_heap == size
            with ml.limit_scope():
                kept = bytes(60_000 + frames)
            size, heap = sys.getsizeof(kept), ml.stats().metered_heap
            tracemalloc.start(frames)
            del kept
            assert heap - ml.stats().metered_heap == size
            assert breaches()
            tracemalloc.stop()
            measured(30_000 + frames)
            assert breaches()
        assert ml.stats().hook_reinstalls == 0
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_tracemalloc_started_at_startup_then_cycled() -> None:
    # -X tracemalloc: tracemalloc's hooks are in before the meter's.  The
    # first stop removes ours (one re-installation, one warning); from then
    # on tracemalloc wraps us and every later stop gives us back.
    out = run(
        """
        assert tracemalloc.is_tracing()
        measured(1000)                          # ours wrap tracemalloc's
        tracemalloc.stop()                      # ours are gone
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            measured(2000)                      # noticed, put back
        assert [w.category for w in caught] == [RuntimeWarning], caught
        assert breaches()
        for round in range(5):
            tracemalloc.start(3)
            measured(3000 + round)
            assert breaches()
            tracemalloc.stop()
            measured(4000 + round)
        assert ml.stats().hook_reinstalls == 1, ml.stats()
        print("ok")
        """,
        "-X",
        "tracemalloc=3",
    )
    assert out.strip() == "ok"


def test_delivery_thread_survives_the_reinstall_warning_as_an_error() -> None:
    # Under -W error the warning of a re-installation made by the delivery
    # thread's upkeep is an exception in that thread; it used to end the
    # thread, and with it every delivery to loops outside the main thread.
    out = run(
        """
        import threading, time, faulthandler
        from memlimits_async import _delivery
        faulthandler.dump_traceback_later(120, exit=True)

        def in_thread(fn, *args):
            out = []
            thread = threading.Thread(target=lambda: out.append(fn(*args)))
            thread.start()
            thread.join()
            return out[0]

        assert in_thread(anyio.run, leak).breached    # the delivery thread runs
        tracemalloc.stop()                            # ours are gone
        for _ in range(1000):                         # it notices within 0.25 s
            if ml.stats().hook_reinstalls:
                break
            time.sleep(0.01)
        assert ml.stats().hook_reinstalls == 1
        assert _delivery._thread.is_alive()
        assert in_thread(anyio.run, leak).breached
        measured(5000)
        print("ok")
        """,
        "-X",
        "tracemalloc",
    )
    assert out.strip() == "ok"


# ---- memray ----

needs_memray = pytest.mark.skipif(
    importlib.util.find_spec("memray") is None,
    reason="memray is not installed (it has no wheel for this platform/Python)",
)

MEMRAY_PRELUDE = """
import os, tempfile
import memray

capture = os.path.join(tempfile.mkdtemp(), "capture.bin")

def memray_saw(size):
    reader = memray.FileReader(capture)
    try:
        return any(r.size == size for r in reader.get_allocation_records())
    finally:
        reader.close()

# memray's profile function materializes frame objects: a few hundred bytes
# charged to the scope that is running, the same whatever the block size.
MEMRAY_SLACK = 2048
"""


@needs_memray
@pytest.mark.parametrize(
    "options",
    [
        "trace_python_allocators=False",
        "trace_python_allocators=True",
        "trace_python_allocators=True, native_traces=True",
    ],
)
def test_memray_tracking_after_the_meter(options: str) -> None:
    out = run(
        MEMRAY_PRELUDE
        + dedent(f"""
        measured(1000)
        with memray.Tracker(capture, {options}):
            sizes = (10_000, 20_000, 2_000_000)  # the first call warms up
            extras = [measured(size, MEMRAY_SLACK) for size in sizes]
            assert extras[1] == extras[2], extras   # each block counted once
            assert breaches()
            block = bytes(333_333)
        measured(30_000)                        # exact again, nothing lost
        assert breaches()
        assert ml.stats().hook_reinstalls == 0
        assert memray_saw(sys.getsizeof(block))
        print("ok")
        """)
    )
    assert out.strip() == "ok"


@needs_memray
def test_memray_tracking_before_the_meter() -> None:
    # memray's Python-allocator hooks are in first; when its tracker ends it
    # restores what it saved, which removes ours: put back, with a warning.
    out = run(
        MEMRAY_PRELUDE
        + dedent("""
        with memray.Tracker(capture, trace_python_allocators=True):
            measured(1000, MEMRAY_SLACK)        # installs ours on top of memray's
            sizes = (10_000, 20_000, 2_000_000)
            extras = [measured(size, MEMRAY_SLACK) for size in sizes]
            assert extras[1] == extras[2], extras
            block = bytes(333_333)
        # (No loop ran yet: no delivery thread to put the hooks back first.)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            measured(30_000)
        assert [w.category for w in caught] == [RuntimeWarning], caught
        measured(40_000)
        assert breaches()
        assert ml.stats().hook_reinstalls == 1
        assert memray_saw(sys.getsizeof(block))
        print("ok")
        """)
    )
    assert out.strip() == "ok"


# ---- numpy ----
#
# Documented behaviour (docs/limit-scope.md, "What is measured"): numpy's
# default data handler takes array buffers from malloc, so they are not
# measured; the array objects themselves, numpy scalars and everything numpy
# creates as Python objects go through the OBJ domain and are.  Nothing is
# counted twice.  (If numpy's PyDataMem handler is ever wrapped, the buffer
# assertions below become "== nbytes, once".)


def usage_of(make: Callable[[], Any]) -> tuple[ml.Usage, Any]:
    with ml.limit_scope() as scope:
        result = make()
    return scope.usage, result


@pytest.fixture
def np(exact_accounting: None) -> Iterator[Any]:
    """numpy, exact accounting, and no collection inside a measured scope
    (finalizers and gc callbacks it runs would be charged to the scope)."""
    numpy = pytest.importorskip("numpy")
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield numpy
    finally:
        if was_enabled:
            gc.enable()


@pytest.mark.parametrize("constructor", ["empty", "zeros", "ones", "arange"])
@pytest.mark.parametrize("dtype", ["uint8", "float64"])
def test_numpy_array_buffers_are_not_measured(
    np: Any, constructor: str, dtype: str
) -> None:
    make = getattr(np, constructor)
    # numpy (and the interpreter, on 3.11) cache a few objects on first use.
    usage_of(functools.partial(make, 16, dtype=dtype))
    headers = set()
    for length in (0, 10, 10_000, 1_000_000):
        usage, array = usage_of(functools.partial(make, length, dtype=dtype))
        assert array.nbytes == length * array.itemsize
        headers.add(usage.live)
        assert usage.allocated < 4096, (length, usage)
    # What stays is the array object, the same for 0 bytes as for 8 MB.
    assert len(headers) == 1, headers
    (header,) = headers
    assert 0 < header <= 1024


def test_numpy_copies_into_python_objects_are_counted_once(np: Any) -> None:
    array = np.arange(250_000, dtype=np.float64)  # 2 MB, not measured
    usage_of(array.tobytes)  # first-use caches
    usage, data = usage_of(array.tobytes)
    assert usage == ml.Usage(*[sys.getsizeof(data)] * 3)
    for convert in (bytes, bytearray):
        usage, data = usage_of(functools.partial(convert, array))
        assert sys.getsizeof(data) <= usage.live <= sys.getsizeof(data) + 1024
    # Views and numpy copies add an array object, never the data again.
    usage, view = usage_of(lambda: np.frombuffer(data, dtype=np.uint8))
    assert view.nbytes == len(data) and usage.live <= 1024
    usage, copied = usage_of(array.copy)
    assert copied.nbytes == array.nbytes and usage.live <= 1024
    usage, doubled = usage_of(functools.partial(np.multiply, array, 2))
    assert doubled.nbytes == array.nbytes and usage.live <= 1024


def test_numpy_python_objects_are_measured(np: Any) -> None:
    usage, scalars = usage_of(lambda: [np.float64(i) for i in range(1000)])
    assert usage.live >= 1000 * 16 + sys.getsizeof(scalars)
    usage, items = usage_of(np.arange(1000).tolist)
    assert usage.live >= sum(map(sys.getsizeof, items))


def test_numpy_buffers_are_left_to_tracemalloc() -> None:
    pytest.importorskip("numpy")
    out = run(
        """
        import numpy as np
        tracemalloc.start()
        with ml.limit_scope() as scope:
            array = np.ones(1_000_000, dtype=np.uint8)
        domain = tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)
        traced = tracemalloc.take_snapshot().filter_traces([domain])
        in_numpy_domain = sum(stat.size for stat in traced.statistics("filename"))
        # numpy reports its buffer to tracemalloc itself; we never see it.
        assert in_numpy_domain >= 1_000_000, in_numpy_domain
        assert scope.usage.live <= 1024, scope.usage
        print("ok")
        """
    )
    assert out.strip() == "ok"


# ---- PYTHONMALLOC and -X dev ----

ALLOCATOR_WORKLOAD = """
import json
results = {}
for name, make in {
    "bytes": lambda: bytes(10_000),
    "strs": lambda: [str(i) for i in range(10_000)],
    "dict": lambda: {i: str(i) for i in range(2_000)},
    "bytearray": lambda: bytearray(100_000),
    "grown": lambda: [0] * 30_000 + [1] * 50_000,
}.items():
    with ml.limit_scope() as scope:
        kept = make()
    results[name] = [scope.usage.allocated, scope.usage.live, scope.usage.peak_live]
ml.configure(sampling_interval="64 KiB")
results["breaches"] = breaches()
print(json.dumps(results))
"""


def allocator_results(*args: str) -> Any:
    return json.loads(run(ALLOCATOR_WORKLOAD, *args))


@pytest.fixture(scope="module")
def default_allocator_results() -> Any:
    return allocator_results()


@pytest.mark.parametrize(
    "allocator", ["malloc", "malloc_debug", "pymalloc_debug", "debug", "-X dev"]
)
def test_every_allocator_gives_the_same_exact_counts(
    allocator: str,
    default_allocator_results: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Sizes are the requested ones, whoever serves them: under malloc and
    # under the debug hooks (below ours) the counts are the same to the byte.
    if allocator.startswith("-X"):
        results = allocator_results("-X", "dev")
    else:
        monkeypatch.setenv("PYTHONMALLOC", allocator)
        results = allocator_results()
    assert default_allocator_results["breaches"] is True
    assert results == default_allocator_results
