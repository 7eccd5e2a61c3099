"""Interrupt-safe regions, @interrupt_safe, is_interrupted and with_resource."""

from __future__ import annotations

import asyncio
import functools
import inspect
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import pytest

import memlimits_async as ml
from helpers import MIB
from memlimits_async._masking import is_protected

pytestmark = pytest.mark.filterwarnings("error")


async def _steps(n: int) -> None:
    """n loop iterations in which a delivered cancellation would land."""
    for _ in range(n):
        await anyio.sleep(0.001)


# ---- regions: `with` and `async with` ----


@pytest.mark.anyio
async def test_async_region_holds_a_token_until_its_exit() -> None:
    token = ml.CancelToken()
    log: list[str] = []
    async with ml.limit_scope(token=token) as scope:
        async with ml.interrupt_safe():
            token.cancel("stop")
            await _steps(5)  # delivered meanwhile, but held back
            assert ml.is_interrupted()
            log.append("region finished")
        log.append("after the region")  # the region's exit is a checkpoint
    assert log == ["region finished"]
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.TOKEN
    assert not ml.is_interrupted()


@pytest.mark.anyio
async def test_sync_region_in_a_task_holds_a_memory_breach_until_its_exit(
    exact_accounting: None,
) -> None:
    held: list[bytes] = []
    log: list[str] = []
    async with ml.limit_scope(memory="1 MiB") as scope:
        with ml.interrupt_safe():
            held.append(bytes(2 * MIB))
            await _steps(5)
            assert ml.is_interrupted()
            log.append("region finished")
        log.append("after the region")
        await anyio.sleep(0)
        log.append("after a checkpoint")  # never reached
    assert log == ["region finished", "after the region"]
    assert scope.breach is not None and scope.breach.kind is ml.BreachKind.MEMORY


@pytest.mark.anyio
async def test_siblings_outside_the_region_are_cancelled_at_once() -> None:
    token = ml.CancelToken()
    log: list[str] = []

    async def sibling() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            log.append(f"sibling stopped, region done: {'region' in log}")

    async def guarded() -> None:
        async with ml.interrupt_safe():
            token.cancel()
            await _steps(10)
            log.append("region")

    async with ml.limit_scope(token=token) as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sibling)
            await anyio.sleep(0)
            tg.start_soon(guarded)
    assert log == ["sibling stopped, region done: False", "region"]
    assert scope.breached


@pytest.mark.anyio
async def test_region_also_holds_back_a_timeout() -> None:
    with anyio.move_on_after(0.01) as outer:
        async with ml.interrupt_safe():
            await anyio.sleep(0.05)
            finished = True
        await anyio.sleep(1)
    assert finished and outer.cancelled_caught


@pytest.mark.anyio
async def test_a_scope_opened_inside_a_region_is_still_interrupted() -> None:
    token = ml.CancelToken()
    async with ml.interrupt_safe():
        async with ml.limit_scope(token=token) as scope:
            token.cancel()
            await anyio.sleep(1)
    assert scope.breached


@pytest.mark.anyio
async def test_shielded_limit_scope_is_a_region_for_the_scopes_around_it() -> None:
    token = ml.CancelToken()
    log: list[str] = []
    async with ml.limit_scope(token=token) as outer:
        async with ml.limit_scope(shield=True) as inner:
            token.cancel("outer stop")
            await _steps(5)
            assert ml.is_interrupted()  # the outer scope was interrupted
            log.append("shielded body finished")
        await anyio.sleep(0)
        log.append("never")
    assert log == ["shielded body finished"]
    assert outer.breached and not inner.breached


def test_region_outside_any_task_just_runs() -> None:
    with ml.interrupt_safe():
        value = sum(range(10))
    assert value == 45


def test_a_region_is_entered_once() -> None:
    region = ml.interrupt_safe()
    with region:
        pass
    with pytest.raises(RuntimeError, match="only be entered once"):
        with region:
            pass


# ---- the decorator marks code, it does not wrap ----


def _plain(x: int, *, y: int = 2) -> int:
    return x + y


def _gen(n: int) -> Iterator[int]:
    yield from range(n)


async def _coro(x: int) -> int:
    await anyio.sleep(0)
    return x


async def _agen(n: int) -> AsyncIterator[int]:
    for i in range(n):
        await anyio.sleep(0)
        yield i


@pytest.mark.parametrize("function", [_plain, _gen, _coro, _agen])
def test_decorator_returns_the_function_itself(function: Callable[..., Any]) -> None:
    signature = inspect.signature(function)
    assert ml.interrupt_safe(function) is function
    assert inspect.signature(function) == signature


def test_decorated_sync_code_and_generators_are_protected_frames() -> None:
    @ml.interrupt_safe
    def guarded() -> bool:
        return is_protected(sys._getframe())

    @ml.interrupt_safe
    def guarded_gen() -> Iterator[bool]:
        yield is_protected(sys._getframe())

    def called_from_guarded() -> bool:
        return is_protected(sys._getframe())

    @ml.interrupt_safe
    def outer() -> bool:
        return called_from_guarded()

    def unguarded() -> bool:
        return is_protected(sys._getframe())

    assert guarded() and next(guarded_gen()) and outer()
    assert not unguarded() and not called_from_guarded()


def test_methods_static_and_class_methods_are_marked_through_their_function() -> None:
    class Pool:
        @ml.interrupt_safe
        def release(self) -> bool:
            return is_protected(sys._getframe())

        @ml.interrupt_safe
        @staticmethod
        def check() -> bool:
            return is_protected(sys._getframe())

        @ml.interrupt_safe
        @classmethod
        def make(cls) -> bool:
            return is_protected(sys._getframe())

    pool = Pool()
    assert pool.release() and Pool.check() and Pool.make()
    bound = pool.release
    assert ml.interrupt_safe(bound) is bound


@pytest.mark.parametrize(
    "bad", [42, len, functools.partial(_plain, 1), "def f(): pass", None]
)
def test_decorating_something_else_is_a_type_error(bad: object) -> None:
    if bad is None:
        assert isinstance(ml.interrupt_safe(), ml.InterruptSafe)  # no argument
        return
    with pytest.raises(TypeError, match="interrupt_safe decorates a function"):
        ml.interrupt_safe(bad)  # type: ignore[call-overload]


@pytest.mark.anyio
async def test_decorated_coroutine_holds_delivery_until_it_returns() -> None:
    token = ml.CancelToken()
    log: list[str] = []

    @ml.interrupt_safe
    async def release_connection() -> None:
        token.cancel("client went away")
        await _steps(10)  # every step gives the delivery a chance
        log.append("released")

    async with ml.limit_scope(token=token) as scope:
        await release_connection()
        log.append("returned")  # no checkpoint yet
        await anyio.sleep(1)
        log.append("never")
    assert log == ["released", "returned"]
    assert scope.breach is not None and scope.breach.reason.endswith("client went away")


@pytest.mark.anyio
async def test_decorated_coroutine_deeper_in_the_await_chain_holds_delivery() -> None:
    token = ml.CancelToken()
    log: list[str] = []

    @ml.interrupt_safe
    async def commit() -> None:
        await plain_helper()
        log.append("committed")

    async def plain_helper() -> None:
        token.cancel()
        await _steps(10)

    async def handler() -> None:
        await commit()

    async with ml.limit_scope(token=token):
        await handler()
        await anyio.sleep(1)
    assert log == ["committed"]


@pytest.mark.anyio
async def test_decorated_async_generator_holds_delivery_while_it_runs() -> None:
    token = ml.CancelToken()
    seen: list[int] = []

    @ml.interrupt_safe
    async def rows() -> AsyncIterator[int]:
        token.cancel()
        for i in range(5):
            await _steps(2)
            yield i

    async with ml.limit_scope(token=token) as scope:
        async for row in rows():
            seen.append(row)  # no checkpoint outside rows()
        await anyio.sleep(1)  # the first one: delivered here
        seen.append(-1)
    assert seen == [0, 1, 2, 3, 4]
    assert scope.breached


@pytest.mark.anyio
async def test_decorated_coroutine_in_a_child_task_holds_the_whole_scope() -> None:
    token = ml.CancelToken()
    log: list[str] = []

    @ml.interrupt_safe
    async def flush() -> None:
        token.cancel()
        await _steps(10)
        log.append("flushed")

    async with ml.limit_scope(token=token) as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(flush)
        await anyio.sleep(1)
    assert log == ["flushed"] and scope.breached


@pytest.mark.asyncio
async def test_decorated_coroutine_on_native_asyncio() -> None:
    token = ml.CancelToken()
    log: list[str] = []

    @ml.interrupt_safe
    async def guarded() -> None:
        token.cancel()
        for _ in range(10):
            await asyncio.sleep(0.001)
        log.append("done")

    async with ml.limit_scope(token=token) as scope:
        await asyncio.create_task(guarded())
        await asyncio.sleep(1)
    assert log == ["done"] and scope.breached


# ---- is_interrupted ----


@pytest.mark.anyio
async def test_is_interrupted_from_delivery_until_the_scope_exits() -> None:
    token = ml.CancelToken()
    seen_in_child: list[bool] = []
    assert not ml.is_interrupted()
    async with ml.limit_scope(token=token):
        assert not ml.is_interrupted()
        token.cancel()
        try:
            await anyio.sleep(1)
        finally:
            assert ml.is_interrupted()
            with anyio.CancelScope(shield=True):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(lambda: _record(seen_in_child))
    assert seen_in_child == [True]
    assert not ml.is_interrupted()


async def _record(into: list[bool]) -> None:
    into.append(ml.is_interrupted())


@pytest.mark.anyio
async def test_plain_cancel_and_timeouts_are_not_interrupts() -> None:
    async with ml.limit_scope() as scope:
        scope.cancel()
        try:
            await anyio.sleep(1)
        finally:
            assert not ml.is_interrupted()
    async with ml.limit_scope(timeout=0.001):
        try:
            await anyio.sleep(1)
        finally:
            assert not ml.is_interrupted()


# ---- with_resource ----


class Pool:
    def __init__(self, fail_acquire: bool = False) -> None:
        self.fail_acquire = fail_acquire
        self.events: list[str] = []

    def acquire(self) -> str:
        if self.fail_acquire:
            raise ConnectionError("no connection")
        self.events.append("acquire")
        return "conn"

    def release(self, conn: str) -> None:
        self.events.append(f"release {conn}")

    async def acquire_async(self) -> str:
        await anyio.sleep(0.005)  # a checkpoint inside acquire
        return self.acquire()

    async def release_async(self, conn: str) -> None:
        await anyio.sleep(0.005)
        self.release(conn)


def test_sync_resource_is_released_iff_acquired() -> None:
    pool = Pool()
    with pytest.raises(KeyError):
        with ml.with_resource(pool.acquire, pool.release) as conn:
            assert conn == "conn"
            raise KeyError("body failed")
    assert pool.events == ["acquire", "release conn"]

    failing = Pool(fail_acquire=True)
    with pytest.raises(ConnectionError):
        with ml.with_resource(failing.acquire, failing.release):
            pytest.fail("the body must not run")
    assert failing.events == []


@pytest.mark.anyio
async def test_async_resource_survives_a_token_during_acquire_and_release() -> None:
    token = ml.CancelToken()
    pool = Pool()
    body: list[str] = []

    async def acquire() -> str:
        token.cancel("now")  # delivered while acquire is still awaiting
        return await pool.acquire_async()

    async with ml.limit_scope(token=token) as scope:
        async with ml.with_resource(acquire, pool.release_async) as conn:
            body.append(conn)
            await anyio.sleep(1)  # interrupted here
            body.append("never")
    assert body == ["conn"]
    assert pool.events == ["acquire", "release conn"]
    assert scope.breached


@pytest.mark.anyio
async def test_async_resource_acquire_failure_skips_release() -> None:
    pool = Pool(fail_acquire=True)
    with pytest.raises(ConnectionError):
        async with ml.with_resource(pool.acquire_async, pool.release_async):
            pytest.fail("the body must not run")
    assert pool.events == []


def test_with_resource_bad_input() -> None:
    with pytest.raises(TypeError, match="acquire must be callable"):
        ml.with_resource(42, print)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="release must be callable"):
        ml.with_resource(print, "x")  # type: ignore[arg-type]
    pool = Pool()
    with pytest.raises(TypeError, match="use 'async with'"):
        with ml.with_resource(pool.acquire_async, pool.release):
            pass
    assert pool.events == []


@pytest.mark.anyio
async def test_marked_code_in_a_task_outside_the_scope_does_not_hold_it() -> None:
    token = ml.CancelToken()
    log: list[str] = []
    outside_running = anyio.Event()

    @ml.interrupt_safe
    async def long_cleanup() -> None:
        outside_running.set()
        await anyio.sleep(0.5)
        log.append("cleanup done")

    async with anyio.create_task_group() as tg:
        tg.start_soon(long_cleanup)  # not in the scope's context
        await outside_running.wait()
        async with ml.limit_scope(token=token) as scope:
            token.cancel()
            await anyio.sleep(1)
        log.append("scope stopped")
    assert log == ["scope stopped", "cleanup done"] and scope.breached


# ---- native trio ----


def test_region_and_marked_coroutine_on_native_trio() -> None:
    import trio

    log: list[str] = []

    @ml.interrupt_safe
    async def marked(token: ml.CancelToken) -> None:
        token.cancel()
        for _ in range(5):
            await trio.sleep(0.001)
        log.append("marked done")

    async def main() -> tuple[ml.LimitScope, ml.LimitScope]:
        first_token, second_token = ml.CancelToken(), ml.CancelToken()
        async with ml.limit_scope(token=first_token) as first:
            async with ml.interrupt_safe():
                first_token.cancel()
                await trio.sleep(0.005)
                log.append("region done")
            log.append("never")
        async with ml.limit_scope(token=second_token) as second:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(marked, second_token)
            await trio.sleep(1)
            log.append("never")
        return first, second

    first, second = trio.run(main)
    assert log == ["region done", "marked done"]
    assert first.breached and second.breached
