"""threads_inherit_context: plain threads started inside it are charged to
the scopes current where they were started."""

from __future__ import annotations

import contextvars
import sys
import threading
from typing import Any

import anyio
import pytest

import memlimits_async as ml
from helpers import MIB

# Without the flag, a plain thread starts in an empty context (3.11-3.13,
# and 3.14 with its default off), which is what the API exists for.
INHERITS_ANYWAY = bool(getattr(sys.flags, "thread_inherit_context", 0))
needs_empty_context = pytest.mark.skipif(
    INHERITS_ANYWAY, reason="threads inherit the context under this interpreter's flag"
)

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("test_var", default="unset")


def _allocate_in_a_thread(size: int) -> threading.Thread:
    thread = threading.Thread(target=lambda: bytearray(size))
    thread.start()
    thread.join()
    return thread


@needs_empty_context
def test_a_plain_thread_is_charged_only_inside_the_block(
    exact_accounting: None,
) -> None:
    with ml.limit_scope() as plain:
        _allocate_in_a_thread(4 * MIB)
    with ml.limit_scope() as inherited:
        with ml.threads_inherit_context():
            thread = _allocate_in_a_thread(4 * MIB)
    # Exact accounting: the thread's 4 MiB block, and the Thread object's
    # few KiB either way.
    assert plain.usage.allocated < MIB
    assert 4 * MIB <= inherited.usage.allocated < 5 * MIB
    # The wrapper, which holds the context and so the scope's account, is
    # gone with the run.
    assert "run" not in thread.__dict__


def test_the_thread_sees_a_copy_of_the_starting_context() -> None:
    seen: dict[str, str] = {}

    def grandchild() -> None:
        seen["grandchild"] = VAR.get()

    def child() -> None:
        seen["child"] = VAR.get()
        VAR.set("changed in the child")
        inner = threading.Thread(target=grandchild)
        inner.start()
        inner.join()

    token = VAR.set("starter")
    try:
        with ml.threads_inherit_context():
            thread = threading.Thread(target=child)
            thread.start()
            thread.join()
        assert VAR.get() == "starter"  # a copy: the child's change stays there
    finally:
        VAR.reset(token)
    assert seen == {"child": "starter", "grandchild": "changed in the child"}


@needs_empty_context
def test_off_inside_and_after_the_block() -> None:
    seen: list[str] = []

    def record() -> None:
        seen.append(VAR.get())

    def start_one() -> None:
        thread = threading.Thread(target=record)
        thread.start()
        thread.join()

    token = VAR.set("starter")
    try:
        with ml.threads_inherit_context():
            with ml.threads_inherit_context(False):
                start_one()
            start_one()
        start_one()
    finally:
        VAR.reset(token)
    assert seen == ["unset", "starter", "unset"]


def test_subclasses_timers_and_their_own_run() -> None:
    seen: list[str] = []

    class Worker(threading.Thread):
        def run(self) -> None:
            seen.append("subclass " + VAR.get())

    token = VAR.set("starter")
    try:
        with ml.threads_inherit_context():
            threads: list[threading.Thread] = [
                Worker(),
                threading.Timer(0, lambda: seen.append("timer " + VAR.get())),
            ]
            own = threading.Thread()
            own.run = lambda: seen.append("own " + VAR.get())  # type: ignore[method-assign]
            threads.append(own)
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        VAR.reset(token)
    assert sorted(seen) == ["own starter", "subclass starter", "timer starter"]
    # An instance's own run is put back after the run.
    assert "run" in own.__dict__ and "run" not in threads[0].__dict__


def test_a_failed_start_leaves_the_thread_as_it_was() -> None:
    with ml.threads_inherit_context():
        thread = threading.Thread(target=lambda: None)
        thread.start()
        thread.join()
        with pytest.raises(RuntimeError, match="once"):
            thread.start()
    assert "run" not in thread.__dict__


@needs_empty_context
def test_a_thread_can_breach_the_scope_it_was_started_in() -> None:
    with ml.limit_scope(memory="8 MiB") as scope:
        with ml.threads_inherit_context():
            held: list[Any] = []
            # Pieces under 1 MiB: sampled past the limit, never refused
            # (tests/test_refuse.py).
            thread = threading.Thread(
                target=lambda: held.extend(bytearray(MIB - 64) for _ in range(32))
            )
            thread.start()
            thread.join()
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.MEMORY
    assert scope.usage.peak_live > 8 * MIB


@needs_empty_context
@pytest.mark.anyio
async def test_a_threads_breach_cancels_the_task_that_started_it() -> None:
    done = threading.Event()
    held: list[Any] = []

    def grow() -> None:
        try:
            # Under 1 MiB a piece: sampled, never refused (test_refuse.py).
            held.extend(bytearray(MIB - 64) for _ in range(32))
        finally:
            done.set()

    with anyio.fail_after(30):
        async with ml.limit_scope(memory="8 MiB") as scope:
            with ml.threads_inherit_context():
                threading.Thread(target=grow).start()
            while not done.is_set():
                await anyio.sleep(0.005)
            await anyio.sleep(1)  # the breach reaches the task first
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.MEMORY
    assert scope.cancelled_caught


def test_bad_use() -> None:
    with pytest.raises(TypeError, match="enabled"):
        ml.threads_inherit_context(1)  # type: ignore[arg-type]
    manager = ml.threads_inherit_context()
    with pytest.raises(RuntimeError, match="not entered"):
        manager.__exit__(None, None, None)
    with manager:
        with pytest.raises(RuntimeError, match="already entered"):
            manager.__enter__()
