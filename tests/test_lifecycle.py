"""Process and thread life: fork while threads allocate, many threads at
once, interpreter shutdown with scopes open, subinterpreters.

Every situation that ends a process runs in a fresh interpreter
(``run_python``); each script arms ``faulthandler.dump_traceback_later`` so
that a hang ends it with a traceback and a non-zero status instead of
stalling the suite (a guard, not a timing assertion).
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
from collections.abc import Callable, Iterator
from textwrap import dedent
from typing import Any

import pytest

import memlimits_async as ml
from helpers import run_python

HANG_GUARD = """
import faulthandler
faulthandler.dump_traceback_later(120, exit=True)
"""


def run_script(body: str, *args: str) -> tuple[int, str, str]:
    result = run_python(
        "-W", "ignore::DeprecationWarning", "-c", HANG_GUARD + dedent(body), *args
    )
    return result.returncode, result.stdout, result.stderr


def assert_no_crash(returncode: int, stderr: str) -> None:
    assert returncode >= 0, f"killed by signal {-returncode}:\n{stderr}"
    for sign in ("Fatal Python error", "Segmentation fault", "Timeout ("):
        assert sign not in stderr, stderr


# ---- fork ----

FORK_WHILE_THREADS_ALLOCATE = """
import os, signal, sys, threading
import anyio
import memlimits_async as ml

ml.configure(sampling_interval=1)
errors = []
stop = threading.Event()
rounds = [0] * 4

def measured(size):
    with ml.limit_scope() as scope:
        block = bytes(size)
    if scope.usage.live != sys.getsizeof(block):
        errors.append(("inexact", scope.usage, sys.getsizeof(block)))

def allocate(i):
    try:
        while not stop.is_set():
            measured(1000 + i)
            with ml.limit_scope(memory="1 GiB", allocations="1 TiB") as scope:
                held = [bytes(1000) for _ in range(40)]
            if scope.breached or scope.usage.allocated < 40_000:
                errors.append(("limits", scope.usage))
            rounds[i] += 1
    except BaseException as exc:
        errors.append(exc)

async def leak():
    held = []
    async with ml.limit_scope(memory="256 KiB") as scope:
        while True:
            held.append(bytes(1024))
            await anyio.sleep(0)
    return scope

def in_thread(fn, *args):
    out = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)))
    thread.start()
    thread.join()
    return out[0] if out else None

def child():
    signal.alarm(100)  # a child that hangs dies, and the parent sees it
    try:
        measured(5000)
        in_thread(measured, 7000)
        ok = (
            not errors
            and anyio.run(leak).breached                   # pending call
            and anyio.run(leak, backend="trio").breached
            and in_thread(anyio.run, leak).breached        # delivery thread
        )
    except BaseException:
        import traceback
        traceback.print_exc()
        ok = False
    if not ok:
        print("child:", errors[:3], file=sys.stderr, flush=True)
    os._exit(0 if ok else 1)

def fork_and_wait():
    pid = os.fork()
    if pid == 0:
        child()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

threads = [threading.Thread(target=allocate, args=(i,)) for i in range(4)]
for thread in threads:
    thread.start()
statuses = []
with ml.limit_scope(memory="1 GiB") as outer:    # open across every fork
    for _ in range(8):
        statuses.append(fork_and_wait())
        measured(3000)
    # and from a thread other than the main one
    for _ in range(4):
        statuses.append(in_thread(fork_and_wait))
        measured(3000)
stop.set()
for thread in threads:
    thread.join()
assert statuses == [0] * 12, statuses
assert not errors, errors[:5]
assert all(rounds), rounds
assert anyio.run(leak).breached and in_thread(anyio.run, leak).breached
assert not outer.breached
measured(9000)
assert not errors, errors
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_while_other_threads_allocate_in_scopes() -> None:
    returncode, out, err = run_script(FORK_WHILE_THREADS_ALLOCATE)
    assert_no_crash(returncode, err)
    assert returncode == 0, err
    assert out.strip() == "ok"


# ---- many threads at once ----


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Switch threads as often as possible; no collector run that would free
    one thread's objects in another (it would credit their scopes)."""
    interval = sys.getswitchinterval()
    gc_was_enabled = gc.isenabled()
    sys.setswitchinterval(1e-6)
    gc.disable()
    try:
        yield
    finally:
        sys.setswitchinterval(interval)
        if gc_was_enabled:
            gc.enable()


BYTES_HEADER = sys.getsizeof(b"ab") - 2


def body_sizes(thread: int, round_: int) -> tuple[int, int, int]:
    # Different sizes in every thread, so that a sample charged to the wrong
    # thread's scope changes its total.
    return (
        1000 + 97 * thread + round_ % 13,
        3000 + 89 * thread + round_ % 7,
        500 + 83 * thread + round_ % 5,
    )


def exact_body(sizes: tuple[int, int, int], problems: list[object]) -> None:
    """bytes, str and bytearray: no free lists, one or two blocks each,
    and sys.getsizeof gives exactly what they allocated."""
    with ml.limit_scope() as scope:
        a = bytes(sizes[0])
        b = "x" * sizes[1]
        c = bytearray(sizes[2])
    expected = sys.getsizeof(a) + sys.getsizeof(b) + sys.getsizeof(c)
    if scope.usage != ml.Usage(expected, expected, expected):
        problems.append((sizes, scope.usage, expected))


def limit_checks(size: int, problems: list[object]) -> None:
    """A limit one byte below a block breaches; one at its size does not."""
    block_size = size + BYTES_HEADER
    with ml.limit_scope(memory=block_size - 1) as tight:
        block = bytes(size)
    with ml.limit_scope(memory=block_size) as exact:
        block = bytes(size)
    with ml.limit_scope(allocations=block_size - 1) as tight_allocations:
        block = bytes(size)
    del block
    if not tight.breached or exact.breached or not tight_allocations.breached:
        problems.append(("limits", size, tight.breach, exact.breach))


ROUNDS = 300


def sync_worker(thread: int, problems: list[object]) -> None:
    with ml.limit_scope() as outer:
        inner_total = 0
        for round_ in range(ROUNDS):
            sizes = body_sizes(thread, round_)
            exact_body(sizes, problems)
            inner_total += sum(sizes)
            limit_checks(sizes[0], problems)
    if outer.usage.allocated < inner_total:
        problems.append(("outer not charged", outer.usage, inner_total))


def async_worker(thread: int, problems: list[object]) -> None:
    async def leak(limit: int) -> ml.LimitScope:
        async with ml.limit_scope(memory=limit) as scope:
            held = []
            for _ in range(100):
                held.append(bytes(1000))
                await asyncio.sleep(0)
        return scope

    async def main() -> None:
        for round_ in range(ROUNDS):
            exact_body(body_sizes(thread, round_), problems)
            if round_ % 30 == 0:
                # 100 KB held against 50 KB: stopped; against 1 MB: not.
                stopped, finished = await leak(50_000), await leak(1_000_000)
                if not stopped.breached or finished.breached:
                    problems.append(("async", stopped.breach, finished.breach))
                await asyncio.sleep(0)

    asyncio.run(main())


@pytest.fixture
def cooperative_only() -> Iterator[None]:
    """Breaches stop bodies at checkpoints (or at exit) only: this test is
    about accounts, and a thread that waits long for the GIL would be
    preempted (where this version preempts)."""
    configure: Any = ml.configure
    if "preempt" not in (configure.__kwdefaults__ or {}):
        yield
        return
    from memlimits_async._preempt import default_grace

    grace = default_grace()
    configure(preempt=False)
    try:
        yield
    finally:
        configure(preempt=False if grace is None else grace)


def test_eight_threads_under_different_scopes_are_charged_exactly(
    exact_accounting: None, busy_switching: None, cooperative_only: None
) -> None:
    problems: list[object] = []

    def run(worker: Callable[[int, list[object]], None], thread: int) -> None:
        try:
            worker(thread, problems)
        except BaseException as exc:  # reported, not lost in the thread
            problems.append(exc)

    workers = [sync_worker] * 4 + [async_worker] * 4
    threads = [
        threading.Thread(target=run, args=(worker, i))
        for i, worker in enumerate(workers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert problems == []


# ---- interpreter shutdown with scopes open ----

SHUTDOWN_CASES = {
    "threads": (
        """
        import threading, asyncio, sys
        import memlimits_async as ml
        ml.configure(sampling_interval=512)
        started = threading.Barrier(8)

        def forever():
            with ml.limit_scope(memory="1 MiB", allocations="1 TiB"):
                held = []
                started.wait()
                while True:
                    held.append(bytes(1000))
                    if len(held) > 500:
                        held.clear()

        def bounded():
            with ml.limit_scope(memory="100 KiB"):
                started.wait()
                held = [bytes(1000) for _ in range(20_000)]

        def loop_breaching():
            async def leak():
                async with ml.limit_scope(memory="64 KiB"):
                    held = []
                    while True:
                        held.append(bytes(1000))
                        await asyncio.sleep(0)
            async def main():
                started.wait()
                while True:
                    await leak()
            asyncio.run(main())

        for target in [forever] * 3 + [loop_breaching] * 3:
            threading.Thread(target=target, daemon=True).start()
        threading.Thread(target=bounded).start()
        started.wait()
        with ml.limit_scope(memory="10 MiB"):
            x = [bytes(100) for _ in range(10_000)]
            print("exiting", flush=True)
        """,
        0,
    ),
    "asyncio tasks, pending breach, sys.exit in a scope": (
        """
        import asyncio, sys
        import memlimits_async as ml

        async def hog():
            async with ml.limit_scope(memory="200 KiB"):
                held = []
                while True:
                    held.append(bytes(1000))
                    if len(held) % 100 == 0:
                        await asyncio.sleep(0)

        async def sleeper():
            async with ml.limit_scope(memory="1 GiB", timeout=1000):
                await asyncio.sleep(1000)

        async def main():
            tasks = [asyncio.create_task(hog()) for _ in range(4)]
            tasks.append(asyncio.create_task(sleeper()))
            await asyncio.sleep(0.01)
            # No preemption: the breach must still be pending at sys.exit.
            # With one, a body past its limit by a quarter is preempted at
            # once, which happened on a busy machine (exit status 0).
            async with ml.limit_scope(memory="100 KiB", preempt=False):
                held = [bytes(1000) for _ in range(1000)]  # breached, not delivered
                sys.exit(3)

        asyncio.run(main())
        """,
        3,
    ),
    "trio nursery, exception in a scope": (
        """
        import trio
        import memlimits_async as ml

        async def hog():
            async with ml.limit_scope(memory="200 KiB"):
                held = []
                while True:
                    held.append(bytes(1000))
                    await trio.sleep(0)

        async def main():
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(hog)
                # No preemption: the exception must leave the body (as in
                # the asyncio case above).
                with ml.limit_scope(memory="100 KiB", preempt=False):
                    held = [bytes(1000) for _ in range(1000)]
                    raise ValueError("boom")

        trio.run(main)
        """,
        1,
    ),
    "SystemExit in nested sync scopes with a breach and a global limit": (
        """
        import memlimits_async as ml
        ml.set_global_memory_limit("1 MiB")
        # No preemption: SystemExit must leave the body (as above).
        with ml.limit_scope(memory="1 MiB", global_memory=True, preempt=False):
            with ml.limit_scope(memory=0, preempt=False):
                held = [bytes(1000) for _ in range(5000)]
                raise SystemExit(5)
        """,
        5,
    ),
    "KeyboardInterrupt in an async scope, RSS poller running": (
        """
        import os, signal
        import anyio
        import memlimits_async as ml
        # Also when started with SIGINT ignored (a background job).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        ml.set_global_memory_limit("100 GiB", measure="rss")

        async def main():
            async with ml.limit_scope(memory="100 KiB", global_memory=True):
                held = [bytes(1000) for _ in range(1000)]
                os.kill(os.getpid(), signal.SIGINT)
                await anyio.sleep(10)

        anyio.run(main)
        """,
        None,  # KeyboardInterrupt: killed by SIGINT
    ),
    "scopes opened by finalizers during teardown": (
        """
        import memlimits_async as ml

        class Late:
            def __del__(self):
                with ml.limit_scope(memory="1 MiB"):
                    b = [bytes(1000) for _ in range(2000)]
                print("late", flush=True)

        late = Late()
        cycle = [Late()]
        cycle.append(cycle)
        """,
        0,
    ),
    "coroutines suspended in scopes, closed in another context": (
        """
        import contextvars
        import memlimits_async as ml

        class Suspend:
            def __await__(self):
                yield

        async def body():
            with ml.limit_scope(memory="1 MiB"):
                held = bytes(10_000)
                await Suspend()

        abandoned = []
        for _ in range(3):
            coroutine = body()
            contextvars.copy_context().run(coroutine.send, None)
            abandoned.append(coroutine)
        """,
        0,
    ),
}


@pytest.mark.parametrize("case", SHUTDOWN_CASES)
def test_interpreter_exits_with_scopes_open(case: str) -> None:
    script, expected = SHUTDOWN_CASES[case]
    returncode, out, err = run_script(script)
    if expected is None:
        assert returncode == -2, err  # re-raised SIGINT
    else:
        assert_no_crash(returncode, err)
        assert returncode == expected, err
    for sign in ("Fatal Python error", "Segmentation fault", "Timeout ("):
        assert sign not in err, err
    if case == "trio nursery, exception in a scope":
        assert "ValueError: boom" in err
    if case == "scopes opened by finalizers during teardown":
        assert out.split() == ["late", "late"]


# ---- subinterpreters ----

SUBINTERPRETERS = """
import os, select, sys, textwrap, threading
try:
    import _interpreters as interpreters          # 3.13
    def create(kind):
        return interpreters.create(kind)
except ImportError:
    import _xxsubinterpreters as interpreters     # 3.11, 3.12
    def create(kind):
        return interpreters.create(isolated=kind == "isolated")

def run_in(interpreter, code):
    # The code reports through a pipe: run_string's failure reporting
    # differs between versions.
    interpreters.run_string(interpreter, textwrap.dedent(code))
"""

IMPORT_IN_SUBINTERPRETER = (
    SUBINTERPRETERS
    + """
kind, order = sys.argv[1], sys.argv[2]
read, write = os.pipe()
code = f'''
    import os
    try:
        import memlimits_async as ml
        import anyio

        async def main():
            async with ml.limit_scope(memory="1 MiB"):
                await anyio.sleep(0)

        anyio.run(main)
        message = "imported"
    except ImportError as exc:
        message = "ImportError: " + str(exc)
    except BaseException as exc:
        message = "other: " + repr(exc)
    os.write({write}, message.encode())
'''

def in_subinterpreter():
    interpreter = create(kind)
    run_in(interpreter, code)
    interpreters.destroy(interpreter)
    print(os.read(read, 1000).decode())

if order == "subinterpreter-first":
    in_subinterpreter()

import memlimits_async as ml
ml.configure(sampling_interval=1)

def measured(size):
    with ml.limit_scope() as scope:
        block = bytes(size)
    assert scope.usage.live == sys.getsizeof(block), scope.usage

with ml.limit_scope(memory="1 GiB") as outer:
    measured(1000)
    if order == "main-first":
        in_subinterpreter()
    measured(10_000)    # the main interpreter's meter still charges exactly
measured(20_000)
assert not outer.breached
print("ok")
"""
)


@pytest.mark.parametrize("kind", ["legacy", "isolated"])
@pytest.mark.parametrize("order", ["main-first", "subinterpreter-first"])
def test_importing_in_a_subinterpreter_is_refused_with_an_import_error(
    kind: str, order: str
) -> None:
    # Without the refusal a legacy subinterpreter imported it and, as it
    # ended, ran our atexit handler (which stopped all metering in the
    # process) or aborted on our delivery thread ("not the last thread").
    returncode, out, err = run_script(IMPORT_IN_SUBINTERPRETER, kind, order)
    assert_no_crash(returncode, err)
    assert returncode == 0, err
    message, ok = out.strip().splitlines()
    assert message.startswith("ImportError: "), message
    assert "subinterpreter" in message
    assert ok == "ok"


ALLOCATING_SUBINTERPRETER = (
    SUBINTERPRETERS
    + """
import memlimits_async as ml
ml.configure(sampling_interval=1)
ml.set_global_memory_limit("100 GiB")   # samples outside scopes count too
errors = []

def measured(size):
    with ml.limit_scope() as scope:
        block = bytes(size)
    if scope.usage.live != sys.getsizeof(block):
        errors.append(scope.usage)

kind = sys.argv[1]
stop_read, stop_write = os.pipe()
said_read, said_write = os.pipe()
# The subinterpreter holds 20 MB, then churns until told to stop.
code = f'''
    import os, select
    held = [bytes(1000) for _ in range(20_000)]
    os.write({said_write}, b"holding")
    churn = []
    while not select.select([{stop_read}], [], [], 0)[0]:
        churn.append([bytes(1000) for _ in range(100)])
        if len(churn) > 20:
            churn.clear()
    os.write({said_write}, b"done")
'''
heap_before = ml.stats().metered_heap
with ml.limit_scope(memory="1 GiB") as outer:
    interpreter = create(kind)
    thread = threading.Thread(target=run_in, args=(interpreter, code))
    thread.start()
    assert os.read(said_read, 7) == b"holding"
    for n in range(500):               # alongside the churn
        measured(1000 + n)
    held_elsewhere = ml.stats().metered_heap - heap_before
    os.write(stop_write, b"x")
    thread.join()
    interpreters.destroy(interpreter)
assert os.read(said_read, 10) == b"done"
assert not errors, errors[:5]
# Neither the scopes nor the global limit's heap see the subinterpreter's
# 20 MB: 500 blocks of ~1.3 KB and the loop's own small objects.
assert held_elsewhere < 2_000_000, held_elsewhere
assert outer.usage.allocated < 5_000_000, outer.usage
assert outer.usage.live < 100_000, outer.usage
assert not outer.breached
measured(10_000)
assert not errors, errors
print("ok")
"""
)


@pytest.mark.parametrize("kind", ["legacy", "isolated"])
def test_allocations_in_a_subinterpreter_leave_main_accounts_alone(
    kind: str,
) -> None:
    # "isolated" has its own GIL from 3.12 on: its hooks run in parallel
    # with the main interpreter's.
    returncode, out, err = run_script(ALLOCATING_SUBINTERPRETER, kind)
    assert_no_crash(returncode, err)
    assert returncode == 0, err
    assert out.strip() == "ok"
