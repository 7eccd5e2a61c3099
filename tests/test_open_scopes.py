"""ml.open_scopes(): every open limit scope, with the tasks it is current in."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest
import trio

import memlimits_async as ml

# asyncio tasks' contexts can be read from 3.12 (Task.get_context).
NAMES_ON_ASYNCIO = sys.version_info >= (3, 12)


def _ours(*scopes: ml.LimitScope) -> dict[int, tuple[str, ...]]:
    """The open scopes among ``scopes``, by position, with their tasks."""
    by_id = {id(each.scope): each.tasks for each in ml.open_scopes()}
    return {i: by_id[id(scope)] for i, scope in enumerate(scopes) if id(scope) in by_id}


def test_a_scope_is_listed_while_open_only() -> None:
    with ml.limit_scope(memory="1 GiB") as scope:
        listed = [each for each in ml.open_scopes() if each.scope is scope]
        assert [each.tasks for each in listed] == [()]  # outside any task
        assert listed[0].scope.memory == 1 << 30
    assert all(each.scope is not scope for each in ml.open_scopes())


def test_scopes_of_other_threads_are_listed() -> None:
    entered = threading.Event()
    leave = threading.Event()
    seen: list[ml.LimitScope] = []

    def body() -> None:
        with ml.limit_scope() as scope:
            seen.append(scope)
            entered.set()
            leave.wait()

    worker = threading.Thread(target=body)
    worker.start()
    try:
        assert entered.wait(60)
        assert _ours(seen[0]) == {0: ()}
    finally:
        leave.set()
        worker.join()
    assert _ours(seen[0]) == {}


@pytest.mark.skipif(not NAMES_ON_ASYNCIO, reason="3.12+ reads a task's context")
def test_asyncio_tasks_name_their_scopes_and_the_enclosing_ones() -> None:
    async def main() -> dict[int, tuple[str, ...]]:
        ready = asyncio.Event()
        release = asyncio.Event()
        scopes: dict[str, ml.LimitScope] = {}

        async def child(name: str) -> None:
            with ml.limit_scope() as inner:
                scopes[name] = inner
                if len(scopes) == 3:
                    ready.set()
                await release.wait()

        with ml.limit_scope() as outer:
            scopes["outer"] = outer
            tasks = [
                asyncio.create_task(child(name), name=name)
                for name in ("alpha", "beta")
            ]
            await ready.wait()
            # From another thread, naming the loop it watches; and from a
            # thread without it: no task names there.
            loop = asyncio.get_running_loop()
            from_monitor = await asyncio.to_thread(ml.open_scopes, loop)
            unnamed = await asyncio.to_thread(ml.open_scopes)
            seen = _ours(scopes["outer"], scopes["alpha"], scopes["beta"])
            release.set()
            await asyncio.gather(*tasks)
        monitor = {id(each.scope): each.tasks for each in from_monitor}
        assert monitor[id(scopes["alpha"])] == ("alpha",)
        assert all(each.tasks == () for each in unnamed)
        return seen

    seen = asyncio.run(main(), debug=False)
    # The outer scope is current in the main task and around both children.
    assert len(seen[0]) == 3 and {"alpha", "beta"} < set(seen[0])
    assert seen[1] == ("alpha",)
    assert seen[2] == ("beta",)


def test_trio_tasks_name_their_scopes() -> None:
    async def main() -> tuple[str, ...]:
        async with trio.open_nursery() as nursery:
            ready = trio.Event()
            release = trio.Event()
            found: list[ml.LimitScope] = []

            async def worker() -> None:
                with ml.limit_scope() as scope:
                    found.append(scope)
                    ready.set()
                    await release.wait()

            nursery.start_soon(worker, name="trio-worker")
            await ready.wait()
            (tasks,) = _ours(found[0]).values()
            release.set()
        return tasks

    assert trio.run(main) == ("trio-worker",)


@pytest.mark.parametrize("loop", ["loop", 1, object()])
def test_a_loop_that_is_not_one_is_refused(loop: object) -> None:
    with pytest.raises(TypeError, match="loop must be an asyncio event loop"):
        ml.open_scopes(loop)  # type: ignore[arg-type]
