"""Bad input: a clear TypeError/ValueError naming the argument, nothing installed."""

from __future__ import annotations

import math
from typing import Any

import pytest

import memlimits_async as ml
from memlimits_async._meter import _core


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"memory": -1}, ValueError, "memory"),
        ({"memory": "lots"}, ValueError, "memory"),
        ({"memory": math.nan}, ValueError, "memory"),
        ({"memory": [1]}, TypeError, "memory"),
        ({"memory": True}, TypeError, "memory"),
        ({"allocations": -5}, ValueError, "allocations"),
        ({"allocations": "3 parsecs"}, ValueError, "allocations"),
        ({"allocations": object()}, TypeError, "allocations"),
        ({"timeout": math.nan}, ValueError, "timeout"),
        ({"timeout": 10**400}, ValueError, "timeout"),
        ({"deadline": math.nan}, ValueError, "deadline"),
        ({"deadline": "5"}, TypeError, "deadline"),
        ({"deadline": True}, TypeError, "deadline"),
        ({"deadline": 10**400}, ValueError, "deadline"),
        ({"timeout": 1, "deadline": 5.0}, TypeError, "timeout.*deadline"),
        ({"budget": ml.Budget(timeout=1), "deadline": 5.0}, TypeError, "deadline"),
        ({"timeout": "5"}, TypeError, "timeout"),
        ({"timeout": True}, TypeError, "timeout"),
        ({"shield": 1}, TypeError, "shield"),
        ({"raise_on_breach": "yes"}, TypeError, "raise_on_breach"),
    ],
)
def test_limit_scope_rejects_bad_arguments(
    kwargs: dict[str, Any], error: type[Exception], names: str
) -> None:
    with pytest.raises(error, match=names):
        ml.limit_scope(**kwargs)
    assert _core.current_account.get(None) is None


def test_limit_scope_takes_keywords_only() -> None:
    with pytest.raises(TypeError):
        ml.limit_scope("50 MiB")  # type: ignore[call-arg]


def test_unknown_argument_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="memroy"):
        ml.limit_scope(memroy="5 MiB")  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        ("0 B", ValueError),
        ("x", ValueError),
        (1.5j, TypeError),
        (False, TypeError),
    ],
)
def test_configure_rejects_bad_sampling_interval(
    value: object, error: type[Exception]
) -> None:
    before = ml.stats().configured_sampling_interval
    with pytest.raises(error, match="sampling_interval"):
        ml.configure(sampling_interval=value)  # type: ignore[arg-type]
    assert ml.stats().configured_sampling_interval == before


def test_cancel_reason_must_be_a_string() -> None:
    scope = ml.limit_scope()
    with pytest.raises(TypeError, match="reason"):
        scope.cancel(42)  # type: ignore[arg-type]


def test_exit_without_enter_is_refused() -> None:
    scope = ml.limit_scope()
    with pytest.raises(RuntimeError, match="not active"):
        scope.__exit__(None, None, None)


def test_unlimited_and_zero_limits_are_valid() -> None:
    assert ml.limit_scope(memory=None).memory is None
    assert ml.limit_scope(memory=0).memory == 0
    assert ml.limit_scope(timeout=0).timeout == 0.0
    assert ml.limit_scope(timeout=math.inf).timeout == math.inf
    assert ml.limit_scope(allocations="1.5 GB").allocations == 1_500_000_000


def test_failed_entry_leaves_nothing_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import anyio

    from memlimits_async import _scope

    class FailingAccount:
        def __init__(self, memory: object, allocations: object) -> None:
            self.left = False

        def enter(self, on_breach: object) -> None:
            raise MemoryError("no room for the context")

        def leave(self) -> None:
            self.left = True

    monkeypatch.setattr(_scope, "Account", FailingAccount)

    async def main() -> None:
        scope = ml.limit_scope(memory="1 MiB")
        with pytest.raises(MemoryError):
            async with scope:
                pass
        assert not scope.breached
        assert _core.current_account.get(None) is None
        await anyio.sleep(0)  # no cancel scope was left behind in this task

    anyio.run(main)
