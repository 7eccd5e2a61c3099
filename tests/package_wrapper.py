"""What the package's integrations do (an ASGI middleware such as
``memlimits_async.asgi``, a pytest plugin, a Dask plugin): call the user's
code (an endpoint, a test, a task) from their own functions.

Not imported under this name: ``test_cancel_scope_api`` loads this file as
a module of the package (a public one, and a private one), because the
preemption landing rule goes by the module name in a frame's globals.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import memlimits_async as ml


def call(callback: Callable[[], object]) -> object:
    result = callback()
    return result


async def call_async(callback: Callable[[], object]) -> object:
    result = callback()
    return result


async def middleware(
    app: Callable[[object, object, object], Awaitable[None]],
    scope: object,
    receive: object,
    send: object,
) -> ml.LimitScope:
    """Open the request's scope and call the application inside it."""
    async with ml.limit_scope(timeout=0.01) as limits:
        await app(scope, receive, send)
    return limits
