"""The meter stays correct whichever order it and tracemalloc start and stop.

Each case runs in a fresh interpreter: the hooks are installed once per
process and never removed, so the order of installation is per process.
"""

from __future__ import annotations

from textwrap import dedent

import pytest

from helpers import run_python

PRELUDE = """
import sys, tracemalloc, warnings
import memlimits_async as ml
ml.configure(sampling_interval=1)

def measured(size):
    with ml.limit_scope() as scope:
        block = bytes(size)
    assert scope.usage.live == sys.getsizeof(block), (scope.usage, sys.getsizeof(block))
    return scope
"""


def run(body: str) -> str:
    result = run_python("-W", "error::RuntimeWarning", "-c", PRELUDE + dedent(body))
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_tracemalloc_started_and_stopped_after_the_meter() -> None:
    out = run(
        """
        measured(10_000)
        tracemalloc.start(1)
        measured(20_000)
        size, peak = tracemalloc.get_traced_memory()
        assert peak >= 20_000
        tracemalloc.stop()
        measured(30_000)
        assert ml.stats().hook_reinstalls == 0
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_tracemalloc_started_before_the_meter_and_stopped_while_a_scope_is_open() -> (
    None
):
    out = run(
        """
        tracemalloc.start(1)
        measured(10_000)            # our hooks wrap tracemalloc's
        with ml.limit_scope() as outer:
            tracemalloc.stop()      # restores the allocators it saved: ours are gone
            lost = bytes(50_000)    # not seen
        assert outer.usage.live < 50_000
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scope = measured(40_000)  # detected, re-installed, exact again
        assert any("installed again" in str(w.message) for w in caught), caught
        assert ml.stats().hook_reinstalls == 1
        measured(60_000)
        tracemalloc.start(1)        # and tracemalloc can wrap us again
        measured(70_000)
        tracemalloc.stop()
        measured(80_000)
        assert ml.stats().hook_reinstalls == 1
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_delivery_thread_notices_lost_hooks_without_a_new_scope() -> None:
    out = run(
        """
        import time, anyio
        tracemalloc.start(1)

        async def main():
            async with ml.limit_scope(memory="1 GiB") as scope:
                tracemalloc.stop()
                for _ in range(100):            # the delivery thread checks
                    await anyio.sleep(0.01)     # every 0.25 s while scopes are open
                    if ml.stats().hook_reinstalls:
                        break
                block = bytes(123_456)
                assert scope.usage.live >= 123_456, scope.usage
            return ml.stats().hook_reinstalls

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            print(anyio.run(main))
        """
    )
    assert out.strip() == "1"


@pytest.mark.parametrize("domain_code", ["bytearray(100_000)", "[0] * 30_000"])
def test_blocks_from_mem_and_obj_domains_are_counted(domain_code: str) -> None:
    out = run(
        f"""
        with ml.limit_scope() as scope:
            block = {domain_code}
        expected = sys.getsizeof(block)
        assert scope.usage.live >= expected - 64, (scope.usage, expected)
        print("ok")
        """
    )
    assert out.strip() == "ok"
