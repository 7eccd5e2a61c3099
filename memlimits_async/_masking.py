"""Interrupt-safe regions: code that a breach or a token must not cut short.

Cleaning up after an interrupt (returning a connection to its pool, rolling
back, releasing a lock) is itself code that an interrupt could cut in half.
memprof-limits' answer is *masking*: delivery is postponed while a region
runs and happens as soon as it exits.  Here there are two ways to mark one:

* ``with interrupt_safe():`` / ``async with interrupt_safe():``.  In a task
  the region is a shielded cancel scope: no cancellation from an enclosing
  scope (a breach, a token, a timeout, a plain ``cancel()``) reaches its
  body; one that arrived meanwhile is delivered at its exit (the ``async
  with`` form checkpoints there).  Sibling tasks are cancelled at once.
  A ``limit_scope(shield=True)`` is such a region for the scopes around it.
* ``@interrupt_safe`` on a function, marking its code object the way trio
  marks KeyboardInterrupt-protected code: the function itself is returned
  unchanged (same object, same signature).  A sync function or generator
  has no checkpoint, so cooperative cancellation cannot land in it anyway;
  the mark is for preemptive interrupts.  For a coroutine function or an
  async generator, the delivery of a breach or token to a scope waits while
  any task of that scope is suspended inside marked code (checked again
  every couple of milliseconds) and happens once it has returned.

Invariant (enforced by ``_deferred_delivery``): a delivery deferred because
of marked code is retried until it happens or its scope exits; it never
waits longer than the marked code runs plus one retry period.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import sys
import weakref
from collections.abc import Awaitable, Callable, Iterator
from contextvars import Context, ContextVar
from types import CodeType, FrameType, TracebackType
from typing import Any, Generic, TypeVar, overload

import anyio
import anyio.lowlevel

from ._accounts import Account, current_account, interrupted
from ._meter import _core

__all__ = [
    "InterruptSafe",
    "interrupt_safe",
    "is_interrupted",
    "is_protected_code",
    "protected_code_waits",
    "region_account",
    "shielded_accounts",
    "shielded_within",
    "with_resource",
]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

# Code objects of functions decorated with @interrupt_safe.  Weak, so that
# decorating a closure in a loop does not keep its code alive (trio keeps its
# KeyboardInterrupt protection the same way).
_protected_code: weakref.WeakKeyDictionary[CodeType, None] = weakref.WeakKeyDictionary()
# The subset whose frames can be suspended at a checkpoint.  While it is
# empty (no coroutine function was ever decorated), delivery checks nothing.
_protected_async_code: weakref.WeakKeyDictionary[CodeType, None] = (
    weakref.WeakKeyDictionary()
)

_ASYNC_FLAGS = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR

region_account: ContextVar[Account | None] = ContextVar(
    "memlimits_async.region_account", default=None
)
"""In a region: the account that was current
where the innermost one was entered.  A region protects against the scopes
around it, i.e. the scopes that account is within; scopes opened inside the
region stay interruptible.  (None: no region, or none inside any scope.)
The meter reads it too: inside a region, no request is refused for the
limits of the scopes it protects (docs/limit-scope.md, "Requests too large
for a limit")."""
_core.set_region_var(region_account)

shielded_accounts: set[Account] = set()
"""The accounts of shielded scopes whose body runs shielded now: each is a
region for the scopes around it.  A set rather than ``region_account``,
because a scope's ``shield`` can be lowered and raised while its body runs,
from wherever the body is (a ContextVar would have to be set and reset in
nested order, in the context of the scope's entry)."""


def shielded_within(running: Account, account: Account) -> bool:
    """True if code charged to ``running`` is in the body of a shielded scope
    opened inside ``account``'s scope (not ``account``'s own: a shield keeps
    out the scopes around, not the scope's own limits)."""
    if not shielded_accounts:
        return False
    for shielded in tuple(shielded_accounts):  # a copy: any thread adds
        if (
            shielded is not account
            and running.is_within(shielded)
            and shielded.is_within(account)
        ):
            return True
    return False


def is_protected_code(code: CodeType) -> bool:
    """True for the code of a function decorated with ``@interrupt_safe``."""
    return code in _protected_code


class InterruptSafe:
    """A region where no breach or token interrupts the code (see module).

    Create it with ``interrupt_safe()``; use it once, with ``with`` or
    ``async with``, in a task, a thread or plain code.  Outside a task there
    is nothing to hold back: scopes there report at exit.
    """

    __slots__ = ("_cancel_scope", "_entered", "_marker")

    def __init__(self) -> None:
        self._cancel_scope: anyio.CancelScope | None = None
        self._entered = False

    def __enter__(self) -> None:
        if self._entered:
            raise RuntimeError("an interrupt_safe() region can only be entered once")
        self._entered = True
        if _in_task():
            self._cancel_scope = anyio.CancelScope(shield=True)
            self._cancel_scope.__enter__()
        # Last: preemption is held back from here on.
        self._marker = region_account.set(current_account.get(None))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        region_account.reset(self._marker)
        if self._cancel_scope is not None:
            # A shield's own scope is never cancelled: it suppresses nothing.
            self._cancel_scope.__exit__(exc_type, exc, tb)

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)
        if exc_type is None:
            # What was held back is delivered here, not at some later await.
            await anyio.lowlevel.checkpoint_if_cancelled()


@overload
def interrupt_safe() -> InterruptSafe: ...
@overload
def interrupt_safe(function: F, /) -> F: ...
def interrupt_safe(function: F | None = None, /) -> InterruptSafe | F:
    """``with interrupt_safe():`` opens a region; ``@interrupt_safe`` marks a
    function (def, async def, generator or async generator) and returns it
    unchanged.  Methods, static and class methods are marked through the
    function they wrap."""
    if function is None:
        return InterruptSafe()
    code = _code_of(function)
    _protected_code[code] = None
    if code.co_flags & _ASYNC_FLAGS:
        _protected_async_code[code] = None
    return function


def _code_of(function: object) -> CodeType:
    target = getattr(function, "__func__", function)  # methods, static/classmethod
    code = getattr(target, "__code__", None)
    if not isinstance(code, CodeType):
        raise TypeError(
            "interrupt_safe decorates a function defined with def or async def "
            f"(or a method of one), not {type(function).__name__}; use "
            "'with interrupt_safe():' around other callables"
        )
    return code


def is_interrupted() -> bool:
    """True from the delivery of a breach or token to a scope around this
    code until that scope exits: the cancellation is on its way (or is being
    handled), so this is a time to clean up, not to start new work.

    A timeout, which anyio delivers by itself, and ``scope.cancel()`` are not
    interrupts in this sense.
    """
    return interrupted()


def is_protected(frame: FrameType | None) -> bool:
    """True if ``frame`` or a frame it was called from runs marked code."""
    while frame is not None:
        if frame.f_code in _protected_code:
            return True
        frame = frame.f_back
    return False


# ---- delivery to scopes whose tasks are inside marked coroutines ----


def protected_code_waits(account: Account) -> bool:
    """True if a task charged to ``account`` is suspended in marked code.

    Runs on the loop thread between task steps.  Costs nothing until a
    coroutine function is decorated; then it looks at every task of the
    loop once per delivery (deliveries are rare: one per breach).
    """
    if not _protected_async_code:
        return False
    for context, awaiting in _suspended_tasks():
        task_account = None if context is None else context.get(current_account)
        if (
            task_account is not None
            and task_account.is_within(account)
            and any(frame.f_code in _protected_code for frame in awaiting)
        ):
            return True
    return False


def _suspended_tasks() -> Iterator[tuple[Context | None, Iterator[FrameType]]]:
    """(context, frames of its await chain) for each task of this loop."""
    loop = asyncio._get_running_loop()
    if loop is not None:
        for task in asyncio.all_tasks(loop):
            yield _task_context(task), _await_chain(task.get_coro())
        return
    trio = sys.modules.get("trio")
    if trio is not None:
        pending = [trio.lowlevel.current_root_task()]
        while pending:
            task = pending.pop()
            if task is None:
                continue
            yield task.context, _await_chain(task.coro)
            for nursery in task.child_nurseries:
                pending.extend(nursery.child_tasks)


if sys.version_info >= (3, 12):

    def _task_context(task: asyncio.Task[Any]) -> Context | None:
        return task.get_context()

else:

    def _task_context(task: asyncio.Task[Any]) -> Context | None:
        # 3.11 has no Task.get_context(); the C task does not expose the
        # attribute the Python one has, but hands its context to the GC.
        context = getattr(task, "_context", None)
        if context is None:
            context = next(
                (each for each in gc.get_referents(task) if isinstance(each, Context)),
                None,
            )
        return context


def _await_chain(awaitable: object) -> Iterator[FrameType]:
    """The frames of a suspended coroutine and of what it awaits, outermost
    first, through coroutines, generators and async generators."""
    seen = 0
    while awaitable is not None and seen < 1000:
        seen += 1
        frame = (
            getattr(awaitable, "cr_frame", None)
            or getattr(awaitable, "gi_frame", None)
            or getattr(awaitable, "ag_frame", None)
        )
        if frame is not None:
            yield frame
        following = (
            getattr(awaitable, "cr_await", None)
            or getattr(awaitable, "gi_yieldfrom", None)
            or getattr(awaitable, "ag_await", None)
        )
        if following is None and type(awaitable).__name__ in _ASYNC_GEN_STEPS:
            # `async for` awaits an asend/athrow object that does not expose
            # its generator; it refers to it, though.
            following = next(
                (
                    each
                    for each in gc.get_referents(awaitable)
                    if inspect.isasyncgen(each)
                ),
                None,
            )
        awaitable = following


_ASYNC_GEN_STEPS = frozenset({"async_generator_asend", "async_generator_athrow"})


def _in_task() -> bool:
    from ._delivery import current_loop_handle

    return current_loop_handle() is not None


# ---- resources ----


class with_resource(Generic[T]):
    """Acquire and release a resource so that an interrupt cannot leak it.

    ``acquire()`` and ``release(resource)`` both run inside an
    interrupt-safe region; ``release`` runs if and only if ``acquire``
    returned, whatever happens in the body.  The body itself can be
    interrupted.  In ``async with`` either may be a coroutine function::

        async with ml.with_resource(pool.acquire, pool.release) as conn:
            await conn.execute(query)

        with ml.with_resource(lambda: open(path), lambda f: f.close()) as f:
            data = f.read()
    """

    __slots__ = ("_acquire", "_acquired", "_release", "_resource")

    def __init__(
        self,
        acquire: Callable[[], T] | Callable[[], Awaitable[T]],
        release: Callable[[T], object],
    ) -> None:
        if not callable(acquire):
            raise TypeError(f"acquire must be callable, not {type(acquire).__name__}")
        if not callable(release):
            raise TypeError(f"release must be callable, not {type(release).__name__}")
        self._acquire = acquire
        self._release = release
        self._acquired = False
        self._resource: Any = None

    def __enter__(self) -> T:
        self._check_unused()
        with interrupt_safe():
            resource: T = _not_awaitable(self._acquire(), "acquire")
            self._hold(resource)
        return resource

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._acquired:
            return
        self._acquired = False
        with interrupt_safe():
            _not_awaitable(self._release(self._resource), "release")

    async def __aenter__(self) -> T:
        self._check_unused()
        # The synchronous form of the region: its `async with` exit would
        # checkpoint, and a cancellation raised there, after a successful
        # acquire, would skip __aexit__ and leak the resource.
        with interrupt_safe():
            resource = self._acquire()
            if inspect.isawaitable(resource):
                resource = await resource
            self._hold(resource)
        return resource

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._acquired:
            return
        self._acquired = False
        with interrupt_safe():
            result = self._release(self._resource)
            if inspect.isawaitable(result):
                await result

    def _check_unused(self) -> None:
        if self._acquired:
            raise RuntimeError("this with_resource is already in use")

    def _hold(self, resource: object) -> None:
        self._resource = resource
        self._acquired = True


def _not_awaitable(value: Any, role: str) -> Any:
    """``value``, which a plain ``with`` cannot await."""
    if inspect.isawaitable(value):
        close = getattr(value, "close", None)
        if close is not None:
            close()  # no "coroutine was never awaited" warning on top
        raise TypeError(
            f"{role} returned an awaitable: use 'async with' with an async {role}"
        )
    return value
