"""limit_scope outside event-loop tasks: meters, and reports at exit."""

from __future__ import annotations

import threading
import time

import pytest

import memlimits_async as ml
from helpers import KIB, MIB


def test_sync_scope_reports_memory_breach_at_exit() -> None:
    # preempt=False: a body twice past its limit is otherwise preempted as
    # soon as the delivery thread polls (the overrun rule), which a slow
    # build or a busy machine lets happen before the list is done.
    with ml.limit_scope(memory="2 MiB", preempt=False) as scope:
        held = [bytes(KIB) for _ in range(4096)]  # ~4 MiB, never interrupted
    assert len(held) == 4096
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.MEMORY
    assert not scope.cancel_called


def test_sync_scope_raise_on_breach_raises_at_exit() -> None:
    with pytest.raises(ml.MemoryLimitReached):
        with ml.limit_scope(memory="1 MiB", raise_on_breach=True):
            held = [bytes(KIB) for _ in range(4096)]
            assert len(held) == 4096


def test_sync_scope_reports_timeout_at_exit() -> None:
    with ml.limit_scope(timeout=0.01) as scope:
        time.sleep(0.03)
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TIMEOUT


def test_sync_scope_within_budget() -> None:
    with ml.limit_scope(memory="64 MiB", timeout=60) as scope:
        data = [bytes(KIB) for _ in range(100)]
    assert len(data) == 100
    assert not scope.breached


def test_sync_scope_cannot_be_cancelled() -> None:
    with ml.limit_scope() as scope, pytest.raises(RuntimeError, match="outside"):
        scope.cancel()


def test_cancelled_before_entry_outside_a_task_is_refused() -> None:
    scope = ml.limit_scope()
    scope.cancel()
    with pytest.raises(RuntimeError, match="cancelled before entry"), scope:
        pass
    # Nothing was installed by the failed entry.
    from memlimits_async._meter import _core

    assert _core.current_account.get(None) is None


def test_scope_in_a_plain_thread() -> None:
    scopes: list[ml.LimitScope] = []

    def work() -> None:
        with ml.limit_scope(memory="1 MiB") as scope:
            held = [bytes(KIB) for _ in range(4096)]
            assert len(held) == 4096
        scopes.append(scope)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert scopes[0].breach is not None
    assert scopes[0].breach.kind is ml.BreachKind.MEMORY
    assert scopes[0].usage.peak_live > 1 * MIB


def test_threads_are_charged_independently() -> None:
    usages: dict[str, ml.Usage] = {}

    def work(name: str, count: int) -> None:
        with ml.limit_scope() as scope:
            held = [bytes(KIB) for _ in range(count)]
            usages[name] = scope.usage
            del held

    threads = [
        threading.Thread(target=work, args=("small", 512)),
        threading.Thread(target=work, args=("large", 16384)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert usages["large"].live > 8 * MIB
    assert usages["small"].live < 4 * MIB
