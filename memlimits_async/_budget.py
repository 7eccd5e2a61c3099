"""Budget: the limits of a unit of work, as one immutable value.

A budget is what a ``limit_scope`` enforces, without the scope: live bytes,
cumulative bytes allocated, a timeout, cancel tokens and the preemption
grace.  One value can be written once and handed to every place that opens
scopes for the same kind of work: ``limit_scope(budget=...)``, each child of
a budgeted task group (``start_soon(..., budget=...)``), each start of a
supervised child (``ChildSpec(budget=...)``).

Invariant (enforced by ``Budget.__init__``, kept by ``__setattr__``): a
Budget holds only validated, normalised values (bytes as ints, seconds as
floats, tokens as one token or a tuple of them), checked with the very
functions ``limit_scope`` uses, so a scope opened from a budget never fails
on its account, and errors name the argument exactly as ``limit_scope``'s do.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NoReturn

from ._preempt import parse_preempt
from ._tokens import CancelToken
from ._units import parse_size

__all__ = ["Budget", "budget_arguments"]

_FIELDS = ("memory", "allocations", "timeout", "token", "preempt")


class Budget:
    """What a unit of work may use; ``None`` everywhere means no limit.

    :param memory: live bytes (int, or a string such as ``"50 MiB"``).
    :param allocations: cumulative bytes allocated, a measure of work done.
    :param timeout: seconds, like ``anyio.move_on_after`` (negative: expired
        from the start).
    :param token: a :class:`CancelToken`, or several (kept as a tuple).
    :param preempt: the preemption grace of ``limit_scope(preempt=...)``:
        seconds a breached body may run without a checkpoint before it is
        preempted, False never to preempt, None for the configured default.

    Sizes are stored in bytes and the timeout in seconds: ``Budget(memory=
    "1 KiB").memory == 1024``.  Budgets are immutable, hashable and compare
    by value, so one can be a module constant shared by every task.
    """

    __slots__ = _FIELDS

    memory: int | None
    allocations: int | None
    timeout: float | None
    token: CancelToken | tuple[CancelToken, ...] | None
    preempt: float | bool | None

    def __init__(
        self,
        *,
        memory: int | str | None = None,
        allocations: int | str | None = None,
        timeout: float | None = None,
        token: CancelToken | Iterable[CancelToken] | None = None,
        preempt: float | bool | None = None,
    ) -> None:
        # The scope module imports this one; its checks are needed only here.
        from ._scope import _parse_timeout, _parse_tokens

        if memory is not None:
            memory = parse_size(memory, name="memory")
        if allocations is not None:
            allocations = parse_size(allocations, name="allocations")
        if timeout is not None:
            timeout = _parse_timeout(timeout, negative=True)
        if token is not None and not isinstance(token, CancelToken):
            token = _parse_tokens(token)
        if preempt is not None:
            parse_preempt(preempt)
            if preempt is not False:
                preempt = float(preempt)
        for name, value in zip(
            _FIELDS, (memory, allocations, timeout, token, preempt), strict=True
        ):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"a Budget is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"a Budget is immutable: cannot delete {name!r}")

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in _FIELDS)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Budget):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        given = [
            f"{name}={value!r}"
            for name, value in zip(_FIELDS, self._values(), strict=True)
            if value is not None
        ]
        return f"Budget({', '.join(given)})"

    def __reduce__(self) -> tuple[object, ...]:
        # Slots and a refusing __setattr__: rebuild through the constructor.
        return (_rebuild, self._values())


def _rebuild(
    memory: int | None,
    allocations: int | None,
    timeout: float | None,
    token: CancelToken | tuple[CancelToken, ...] | None,
    preempt: float | bool | None,
) -> Budget:
    return Budget(
        memory=memory,
        allocations=allocations,
        timeout=timeout,
        token=token,
        preempt=preempt,
    )


def budget_arguments(
    budget: object,
    memory: int | str | None,
    allocations: int | str | None,
    timeout: float | None,
    token: CancelToken | Iterable[CancelToken] | None,
    preempt: float | bool | None,
) -> tuple[
    int | None,
    int | None,
    float | None,
    CancelToken | Iterable[CancelToken] | None,
    float | bool | None,
]:
    """The limits of ``limit_scope(budget=...)``.

    ``token`` may come with the budget: its tokens are watched besides the
    budget's (a token only adds a way to stop the scope, so nothing is
    ambiguous, and one budget can serve every request, each with a token of
    its own).  Any other argument given besides the budget is a TypeError
    naming it (which of the two limits would hold?)."""
    if not isinstance(budget, Budget):
        raise TypeError(
            f"budget must be a memlimits_async.Budget or None, "
            f"not {type(budget).__name__}"
        )
    if memory is None and allocations is None and timeout is None and preempt is None:
        # The common case, first: task groups open a scope per child.
        tokens = budget.token
        if token is not None:
            tokens = _more_tokens(tokens, token)
        return (
            budget.memory,
            budget.allocations,
            budget.timeout,
            tokens,
            budget.preempt,
        )
    given = [
        name
        for name, value in zip(
            ("memory", "allocations", "timeout", "preempt"),
            (memory, allocations, timeout, preempt),
            strict=True,
        )
        if value is not None
    ]
    others = ", ".join(f"{name}=" for name in given)
    raise TypeError(
        f"pass either budget= or {others} (not both): the budget already "
        f"sets every limit (only token= may come with it)"
    )


def _more_tokens(
    tokens: CancelToken | tuple[CancelToken, ...] | None,
    token: CancelToken | Iterable[CancelToken],
) -> CancelToken | tuple[CancelToken, ...]:
    """The budget's tokens and ``token`` (checked as ``limit_scope`` does)."""
    if tokens is None and isinstance(token, CancelToken):
        return token  # the common case: a request's token, a budget without
    from ._scope import _parse_tokens

    if tokens is None:
        return _parse_tokens(token)
    if isinstance(tokens, CancelToken):
        tokens = (tokens,)
    return (*tokens, *_parse_tokens(token))
