"""memlimits_async.asgi in-process: the middleware driven directly by a
scripted server (every ASGI message in order), and through Starlette's and
FastAPI's TestClient.  The real servers are in test_asgi_servers.py."""

from __future__ import annotations

import functools
import gc
import inspect
import logging
import math
import threading
import weakref
from collections.abc import AsyncIterator, Callable, MutableMapping
from typing import Any, Literal

import anyio
import anyio.lowlevel
import pytest

pytest.importorskip("starlette")

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

import memlimits_async as ml
from helpers import MIB, run_python
from memlimits_async import asgi
from memlimits_async.asgi import (
    BudgetMiddleware,
    RequestReport,
    RouteBudget,
    RouteStats,
    budget_dependency,
    preemptible,
    request_token,
)

Message = MutableMapping[str, Any]


class ScriptedServer:
    """Serves one HTTP request to an ASGI app the way uvicorn does: the
    body in the given chunks, then a receive that waits until the client
    leaves (``leave()``) or the response is complete, and then says
    ``http.disconnect``.  Refuses two concurrent receives (a server's
    receive is not made for them), and records what was sent."""

    def __init__(self, body: list[bytes] | None = None, path: str = "/") -> None:
        self.body = list(body or [b""])
        self.sent: list[Message] = []
        self.receiving = False
        self.delivered = 0
        self.gone = anyio.Event()
        self.complete = False
        self.scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"test")],
            "client": ("127.0.0.1", 1234),
            "server": ("127.0.0.1", 80),
        }

    async def receive(self) -> Message:
        assert not self.receiving, "two receives at once"
        self.receiving = True
        try:
            if self.body:
                chunk = self.body.pop(0)
                self.delivered += 1
                await anyio.lowlevel.checkpoint()
                return {
                    "type": "http.request",
                    "body": chunk,
                    "more_body": bool(self.body),
                }
            if not self.complete:
                await self.gone.wait()
            return {"type": "http.disconnect"}
        finally:
            self.receiving = False

    async def send(self, message: Message) -> None:
        assert not self.complete, f"sent after the response was complete: {message}"
        self.sent.append(dict(message))
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.complete = True
            self.gone.set()  # what a waiting receive says now

    def leave(self) -> None:
        self.gone.set()

    async def serve(self, app: Any) -> None:
        await app(self.scope, self.receive, self.send)

    @property
    def status(self) -> int | None:
        starts = [m for m in self.sent if m["type"] == "http.response.start"]
        return starts[0]["status"] if starts else None

    @property
    def headers(self) -> dict[bytes, bytes]:
        starts = [m for m in self.sent if m["type"] == "http.response.start"]
        return dict(starts[0]["headers"]) if starts else {}

    @property
    def text(self) -> str:
        return b"".join(
            m.get("body", b"") for m in self.sent if m["type"] == "http.response.body"
        ).decode()


def reporting(
    **kwargs: Any,
) -> tuple[Callable[[Any], BudgetMiddleware], list[RequestReport]]:
    reports: list[RequestReport] = []

    def make(app: Any) -> BudgetMiddleware:
        return BudgetMiddleware(app, on_finished=reports.append, **kwargs)

    return make, reports


async def respond(send: Any, text: str = "ok", status: int = 200) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": text.encode()})


async def hold_until_cancelled(held: list[bytearray]) -> None:
    while True:
        held.append(bytearray(MIB))
        await anyio.sleep(0)


# ---- breaches before, during and after the response ----


@pytest.mark.anyio
async def test_a_breach_before_the_response_gets_a_503_naming_it() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await hold_until_cancelled([])

    make, reports = reporting(memory="8 MiB")
    server = ScriptedServer()
    await server.serve(make(app))
    assert server.status == 503
    assert server.headers[b"memlimits-breach"] == b"memory"
    assert server.headers[b"content-type"] == b"application/json"
    assert server.text == (
        '{"detail": "request stopped by its memory limit", "breach": "memory"}'
    )
    (report,) = reports
    assert report.breach is not None and report.breach.kind is ml.BreachKind.MEMORY
    assert report.phase == "before response"
    assert report.status == 503
    assert report.usage.peak_live >= 6 * MIB
    assert report.route == "/" and report.method == "GET"
    assert report.protocol == "http" and not report.disconnected


@pytest.mark.anyio
async def test_the_log_line_names_the_sites_that_hold_the_memory(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await hold_until_cancelled([])

    make, reports = reporting(memory="8 MiB")
    with caplog.at_level(logging.WARNING, "memlimits_async.asgi"):
        await ScriptedServer().serve(make(app))
    lines, start = inspect.getsourcelines(hold_until_cancelled)
    appending = start + next(i for i, line in enumerate(lines) if "held.append" in line)
    site = f"test_asgi.py:{appending} (hold_until_cancelled)"
    (report,) = reports
    assert report.breach is not None and site in report.breach.reason
    (record,) = [r for r in caplog.records if "request stopped" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert site in record.getMessage()


@pytest.mark.anyio
async def test_the_error_response_is_configurable() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await hold_until_cancelled([])

    def error_response(scope: Any, breach: ml.Breach) -> Any:
        return JSONResponse({"oops": breach.kind.name}, status_code=507)

    server = ScriptedServer()
    await server.serve(
        BudgetMiddleware(app, memory="8 MiB", error_response=error_response)
    )
    assert (server.status, server.text) == (507, '{"oops":"MEMORY"}')
    server = ScriptedServer()
    await server.serve(
        BudgetMiddleware(app, memory="8 MiB", status_code=500, breach_header=None)
    )
    assert server.status == 500 and b"memlimits-breach" not in server.headers


@pytest.mark.anyio
async def test_a_breach_mid_stream_ends_the_response_without_completing_it() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await hold_until_cancelled([])

    make, reports = reporting(memory="8 MiB")
    server = ScriptedServer()
    seen: list[bool] = []

    async def serve_and_look() -> None:
        await server.serve(make(app))
        # What uvicorn's log filter reads right after the app returns.
        seen.append(asgi._aborted.get())

    await serve_and_look()
    assert [m["type"] for m in server.sent] == [
        "http.response.start",
        "http.response.body",
    ]
    assert not server.complete
    assert seen == [True]
    assert reports[0].phase == "streaming" and reports[0].status == 200


def test_uvicorns_error_for_an_aborted_response_is_dropped_only_then() -> None:
    incomplete = logging.LogRecord(
        "uvicorn.error", logging.ERROR, __file__, 1, asgi._UVICORN_INCOMPLETE, (), None
    )
    other = logging.LogRecord(
        "uvicorn.error", logging.ERROR, __file__, 1, "something else", (), None
    )
    aborted_filter = asgi._AbortedResponseFilter()
    assert aborted_filter.filter(incomplete) and aborted_filter.filter(other)

    def in_an_aborted_request() -> list[bool]:
        asgi._aborted.set(True)
        return [aborted_filter.filter(incomplete), aborted_filter.filter(other)]

    import contextvars

    assert contextvars.copy_context().run(in_an_aborted_request) == [False, True]


@pytest.mark.anyio
async def test_a_breach_after_the_response_is_only_reported() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await respond(send)
        await hold_until_cancelled([])  # background work after the response

    make, reports = reporting(memory="8 MiB")
    server = ScriptedServer()
    await server.serve(make(app))
    assert (server.status, server.text) == (200, "ok")
    assert reports[0].phase == "after response"
    assert reports[0].breach is not None


@pytest.mark.anyio
async def test_a_breach_not_delivered_when_the_response_starts_is_answered() -> None:
    # Past the budget in a fraction of a millisecond, with no checkpoint,
    # then the response at once: the meter has the breach, the request's
    # task does not have it yet (the delivery thread hands it over within
    # milliseconds).  The start waits for it, and the error response goes
    # out; before, the app's 200 did.
    async def app(scope: Any, receive: Any, send: Any) -> None:
        held = [bytearray(MIB) for _ in range(16)]
        await respond(send, text=str(len(held)))

    server = ScriptedServer()
    await server.serve(BudgetMiddleware(app, memory="4 MiB"))
    assert server.status == 503


@pytest.mark.anyio
async def test_a_breach_landing_before_the_response_starts_is_answered() -> None:
    # The cancellation was delivered while the app could not be stopped
    # (here: a shielded stretch, as a worker thread's await is); the
    # response it then sends is replaced by the error response.
    async def app(scope: Any, receive: Any, send: Any) -> None:
        held: list[bytearray] = []
        with anyio.CancelScope(shield=True):
            while not ml.is_interrupted():
                held.append(bytearray(MIB))
                await anyio.sleep(0)
        await respond(send)

    server = ScriptedServer()
    await server.serve(BudgetMiddleware(app, memory="8 MiB"))
    assert server.status == 503


@pytest.mark.anyio
@pytest.mark.parametrize("whose", ["request's", "route's"])
async def test_a_timeout_that_passed_unnoticed_is_answered(whose: str) -> None:
    # The deadline passes while the app cannot be cancelled (a shielded
    # stretch, as a 3.11 worker thread's await is); the response it then
    # starts is replaced by the error response.
    async def app(scope: Any, receive: Any, send: Any) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.1)
        await respond(send)

    if whose == "route's":
        app = RouteBudget(app, timeout=0.02)
    make, reports = reporting(timeout=0.02 if whose == "request's" else 60)
    server = ScriptedServer()
    await server.serve(make(app))
    assert server.status == 503
    assert server.headers[b"memlimits-breach"] == b"timeout"
    breach = reports[0].breach
    assert breach is not None and breach.kind is ml.BreachKind.TIMEOUT
    assert breach.limit == 0.02


@pytest.mark.anyio
async def test_a_limit_reached_from_the_app_is_answered_like_a_breach() -> None:
    breach = ml.Breach(ml.BreachKind.ALLOCATIONS, 1, 2, "allocations limit")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise ml.AllocationLimitReached(breach)

    async def group_app(scope: Any, receive: Any, send: Any) -> None:
        raise BaseExceptionGroup("x", [ml.AllocationLimitReached(breach)])

    for each in (app, group_app):
        make, reports = reporting()
        server = ScriptedServer()
        await server.serve(make(each))
        assert server.status == 503
        assert server.headers[b"memlimits-breach"] == b"allocations"
        assert reports[0].breach == breach


@pytest.mark.anyio
async def test_other_exceptions_go_through_unchanged() -> None:
    class Boom(Exception):
        pass

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise Boom

    async def mixed(scope: Any, receive: Any, send: Any) -> None:
        breach = ml.Breach(ml.BreachKind.MEMORY, 1, 2, "m")
        raise ExceptionGroup("x", [ml.MemoryLimitReached(breach), Boom()])

    make, _ = reporting(memory="64 MiB")
    with pytest.raises(Boom):
        await ScriptedServer().serve(make(app))
    with pytest.raises(ExceptionGroup):
        await ScriptedServer().serve(make(mixed))


# ---- disconnects ----


@pytest.mark.anyio
async def test_a_disconnect_while_the_app_computes_cancels_it() -> None:
    # The app never calls receive: the sweeper's watcher sees the client
    # leave for it.
    started = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        started.set()
        await anyio.sleep_forever()

    make, reports = reporting()
    server = ScriptedServer()
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, make(app))
        await started.wait()
        server.leave()
    (report,) = reports
    assert report.breach is not None
    assert report.breach.reason == "token cancelled: client disconnected"
    assert report.disconnected and report.status is None
    assert server.sent == []  # nothing for a client gone


@pytest.mark.anyio
async def test_a_disconnect_the_app_reads_cancels_it_and_reaches_the_app() -> None:
    got: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # the body
        got.append((await receive())["type"])
        await anyio.sleep_forever()

    make, reports = reporting()
    server = ScriptedServer()
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, make(app))
        await anyio.sleep(0.05)
        server.leave()
    assert got == ["http.disconnect"]
    assert reports[0].breach is not None
    assert reports[0].breach.kind is ml.BreachKind.TOKEN


@pytest.mark.anyio
async def test_the_watcher_hands_every_message_to_the_app_in_order() -> None:
    # The app reads its body late, long after a watcher started waiting on
    # receive for it; it gets every chunk, in order, and the watcher never
    # read more than one chunk ahead of it (no body is buffered whole).
    chunks = [b"one", b"two", b"three", b"four"]
    server = ScriptedServer(body=list(chunks))
    got: list[bytes] = []
    ahead: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            await anyio.sleep(0.03)  # a few sweeper ticks between reads
            message = await receive()
            got.append(message["body"])
            ahead.append(server.delivered - len(got))
            if not message.get("more_body"):
                break
        await respond(send, "read")
        # After the response, a receive says the client is done.
        assert (await receive())["type"] == "http.disconnect"

    make, reports = reporting()
    await server.serve(make(app))
    assert got == chunks
    assert max(ahead) <= 0, ahead
    assert (server.status, server.text) == (200, "read")
    assert reports[0].breach is None and not reports[0].disconnected


@pytest.mark.anyio
async def test_the_app_and_the_watcher_share_a_disconnect() -> None:
    # The watcher waits on receive; then the app calls receive too (a
    # Starlette StreamingResponse does): both see the client leave, and
    # the server's receive is never called twice at once.
    got: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await anyio.sleep(0.05)  # the watcher takes the body, then waits
        got.append((await receive())["type"])
        with anyio.CancelScope(shield=True):
            got.append((await receive())["type"])
            got.append((await receive())["type"])

    make, reports = reporting()
    server = ScriptedServer()
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, make(app))
        await anyio.sleep(0.1)
        server.leave()
    assert got == ["http.request", "http.disconnect", "http.disconnect"]
    assert reports[0].breach is not None and reports[0].disconnected


@pytest.mark.anyio
async def test_the_disconnect_after_the_response_is_no_cancellation() -> None:
    done = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await anyio.sleep(0.05)  # a watcher waits on receive from now on
        await respond(send)
        for _ in range(5):  # background work after the response
            await anyio.sleep(0.01)
        done.set()

    make, reports = reporting()
    server = ScriptedServer()
    await server.serve(make(app))
    assert done.is_set()
    assert reports[0].breach is None and not reports[0].disconnected


@pytest.mark.anyio
@pytest.mark.parametrize("in_a_thread", [False, True])
async def test_request_token_stops_the_request_from_elsewhere(
    in_a_thread: bool,
) -> None:
    # The token is made when first asked for (in a worker thread too) and
    # added to the request's running scope.
    tokens: list[ml.CancelToken] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if in_a_thread:
            token = await anyio.to_thread.run_sync(request_token, scope)
        else:
            token = request_token(scope)
        assert token is not None and token is request_token(scope)
        tokens.append(token)
        await anyio.sleep_forever()

    make, reports = reporting()
    server = ScriptedServer()
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, make(app))
        while not tokens:
            await anyio.sleep(0.01)
        threading.Thread(target=tokens[0].cancel, args=("by an admin",)).start()
    assert server.status == 503
    assert server.headers[b"memlimits-breach"] == b"token"
    assert reports[0].breach is not None
    assert reports[0].breach.reason == "token cancelled: by an admin"
    assert request_token({}) is None


# ---- timeouts: to the first byte, and in all ----


@pytest.mark.anyio
async def test_the_first_byte_and_the_whole_stream_have_their_own_timeouts() -> None:
    async def late(scope: Any, receive: Any, send: Any) -> None:
        await anyio.sleep(30)

    async def streams(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(10):  # >= 0.2 s in all, past the time to the first byte
            await send({"type": "http.response.body", "body": b".", "more_body": True})
            await anyio.sleep(0.02)
        await send({"type": "http.response.body", "body": b""})

    async def streams_forever(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while True:
            await send({"type": "http.response.body", "body": b".", "more_body": True})
            await anyio.sleep(0.02)

    # Streams may take 60 s in all: far more than the streaming test needs,
    # however busy the machine.
    make, reports = reporting(timeout=0.05, stream_timeout=60)
    server = ScriptedServer()
    await server.serve(make(late))
    assert server.status == 503
    assert server.headers[b"memlimits-breach"] == b"timeout"
    breach = reports[-1].breach
    assert breach is not None and breach.kind is ml.BreachKind.TIMEOUT
    assert breach.limit == 0.05 and breach.observed is not None
    assert breach.observed >= 0.05
    assert breach.reason.startswith("no response within 0.05 s")

    server = ScriptedServer()
    await server.serve(make(streams))
    assert (server.status, server.text) == (200, "." * 10)
    assert reports[-1].breach is None

    make, reports = reporting(timeout=0.05, stream_timeout=0.3)
    server = ScriptedServer()
    await server.serve(make(streams_forever))
    breach = reports[-1].breach
    assert breach is not None and breach.kind is ml.BreachKind.TIMEOUT
    assert breach.limit == 0.3 and reports[-1].phase == "streaming"


@pytest.mark.anyio
async def test_finished_requests_leave_the_sweeper() -> None:
    # A time to the first byte of 60 s: finished requests must not wait in
    # the sweeper's deadline heap for a minute (nor what they hold).
    async def quick(scope: Any, receive: Any, send: Any) -> None:
        await respond(send)

    async def slower(scope: Any, receive: Any, send: Any) -> None:
        await anyio.sleep(0.05)  # a few ticks: watched, and in the heap
        await respond(send)

    middleware = BudgetMiddleware(quick, timeout=60, stream_timeout=120)
    for _ in range(50):
        await ScriptedServer().serve(middleware)
    sweeper = middleware._current_sweeper()
    assert not sweeper.deadlines and not sweeper.newer and not sweeper.older
    middleware.app = slower
    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(ScriptedServer().serve, middleware)
    assert not sweeper.deadlines and not sweeper.newer and not sweeper.older


@pytest.mark.anyio
@pytest.mark.parametrize("app", ["quick", "watched"])
async def test_a_finished_request_is_freed_without_the_garbage_collector(
    app: str,
) -> None:
    # A server's connection object holds the scope, and its receive and
    # send are bound to it (uvicorn's RequestResponseCycle, like
    # ScriptedServer): a request left in the scope made a reference cycle of
    # every request, which only full collections freed (in 10-26 ms pauses,
    # a server's p99 latency 10x its own).
    async def quick(scope: Any, receive: Any, send: Any) -> None:
        await respond(send)

    async def watched(scope: Any, receive: Any, send: Any) -> None:
        await anyio.sleep(0.05)  # outlives a tick: gets a disconnect watcher
        await respond(send)

    middleware = BudgetMiddleware(quick if app == "quick" else watched, timeout=60)
    await ScriptedServer().serve(middleware)  # the sweeper's task, made once
    gc.collect()
    gc.disable()
    try:
        server = ScriptedServer()
        await server.serve(middleware)
        assert server.status == 200
        connection = weakref.ref(server)
        del server
        for _ in range(5):
            await anyio.lowlevel.checkpoint()  # a cancelled watcher ends
        assert connection() is None
    finally:
        gc.enable()


def test_a_timeout_alone_is_the_whole_request() -> None:
    middleware = BudgetMiddleware(PlainTextResponse("x"), timeout=3)
    assert middleware.budget.timeout == 3.0
    middleware = BudgetMiddleware(PlainTextResponse("x"), timeout=3, stream_timeout=2)
    assert middleware.budget.timeout == 3.0  # a shorter stream_timeout: no-op
    middleware = BudgetMiddleware(PlainTextResponse("x"), timeout=3, stream_timeout=60)
    assert middleware.budget.timeout == 60.0


# ---- Starlette and FastAPI: routes, streaming, WebSockets, stats ----


def hog_endpoint(request: Request) -> Response:
    held = []
    for _ in range(400):
        held.append(bytearray(MIB))
    return PlainTextResponse("held")


async def async_hog(request: Request) -> Response:
    await hold_until_cancelled([])
    return PlainTextResponse("unreachable")


async def slow_hog(request: Request) -> Response:
    # At least 10 ms per MiB: when its route budget is passed, the
    # request's own lies far ahead, whatever the delivery thread's delay
    # (the TestClient runs the loop in a thread of its own).
    held = []
    while True:
        held.append(bytearray(MIB))
        await anyio.sleep(0.01)


async def item(request: Request) -> Response:
    return PlainTextResponse(request.path_params["id"])


def starlette_app(stats: RouteStats, reports: list[RequestReport]) -> Starlette:
    async def stream(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"first"
            await hold_until_cancelled([])
            yield b"never"

        return StreamingResponse(body())

    async def ws_hog(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.receive_text()
        await hold_until_cancelled([])

    return Starlette(
        routes=[
            Route("/hog", async_hog),
            Route(
                "/small",
                slow_hog,
                middleware=[Middleware(RouteBudget, memory="4 MiB")],
            ),
            Route(
                "/wide", async_hog, middleware=[Middleware(RouteBudget, memory="1 GiB")]
            ),
            Route("/sync", preemptible(hog_endpoint)),
            Route("/stream", stream),
            Mount("/api", routes=[Route("/items/{id}", item)]),
            WebSocketRoute("/ws", ws_hog),
        ],
        middleware=[
            Middleware(
                BudgetMiddleware,
                memory="16 MiB",
                stats=stats,
                on_finished=reports.append,
            )
        ],
    )


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_starlette_routes_budgets_and_stats(
    backend: Literal["asyncio", "trio"],
) -> None:
    stats = RouteStats()
    reports: list[RequestReport] = []
    with TestClient(starlette_app(stats, reports), backend=backend) as client:
        assert client.get("/api/items/7").text == "7"
        assert client.get("/api/items/8").text == "8"
        response = client.get("/hog")
        assert response.status_code == 503 and response.json()["breach"] == "memory"
        assert client.get("/small").status_code == 503
        assert client.get("/wide").status_code == 503
        assert client.get("/sync").status_code == 503
        with pytest.raises(WebSocketDisconnect) as closed:
            with client.websocket_connect("/ws") as websocket:
                websocket.send_text("go")
                websocket.receive_text()
        assert closed.value.code == 1013
        assert closed.value.reason == "memory limit exceeded"
    by_route = {report.route: report for report in reports}
    # The route budget narrows (4 MiB), and cannot widen (1 GiB: the
    # middleware's 16 MiB holds).
    limits = {
        route: by_route[route].breach.limit  # type: ignore[union-attr]
        for route in ("/hog", "/small", "/wide", "/sync")
    }
    assert limits == {
        "/hog": 16 * MIB,
        "/small": 4 * MIB,
        "/wide": 16 * MIB,
        "/sync": 16 * MIB,
    }
    assert by_route["/ws"].protocol == "websocket"
    snapshot = stats.snapshot()
    assert snapshot["/api/items/{id}"].requests == 2
    assert snapshot["/api/items/{id}"].breaches == {}
    assert snapshot["/hog"].breaches == {"memory": 1}
    assert snapshot["/hog"].peak_live_max >= 12 * MIB
    stats.reset()
    assert stats.snapshot() == {}


def test_route_stats_keep_a_bounded_number_of_routes() -> None:
    stats = RouteStats(max_routes=2)
    usage = ml.Usage(10, 5, 7)
    for route in ("/a", "/b", "/c", "/d", "/a"):
        stats.add(route, usage, None, 0.5)
    snapshot = stats.snapshot()
    assert set(snapshot) == {"/a", "/b", "<other>"}
    assert snapshot["/a"].requests == 2 and snapshot["<other>"].requests == 2
    assert snapshot["/a"].peak_live_sum == 14 and snapshot["/a"].duration_max == 0.5
    with pytest.raises(ValueError, match="max_routes"):
        RouteStats(max_routes=0)
    with pytest.raises(TypeError, match="max_routes"):
        RouteStats(max_routes="2")  # type: ignore[arg-type]


def test_route_budgets_need_the_middleware() -> None:
    app = Starlette(
        routes=[Route("/x", item, middleware=[Middleware(RouteBudget, memory="4 MiB")])]
    )
    with (
        TestClient(app) as client,
        pytest.raises(RuntimeError, match="BudgetMiddleware"),
    ):
        client.get("/x")


FASTAPI_REPORTS: list[RequestReport] = []


@functools.cache
def fastapi_app() -> Any:
    """Made once: FastAPI caches what it learns of each endpoint and
    dependency function, so an app made anew for every run would grow its
    caches (tools/refleak.py runs the tests over and over)."""
    from fastapi import Depends, FastAPI
    from fastapi.responses import StreamingResponse as FastStreamingResponse

    app = FastAPI()
    app.add_middleware(
        BudgetMiddleware, memory="32 MiB", on_finished=FASTAPI_REPORTS.append
    )
    small = Depends(budget_dependency(memory="4 MiB"))

    @app.get("/items/{item_id}", dependencies=[small])
    async def read(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    # Past the dependency's 4 MiB, never near the request's 32 MiB: the
    # async ones slowly (10 ms per MiB), the sync one 16 MiB in all.
    @app.get("/hog", dependencies=[small])
    async def hog(request: Request) -> Any:
        return await slow_hog(request)

    @app.get("/sync-hog", dependencies=[small])
    def sync_hog() -> dict[str, int]:
        # 16 MiB in a fraction of a millisecond, then returns at once: on a
        # busy machine its 200 started before the breach reached the
        # request's task, until the middleware waited for it.
        held = [bytearray(MIB) for _ in range(16)]
        return {"held": len(held)}

    @app.get("/stream", dependencies=[small])
    async def stream(request: Request) -> Any:
        async def body() -> AsyncIterator[bytes]:
            yield b"first"
            await slow_hog(request)

        return FastStreamingResponse(body())

    return app


def test_fastapi_dependency_narrows_the_budget() -> None:
    pytest.importorskip("fastapi")
    app = fastapi_app()
    FASTAPI_REPORTS.clear()
    reports = FASTAPI_REPORTS
    with TestClient(app) as client:
        assert client.get("/items/3").json() == {"item_id": 3}
        response = client.get("/hog")
        assert response.status_code == 503
        assert response.headers["memlimits-breach"] == "memory"
        assert client.get("/sync-hog").status_code == 503
        client.get("/stream")  # the TestClient does not see the abort
    by_route = {report.route: report for report in reports}
    assert by_route["/items/{item_id}"].breach is None
    for route, phase in (
        ("/hog", "before response"),
        ("/sync-hog", "before response"),
        ("/stream", "streaming"),
    ):
        breach = by_route[route].breach
        assert breach is not None and breach.limit == 4 * MIB, route
        assert by_route[route].phase == phase, route


# ---- synchronous endpoints ----


def test_preemptible_runs_a_sync_function_through_run_sync() -> None:
    def endpoint(request: Request, *, extra: int = 1) -> int:
        """Docs."""
        return threading.get_ident()

    wrapped = preemptible(endpoint)
    assert inspect.iscoroutinefunction(wrapped)
    assert inspect.signature(wrapped) == inspect.signature(endpoint)
    assert wrapped.__doc__ == "Docs." and wrapped.__name__ == "endpoint"
    thread = anyio.run(functools.partial(wrapped, None))  # type: ignore[arg-type]
    assert thread != threading.get_ident()
    with pytest.raises(TypeError, match="synchronous"):
        preemptible(item)
    with pytest.raises(TypeError, match="callable"):
        preemptible(3)  # type: ignore[arg-type]


# ---- arguments ----


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"memory": "lots"}, ValueError, "memory"),
        ({"allocations": -1}, ValueError, "allocations"),
        ({"timeout": "1"}, TypeError, "timeout"),
        ({"timeout": 1, "stream_timeout": "2"}, TypeError, "stream_timeout"),
        ({"timeout": 1, "stream_timeout": math.nan}, ValueError, "stream_timeout"),
        ({"stream_timeout": 5}, ValueError, "stream_timeout needs timeout"),
        ({"budget": ml.Budget(), "memory": 1}, TypeError, "budget= or memory="),
        ({"budget": {"memory": 1}}, TypeError, "budget must be"),
        ({"websocket": 3}, TypeError, "websocket"),
        ({"global_memory": 1}, TypeError, "global_memory"),
        ({"trim_memory": "yes"}, TypeError, "trim_memory"),
        ({"preload_numpy": None}, TypeError, "preload_numpy"),
        ({"status_code": 700}, ValueError, "status_code"),
        ({"status_code": "503"}, TypeError, "status_code"),
        ({"breach_header": b"x"}, TypeError, "breach_header"),
        ({"on_finished": 3}, TypeError, "on_finished"),
        ({"error_response": "x"}, TypeError, "error_response"),
        ({"route_name": 1}, TypeError, "route_name"),
        ({"stats": {}}, TypeError, "stats"),
    ],
)
def test_bad_arguments_name_themselves(
    arguments: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        BudgetMiddleware(PlainTextResponse("x"), **arguments)


def test_bad_route_budget_arguments_name_themselves() -> None:
    with pytest.raises(ValueError, match="memory"):
        RouteBudget(PlainTextResponse("x"), memory="lots")
    with pytest.raises(TypeError, match="app must be an ASGI app"):
        RouteBudget(3, memory=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="budget= or timeout="):
        budget_dependency(budget=ml.Budget(), timeout=1)


# ---- start-up, and memory given back ----


@pytest.mark.parametrize("preload", [True, False])
def test_start_up_installs_the_hooks_and_wraps_numpy(preload: bool) -> None:
    pytest.importorskip("numpy")
    script = f"""
import sys, anyio
import memlimits_async as ml
from memlimits_async.asgi import BudgetMiddleware

async def app(scope, receive, send):
    message = await receive()
    assert message["type"] == "lifespan.startup"
    await send({{"type": "lifespan.startup.complete"}})

async def main():
    messages = [{{"type": "lifespan.startup"}}]
    async def receive():
        return messages.pop(0)
    async def send(message):
        pass
    await BudgetMiddleware(app, preload_numpy={preload})(
        {{"type": "lifespan"}}, receive, send)

assert "numpy" not in sys.modules
anyio.run(main)
stats = ml.stats()
print("numpy" in sys.modules, stats.hooks_installed, stats.numpy_buffers_metered)
"""
    result = run_python("-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(preload), "True", str(preload)]


@pytest.mark.skipif(
    not asgi._Trimmer(1.0).available, reason="no malloc_trim (not glibc)"
)
def test_trim_memory_trims_after_a_memory_breach() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await hold_until_cancelled([])

    middleware = BudgetMiddleware(app, memory="8 MiB", trim_memory=True)
    assert middleware.trimmer is not None
    # One thread for the process, however many middlewares trim.
    assert BudgetMiddleware(app, trim_memory=True).trimmer is middleware.trimmer
    trims_before = middleware.trimmer.trims

    async def serve() -> None:
        await ScriptedServer().serve(middleware)

    anyio.run(serve)
    # The trimming thread runs on its own: wait for it (bounded).
    for _ in range(6000):
        if middleware.trimmer.trims > trims_before:
            break
        threading.Event().wait(0.01)
    assert middleware.trimmer.trims > trims_before
    names = [t.name for t in threading.enumerate()]
    assert names.count("memlimits_async.asgi trim") == 1


def test_on_finished_errors_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    def broken(report: RequestReport) -> None:
        raise ValueError("broken callback")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await respond(send)

    async def serve() -> ScriptedServer:
        server = ScriptedServer()
        await server.serve(BudgetMiddleware(app, on_finished=broken))
        return server

    with caplog.at_level(logging.ERROR, "memlimits_async.asgi"):
        server = anyio.run(serve)
    assert server.status == 200
    assert "on_finished failed" in caplog.text


def test_the_core_imports_no_integration() -> None:
    # run_python: a plain `python -c` in a checkout imports its sources,
    # which have no built extension (CI's fresh clone).
    result = run_python(
        "-c",
        "import sys, memlimits_async; "
        "print(sorted(m for m in ('starlette', 'fastapi', 'uvicorn', "
        "'memlimits_async.asgi') if m in sys.modules))",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_route_budget_gets_its_503_with_the_middleware_outside_the_app(
    backend: Literal["asyncio", "trio"],
) -> None:
    """``BudgetMiddleware(Starlette(...))`` puts Starlette's
    ServerErrorMiddleware between the two: it answered a route budget's
    ``LimitReached`` with a 500 of its own, then raised it on; the client
    got the 500.  Its response is held back and the 503 sent instead; a
    handler the app has for the breach still answers with its own."""

    async def hog(request: Request) -> Response:
        # At 64 KiB a millisecond: the route's breach reaches the request's
        # task long before the request's own limit is near, whatever the
        # machine's load (with sleep(0) it passed 64 MiB first, under load).
        held: list[bytearray] = []
        while True:
            held.append(bytearray(64 * 1024))
            await anyio.sleep(0.001)

    async def insufficient_storage(request: Request, exc: Exception) -> Response:
        return PlainTextResponse("too big", status_code=507)

    small = [Middleware(RouteBudget, memory="4 MiB")]
    reports: list[RequestReport] = []
    plain = Starlette(routes=[Route("/hog", hog, middleware=small)])
    handled = Starlette(
        routes=[Route("/hog", hog, middleware=small)],
        exception_handlers={ml.MemoryLimitReached: insufficient_storage},
    )
    for app, status in ((plain, 503), (handled, 507)):
        wrapped = BudgetMiddleware(app, memory="64 MiB", on_finished=reports.append)
        with TestClient(
            wrapped, backend=backend, raise_server_exceptions=False
        ) as client:
            for _ in range(3):
                response = client.get("/hog")
                assert response.status_code == status, response.text
    for report in reports[:3]:
        assert report.breach is not None and report.breach.limit == 4 * MIB
        assert report.phase == "before response"
        assert report.status == 503


def test_a_refused_request_gets_the_503_behind_starlettes_error_middleware() -> None:
    """A request too large for the budget is refused (tests/test_refuse.py):
    a MemoryError that Starlette's ServerErrorMiddleware turns into a 500
    before the breach's cancellation could land; the middleware delivers
    the breach at the response's start, and the request gets the 503."""

    async def hog(request: Request) -> Response:
        return PlainTextResponse(str(len(bytearray(10 * 1024 * MIB))))

    def sync_hog(request: Request) -> Response:
        return PlainTextResponse(str(len(bytearray(10 * 1024 * MIB))))

    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    reports: list[RequestReport] = []
    app = BudgetMiddleware(
        Starlette(
            routes=[Route("/hog", hog), Route("/sync-hog", sync_hog), Route("/ok", ok)]
        ),
        memory="64 MiB",
        on_finished=reports.append,
    )
    with TestClient(app) as client:
        for path in ("/hog", "/sync-hog"):
            response = client.get(path)
            assert response.status_code == 503, path
            assert response.headers["memlimits-breach"] == "memory"
        assert client.get("/ok").text == "ok"
    for report in reports[:2]:
        assert report.breach is not None and report.breach.refused >= 10 * 1024 * MIB
        assert report.phase == "before response"
        assert "was refused" in report.breach.reason


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_after_a_route_breach_the_apps_stream_and_the_requests_own_breach(
    backend: Literal["asyncio", "trio"],
) -> None:
    """What the app sends after a route budget's breach is held back only
    while it may be ServerErrorMiddleware's answer: a stream from the app's
    own handler goes out as it comes; a handler that the request's own
    timeout stops gets the 503 (the middleware's, never held back)."""

    async def hog(request: Request) -> Response:
        # At 64 KiB a millisecond: the route's breach reaches the request's
        # task long before the request's own limit is near, whatever the
        # machine's load (with sleep(0) it passed 64 MiB first, under load).
        held: list[bytearray] = []
        while True:
            held.append(bytearray(64 * 1024))
            await anyio.sleep(0.001)

    async def chunks() -> AsyncIterator[bytes]:
        for chunk in (b"a", b"b", b"c"):
            yield chunk
            await anyio.sleep(0)

    async def streamed(request: Request, exc: Exception) -> Response:
        return StreamingResponse(chunks(), status_code=507)

    async def slow(request: Request, exc: Exception) -> Response:
        await anyio.sleep(30)
        return PlainTextResponse("late")

    small = [Middleware(RouteBudget, memory="4 MiB")]
    reports: list[RequestReport] = []
    for handler, status, body in ((streamed, 507, "abc"), (slow, 503, None)):
        app = BudgetMiddleware(
            Starlette(
                routes=[Route("/hog", hog, middleware=small)],
                exception_handlers={ml.MemoryLimitReached: handler},
            ),
            memory="64 MiB",
            timeout=0.5,
            on_finished=reports.append,
        )
        with TestClient(app, backend=backend, raise_server_exceptions=False) as client:
            response = client.get("/hog")
        assert response.status_code == status, response.text
        if body is not None:
            assert response.text == body
    assert reports[-1].status == 503
    assert reports[-1].breach is not None
    assert reports[-1].breach.kind is ml.BreachKind.TIMEOUT
