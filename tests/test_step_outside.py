"""LimitScope.step_outside(): a task started in a scope stops charging it."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

import memlimits_async as ml

MIB = 1 << 20


async def _hold(size: int, held: list[bytes]) -> None:
    held.append(bytes(size))
    await asyncio.sleep(0)


def test_child_task_charges_the_scopes_around_only(exact_accounting: None) -> None:
    async def main() -> None:
        held: list[bytes] = []
        async with ml.limit_scope() as outer:
            async with ml.limit_scope() as parent:

                async def child() -> None:
                    parent.step_outside()
                    async with ml.limit_scope() as own:
                        await _hold(4 * MIB, held)
                    assert own.usage.live >= 4 * MIB

                await asyncio.create_task(child())
            assert parent.usage.allocated < MIB  # its own small objects only
        assert outer.usage.live >= 4 * MIB  # still charged to the scope around

    asyncio.run(main())


def test_without_it_the_parent_is_charged(exact_accounting: None) -> None:
    async def main() -> None:
        held: list[bytes] = []
        async with ml.limit_scope() as parent:
            await asyncio.create_task(_hold(4 * MIB, held))
        assert parent.usage.live >= 4 * MIB

    asyncio.run(main())


def test_refused_where_the_scope_was_entered() -> None:
    async def main() -> None:
        async with ml.limit_scope() as scope:
            with pytest.raises(RuntimeError, match="copy of the context"):
                scope.step_outside()
        # nothing changed: the exit above worked
        assert not scope.breached

    asyncio.run(main())


def test_refused_when_not_innermost_or_not_open() -> None:
    async def main() -> None:
        async with ml.limit_scope() as scope:
            async with ml.limit_scope():
                ctx = contextvars.copy_context()
                with pytest.raises(RuntimeError, match="innermost"):
                    ctx.run(scope.step_outside)
        with pytest.raises(RuntimeError, match="open limit_scope"):
            scope.step_outside()
        with pytest.raises(RuntimeError, match="open limit_scope"):
            ml.limit_scope().step_outside()

    asyncio.run(main())
