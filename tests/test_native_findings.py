"""The judge of the sanitizer logs (tools/native_findings.py).

Every Python block of an instrumented run passes through the meter's hooks,
so a block CPython loses at exit has hook frames on its allocation stack.
The judge must tell those (not findings) from blocks the meter allocated
itself; a renamed hook once made it report a float CPython kept as "a leak in
the meter" and failed CI.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]
JUDGE = CHECKOUT / "tools" / "native_findings.py"
METER_SOURCES = CHECKOUT / "memlimits_async" / "_meter"


@pytest.fixture(scope="module")
def judge() -> ModuleType:
    if not JUDGE.exists():
        pytest.skip("tools/ is not in this tree")
    spec = importlib.util.spec_from_file_location("native_findings", JUDGE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(*frames: str) -> str:
    lines = ["Direct leak of 24 byte(s) in 1 object(s) allocated from:"]
    lines.append("    #0 0x7f3a574b89cf in __interceptor_malloc asan_malloc.cpp:69")
    lines += [f"    #{i} 0x7f3a5517ddd2 in {f}" for i, f in enumerate(frames, 1)]
    return "\n".join(lines)


def test_pass_through_hooks_are_defined_in_the_meter(judge: ModuleType) -> None:
    sources = "\n".join(p.read_text() for p in METER_SOURCES.glob("*.c"))
    for name in judge.PASS_THROUGH:
        assert re.search(rf"^{name}\(", sources, re.MULTILINE), name


def test_a_block_cpython_lost_through_the_hooks_is_not_a_finding(
    judge: ModuleType,
) -> None:
    record = _record(
        "meter_malloc_slow memlimits_async/_meter/hooks.c:231",
        "hook_malloc memlimits_async/_meter/hooks.c:315",
        "PyFloat_FromDouble Objects/floatobject.c:147",
    )
    assert not judge.is_ours(record)
    numpy_record = _record(
        "meter_calloc_slow memlimits_async/_meter/hooks.c:246",
        "np_calloc memlimits_async/_meter/numpy_handler.c:105",
    )
    assert not judge.is_ours(numpy_record)


def test_a_float_built_for_the_meter_is_not_a_finding(judge: ModuleType) -> None:
    # 3.15.2 leaves a few floats at exit, one of them once built into a
    # tuple by sites.c: the float is CPython's, the tuple would be a record.
    record = _record(
        "meter_malloc_slow memlimits_async/_meter/hooks.c:227",
        "hook_malloc memlimits_async/_meter/hooks.c:315",
        "PyFloat_FromDouble (/usr/bin/python3.15+0x59dfb5)",
        "Py_BuildValue (/usr/bin/python3.15+0x5962de)",
        "sites_agg_to_list memlimits_async/_meter/sites.c:400",
        "Account_sites memlimits_async/_meter/module.c:349",
    )
    assert not judge.is_ours(record)
    tuple_record = _record(
        "meter_malloc_slow memlimits_async/_meter/hooks.c:227",
        "hook_malloc memlimits_async/_meter/hooks.c:315",
        "PyTuple_New (/usr/bin/python3.15+0x5a0000)",
        "Py_BuildValue (/usr/bin/python3.15+0x5962de)",
        "sites_agg_to_list memlimits_async/_meter/sites.c:400",
    )
    assert judge.is_ours(tuple_record)
    # The meter's own block through PyMem_Calloc stays a finding.
    assert judge.is_ours(
        _record(
            "PyMem_Calloc Objects/obmalloc.c:900",
            "fence_thread memlimits_async/_meter/interrupts.c:389",
        )
    )


def test_a_block_the_meter_allocated_is_a_finding(judge: ModuleType) -> None:
    record = _record(
        "account_new memlimits_async/_meter/accounts.c:70",
        "PyCFunction_Call Objects/call.c:12",
    )
    assert judge.is_ours(record)
    # A hook frame beside one of ours does not hide it.
    assert judge.is_ours(
        _record(
            "blocks_grow memlimits_async/_meter/blocks.c:90",
            "meter_malloc_slow memlimits_async/_meter/hooks.c:231",
        )
    )
