"""A Starlette app with a memory, allocation and time budget per request.

``BudgetMiddleware`` runs every request in a ``limit_scope`` with a cancel
token of its own, cancelled if the client goes away.  One route has a
narrower budget of its own (``RouteBudget``), one streams.  ``main()``
serves the app with uvicorn on 127.0.0.1 (an ephemeral port), plays a few
clients against it (httpx), prints what each saw and what the server
reported, and stops.

Run:  pip install 'memlimits_async[asgi]' uvicorn httpx
      python examples/asgi_app.py

Serve it yourself:  uvicorn asgi_app:app  (from examples/)
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import AsyncIterator

import anyio
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from memlimits_async.asgi import (
    BudgetMiddleware,
    RequestReport,
    RouteBudget,
    RouteStats,
)

MIB = 1 << 20


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


async def report(request: Request) -> Response:
    """A modest page: a few thousand rows."""
    rows = [
        {"id": i, "name": f"row {i}"}
        for i in range(int(request.query_params.get("rows", "1000")))
    ]
    return JSONResponse({"rows": len(rows)})


async def leak(request: Request) -> Response:
    """Holds ever more memory: stopped at the request's 32 MiB."""
    held = []
    while True:
        held.append(bytearray(MIB))
        await anyio.sleep(0)


async def export(request: Request) -> Response:
    """Needs 12 MiB, within the request's budget but not its route's."""
    held = [bytearray(MIB) for _ in range(12)]
    await anyio.sleep(0)
    return PlainTextResponse(f"exported {len(held)} MiB")


async def stream_leak(request: Request) -> Response:
    """Starts streaming, then leaks: the stream is cut."""

    async def body() -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"line {i}\n".encode()
            await anyio.sleep(0.01)
        held = []
        while True:
            held.append(bytearray(MIB))
            await anyio.sleep(0)
            yield b"."

    return StreamingResponse(body(), media_type="text/plain")


async def slow(request: Request) -> Response:
    """Works for a minute unless its client goes away."""
    await anyio.sleep(60)
    return PlainTextResponse("done")


reports: list[RequestReport] = []
stats = RouteStats()

app = Starlette(
    routes=[
        Route("/hello", hello),
        Route("/report", report),
        Route("/leak", leak),
        Route(
            "/export",
            export,
            # Narrower than the request's budget (it can never be wider).
            middleware=[Middleware(RouteBudget, memory="8 MiB")],
        ),
        Route("/stream-leak", stream_leak),
        Route("/slow", slow),
    ],
    middleware=[
        Middleware(
            BudgetMiddleware,
            memory="32 MiB",
            allocations="1 GiB",
            timeout=30,
            on_finished=reports.append,  # feed your metrics from here
            stats=stats,
        )
    ],
)


async def clients(base: str) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        for path in ("/hello", "/report?rows=5000", "/leak", "/export"):
            response = await client.get(path)
            print(f"client: GET {path} -> {response.status_code} {response.text}")

        received = b""
        try:
            async with client.stream("GET", "/stream-leak") as response:
                async for chunk in response.aiter_bytes():
                    received += chunk
        except httpx.RemoteProtocolError:
            lines = received.count(b"\n")
            print(f"client: GET /stream-leak -> 200, cut after {lines} lines")

        # A client that gives up: the handler is stopped, not left running.
        request = asyncio.ensure_future(client.get("/slow"))
        await asyncio.sleep(0.3)
        request.cancel()
        print("client: GET /slow -> gave up after 0.3 s")
        while not any(each.route == "/slow" for each in reports):
            await asyncio.sleep(0.01)


async def main() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    serving = asyncio.ensure_future(server.serve(sockets=[listener]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        await clients(f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        await serving

    print()
    for each in reports:
        if each.breach is None:
            peak = each.usage.peak_live / MIB
            print(f"server: {each.route} finished {each.status}, peak {peak:.1f} MiB")
        else:
            print(
                f"server: {each.route} stopped {each.phase} ({each.breach.reason}), "
                f"status {each.status}"
            )
    print()
    for route, stat in stats.snapshot().items():
        print(f"stats: {route}: {stat.requests} request(s), breaches {stat.breaches}")


if __name__ == "__main__":
    # The middleware's own log: one line per breach.
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="log: %(name)s %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    asyncio.run(main())
