"""limit_scope on anyio (asyncio and trio backends), native asyncio and trio."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import anyio
import pytest
import trio

import memlimits_async as ml
from helpers import KIB, MIB, churn, held_bytes, leak_until_cancelled
from memlimits_async._accounts import current_account

pytestmark = pytest.mark.filterwarnings("error")


# ---- a leaking task is cancelled and reports MEMORY ----


@pytest.mark.anyio
async def test_leaking_task_is_cancelled_with_memory_breach() -> None:
    held: list[bytes] = []
    async with ml.limit_scope(memory="4 MiB") as scope:
        await leak_until_cancelled(held)
    assert scope.breached
    assert scope.breach is not None
    assert scope.breach.kind is ml.BreachKind.MEMORY
    assert scope.breach.limit == 4 * MIB
    assert scope.breach.observed is not None and scope.breach.observed > 4 * MIB
    assert "memory limit of 4 MiB exceeded" in scope.breach.reason
    # Stopped near the limit: 1200+ samples per limit make a miss beyond
    # +-50% impossible in practice (P < 1e-60, docs/accuracy.md).
    assert 2 * MIB < held_bytes(held) < 6 * MIB
    assert scope.usage.live > 2 * MIB
    assert scope.usage.peak_live >= scope.usage.live


@pytest.mark.asyncio
async def test_native_asyncio_leaking_task_is_cancelled() -> None:
    held: list[bytes] = []
    async with ml.limit_scope(memory="4 MiB") as scope:
        while True:
            held.append(bytes(KIB))
            await asyncio.sleep(0)
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.MEMORY


def test_native_trio_leaking_task_is_cancelled() -> None:
    async def main() -> ml.LimitScope:
        held: list[bytes] = []
        async with ml.limit_scope(memory="4 MiB") as scope:
            while True:
                held.append(bytes(KIB))
                await trio.sleep(0)
        return scope

    scope = trio.run(main)
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.MEMORY


@pytest.mark.anyio
async def test_trio_and_anyio_cancel_reason_names_the_limit(anyio_backend: str) -> None:
    seen: list[str] = []
    async with ml.limit_scope(memory="2 MiB") as scope:
        held: list[bytes] = []
        try:
            await leak_until_cancelled(held)
        except anyio.get_cancelled_exc_class() as exc:
            seen.append(str(exc))
            raise
    assert scope.breached
    if anyio_backend == "trio":
        assert "memory limit of 2 MiB exceeded" in seen[0]


# ---- churn stays under a memory limit but hits an allocation limit ----


@pytest.mark.anyio
async def test_churn_stays_under_memory_limit_but_hits_allocation_limit() -> None:
    async with ml.limit_scope(memory="8 MiB", allocations="64 MiB") as scope:
        await churn(total=1024 * MIB)
    assert scope.breach is not None
    assert scope.breach.kind is ml.BreachKind.ALLOCATIONS
    assert scope.breach.limit == 64 * MIB
    assert "allocations limit of 64 MiB exceeded" in scope.breach.reason
    assert scope.usage.peak_live < 8 * MIB
    assert 64 * MIB < scope.usage.allocated < 96 * MIB


@pytest.mark.anyio
async def test_scope_within_budget_is_not_breached() -> None:
    async with ml.limit_scope(memory="64 MiB", allocations="1 GiB") as scope:
        await churn(total=8 * MIB)
        kept = [bytes(KIB) for _ in range(1000)]
    assert not scope.breached
    assert scope.breach is None
    assert not scope.cancel_called
    assert scope.usage.allocated > 4 * MIB
    assert len(kept) == 1000


# ---- timeouts ----


@pytest.mark.anyio
async def test_timeout_cancels_and_reports_timeout() -> None:
    async with ml.limit_scope(timeout=0.05) as scope:
        await anyio.sleep(10)
    assert scope.breach is not None
    assert scope.breach.kind is ml.BreachKind.TIMEOUT
    assert scope.breach.limit == 0.05
    assert scope.breach.observed is not None and scope.breach.observed >= 0.05
    assert "timeout of 0.05 s expired" in scope.breach.reason


@pytest.mark.anyio
async def test_timeout_raises_time_limit_reached() -> None:
    with pytest.raises(ml.TimeLimitReached) as info:
        async with ml.limit_scope(timeout=0.01, raise_on_breach=True):
            await anyio.sleep(10)
    assert isinstance(info.value, TimeoutError)
    assert info.value.breach.kind is ml.BreachKind.TIMEOUT


@pytest.mark.anyio
async def test_manual_cancel_is_not_a_breach() -> None:
    async with ml.limit_scope(memory="1 GiB", timeout=10) as scope:
        scope.cancel("enough")
        await anyio.sleep(10)
    assert scope.cancel_called
    assert not scope.breached


@pytest.mark.anyio
async def test_cancel_before_entry_cancels_at_once() -> None:
    scope = ml.limit_scope(memory="1 GiB")
    scope.cancel()
    async with scope:
        await anyio.sleep(10)
    assert scope.cancel_called and not scope.breached


# ---- raise_on_breach ----


@pytest.mark.anyio
async def test_raise_on_breach_raises_memory_limit_reached() -> None:
    held: list[bytes] = []
    with pytest.raises(ml.MemoryLimitReached) as info:
        async with ml.limit_scope(memory="2 MiB", raise_on_breach=True):
            await leak_until_cancelled(held)
    assert isinstance(info.value, MemoryError)
    assert isinstance(info.value, ml.LimitReached)
    assert info.value.breach.kind is ml.BreachKind.MEMORY
    assert str(info.value) == info.value.breach.reason


@pytest.mark.anyio
async def test_raise_on_breach_raises_allocation_limit_reached() -> None:
    with pytest.raises(ml.AllocationLimitReached):
        async with ml.limit_scope(allocations="16 MiB", raise_on_breach=True):
            await churn(total=1024 * MIB)


# ---- the result contract ----


@pytest.mark.anyio
async def test_swallowed_cancellation_is_still_reported() -> None:
    held: list[bytes] = []
    async with ml.limit_scope(memory="2 MiB") as scope:
        try:
            await leak_until_cancelled(held)
        except anyio.get_cancelled_exc_class():
            pass  # a body that swallows its cancellation and returns normally
        held.clear()
    assert scope.breached
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.MEMORY


@pytest.mark.anyio
async def test_swallowed_cancellation_with_raise_on_breach_still_raises() -> None:
    held: list[bytes] = []
    with pytest.raises(ml.MemoryLimitReached):
        async with ml.limit_scope(memory="2 MiB", raise_on_breach=True):
            try:
                await leak_until_cancelled(held)
            except anyio.get_cancelled_exc_class():
                pass


@pytest.mark.anyio
async def test_swallowed_cancellation_is_redelivered_at_next_checkpoint() -> None:
    held: list[bytes] = []
    deliveries = 0
    async with ml.limit_scope(memory="2 MiB") as scope:
        for _ in range(3):
            try:
                await leak_until_cancelled(held)
            except anyio.get_cancelled_exc_class():
                deliveries += 1  # level-triggered: cancelled again next time
    assert deliveries == 3
    assert scope.breached


class Boom(Exception):
    pass


@pytest.mark.anyio
async def test_foreign_exception_propagates_unchanged() -> None:
    error = Boom("not ours")
    with pytest.raises(Boom) as info:
        async with ml.limit_scope(memory="1 GiB", raise_on_breach=True) as scope:
            raise error
    assert info.value is error
    assert not scope.breached


@pytest.mark.anyio
async def test_foreign_exception_after_breach_propagates_unchanged() -> None:
    held: list[bytes] = []
    error = Boom("during cleanup")
    with pytest.raises(Boom) as info:
        async with ml.limit_scope(memory="2 MiB", raise_on_breach=True) as scope:
            try:
                await leak_until_cancelled(held)
            finally:
                raise error
    assert info.value is error
    assert scope.breached  # the breach is still on record


# ---- nesting ----


@pytest.mark.anyio
async def test_inner_scope_cannot_extend_outer() -> None:
    held: list[bytes] = []
    async with ml.limit_scope(memory="2 MiB") as outer:
        async with ml.limit_scope(memory="1 GiB") as inner:
            await leak_until_cancelled(held)
        pytest.fail("the outer scope's cancellation must leave the inner scope")
    assert outer.breached
    assert not inner.breached
    assert held_bytes(held) < 4 * MIB
    # Charged to both; allocated only grows, so this holds across exit times.
    assert outer.usage.allocated >= inner.usage.allocated


@pytest.mark.anyio
async def test_tightest_limit_owner_reports_and_outer_goes_on() -> None:
    held: list[bytes] = []
    async with ml.limit_scope(memory="1 GiB") as outer:
        async with ml.limit_scope(memory="2 MiB") as inner:
            await leak_until_cancelled(held)
        after_inner = len(held)
        held.append(bytes(KIB))
        await anyio.sleep(0)
    assert inner.breached and inner.breach is not None
    assert inner.breach.kind is ml.BreachKind.MEMORY
    assert not outer.breached
    assert len(held) == after_inner + 1
    # The ~2 MiB allocated in the inner scope are still held: they keep
    # counting in the outer scope (estimates: 1 MiB is > 15 sd away).
    assert held_bytes(held) > 1.5 * MIB
    assert outer.usage.live > 1 * MIB


@pytest.mark.anyio
async def test_outer_timeout_cancels_inner_without_breaching_it() -> None:
    async with ml.limit_scope(timeout=0.02) as outer:
        async with ml.limit_scope(memory="1 GiB", timeout=10) as inner:
            await anyio.sleep(10)
    assert outer.breach is not None and outer.breach.kind is ml.BreachKind.TIMEOUT
    assert not inner.breached


@pytest.mark.anyio
async def test_shielded_scope_postpones_outer_cancellation_to_its_exit() -> None:
    finished_shielded_work = False
    async with ml.limit_scope(timeout=0.01) as outer:
        async with ml.limit_scope(shield=True) as inner:
            await anyio.sleep(0.05)
            finished_shielded_work = True
        await anyio.sleep(10)
    assert finished_shielded_work
    assert outer.breached and not inner.breached


@pytest.mark.anyio
async def test_shielded_scope_own_limit_still_applies() -> None:
    held: list[bytes] = []
    async with ml.limit_scope(memory="2 MiB", shield=True) as scope:
        await leak_until_cancelled(held)
    assert scope.breached


# ---- tasks spawned inside a scope are charged to it ----


@pytest.mark.anyio
async def test_anyio_task_group_children_are_charged_and_cancelled() -> None:
    held: list[bytes] = []
    async with ml.limit_scope(memory="2 MiB") as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(leak_until_cancelled, held)
            tg.start_soon(anyio.sleep, 10)
    assert scope.breached
    assert held_bytes(held) < 4 * MIB


def test_trio_nursery_children_are_charged_and_cancelled() -> None:
    async def main() -> tuple[ml.LimitScope, list[bytes]]:
        held: list[bytes] = []
        async with ml.limit_scope(memory="2 MiB") as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(leak_until_cancelled, held)
                nursery.start_soon(trio.sleep, 10)
        return scope, held

    scope, held = trio.run(main)
    assert scope.breached
    assert held_bytes(held) < 4 * MIB


@pytest.mark.asyncio
async def test_asyncio_task_group_children_are_charged_and_cancelled() -> None:
    held: list[bytes] = []
    async with ml.limit_scope(memory="2 MiB") as scope, asyncio.TaskGroup() as tg:
        tg.create_task(leak_until_cancelled(held))
        tg.create_task(asyncio.sleep(10))
    assert scope.breached


@pytest.mark.asyncio
async def test_asyncio_create_task_is_charged_to_the_scope(
    exact_accounting: None,
) -> None:
    async def build() -> bytes:
        return bytes(300_000)

    async with ml.limit_scope() as scope:
        task = asyncio.create_task(build())
        result = await task
    assert len(result) == 300_000
    assert scope.usage.allocated >= 300_000
    assert scope.usage.live >= 300_000


@pytest.mark.anyio
async def test_worker_thread_allocations_are_charged_to_the_scope(
    exact_accounting: None,
) -> None:
    def build() -> bytes:
        return bytes(300_000)

    async with ml.limit_scope() as scope:
        result = await anyio.to_thread.run_sync(build)
    assert len(result) == 300_000
    assert scope.usage.allocated >= 300_000


# ---- event loop in another thread: delivery through the delivery thread ----


def test_loop_in_a_worker_thread_is_cancelled() -> None:
    import threading

    results: list[ml.LimitScope] = []

    async def main() -> None:
        held: list[bytes] = []
        async with ml.limit_scope(memory="2 MiB") as scope:
            await leak_until_cancelled(held)
        results.append(scope)

    thread = threading.Thread(target=asyncio.run, args=(main(),))
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert results and results[0].breached


# ---- usage while running and after exit ----


@pytest.mark.anyio
async def test_usage_is_live_inside_and_frozen_after_exit(
    exact_accounting: None,
) -> None:
    async with ml.limit_scope() as scope:
        block = bytes(100_000)
        inside = scope.usage
        del block
        after_free = scope.usage
    assert inside.live >= 100_000
    assert after_free.live < inside.live
    frozen = scope.usage
    more = bytes(100_000)
    assert scope.usage == frozen
    assert len(more) == 100_000


def test_scope_can_be_entered_only_once() -> None:
    scope = ml.limit_scope()
    with scope:
        pass
    with pytest.raises(RuntimeError, match="only be entered once"), scope:
        pass


def test_leaving_before_a_scope_entered_later_is_refused() -> None:
    """Out-of-order exits (e.g. scopes in two interleaved generators) raise
    instead of leaving the later scope's account current after the earlier
    one is gone; both can then be left in order."""
    earlier, later = ml.limit_scope(), ml.limit_scope()
    earlier.__enter__()
    later.__enter__()
    with pytest.raises(RuntimeError, match="not current here"):
        earlier.__exit__(None, None, None)
    later.__exit__(None, None, None)
    earlier.__exit__(None, None, None)
    assert current_account.get(None) is None


def test_leaving_in_another_context_is_refused() -> None:
    scope = ml.limit_scope()
    scope.__enter__()
    with pytest.raises(RuntimeError, match="not current here"):
        contextvars.Context().run(scope.__exit__, None, None, None)
    scope.__exit__(None, None, None)  # in its own context it still can
    assert current_account.get(None) is None


@pytest.mark.anyio
async def test_exit_from_another_task_is_refused_and_the_owner_can_exit(
    exact_accounting: None,
) -> None:
    """A task started inside the scope copies the context that holds its
    account, so the account is current there too: exiting from that task
    must still be refused, before anything changes, and leave the scope to
    the task that entered it."""
    before = current_account.get(None)
    scope = ml.limit_scope(memory="1 GiB")
    await scope.__aenter__()
    inside = current_account.get()
    refused: list[BaseException] = []

    async def exit_it() -> None:
        assert current_account.get() is inside  # the copied context
        try:
            await scope.__aexit__(None, None, None)
        except RuntimeError as exc:
            refused.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(exit_it)
    assert len(refused) == 1
    assert "another task, thread or context" in str(refused[0])
    assert current_account.get() is inside
    assert "active" in repr(scope)
    block = bytes(100_000)
    assert scope.usage.live >= 100_000  # still metering for its owner
    await scope.__aexit__(None, None, None)
    assert current_account.get(None) is before
    assert not scope.breached
    del block


def test_sync_exit_from_another_thread_is_refused() -> None:
    scope = ml.limit_scope(memory="1 GiB")
    scope.__enter__()
    refused: list[BaseException] = []

    def exit_it() -> None:
        try:
            scope.__exit__(None, None, None)
        except RuntimeError as exc:
            refused.append(exc)

    # A thread running in a copy of this context, as anyio's workers do.
    thread = threading.Thread(target=contextvars.copy_context().run, args=(exit_it,))
    thread.start()
    thread.join()
    assert len(refused) == 1
    assert "another task, thread or context" in str(refused[0])
    # nor in a copy of the context in this very thread
    with pytest.raises(RuntimeError, match="another task, thread or context"):
        contextvars.copy_context().run(scope.__exit__, None, None, None)
    scope.__exit__(None, None, None)
    assert current_account.get(None) is None
    assert scope.usage.allocated >= 0 and not scope.breached


def test_repr_mentions_limits_and_state() -> None:
    scope = ml.limit_scope(memory="1 MiB", timeout=2)
    assert "memory=1048576" in repr(scope)
    assert "timeout=2.0" in repr(scope)
    assert "new" in repr(scope)


def test_a_failing_breach_listener_does_not_stop_delivery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from memlimits_async._meter import _core

    reported: list[object] = []
    monkeypatch.setattr("sys.unraisablehook", reported.append)

    async def main() -> ml.LimitScope:
        held: list[bytes] = []
        async with ml.limit_scope(memory="2 MiB") as scope:
            await leak_until_cancelled(held)
        return scope

    # Every drain first meets a listener that raises: the scope must still
    # be told, and the failure be reported, not lost.
    calls: list[int] = []

    class Boom:
        def _on_breach(self) -> None:
            calls.append(1)
            raise RuntimeError("delivery failed")

    original = _core.take_breached
    monkeypatch.setattr(_core, "take_breached", lambda: [Boom(), *original()])
    scope = anyio.run(main)
    assert scope.breached
    assert calls
    assert any("delivery failed" in str(getattr(r, "exc_value", "")) for r in reported)
