"""Process-level situations, each in a fresh interpreter: CPython's debug
allocator hooks, and fork."""

from __future__ import annotations

import os
import subprocess
from textwrap import dedent

import pytest

from helpers import run_python

LEAK = """
import anyio, os, sys
import memlimits_async as ml

async def leak():
    held = []
    async with ml.limit_scope(memory="2 MiB") as scope:
        while True:
            held.append(bytes(1024))
            await anyio.sleep(0)
    return scope
"""

LEAK_UNTIL_STOPPED = (
    LEAK
    + """
for backend in ("asyncio", "trio"):
    scope = anyio.run(leak, backend=backend)
    assert scope.breach is not None and scope.breach.kind.name == "MEMORY"

ml.configure(sampling_interval=1)
with ml.limit_scope() as scope:
    block = bytes(10_000)
assert scope.usage.live == sys.getsizeof(block), scope.usage
print("ok")
"""
)


def prints_ok(*args: str) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter run with ``args``, which exited 0 and printed "ok"."""
    result = run_python(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok", result.stderr
    return result


@pytest.mark.parametrize("mode", ["PYTHONMALLOC=debug", "-X dev"])
def test_composes_with_cpython_debug_allocator_hooks(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["-c", LEAK_UNTIL_STOPPED]
    if mode == "-X dev":
        args = ["-X", "dev", *args]
    else:
        monkeypatch.setenv("PYTHONMALLOC", "debug")
    prints_ok(*args)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_child_of_fork_meters_and_delivers() -> None:
    code = LEAK + dedent(
        """
        assert anyio.run(leak).breached       # the parent's delivery thread runs
        with ml.limit_scope(memory="1 GiB"):  # a scope open across the fork
            pid = os.fork()
            if pid == 0:
                on_trio = anyio.run(leak, backend="trio")
                os._exit(0 if anyio.run(leak).breached and on_trio.breached else 1)
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        print("ok")
        """
    )
    prints_ok("-W", "ignore::DeprecationWarning", "-c", code)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_fork_outside_any_scope_after_one_says_nothing() -> None:
    # The delivery thread ran (a scope of a task, now exited), and the fork
    # comes from a context where no scope was ever current, as a
    # ProcessPoolExecutor's or multiprocessing's fork does: the child's
    # at-fork hook used to print "Exception ignored ... LookupError".
    code = LEAK + dedent(
        """
        assert anyio.run(leak).breached
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        print("ok")
        """
    )
    result = prints_ok("-W", "ignore::DeprecationWarning", "-c", code)
    assert "Exception ignored" not in result.stderr, result.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_children_draw_their_own_samples() -> None:
    # Four children of one parent meter the same 5 MB of allocations at the
    # default 64 KiB interval: about 80 samples each.  With independent draws
    # two children report the same estimate with probability < 0.05, and all
    # four the same with P < 1e-9 (false failure).  With shared random state
    # they always report the same.
    code = dedent(
        """
        import os
        import memlimits_async as ml

        with ml.limit_scope():
            pass
        estimates = []
        for _ in range(4):
            read, write = os.pipe()
            if os.fork() == 0:
                with ml.limit_scope() as scope:
                    blocks = [bytes(1000) for _ in range(5000)]
                os.write(write, str(scope.usage.allocated).encode())
                os._exit(0)
            os.close(write)
            estimates.append(os.read(read, 100).decode())
            os.wait()
        print(len(set(estimates)))
        """
    )
    result = run_python("-W", "ignore::DeprecationWarning", "-c", code)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 1


def test_sync_scope_breach_is_not_queued_for_delivery() -> None:
    # Outside a loop nothing drains the delivery queue, so a breached sync
    # scope must not be put on it (it would keep its account alive forever).
    code = dedent(
        """
        import memlimits_async as ml
        from memlimits_async._meter import _core

        for _ in range(3):
            with ml.limit_scope(memory=0) as scope:
                blocks = [bytes(1024) for _ in range(256)]
            assert scope.breached
        assert _core.take_breached() == [], "sync breaches were queued"
        print("ok")
        """
    )
    prints_ok("-c", code)


# Every child arms an alarm, so that one that hangs dies, with a traceback,
# and the parent sees it (a guard, not a timing assertion); the parent stops
# at the first one.  (A child cannot rearm dump_traceback_later: cancelling
# the parent's waits for a watchdog thread that the fork did not copy.)
FORK_INSIDE_A_BREACHING_SCOPE = """
import asyncio, faulthandler, os, signal
import memlimits_async as ml

faulthandler.dump_traceback_later(240, exit=True)
faulthandler.register(signal.SIGALRM, chain=True)
ml.configure(sampling_interval=1)

async def in_a_task():
    async with ml.limit_scope(allocations=7000) as scope:
        held = [bytes(100) for _ in range(80)]
    return scope

def child(outer):
    signal.alarm(60)
    try:
        for _ in range(10):
            # the first entry starts the delivery thread, unless the fork did
            with ml.limit_scope(allocations=7000):
                held = [bytes(100) for _ in range(10)]
        inner = asyncio.run(in_a_task())
        ok = outer.breached and inner.breached
    except ml.Preempted:  # the inherited scope's grace ran out: also fine
        ok = outer.breached
    os._exit(0 if ok else 3)

asyncio.run(in_a_task())  # imports anyio's backend here, once
failed = []
# Each limit moves the moment the inherited scope breaches in the child
# across everything the child runs: the fork handler, a first scope entry
# starting the delivery thread, later entries and exits, an event loop.
for extra in range(0, 200 * 37, 37):
    with ml.limit_scope(allocations=7000 + extra) as outer:
        pid = os.fork()
        if pid == 0:
            child(outer)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if status != 0:
        failed.append((7000 + extra, status))
        break
print(failed or "ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_child_never_hangs_when_an_inherited_scope_breaches() -> None:
    # A breach of a scope open at the fork, drained by a pending call while
    # the child was starting its delivery thread under a lock, armed a
    # timer that started it again: the pending call waited for that lock
    # for ever (status -14, SIGALRM, at about a quarter of the limits).
    prints_ok("-W", "ignore::DeprecationWarning", "-c", FORK_INSIDE_A_BREACHING_SCOPE)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_inherited_scope_preempts_the_child() -> None:
    # The forking thread's open scopes go on in the child: one breached
    # there by code that never reaches a checkpoint is preempted, with no
    # other scope entered in the child to start its delivery thread.
    code = dedent(
        """
        import os, signal
        import memlimits_async as ml

        with ml.limit_scope(allocations="1 MiB") as outer:
            pid = os.fork()
            if pid == 0:
                signal.alarm(60)  # a child never preempted dies of it
                try:
                    while True:
                        block = bytes(1000)
                except ml.Preempted:
                    os._exit(0 if outer.breached else 3)
            status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        assert status == 0, status
        assert not outer.breached  # the child's allocations are its own
        print("ok")
        """
    )
    prints_ok("-W", "ignore::DeprecationWarning", "-c", code)
