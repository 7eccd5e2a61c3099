"""Requests too large to succeed: a MemoryError, nothing charged, no crash.

A request of nearly 2**63 bytes reaches the sampler's slow path with an
overshoot of nearly 2**63 bytes past the thread's mark, so the marks such a
block would carry weigh more than an int64 holds.  The allocator refuses it
and nothing is charged, but the weight used to be computed first: signed
overflow, in about half of such requests.  tools/check-native.sh runs this
module under UBSan, where every check traps, so any overflow left in the
hooks or the sampler fails that run; here, on an ordinary build, the tests
check what the caller sees: the MemoryError, and a scope whose accounting
still adds up.

Each request is repeated ``REPEATS`` times: with sampling, the odds that not
one of them would have overflowed before the fix are 2**-64 per case.

The scope's figures are checked against bounds far from both the requests
and the truth (a few hundred KiB of exceptions and tracebacks): an estimate
of over 1 GiB from that much allocation needs over 1200 times the expected
number of samples at every interval used here, with probability < 1e-100.
"""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import memlimits_async as ml
from memlimits_async._meter import _core

REPEATS = 64
HUGE = 2**63 - 64  # bytes: within Py_ssize_t, far beyond any address space
GIB = 1024**3


def _bytearray() -> object:
    return bytearray(HUGE)  # malloc


def _bytes() -> object:
    return bytes(HUGE)  # calloc


def _bytes_repeat() -> object:
    return b"x" * HUGE


def _str_repeat() -> object:
    return "x" * (HUGE - 64)


def _list_repeat() -> object:
    return [None] * (HUGE // 8)  # the MEM domain


def _bytearray_grow() -> object:
    block = bytearray(64)
    block *= HUGE // 64  # realloc
    return block


REQUESTS: dict[str, Callable[[], object]] = {
    "bytearray": _bytearray,
    "bytes": _bytes,
    "bytes-repeat": _bytes_repeat,
    "str-repeat": _str_repeat,
    "list-repeat": _list_repeat,
    "bytearray-grow": _bytearray_grow,
}


def _numpy_requests(np: Any) -> dict[str, Callable[[], object]]:
    def grow() -> object:
        array = np.ones(4096, np.uint8)
        array.resize(HUGE, refcheck=False)  # the handler's realloc
        return array

    return {
        "numpy-empty": lambda: np.empty(HUGE, np.uint8),  # malloc
        "numpy-zeros": lambda: np.zeros(HUGE, np.uint8),  # calloc
        "numpy-empty-2d": lambda: np.empty((2**31, 2**32 - 1), np.uint8),
        "numpy-resize": grow,
    }


# How the requests are metered: every byte (sampling interval 1), the default
# interval, and the 512-byte floor of the adaptive interval (a 600 KiB limit).
MODES = ["exact", "default", "adaptive-floor", "no-scope"]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    configured = ml.stats().configured_sampling_interval
    if request.param == "exact":
        ml.configure(sampling_interval=1)
    try:
        yield str(request.param)
    finally:
        ml.configure(sampling_interval=configured)


def _scope_for(mode: str) -> ml.LimitScope:
    # An allocation limit too: a huge request charged would breach it.
    memory = "600 KiB" if mode == "adaptive-floor" else None
    return ml.limit_scope(memory=memory, allocations="1 GiB")


def _check_interval(mode: str) -> None:
    stats = ml.stats()
    if mode == "exact":
        assert stats.sampling_interval == 1
    elif mode == "adaptive-floor":
        assert stats.sampling_interval == stats.min_adaptive_interval
    else:  # smaller limits of earlier tests may still hold it down a while
        assert (
            stats.min_adaptive_interval
            <= stats.sampling_interval
            <= stats.configured_sampling_interval
        )


def _refuse_repeatedly(make: Callable[[], object]) -> None:
    for _ in range(REPEATS):
        with pytest.raises(MemoryError):
            make()


def _check_survives(mode: str, make: Callable[[], object]) -> None:
    if mode == "no-scope":
        _refuse_repeatedly(make)
        assert _core.current_account.get(None) is None
        return
    with _scope_for(mode) as scope:
        _check_interval(mode)
        # A memory limit refuses such a request in the hook, before the
        # allocator below and the sampler see it (tests/test_refuse.py); an
        # interrupt-safe region keeps the limits it protects from refusing,
        # so that the requests go the way this module tests.
        with ml.interrupt_safe():
            _refuse_repeatedly(make)
        inside = scope.usage
    assert not scope.breached, scope.breach
    usage = scope.usage
    for figures in (inside, usage):
        assert 0 <= figures.live <= figures.peak_live <= figures.allocated < GIB


@pytest.mark.parametrize("request_name", list(REQUESTS))
def test_huge_request_raises_memory_error_and_charges_nothing(
    mode: str, request_name: str
) -> None:
    _check_survives(mode, REQUESTS[request_name])


def test_huge_numpy_request_raises_memory_error_and_charges_nothing(
    mode: str,
) -> None:
    np = pytest.importorskip("numpy")
    with ml.limit_scope():  # wraps numpy's data handler, the first time
        pass
    assert ml.stats().numpy_buffers_metered
    for make in _numpy_requests(np).values():
        _check_survives(mode, make)


def test_block_that_failed_to_grow_stays_charged(exact_accounting: None) -> None:
    """A realloc that fails leaves the block where it was, still charged:
    its free credits the scope as much as its allocation charged it."""
    was_enabled = gc.isenabled()
    gc.disable()  # a collection inside the scope would charge it too
    try:
        with ml.limit_scope() as scope:
            block = bytearray(100_000)
            before = scope.usage.live
            for _ in range(REPEATS):
                with pytest.raises(MemoryError):
                    block *= HUGE // len(block)
            assert len(block) == 100_000
            held = scope.usage.live
            del block
            freed = scope.usage.live
    finally:
        if was_enabled:
            gc.enable()
    assert held >= before >= 100_000
    assert held - freed >= 100_000
    assert not scope.breached


def test_numpy_array_that_failed_to_grow_stays_charged(
    exact_accounting: None,
) -> None:
    np = pytest.importorskip("numpy")
    with ml.limit_scope():  # wraps numpy's data handler, the first time
        pass
    with ml.limit_scope() as scope:
        array = np.ones(100_000, np.uint8)
        before = scope.usage.live
        for _ in range(REPEATS):
            with pytest.raises(MemoryError):
                array.resize(HUGE, refcheck=False)
        assert array.nbytes == 100_000
        held = scope.usage.live
        del array
        freed = scope.usage.live
    assert held >= before >= 100_000
    assert held - freed >= 100_000
    assert not scope.breached


class _Handler(ctypes.Structure):
    """numpy's PyDataMem_Handler, version 1 (numpy/ndarraytypes.h)."""

    _fields_ = [
        ("name", ctypes.c_char * 127),
        ("version", ctypes.c_uint8),
        ("ctx", ctypes.c_void_p),
        # PYFUNCTYPE: called with the GIL held, as numpy calls it.
        (
            "malloc",
            ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t),
        ),
        (
            "calloc",
            ctypes.PYFUNCTYPE(
                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t
            ),
        ),
        (
            "realloc",
            ctypes.PYFUNCTYPE(
                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t
            ),
        ),
        (
            "free",
            ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t),
        ),
    ]


def _numpy_default_handler(np: Any) -> _Handler:
    """The handler behind numpy's default capsule, read from its C-API table
    (slot 306: &PyDataMem_DefaultHandler), as numpy_handler.c reads it."""
    core = sys.modules.get("numpy._core._multiarray_umath") or sys.modules.get(
        "numpy.core._multiarray_umath"
    )
    assert core is not None
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype = ctypes.c_void_p
    get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    table = ctypes.cast(
        get_pointer(core._ARRAY_API, None), ctypes.POINTER(ctypes.c_void_p)
    )
    slot = ctypes.cast(table[306], ctypes.POINTER(ctypes.py_object))
    handler = get_pointer(slot[0], b"mem_handler")
    return _Handler.from_address(handler)


@pytest.mark.parametrize("size", [2**63, 2**63 + 2**62, 2**64 - 1])
def test_numpy_handler_refuses_sizes_past_int64(size: int) -> None:
    """numpy never asks its handler for more than NPY_MAX_INTP bytes, but the
    handler is public C API: a larger size must fail, not wrap the countdown
    (signed overflow, trapped by the UBSan run, at 2**63 exactly)."""
    np = pytest.importorskip("numpy")
    with ml.limit_scope():  # wraps numpy's data handler, the first time
        pass
    handler = _numpy_default_handler(np)
    assert handler.name == b"memlimits_async"
    with ml.limit_scope(allocations="1 GiB") as scope:
        for _ in range(REPEATS):
            assert handler.malloc(handler.ctx, size) is None
            assert handler.calloc(handler.ctx, 1, size) is None
            assert handler.realloc(handler.ctx, None, size) is None
        small = handler.malloc(handler.ctx, 4096)
        assert small is not None
        bigger = handler.realloc(handler.ctx, small, size)
        assert bigger is None  # and `small` is still there
        handler.free(handler.ctx, small, 4096)
    assert not scope.breached
    assert 0 <= scope.usage.live <= scope.usage.allocated < GIB
