"""CancelToken, alone and watched by limit_scope, on asyncio and trio."""

from __future__ import annotations

import gc
import signal
import sys
import threading
import time

import anyio
import pytest

import memlimits_async as ml
from helpers import leak_until_cancelled

# ---- the token itself ----


def test_first_reason_wins_and_cancel_is_idempotent() -> None:
    token = ml.CancelToken()
    assert not token.cancelled and token.reason is None
    assert token.cancel("client went away") is True
    assert token.cancel("admin") is False
    assert token.cancelled
    assert token.reason == "client went away"
    assert "client went away" in repr(token)


def _race_to_cancel(token: ml.CancelToken, racers: int) -> list[bool]:
    barrier = threading.Barrier(racers)
    wins: list[bool] = []

    def race(name: str) -> None:
        barrier.wait()
        wins.append(token.cancel(name))

    threads = [threading.Thread(target=race, args=(f"t{i}",)) for i in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return wins


def test_concurrent_cancels_have_exactly_one_winner() -> None:
    for _ in range(50):
        token = ml.CancelToken()
        fired: list[str | None] = []
        token.on_cancel(fired.append)
        wins = _race_to_cancel(token, racers=8)
        assert wins.count(True) == 1
        assert fired == [token.reason]


def test_on_cancel_runs_once_also_when_registered_late_and_can_be_removed() -> None:
    token = ml.CancelToken()
    calls: list[str | None] = []
    remove = token.on_cancel(calls.append)
    removed = token.on_cancel(lambda reason: calls.append("removed"))
    removed()
    token.cancel("stop")
    token.cancel("again")
    token.on_cancel(calls.append)  # already cancelled: called at once
    remove()  # too late, and harmless
    assert calls == ["stop", "stop"]


def test_a_failing_callback_does_not_stop_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reported: list[object] = []
    monkeypatch.setattr("sys.unraisablehook", reported.append)
    token = ml.CancelToken()
    calls: list[str | None] = []

    def boom(reason: str | None) -> None:
        raise RuntimeError("callback failed")

    token.on_cancel(boom)
    token.on_cancel(calls.append)
    token.cancel("x")
    assert calls == ["x"]
    assert len(reported) == 1


def test_child_is_cancelled_with_its_parent_and_alone() -> None:
    parent = ml.CancelToken()
    lone = parent.child()
    grandchild = lone.child()
    lone.cancel("just this one")
    assert lone.cancelled and grandchild.cancelled and not parent.cancelled
    other = parent.child()
    parent.cancel("everything")
    assert other.cancelled and other.reason == "everything"
    assert lone.reason == "just this one"
    assert parent.child().cancelled  # a child of a cancelled token


def test_a_deep_line_of_children_is_cancelled_without_recursion() -> None:
    # cancel() may run in a signal handler on top of a deep stack: the
    # depth of the token tree must not cost stack (it did: a line of a few
    # hundred generations hit RecursionError, reported as unraisable, and
    # left the deeper ones active).
    root = ml.CancelToken()
    line = [root]
    for _ in range(5 * sys.getrecursionlimit()):
        line.append(line[-1].child())
    calls: list[str | None] = []
    line[-1].on_cancel(calls.append)
    assert root.cancel("all of them")
    assert all(token.reason == "all of them" for token in line)
    assert calls == ["all of them"]


def test_dropped_children_unregister_themselves() -> None:
    parent = ml.CancelToken()
    for _ in range(1000):
        parent.child()
    gc.collect()
    assert len(parent._callbacks) == 0


@pytest.mark.parametrize("bad", [5, b"no", ["no"]])
def test_bad_reason_is_a_type_error(bad: object) -> None:
    with pytest.raises(TypeError, match="reason"):
        ml.CancelToken().cancel(bad)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_wait_returns_when_cancelled_from_another_task() -> None:
    token = ml.CancelToken()
    async with anyio.create_task_group() as tg:
        tg.start_soon(token.wait)
        await anyio.sleep(0.01)
        token.cancel()
    await token.wait()  # returns at once now


@pytest.mark.anyio
async def test_wait_returns_when_cancelled_from_another_thread() -> None:
    token = ml.CancelToken()
    timer = threading.Timer(0.02, token.cancel, args=("from a thread",))
    timer.start()
    with anyio.fail_after(30):
        await token.wait()
    assert token.reason == "from a thread"


# ---- limit_scope(token=...) ----


@pytest.mark.anyio
async def test_token_from_another_thread_cancels_a_task_blocked_in_await() -> None:
    token = ml.CancelToken()
    threading.Timer(0.02, token.cancel, args=("client went away",)).start()
    async with ml.limit_scope(token=token) as scope:
        await anyio.sleep(30)
    assert scope.breach is not None
    assert scope.breach.kind is ml.BreachKind.TOKEN
    assert scope.breach.reason == "token cancelled: client went away"


@pytest.mark.anyio
async def test_token_from_another_task_cancels_within_one_loop_iteration() -> None:
    token = ml.CancelToken()
    progress: list[str] = []

    async def worker() -> None:
        async with ml.limit_scope(token=token) as scope:
            await anyio.sleep(30)
        progress.append("stopped" if scope.breached else "not stopped")

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker)
        await anyio.sleep(0.01)  # the worker is blocked in its sleep
        token.cancel("admin")
        for _ in range(3):  # one loop iteration delivers, one runs the worker
            await anyio.sleep(0)
        progress.append("canceller went on")
    assert progress[0] == "stopped"


@pytest.mark.anyio
async def test_token_from_a_signal_handler(anyio_backend: str) -> None:
    token = ml.CancelToken()
    previous = signal.signal(signal.SIGUSR1, lambda *_: token.cancel("signal"))
    try:
        async with ml.limit_scope(token=token) as scope:
            signal.raise_signal(signal.SIGUSR1)
            await anyio.sleep(30)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert scope.breach is not None and scope.breach.reason == "token cancelled: signal"


@pytest.mark.anyio
async def test_token_cancelled_before_entry_cancels_at_once() -> None:
    token = ml.CancelToken()
    token.cancel("too late")
    reached_checkpoint = False
    async with ml.limit_scope(token=token) as scope:
        await anyio.lowlevel.checkpoint()
        reached_checkpoint = True
    assert not reached_checkpoint
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TOKEN


@pytest.mark.anyio
async def test_many_scopes_watch_one_token() -> None:
    token = ml.CancelToken()
    scopes: list[ml.LimitScope] = []

    async def worker() -> None:
        async with ml.limit_scope(token=token) as scope:
            scopes.append(scope)
            await anyio.sleep(30)

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(worker)
        await anyio.sleep(0.01)
        token.cancel("shutdown")
    assert len(scopes) == 20 and all(scope.breached for scope in scopes)
    assert not token._callbacks  # every scope unregistered on exit


@pytest.mark.anyio
async def test_one_scope_watches_several_tokens() -> None:
    request, server = ml.CancelToken(), ml.CancelToken()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: _cancel_later(server, "server stopping"))
        async with ml.limit_scope(token=[request, server]) as scope:
            await anyio.sleep(30)
    assert scope.breach is not None
    assert scope.breach.reason == "token cancelled: server stopping"
    assert not request.cancelled


async def _cancel_later(token: ml.CancelToken, reason: str) -> None:
    await anyio.sleep(0.01)
    token.cancel(reason)


@pytest.mark.anyio
async def test_token_cancelled_after_exit_does_nothing() -> None:
    token = ml.CancelToken()
    async with ml.limit_scope(token=token) as scope:
        await anyio.sleep(0)
    token.cancel("late")
    await anyio.sleep(0)
    assert not scope.breached


@pytest.mark.anyio
async def test_token_with_raise_on_breach_raises_token_cancelled() -> None:
    token = ml.CancelToken()
    token.cancel("stop")
    with pytest.raises(ml.TokenCancelled, match="token cancelled: stop"):
        async with ml.limit_scope(token=token, raise_on_breach=True):
            await anyio.sleep(30)


@pytest.mark.anyio
async def test_first_breach_wins_between_memory_and_token() -> None:
    token = ml.CancelToken()
    held: list[bytes] = []
    async with ml.limit_scope(memory="2 MiB", token=token) as scope:
        await leak_until_cancelled(held)
    token.cancel("after the fact")
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.MEMORY


def test_sync_scope_reports_a_token_cancelled_meanwhile() -> None:
    token = ml.CancelToken()
    with ml.limit_scope(token=token) as scope:
        threading.Thread(target=token.cancel, args=("from a thread",)).start()
        time.sleep(0.05)
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TOKEN


# ---- scope.add_token ----


@pytest.mark.anyio
async def test_token_added_while_the_body_runs_cancels_a_blocked_task() -> None:
    token = ml.CancelToken()
    async with ml.limit_scope() as scope:
        scope.add_token(token)
        threading.Timer(0.02, token.cancel, args=("client went away",)).start()
        await anyio.sleep(30)
    assert scope.breach is not None
    assert scope.breach.kind is ml.BreachKind.TOKEN
    assert scope.breach.reason == "token cancelled: client went away"
    assert not token._callbacks  # unregistered on exit


@pytest.mark.anyio
async def test_token_added_cancelled_cancels_at_once() -> None:
    token = ml.CancelToken()
    token.cancel("gone")
    reached_checkpoint = False
    async with ml.limit_scope(memory="1 GiB") as scope:
        assert not scope.breached
        scope.add_token(token)
        assert scope.breached  # known before it lands
        await anyio.lowlevel.checkpoint()
        reached_checkpoint = True
    assert not reached_checkpoint
    assert scope.breach is not None and scope.breach.reason == "token cancelled: gone"


@pytest.mark.anyio
async def test_token_added_before_entry_is_watched_like_token_given() -> None:
    first, added = ml.CancelToken(), ml.CancelToken()
    scope = ml.limit_scope(token=first)
    scope.add_token(added)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: _cancel_later(added, "added"))
        async with scope:
            await anyio.sleep(30)
    assert scope.breach is not None and scope.breach.reason == "token cancelled: added"
    assert not first._callbacks and not added._callbacks


def test_token_added_to_a_sync_scope_is_reported_at_exit() -> None:
    token = ml.CancelToken()
    with ml.limit_scope(preempt=False) as scope:
        scope.add_token(token)
        token.cancel("meanwhile")
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TOKEN


@pytest.mark.anyio
async def test_add_token_checks_its_argument_and_the_scope_state() -> None:
    scope = ml.limit_scope()
    with pytest.raises(TypeError, match="CancelToken"):
        scope.add_token("token")  # type: ignore[arg-type]
    async with scope:
        pass
    with pytest.raises(RuntimeError, match="exited"):
        scope.add_token(ml.CancelToken())


@pytest.mark.parametrize("bad", [5, "token", [ml.CancelToken(), 5]])
def test_bad_token_is_a_type_error_naming_it(bad: object) -> None:
    with pytest.raises(TypeError, match="token"):
        ml.limit_scope(token=bad)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_breach_is_kept_when_a_foreign_error_group_leaves_the_scope() -> None:
    # trio's cancel scope re-raises an exception group without its Cancelled
    # from __exit__: the scope must record its breach all the same.
    token = ml.CancelToken()

    async def converts_cancellation() -> None:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            raise ConnectionError("reset") from None

    async def stays_cancelled() -> None:
        await anyio.sleep_forever()

    with pytest.raises(ExceptionGroup) as caught:
        async with ml.limit_scope(token=token) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(converts_cancellation)
                tg.start_soon(stays_cancelled)
                await anyio.sleep(0.01)
                token.cancel("gone")
    assert caught.group_contains(ConnectionError)
    assert scope.breach is not None and scope.breach.reason.endswith("gone")


@pytest.mark.anyio
async def test_cancel_message_carries_the_token_reason(anyio_backend: str) -> None:
    token = ml.CancelToken()
    seen: list[str] = []
    async with ml.limit_scope(token=token) as scope:
        token.cancel("admin stopped req-7")
        try:
            await anyio.sleep(1)
        except anyio.get_cancelled_exc_class() as exc:
            seen.append(str(exc))
            raise
    assert scope.breach is not None
    assert scope.breach.reason == "token cancelled: admin stopped req-7"
    if anyio_backend == "trio":  # asyncio's CancelledError has no message here
        assert "admin stopped req-7" in seen[0]


@pytest.mark.anyio
async def test_scopes_watching_child_tokens_stop_when_the_tree_is_cancelled() -> None:
    server = ml.CancelToken()
    requests = [server.child() for _ in range(3)]
    stopped: list[str] = []

    async def handle(name: str, token: ml.CancelToken) -> None:
        async with ml.limit_scope(token=token) as scope:
            await anyio.sleep_forever()
        assert scope.breach is not None
        stopped.append(f"{name}: {scope.breach.reason}")

    async with anyio.create_task_group() as tg:
        for index, token in enumerate(requests):
            tg.start_soon(handle, f"r{index}", token)
        await anyio.sleep(0.01)
        requests[1].cancel("client went away")  # one request alone
        await anyio.sleep(0.01)
        assert stopped == ["r1: token cancelled: client went away"]
        server.cancel("shutdown")  # the rest through the parent
    assert sorted(stopped[1:]) == [
        "r0: token cancelled: shutdown",
        "r2: token cancelled: shutdown",
    ]
