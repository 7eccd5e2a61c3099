"""A Starlette app behind ``BudgetMiddleware``, served by a real server.

``python tests/asgi_server.py --server uvicorn|hypercorn --loop asyncio|
uvloop|trio --fd N`` serves it on the listening socket N (made and bound to
127.0.0.1 by the test).  Every endpoint records what it did under the
request's ``x-test-id`` header, and so does the middleware's
``on_finished``: ``GET /_events/{id}`` returns them, ``GET /_health`` the
process's open descriptors, threads, live accounts and memory.

Environment: ``ASGI_TEST_PRELOAD_NUMPY=0`` turns numpy's preloading off
(to see that the numpy test fails without it).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

import memlimits_async as ml
from memlimits_async.asgi import (
    BudgetMiddleware,
    RequestReport,
    RouteBudget,
    RouteStats,
    preemptible,
)

MIB = 1 << 20
LIMIT = "40 MiB"
SMALL_LIMIT = "8 MiB"

EVENTS: dict[str, list[Any]] = {}
STATS = RouteStats()


def record(request: Request | WebSocket, *event: Any) -> None:
    test_id = request.headers.get("x-test-id")
    if test_id is not None:
        EVENTS.setdefault(test_id, []).append(list(event))


def on_finished(report: RequestReport) -> None:
    headers = dict(report.scope.get("headers", []))
    test_id = headers.get(b"x-test-id")
    if test_id is None:
        return
    breach = report.breach
    EVENTS.setdefault(test_id.decode(), []).append(
        [
            "report",
            {
                "route": report.route,
                "status": report.status,
                "phase": report.phase,
                "kind": None if breach is None else breach.kind.name,
                "reason": None if breach is None else breach.reason,
                "limit": None if breach is None else breach.limit,
                "peak_live": report.usage.peak_live,
                "disconnected": report.disconnected,
            },
        ]
    )


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


async def hog(request: Request) -> Response:
    """Holds ``mb`` MiB, 1 MiB at a time; ``await=0``: no checkpoint."""
    mb = int(request.query_params.get("mb", "300"))
    awaits = request.query_params.get("await", "1") == "1"
    held = []
    record(request, "started")
    for _ in range(mb):
        held.append(bytearray(MIB))
        if awaits:
            await anyio.sleep(0)
    record(request, "held", len(held))
    return PlainTextResponse(f"held {len(held)} MiB")


def sync_hog(request: Request) -> Response:
    """The same in the threadpool (a ``def`` endpoint), recording how far it
    got as it goes."""
    mb = int(request.query_params.get("mb", "300"))
    held = []
    record(request, "started")
    progress = [0]
    record(request, "progress", progress)  # the same list, updated in place
    for _ in range(mb):
        held.append(bytearray(MIB))
        progress[0] = len(held)
    return PlainTextResponse(f"held {len(held)} MiB")


async def wait(request: Request) -> Response:
    """Waits (with checkpoints) far longer than any test: only a
    cancellation ends it."""
    record(request, "started")
    for _ in range(100_000):
        await anyio.sleep(0.01)
    return PlainTextResponse("waited")


async def spin(request: Request) -> Response:
    """CPU-bound without a checkpoint (a call in the loop, so that every
    Python version can preempt it), until its route budget's timeout."""
    record(request, "started")
    count = 0
    while count < 10**12:
        count = abs(count + 1)
    return PlainTextResponse("spun")


async def stream_hog(request: Request) -> Response:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"chunk\n"
            await anyio.sleep(0.01)
        held = []
        while True:
            held.append(bytearray(MIB))
            yield b"."
            await anyio.sleep(0)

    return StreamingResponse(body(), media_type="text/plain")


async def background(request: Request) -> Response:
    """Answers after 0.1 s (so that a disconnect watcher is waiting on
    receive by then), then works on for 0.2 s after the response is
    complete, when the server reports a disconnect."""
    await anyio.sleep(0.1)

    async def work_on() -> None:
        for _ in range(20):
            await anyio.sleep(0.01)
        record(request, "background done")

    return PlainTextResponse("answered", background=BackgroundTask(work_on))


async def late(request: Request) -> Response:
    """Its first byte comes after 30 s, past its route's 0.3 s."""
    record(request, "started")
    await anyio.sleep(30)
    return PlainTextResponse("late")


async def long_stream(request: Request) -> Response:
    """Starts at once and streams for 1 s, past its route's 0.3 s to the
    first byte but within its 30 s in all."""

    async def body() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"tick\n"
            await anyio.sleep(0.05)

    return StreamingResponse(body(), media_type="text/plain")


async def numpy_first(request: Request) -> Response:
    """Imports numpy itself (the app does not at import time), then holds
    arrays of 8 MiB, 40 of them."""
    record(request, "metered at entry", ml.stats().numpy_buffers_metered)
    import numpy

    held = []
    for _ in range(40):
        held.append(numpy.ones(8 * MIB, dtype=numpy.uint8))
        await anyio.sleep(0)
    return PlainTextResponse(f"held {len(held)} arrays")


async def events(request: Request) -> Response:
    return JSONResponse(EVENTS.get(request.path_params["test_id"], []))


async def health(request: Request) -> Response:
    accounts_before_collection = ml.stats().live_accounts
    collected = gc.collect() if request.query_params.get("collect") else 0
    status = Path("/proc/self/status").read_text()

    def field(name: str) -> int:
        found = re.search(rf"^{name}:\s+(\d+) kB", status, re.M)
        return int(found.group(1)) * 1024 if found else 0

    return JSONResponse(
        {
            "fds": len(os.listdir("/proc/self/fd")),
            "fd_kinds": sorted(
                os.readlink(f"/proc/self/fd/{fd}").split(":")[0]
                for fd in os.listdir("/proc/self/fd")
                if os.path.exists(f"/proc/self/fd/{fd}")
            ),
            "threads": threading.active_count(),
            "live_accounts": ml.stats().live_accounts,
            "live_accounts_before_collection": accounts_before_collection,
            "collected": collected,
            "rss": field("VmRSS"),
            "peak_rss": field("VmHWM"),
            "numpy_metered": ml.stats().numpy_buffers_metered,
            "numpy_imported": "numpy" in sys.modules,
            "stats": {
                route: {"requests": stat.requests, "breaches": stat.breaches}
                for route, stat in STATS.snapshot().items()
            },
        }
    )


async def ws_echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass


async def ws_hog(websocket: WebSocket) -> None:
    await websocket.accept()
    held = []
    while True:
        await websocket.receive_text()
        for _ in range(16):
            held.append(bytearray(MIB))
            await anyio.sleep(0)
        await websocket.send_text(f"held {len(held)} MiB")


small = [Middleware(RouteBudget, memory=SMALL_LIMIT)]
app = Starlette(
    routes=[
        Route("/ok", ok),
        Route("/hog", hog),
        Route("/small-hog", hog, middleware=small),
        Route("/sync-hog", sync_hog),
        Route("/sync-hog-preemptible", preemptible(sync_hog)),
        Route("/wait", wait),
        Route("/background", background),
        Route("/spin", spin, middleware=[Middleware(RouteBudget, timeout=0.5)]),
        Route("/stream-hog", stream_hog),
        Route(
            "/late",
            late,
            middleware=[Middleware(RouteBudget, timeout=0.3, stream_timeout=30)],
        ),
        Route(
            "/long-stream",
            long_stream,
            middleware=[Middleware(RouteBudget, timeout=0.3, stream_timeout=30)],
        ),
        Route("/numpy-first", numpy_first),
        Route("/_events/{test_id}", events),
        Route("/_health", health),
        WebSocketRoute("/ws-echo", ws_echo),
        WebSocketRoute("/ws-hog", ws_hog),
    ],
    middleware=[
        Middleware(
            BudgetMiddleware,
            memory=LIMIT,
            stream_timeout=300,
            timeout=60,
            websocket=ml.Budget(memory=LIMIT),
            on_finished=on_finished,
            stats=STATS,
            preload_numpy=os.environ.get("ASGI_TEST_PRELOAD_NUMPY", "1") == "1",
        )
    ],
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", choices=("uvicorn", "hypercorn"), required=True)
    parser.add_argument("--loop", choices=("asyncio", "uvloop", "trio"), required=True)
    # hypercorn: asyncio or trio; uvicorn: asyncio or uvloop
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    breaches = logging.getLogger("memlimits_async.asgi")
    breaches.addHandler(handler)
    breaches.setLevel(logging.INFO)
    if args.server == "uvicorn":
        serve_uvicorn(args.loop, args.fd)
    else:
        serve_hypercorn(args.loop, args.fd)


def serve_uvicorn(loop: str, fd: int) -> None:
    import uvicorn

    config = uvicorn.Config(app, loop=loop, log_level="info", lifespan="on")
    # A socket object, not fd=: uvicorn takes a descriptor for a Unix
    # socket, and would leave Nagle's algorithm on.
    uvicorn.Server(config).run(sockets=[socket.socket(fileno=fd)])


def serve_hypercorn(loop: str, fd: int) -> None:
    from hypercorn.config import Config

    # hypercorn types the apps it takes with its own TypedDicts.
    framework: Any = app
    config = Config()
    config.bind = [f"fd://{fd}"]
    config.errorlog = "-"
    config.loglevel = "INFO"
    if loop == "trio":
        import trio
        from hypercorn.trio import serve as trio_serve

        trio.run(trio_serve, framework, config)
    else:
        import asyncio

        from hypercorn.asyncio import serve as asyncio_serve

        asyncio.run(asyncio_serve(framework, config))


if __name__ == "__main__":
    main()
