"""Per-request budgets for any ASGI server: a pure ASGI middleware.

``app = BudgetMiddleware(app, memory="100 MiB", timeout=30)`` runs every HTTP
request (and every WebSocket connection, with a policy of its own) in a
``limit_scope`` with a cancel token of its own, cancelled when the client
goes away.  A breach before the response starts gets an error response (503
with a JSON body naming the breach, by default); one while the response is
streaming ends it the way ASGI ends a failed response (the connection is
closed, so the client sees an incomplete body); one after the response is
complete is only reported.  Each breach is logged once, as one structured
line, and every finished request can be reported to a callback.  See
docs/asgi.md.

Built on the public API of ``memlimits_async`` alone, as a user could have
written it; it imports no web framework (Starlette is needed only by
:func:`budget_dependency`, for FastAPI).

How a disconnect is seen without a second task per request: ``receive`` is
wrapped, so a disconnect the app reads itself is seen at once; and a request
still running after one tick of a shared sweeper (one task per event loop,
every 10 ms) gets a watcher that waits on ``receive`` for it, handing every
message it gets on to the app, so that nothing is stolen from it.  The
disconnect that servers report after a complete response is not a
cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import ctypes.util
import functools
import heapq
import importlib.util
import inspect
import itertools
import json
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    MutableMapping,
)
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, ParamSpec, TypeVar

import anyio
import anyio.lowlevel

import memlimits_async as ml

if TYPE_CHECKING:
    from starlette.requests import HTTPConnection

__all__ = [
    "BudgetMiddleware",
    "Phase",
    "RequestReport",
    "RouteBudget",
    "RouteStat",
    "RouteStats",
    "budget_dependency",
    "preemptible",
    "request_token",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

Phase = Literal["before response", "streaming", "after response"]
"""Where a request was when its breach stopped it."""

logger = logging.getLogger("memlimits_async.asgi")

# Where a request's state is kept in the ASGI scope, for route budgets and
# request_token().
_STATE_KEY: Final = "memlimits_async.request"
_SWEEP_PERIOD: Final = 0.01
"""Seconds between two ticks of the sweeper: a request still running after
one to two ticks gets a disconnect watcher, and first-byte deadlines are
checked at this resolution."""
_SWEEPER_IDLE_TICKS: Final = 100
"""Ticks with no request in flight after which the sweeper task ends (the
next request starts it again)."""
_DELIVERY_WAIT: Final = 1.0
"""Seconds a response start waits for a breach the meter has seen to reach
the request's task (it takes milliseconds; this only bounds a wait that
something unforeseen would make endless)."""
_DELIVERY_POLL: Final = 0.001
"""Seconds between two looks at whether that breach has landed."""
_token_lock: Final = threading.Lock()
_BYTE_KINDS: Final = frozenset(
    {ml.BreachKind.MEMORY, ml.BreachKind.ALLOCATIONS, ml.BreachKind.GLOBAL_MEMORY}
)


# ---- reports and stats ----


@dataclass(frozen=True, slots=True)
class RequestReport:
    """One finished request (or WebSocket connection), for ``on_finished``."""

    route: str
    """The route's path template when the framework says it (Starlette and
    FastAPI: ``"/items/{id}"``), else what ``route_name`` returned, else the
    path."""
    method: str | None
    """The HTTP method; None for a WebSocket."""
    path: str
    protocol: Literal["http", "websocket"]
    status: int | None
    """The status sent (the error response's, after a breach), or None if
    no response was started (a client that went away)."""
    breach: ml.Breach | None
    """What stopped the request, or None."""
    phase: Phase | None
    """Where the request was when it was stopped; None without a breach."""
    usage: ml.Usage
    """What the request's scope was charged (bytes, estimates)."""
    duration: float
    """Seconds from the request's start to the end of its scope."""
    disconnected: bool
    """The client went away before the response was complete."""
    scope: Scope = field(repr=False, compare=False)
    """The request's ASGI scope (its headers, client, and what the framework
    added to it), for labels of your own."""


@dataclass(slots=True)
class RouteStat:
    """Totals of one route since the stats were made (or reset)."""

    requests: int = 0
    breaches: dict[str, int] = field(default_factory=dict)
    """Breaches by kind (``BreachKind`` names in lower case)."""
    allocated: int = 0
    """Bytes allocated by all its requests (estimates, summed)."""
    peak_live_max: int = 0
    """The largest ``peak_live`` of one request."""
    peak_live_sum: int = 0
    """Summed ``peak_live`` (divide by ``requests`` for the mean)."""
    duration_sum: float = 0.0
    duration_max: float = 0.0


class RouteStats:
    """Usage and breaches per route, kept by :class:`BudgetMiddleware`
    given one as ``stats=`` (also where the framework builds the
    middleware: Starlette's ``Middleware(...)``).  At most
    ``max_routes`` routes are kept apart; the others are added up under
    ``"<other>"`` (an app whose framework does not name routes is counted
    by path, which can be many).
    """

    def __init__(self, max_routes: int = 1000) -> None:
        if isinstance(max_routes, bool) or not isinstance(max_routes, int):
            raise TypeError(
                f"max_routes must be an int, not {type(max_routes).__name__}"
            )
        if max_routes < 1:
            raise ValueError(f"max_routes must be at least 1, got {max_routes}")
        self._max_routes = max_routes
        self._routes: dict[str, RouteStat] = {}

    def add(
        self,
        route: str,
        usage: ml.Usage,
        breach: ml.Breach | None,
        duration: float,
    ) -> None:
        """Count one finished request of ``route``."""
        stat = self._routes.get(route)
        if stat is None:
            if len(self._routes) >= self._max_routes:
                route = "<other>"
                stat = self._routes.get(route)
            if stat is None:
                stat = self._routes[route] = RouteStat()
        stat.requests += 1
        stat.allocated += usage.allocated
        peak = usage.peak_live
        stat.peak_live_sum += peak
        if peak > stat.peak_live_max:
            stat.peak_live_max = peak
        stat.duration_sum += duration
        if duration > stat.duration_max:
            stat.duration_max = duration
        if breach is not None:
            kind = breach.kind.name.lower()
            stat.breaches[kind] = stat.breaches.get(kind, 0) + 1

    def snapshot(self) -> dict[str, RouteStat]:
        """A copy of the totals, by route."""
        return {
            route: RouteStat(
                stat.requests,
                dict(stat.breaches),
                stat.allocated,
                stat.peak_live_max,
                stat.peak_live_sum,
                stat.duration_sum,
                stat.duration_max,
            )
            for route, stat in list(self._routes.items())
        }

    def reset(self) -> None:
        self._routes = {}


# ---- the per-request state ----


class _Request:
    """One HTTP request or WebSocket connection in flight: its token, what
    was sent and received, and the disconnect watcher's hand-over.

    Invariant: at most one coroutine awaits the server's ``receive`` at a
    time: the app (``receiving``) or the watcher (``watching``).  While the
    watcher waits, the app waits for what it gets (``buffered``), so every
    message reaches the app, in order."""

    # What most requests never change lives on the class: a request is
    # made for every HTTP request of a server, and each attribute set here
    # is paid for every time.
    first_byte_fired = False
    first_byte_deadline = math.inf  # time.monotonic()
    started = False  # response started (or WebSocket accepted)
    completing = False  # its last message is being sent (or was)
    complete = False  # response complete (or close sent)
    trailers = False
    status: int | None = None
    disconnected = False
    finished = False
    receiving = False  # the app awaits the server's receive
    watching = False  # the watcher awaits it
    buffered: deque[Message] | None = None  # what the watcher got
    wake: anyio.Event | None = None
    watch_handle: object = None
    sweeper: _Sweeper | None = None
    limit_scope: ml.LimitScope | None = None  # the request's, while it runs
    swept = False  # seen by a tick of the sweeper: it runs for a while
    route_scopes: list[ml.LimitScope] | None = None  # route budgets' scopes
    # A route budget's scope left with its LimitReached: a response the app
    # starts after that is an error handler's (Starlette's
    # ServerErrorMiddleware sends its 500, then raises the exception on to
    # us), held back until the app returns (``withheld``).
    route_breach_raised = False
    withheld: list[Message] | None = None
    # Made when something needs it (``token``): most requests end with
    # neither a disconnect nor anyone asking for it.
    _token: ml.CancelToken | None = None

    def __init__(
        self,
        receive: Receive,
        send: Send,
        protocol: Literal["http", "websocket"],
        first_byte: float | None,
    ) -> None:
        self._receive = receive
        self._send = send
        self.protocol = protocol
        self.started_at = time.monotonic()
        self.first_byte = first_byte  # the limit, seconds, or None
        if first_byte is not None:
            self.first_byte_deadline = self.started_at + first_byte

    @property
    def token(self) -> ml.CancelToken:
        """The request's cancel token, made on first use and then watched
        by the request's scope (while it runs)."""
        token = self._token
        if token is None:
            # A lock: request_token() may be called in a worker thread.
            with _token_lock:
                token = self._token
                if token is None:
                    token = ml.CancelToken()
                    scope = self.limit_scope
                    if scope is not None:
                        # (In another thread, the scope may have exited
                        # just now: then there is nothing left to stop.)
                        with contextlib.suppress(RuntimeError):
                            scope.add_token(token)
                    self._token = token
        return token

    # -- what the app calls --

    async def receive(self) -> Message:
        if self.buffered is not None or self.watching:
            message = await self._handed_over()
            if message is not None:
                return message
        self.receiving = True
        try:
            message = await self._receive()
        finally:
            self.receiving = False
        if message["type"] in ("http.disconnect", "websocket.disconnect"):
            self._on_disconnect()
        return message

    async def _handed_over(self) -> Message | None:
        """What the watcher received, waiting for it if it is receiving;
        None once it is done and nothing is left."""
        while True:
            buffered = self.buffered
            if buffered:
                message = buffered[0]
                if message["type"] == "http.disconnect":
                    # Every later receive says so too, as the server's does.
                    return dict(message)
                buffered.popleft()
                if not buffered:
                    self.buffered = None
                return message
            self.buffered = None
            if not self.watching:
                return None
            wake = self.wake
            if wake is None:
                wake = self.wake = anyio.Event()
            await wake.wait()

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if self.withheld is not None:
            self.withheld.append(message)
            if kind == "http.response.body" and message.get("more_body", False):
                # A stream (ServerErrorMiddleware's answer is one whole
                # message): the app's own, sent as it comes.
                await self.release_withheld()
            return
        if self.route_breach_raised and kind == "http.response.start":
            self.withheld = [message]
            return
        if kind == "http.response.body":
            if message.get("more_body", False) or self.trailers:
                await self._send(message)
                return
        elif kind in ("http.response.start", "websocket.accept"):
            scope = self.limit_scope
            breached = (scope is not None and scope.breached) or (
                self.route_scopes is not None and self._route_breached()
            )
            if breached and not ml.is_interrupted():
                # The meter saw the budget pass, but the breach has not
                # reached this task yet: the delivery thread hands it over
                # within milliseconds.  A sync endpoint that allocated past
                # its budget in a fraction of a millisecond got its 200
                # before that.  Wait for the delivery (bounded: the answer
                # is sent anyway if it never comes).
                with anyio.move_on_after(_DELIVERY_WAIT):
                    while not ml.is_interrupted():
                        await anyio.sleep(_DELIVERY_POLL)
            if (
                breached
                or ml.is_interrupted()
                or (scope is not None and scope.cancel_called)
                or (self.route_scopes is not None and self._route_cancelled())
            ):
                # The request was stopped while the app ran without
                # reaching a checkpoint (work in a worker thread that cannot
                # be preempted, a stretch shorter than the preemption
                # grace, or the wait above, whose sleep may have ended
                # before the cancellation reached it): let the cancellation
                # land now, so that the request is answered with the error
                # response.
                await anyio.lowlevel.checkpoint()
            # Set before sending: headers interrupted half-way out cannot be
            # followed by an error response.
            self.started = True
            if kind == "http.response.start":
                self.status = message["status"]
                self.trailers = bool(message.get("trailers", False))
            await self._send(message)
            return
        elif kind in ("http.response.zerocopy", "websocket.http.response.body"):
            if message.get("more_body", False):
                await self._send(message)
                return
        elif kind == "http.response.trailers":
            if message.get("more_trailers", False):
                await self._send(message)
                return
        elif kind not in ("http.response.pathsend", "websocket.close"):
            if kind == "websocket.http.response.start":
                self.started = True
                self.status = message["status"]
            await self._send(message)
            return
        # The last message.  The response is complete once the server has
        # it: a breach that interrupts this send leaves it incomplete.  But
        # a disconnect the server reports meanwhile is the one that follows
        # a complete response.
        self.completing = True
        await self._send(message)
        self.complete = True

    def _route_breached(self) -> bool:
        """A route's scope inside the request's has a breach in the meter
        (``LimitScope.breached`` reads it live), delivered or not."""
        scopes = self.route_scopes
        return scopes is not None and any(scope.breached for scope in scopes)

    def _route_cancelled(self) -> bool:
        """A route's scope inside the request's was cancelled (a timeout,
        which anyio delivers itself, is not an interrupt)."""
        scopes = self.route_scopes
        return scopes is not None and any(scope.cancel_called for scope in scopes)

    # -- events --

    def _on_disconnect(self) -> None:
        self.disconnected = True
        # The disconnect that follows a complete response is no reason to
        # stop anything; a WebSocket's is its normal end, which the app
        # handles itself.
        if not self.completing and self.protocol == "http":
            self.token.cancel("client disconnected")

    def first_byte_expired(self) -> None:
        token = self._token
        cancelled = token is not None and token.cancelled
        if not self.started and not self.finished and not cancelled:
            self.first_byte_fired = True
            self.token.cancel(f"no response within {self.first_byte:g} s")

    def narrow_first_byte(self, seconds: float) -> None:
        """A route budget's time to the first byte, from now."""
        deadline = time.monotonic() + seconds
        if deadline < self.first_byte_deadline:
            self.first_byte = seconds
            self.first_byte_deadline = deadline
            if self.sweeper is not None and self.swept:
                self.sweeper.watch_first_byte(self)

    @contextlib.contextmanager
    def route_scope(self, budget: ml.Budget) -> Iterator[ml.LimitScope]:
        """A route budget's scope inside the request's: its breach leaves
        as a ``LimitReached`` for the middleware."""
        scope = ml.limit_scope(budget=budget, raise_on_breach=True)
        if self.route_scopes is None:
            self.route_scopes = []
        self.route_scopes.append(scope)
        try:
            with scope:
                yield scope
        finally:
            self.route_scopes.remove(scope)
            if scope.breach is not None and not self.started:
                self.route_breach_raised = True

    def take_withheld(self) -> list[Message] | None:
        """What was held back, if anything; nothing is held from now on."""
        withheld, self.withheld = self.withheld, None
        self.route_breach_raised = False
        return withheld

    async def release_withheld(self) -> None:
        """Send the response held back after a route budget's breach: the
        app answered it itself (an exception handler of its own)."""
        for message in self.take_withheld() or ():
            await self.send(message)

    # -- the watcher (run by the sweeper) --

    def needs_watcher(self) -> bool | None:
        """True to start a watcher now, False to look again at the next
        tick, None when no watcher will ever be needed."""
        if self.finished or self.completing or self.disconnected or self.watching:
            return None
        return not (self.receiving or self.buffered)

    async def watch(self) -> None:
        """Wait on the server's ``receive`` for the app, until a disconnect,
        or a body chunk with more to come (the app reads the body at its own
        pace: the sweeper looks again once it has taken this one)."""
        try:
            while not self.finished:
                message = await self._receive()
                if self.buffered is None:
                    self.buffered = deque()
                self.buffered.append(message)
                self._wake()
                if message["type"] == "http.disconnect":
                    self._on_disconnect()
                    return
                if message.get("more_body", False):
                    if self.sweeper is not None:
                        self.sweeper.look_again(self)
                    return
        except Exception:
            # The server's receive failed: the app's next receive will say
            # what it says.
            logger.debug("disconnect watcher stopped", exc_info=True)
        finally:
            self.watching = False
            self._wake()

    def _wake(self) -> None:
        wake = self.wake
        if wake is not None:
            self.wake = None
            wake.set()


def request_token(scope: Scope) -> ml.CancelToken | None:
    """The cancel token of the request that ``scope`` (the ASGI scope, or
    Starlette's ``request.scope``) belongs to, or None outside
    :class:`BudgetMiddleware`.

    It is cancelled when the client goes away: give it to work that should
    stop with the request (``ml.limit_scope(token=...)`` in a task that
    outlives it, ``ml.Budget(token=...)`` for ``ml.run_sync``), or cancel it
    to stop the request (an administrator's endpoint)."""
    request = scope.get(_STATE_KEY)
    return request.token if isinstance(request, _Request) else None


# ---- the sweeper: one task per event loop ----


class _Sweeper:
    """Ticks every 10 ms while requests are in flight: starts a disconnect
    watcher for each request still running after a tick, and cancels the
    requests whose first byte is late.  One per event loop, started in an
    empty context (nothing it allocates is charged to a request).

    A request costs it two dict operations unless it outlives a tick: most
    requests end before, and never meet a watcher or the deadline heap
    (which would keep them, and what they hold, until their deadline)."""

    def __init__(self) -> None:
        self.newer: dict[_Request, None] = {}  # added since the last tick
        self.older: dict[_Request, None] = {}  # to look at, at each tick
        self.deadlines: list[tuple[float, int, _Request]] = []
        self.finished_in_heap = 0
        self.running = False
        self._order = itertools.count()

    def add(self, request: _Request) -> None:
        request.sweeper = self
        self.newer[request] = None
        if not self.running:
            self.running = True
            self.start()

    def discard(self, request: _Request) -> None:
        if self.newer.pop(request, self) is self:
            self.older.pop(request, None)
        if request.first_byte is not None and request.swept:
            # Finished: dropped from the heap when they are half of it.
            self.finished_in_heap += 1
            if self.finished_in_heap * 2 > len(self.deadlines):
                self.deadlines = [
                    entry for entry in self.deadlines if not entry[2].finished
                ]
                heapq.heapify(self.deadlines)
                self.finished_in_heap = 0

    def look_again(self, request: _Request) -> None:
        if not request.finished:
            self.older[request] = None

    def watch_first_byte(self, request: _Request) -> None:
        heapq.heappush(
            self.deadlines,
            (request.first_byte_deadline, next(self._order), request),
        )

    def tick(self) -> None:
        for request in list(self.older):
            start = request.needs_watcher()
            if start is False:
                continue  # busy receiving: next tick
            del self.older[request]
            if start:
                request.watching = True
                self.spawn_watcher(request)
        if self.newer:
            for request in self.newer:
                request.swept = True
                if request.first_byte is not None:
                    self.watch_first_byte(request)
            self.older.update(self.newer)
            self.newer.clear()
        deadlines = self.deadlines
        if deadlines:
            now = time.monotonic()
            while deadlines and deadlines[0][0] <= now:
                _, _, request = heapq.heappop(deadlines)
                if request.finished:
                    # A heuristic count (a narrowed deadline adds an entry).
                    self.finished_in_heap = max(self.finished_in_heap - 1, 0)
                elif request.first_byte_deadline <= now:
                    request.first_byte_expired()

    async def run(self) -> None:
        idle = 0
        try:
            while idle < _SWEEPER_IDLE_TICKS:
                await self.sleep(_SWEEP_PERIOD)
                if self.newer or self.older or self.deadlines:
                    idle = 0
                    self.tick()
                else:
                    idle += 1
        finally:
            self.running = False

    # The event loop's own ways (asyncio and trio below).

    def start(self) -> None:
        raise NotImplementedError

    async def sleep(self, seconds: float) -> None:
        raise NotImplementedError

    def spawn_watcher(self, request: _Request) -> None:
        raise NotImplementedError

    def stop_watcher(self, request: _Request) -> None:
        raise NotImplementedError


class _AsyncioSweeper(_Sweeper):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        # A reference is kept: the loop holds its tasks only weakly.
        self.task = self.loop.create_task(self.run(), context=contextvars.Context())

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def spawn_watcher(self, request: _Request) -> None:
        request.watch_handle = self.loop.create_task(
            request.watch(), context=contextvars.Context()
        )

    def stop_watcher(self, request: _Request) -> None:
        task = request.watch_handle
        if isinstance(task, asyncio.Task):
            task.cancel()


class _TrioSweeper(_Sweeper):
    def __init__(self) -> None:
        super().__init__()
        import trio

        self.trio = trio

    def start(self) -> None:
        self.trio.lowlevel.spawn_system_task(
            self.run, name="memlimits_async.asgi sweeper", context=contextvars.Context()
        )

    async def sleep(self, seconds: float) -> None:
        await self.trio.sleep(seconds)

    def spawn_watcher(self, request: _Request) -> None:
        # Made here, not in the task: the request may end before the task
        # first runs, and a scope cancelled before entry enters cancelled.
        cancel_scope = self.trio.CancelScope()
        request.watch_handle = cancel_scope

        async def watch() -> None:
            with cancel_scope:
                await request.watch()

        self.trio.lowlevel.spawn_system_task(
            watch, name="memlimits_async.asgi watcher", context=contextvars.Context()
        )

    def stop_watcher(self, request: _Request) -> None:
        cancel_scope = request.watch_handle
        if cancel_scope is not None:
            cancel_scope.cancel()  # type: ignore[attr-defined]


# ---- error responses ----


ErrorResponse = Callable[[Scope, ml.Breach], ASGIApp]
"""``error_response(scope, breach)`` returns the ASGI app (a Starlette
``Response`` is one) that answers a request stopped before its response
started."""


def _breach_name(breach: ml.Breach) -> str:
    return breach.kind.name.lower()


class _DefaultErrorResponse:
    """``503`` with ``{"detail": ..., "breach": "memory"}`` and the header."""

    def __init__(self, status_code: int, header: str | None) -> None:
        self.status_code = status_code
        self.header = None if header is None else header.lower().encode("latin-1")
        self._bodies: dict[ml.BreachKind, tuple[bytes, list[tuple[bytes, bytes]]]] = {}

    def __call__(self, scope: Scope, breach: ml.Breach) -> ASGIApp:
        made = self._bodies.get(breach.kind)
        if made is None:
            name = _breach_name(breach)
            what = {
                ml.BreachKind.MEMORY: "its memory limit",
                ml.BreachKind.ALLOCATIONS: "its allocation limit",
                ml.BreachKind.GLOBAL_MEMORY: "the server's memory limit",
                ml.BreachKind.TOKEN: "a cancellation",
                ml.BreachKind.TIMEOUT: "its time limit",
            }[breach.kind]
            body = json.dumps(
                {"detail": f"request stopped by {what}", "breach": name}
            ).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ]
            if self.header is not None:
                headers.append((self.header, name.encode()))
            made = self._bodies[breach.kind] = (body, headers)
        body, headers = made
        status = self.status_code

        async def respond(scope: Scope, receive: Receive, send: Send) -> None:
            await send(
                {"type": "http.response.start", "status": status, "headers": headers}
            )
            await send({"type": "http.response.body", "body": body})

        return respond


# ---- aborting a response mid-stream ----

_aborted: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "memlimits_async.asgi aborted", default=False
)
_UVICORN_INCOMPLETE: Final = "ASGI callable returned without completing response."
_filter_installed = False


class _AbortedResponseFilter(logging.Filter):
    """Drops uvicorn's error for a response this middleware ended on
    purpose (it logged the breach itself).  uvicorn logs it in the request's
    task right after the app returns, where ``_aborted`` is still set."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == _UVICORN_INCOMPLETE and _aborted.get())


def _quiet_uvicorn() -> None:
    global _filter_installed
    if not _filter_installed:
        _filter_installed = True
        logging.getLogger("uvicorn.error").addFilter(_AbortedResponseFilter())


# ---- giving freed memory back to the OS ----


class _Trimmer:
    """glibc's ``malloc_trim(0)`` in a thread of its own, once ``quiet``
    seconds have passed without a request for it (after a burst of breached
    requests, once, when it is over: memory given back in the middle of a
    burst would be taken again at once).

    The loop never waits for the call itself (ctypes releases the GIL
    around it), but glibc locks each arena while it trims it, and the
    loop's own allocations from that arena wait meanwhile: the stall is
    most of the trim's duration (docs/asgi.md has the figures).  Never
    called from an allocator hook, nor on the loop's thread."""

    def __init__(self, quiet: float) -> None:
        self.quiet = quiet
        self.wanted = threading.Event()
        self.trims = 0
        self.seconds = 0.0
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()
        path = ctypes.util.find_library("c")
        libc = ctypes.CDLL(path) if path else None
        self._trim = getattr(libc, "malloc_trim", None)
        if self._trim is not None:
            self._trim.argtypes = [ctypes.c_size_t]
            self._trim.restype = ctypes.c_int

    @property
    def available(self) -> bool:
        return self._trim is not None

    def request(self) -> None:
        if self._trim is None:
            return
        if self._pid != os.getpid():  # not started yet, or a forked child
            with self._lock:
                if self._pid != os.getpid():
                    self.wanted = threading.Event()
                    self._thread = threading.Thread(
                        target=self._run, name="memlimits_async.asgi trim", daemon=True
                    )
                    self._thread.start()
                    self._pid = os.getpid()
        self.wanted.set()

    def _run(self) -> None:
        assert self._trim is not None
        wanted = self.wanted
        while True:
            wanted.wait()
            wanted.clear()
            while wanted.wait(self.quiet):
                wanted.clear()  # asked again: wait for quiet again
            started = time.perf_counter()
            self._trim(0)
            self.seconds += time.perf_counter() - started
            self.trims += 1


_trimmer: _Trimmer | None = None
_trimmer_lock = threading.Lock()


def _shared_trimmer() -> _Trimmer:
    """One trimmer (and one thread) per process, whatever the number of
    middlewares: a trim covers the whole process."""
    global _trimmer
    with _trimmer_lock:
        if _trimmer is None:
            _trimmer = _Trimmer(1.0)
        return _trimmer


# ---- policies ----


def _seconds(value: float | None, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"{name} must be a number of seconds or None, not {type(value).__name__}"
        )
    if value < 0 or value != value:
        raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
    return float(value)


def _policy(
    memory: int | str | None,
    allocations: int | str | None,
    timeout: float | None,
    stream_timeout: float | None,
    preempt: float | bool | None,
    budget: ml.Budget | None,
) -> tuple[ml.Budget, float | None]:
    """The budget of each request's scope, and its time to the first byte
    (None: the scope's timeout is all there is)."""
    if budget is None:
        base = ml.Budget(
            memory=memory, allocations=allocations, timeout=timeout, preempt=preempt
        )
    elif not isinstance(budget, ml.Budget):
        raise TypeError(
            f"budget must be a memlimits_async.Budget or None, "
            f"not {type(budget).__name__}"
        )
    else:
        given = [
            name
            for name, value in (
                ("memory", memory),
                ("allocations", allocations),
                ("timeout", timeout),
                ("preempt", preempt),
            )
            if value is not None
        ]
        if given:
            others = ", ".join(f"{name}=" for name in given)
            raise TypeError(f"pass either budget= or {others} (not both)")
        base = budget
    stream = _seconds(stream_timeout, "stream_timeout")
    if stream is None or (base.timeout is not None and stream <= base.timeout):
        return base, None
    if base.timeout is None:
        raise ValueError(
            "stream_timeout needs timeout (the time to the first byte) to be set"
        )
    scoped = ml.Budget(
        memory=base.memory,
        allocations=base.allocations,
        timeout=stream,
        token=base.token,
        preempt=base.preempt,
    )
    return scoped, base.timeout


# ---- the middleware ----


class BudgetMiddleware:
    """Per-request memory, allocation and time budgets, and cancel-on-
    disconnect, for any ASGI app.

    ``BudgetMiddleware(app, memory="100 MiB", allocations="2 GiB",
    timeout=30)``, or with Starlette and FastAPI ``app.add_middleware(
    BudgetMiddleware, memory="100 MiB", ...)``.

    :param memory, allocations, timeout, preempt: each HTTP request's
        budget, as in ``limit_scope``; or ``budget=ml.Budget(...)``.
    :param stream_timeout: seconds a response that started within
        ``timeout`` may take in all: ``timeout`` is then the time to the
        first byte, and streamed responses may go on until this.  Without
        it, ``timeout`` is the time of the whole request.
    :param websocket: each WebSocket connection's budget.  None (the
        default): the HTTP memory limit and no other; False: WebSockets are
        passed through untouched.
    :param global_memory: take part in the process-wide limit
        (``ml.set_global_memory_limit``).
    :param error_response: ``error_response(scope, breach)`` returns the
        ASGI app (a Starlette ``Response`` is one) that answers a request
        stopped before its response started.  Default: ``status_code``
        with a JSON body naming the breach and the ``breach_header``.
    :param on_finished: called with a :class:`RequestReport` after every
        request, on the event loop's thread: keep it quick (feed a metric,
        hand the report over); what it raises is logged.
    :param stats: a :class:`RouteStats` to keep per-route totals in (none
        are kept without it: they cost about 2 µs a request).
    :param route_name: ``route_name(scope)`` names a request's route where
        the framework does not (Starlette and FastAPI do).
    :param trim_memory: after requests that breached a byte limit, have
        glibc give freed memory back to the OS (``malloc_trim(0)``, in a
        thread of its own, once a second has passed without another such
        breach).  See docs/asgi.md for what it returns and what it costs.
    :param preload_numpy: import numpy at start-up when it is installed, so
        that its array buffers are metered from the first request on.
    :param logger: where breaches are logged (``memlimits_async.asgi``).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        memory: int | str | None = None,
        allocations: int | str | None = None,
        timeout: float | None = None,
        stream_timeout: float | None = None,
        preempt: float | bool | None = None,
        budget: ml.Budget | None = None,
        websocket: ml.Budget | Literal[False] | None = None,
        global_memory: bool = False,
        error_response: ErrorResponse | None = None,
        status_code: int = 503,
        breach_header: str | None = "memlimits-breach",
        on_finished: Callable[[RequestReport], object] | None = None,
        stats: RouteStats | None = None,
        route_name: Callable[[Scope], str | None] | None = None,
        trim_memory: bool = False,
        preload_numpy: bool = True,
        logger: logging.Logger | None = None,
    ) -> None:
        if not callable(app):
            raise TypeError(f"app must be an ASGI app, not {type(app).__name__}")
        self.budget, self._first_byte = _policy(
            memory, allocations, timeout, stream_timeout, preempt, budget
        )
        base = self.budget
        if websocket is None:
            self.websocket_budget: ml.Budget | None = ml.Budget(
                memory=base.memory, token=base.token, preempt=base.preempt
            )
        elif websocket is False:
            self.websocket_budget = None
        elif isinstance(websocket, ml.Budget):
            self.websocket_budget = websocket
        else:
            raise TypeError(
                f"websocket must be a memlimits_async.Budget, False or None, "
                f"not {type(websocket).__name__}"
            )
        for name, flag in (
            ("global_memory", global_memory),
            ("trim_memory", trim_memory),
            ("preload_numpy", preload_numpy),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, not {type(flag).__name__}")
        if isinstance(status_code, bool) or not isinstance(status_code, int):
            raise TypeError(
                f"status_code must be an int, not {type(status_code).__name__}"
            )
        if not 100 <= status_code <= 599:
            raise ValueError(f"status_code must be an HTTP status, got {status_code}")
        if breach_header is not None and not isinstance(breach_header, str):
            raise TypeError(
                f"breach_header must be a str or None, "
                f"not {type(breach_header).__name__}"
            )
        for name, function in (
            ("error_response", error_response),
            ("on_finished", on_finished),
            ("route_name", route_name),
        ):
            if function is not None and not callable(function):
                raise TypeError(f"{name} must be callable or None")
        if stats is not None and not isinstance(stats, RouteStats):
            raise TypeError(
                f"stats must be a RouteStats or None, not {type(stats).__name__}"
            )
        self.app = app
        self.global_memory = global_memory
        self.error_response: ErrorResponse = error_response or _DefaultErrorResponse(
            status_code, breach_header
        )
        self.on_finished = on_finished
        self.stats = stats
        self.route_name = route_name
        self.preload_numpy = preload_numpy
        self.logger = logger or globals()["logger"]
        self.trimmer = _shared_trimmer() if trim_memory else None
        self._ready = False
        self._sweeper_key: object = None
        self._sweeper: _Sweeper | None = None
        self._sweepers: dict[object, _Sweeper] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A request is served here rather than in a coroutine of its own:
        # one coroutine less to make for every request.
        kind = scope["type"]
        protocol: Literal["http", "websocket"]
        if kind == "http":
            protocol, budget = "http", self.budget
        elif kind == "websocket" and self.websocket_budget is not None:
            protocol, budget = "websocket", self.websocket_budget
        else:
            if kind == "lifespan" and not self._ready:
                self._start_up()
            await self.app(scope, receive, send)
            return

        if not self._ready:
            self._start_up()
        request = _Request(
            receive, send, protocol, self._first_byte if protocol == "http" else None
        )
        scope[_STATE_KEY] = request
        try:
            sweeper = None
            if protocol == "http":
                sweeper = self._sweeper
                if sweeper is None or asyncio._get_running_loop() is not (
                    self._sweeper_key
                ):
                    sweeper = self._current_sweeper()
                sweeper.add(request)
            # The breach of a LimitReached, never the exception: its traceback
            # holds this frame, and its context the frames of the body it
            # stopped (and what they were building), which a reference from
            # here would keep until a garbage collection.
            raised: ml.Breach | None = None
            # No token: the request's is made only when needed (a
            # disconnect, request_token()), and then added to the scope.
            limit_scope = ml.limit_scope(
                budget=budget, global_memory=self.global_memory
            )
            request.limit_scope = limit_scope
            try:
                try:
                    # A plain `with` (it works in a task): no coroutine to make
                    # for entering and leaving.
                    with limit_scope:
                        await self.app(scope, request.receive, request.send)
                except ml.LimitReached as exc:
                    # A route budget's (or the app's own) breach.
                    raised = exc.breach
                except BaseExceptionGroup as group:
                    limits, rest = group.split(ml.LimitReached)
                    if rest is not None or limits is None:
                        await _release_on_failure(request)
                        raise
                    raised = _first_leaf(limits).breach
                    del limits, rest
                except Exception:
                    await _release_on_failure(request)
                    raise
            finally:
                request.finished = True
                request.limit_scope = None
                if sweeper is not None:
                    sweeper.discard(request)
                    if request.watching:
                        sweeper.stop_watcher(request)
                    # The watcher's task keeps its cancellation, whose
                    # traceback holds the request: not the other way round.
                    request.watch_handle = None
            # A route budget's breach, when there is one, is what stopped the
            # request: its limit is the tighter (the request's own may have
            # been passed too before the route's cancellation landed).
            withheld = request.take_withheld()
            if withheld is not None and raised is None and limit_scope.breach is None:
                # The app answered the route's breach itself.
                for message in withheld:
                    await request.send(message)
            # Else the breach reached us, or the request's own stopped the
            # answer: the error response instead (nothing was sent yet).
            del withheld
            breach = raised or limit_scope.breach
            if breach is not None and request.first_byte_fired:
                breach = self._first_byte_breach(request)
            phase: Phase | None = None
            if breach is not None:
                if not request.started:
                    phase = "before response"
                    if not request.disconnected:
                        await self._refuse(scope, request, breach)
                elif not request.complete:
                    phase = "streaming"
                    if protocol == "websocket":
                        await self._close_websocket(request, breach)
                    else:
                        # ASGI has no message to abort a response: returning
                        # without completing it makes the server close the
                        # connection, and the client sees an incomplete body.
                        _quiet_uvicorn()
                        _aborted.set(True)
                else:
                    phase = "after response"
            if (
                breach is not None
                or self.stats is not None
                or self.on_finished is not None
            ):
                # Else nothing to say about it.
                self._finish(scope, request, limit_scope, breach, phase)
        finally:
            # The request refers to the server's receive and send, bound to
            # its connection object, which refers to this scope: left here,
            # it would make a reference cycle of every request, freed only
            # by the garbage collector's full collections (a server's p99
            # latency was 10x its own, in 10-26 ms collections).
            scope.pop(_STATE_KEY, None)

    def _start_up(self) -> None:
        """Install the meter's hooks now, and wrap numpy's data handler,
        rather than in the first request (where numpy imported by that
        request would not be metered until the next scope)."""
        self._ready = True
        if (
            self.preload_numpy
            and "numpy" not in sys.modules
            and importlib.util.find_spec("numpy") is not None
        ):
            import numpy  # noqa: F401 - imported to be metered

        with ml.limit_scope():
            pass  # installs the hooks, and wraps numpy's handler if imported
        if "numpy" in sys.modules and not ml.stats().numpy_buffers_metered:
            self.logger.warning(
                "numpy's array buffers are not metered (numpy older than "
                "1.22, or its default data handler was replaced)"
            )

    def _current_sweeper(self) -> _Sweeper:
        loop = asyncio._get_running_loop()
        key: object = loop
        if loop is None:
            import trio

            key = trio.lowlevel.current_trio_token()
        if key is self._sweeper_key and self._sweeper is not None:
            return self._sweeper
        sweeper = self._sweepers.get(key)
        if sweeper is None:
            sweeper = _AsyncioSweeper(loop) if loop is not None else _TrioSweeper()
            # Old loops (tests run many) are dropped with their sweepers.
            self._sweepers = {
                each: old for each, old in self._sweepers.items() if old.running
            }
            self._sweepers[key] = sweeper
        self._sweeper_key, self._sweeper = key, sweeper
        return sweeper

    def _first_byte_breach(self, request: _Request) -> ml.Breach:
        assert request.first_byte is not None
        elapsed = max(time.monotonic() - request.started_at, request.first_byte)
        return ml.Breach(
            ml.BreachKind.TIMEOUT,
            request.first_byte,
            elapsed,
            f"no response within {request.first_byte:g} s ({elapsed:.3g} s elapsed)",
        )

    async def _refuse(self, scope: Scope, request: _Request, breach: ml.Breach) -> None:
        """Answer a request stopped before its response started."""
        try:
            if request.protocol == "websocket":
                await self._close_websocket(request, breach)
                return
            respond = self.error_response(scope, breach)
            await respond(scope, request.receive, request.send)
        except Exception:
            # The client may be gone; the breach is reported all the same.
            self.logger.debug("could not send the error response", exc_info=True)

    async def _close_websocket(self, request: _Request, breach: ml.Breach) -> None:
        # 1013, "try again later": the server is short of what it takes.
        reason = f"{_breach_name(breach)} limit exceeded"
        if breach.kind is ml.BreachKind.TOKEN:
            reason = "cancelled"
        try:
            await request.send(
                {"type": "websocket.close", "code": 1013, "reason": reason}
            )
        except Exception:
            self.logger.debug("could not close the WebSocket", exc_info=True)

    def _route(self, scope: Scope) -> str:
        route = scope.get("route")
        template = getattr(route, "path", None)
        if isinstance(template, str):
            # Inside a Mount, the path is the mount's prefix (root_path, past
            # the app's own) and the route's own template.
            root = scope.get("root_path", "")
            app_root = scope.get("app_root_path", "")
            if isinstance(root, str) and isinstance(app_root, str):
                return (
                    root[len(app_root) :] + template
                    if root.startswith(app_root)
                    else template
                )
            return template
        if self.route_name is not None:
            try:
                name = self.route_name(scope)
            except Exception:
                self.logger.exception("route_name failed")
                name = None
            if isinstance(name, str):
                return name
        path = scope.get("path", "")
        return path if isinstance(path, str) else ""

    def _finish(
        self,
        scope: Scope,
        request: _Request,
        limit_scope: ml.LimitScope,
        breach: ml.Breach | None,
        phase: Phase | None,
    ) -> None:
        duration = time.monotonic() - request.started_at
        usage = limit_scope.usage
        route = self._route(scope)
        if self.stats is not None:
            self.stats.add(route, usage, breach, duration)
        if breach is not None:
            self._log(scope, request, route, usage, breach, phase)
            if self.trimmer is not None and breach.kind in _BYTE_KINDS:
                self.trimmer.request()
        if self.on_finished is not None:
            report = RequestReport(
                route=route,
                method=scope.get("method") if request.protocol == "http" else None,
                path=scope.get("path", ""),
                protocol=request.protocol,
                status=request.status,
                breach=breach,
                phase=phase,
                usage=usage,
                duration=duration,
                disconnected=request.disconnected and not request.complete,
                scope=scope,
            )
            try:
                self.on_finished(report)
            except Exception:
                self.logger.exception("on_finished failed")

    def _log(
        self,
        scope: Scope,
        request: _Request,
        route: str,
        usage: ml.Usage,
        breach: ml.Breach,
        phase: Phase | None,
    ) -> None:
        method = scope.get("method", "WEBSOCKET")
        kind = _breach_name(breach)
        fields = {
            "route": route,
            "method": method,
            "kind": kind,
            "limit": breach.limit,
            "observed": breach.observed,
            "phase": phase,
            "status": request.status,
            "live": usage.live,
            "peak_live": usage.peak_live,
            "allocated": usage.allocated,
            "reason": breach.reason,
        }
        # A client that went away is routine; a limit is worth a warning.
        gone = breach.kind is ml.BreachKind.TOKEN and request.disconnected
        self.logger.log(
            logging.INFO if gone else logging.WARNING,
            "request stopped: route=%s method=%s kind=%s limit=%s observed=%s "
            "phase=%s status=%s live=%d peak_live=%d allocated=%d reason=%s",
            route,
            method,
            kind,
            _number(breach.limit),
            _number(breach.observed),
            (phase or "-").replace(" ", "-"),
            request.status,
            usage.live,
            usage.peak_live,
            usage.allocated,
            json.dumps(breach.reason),
            extra={"memlimits_async": fields},
        )


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.3g}"
    return str(int(value))


def _first_leaf(group: BaseExceptionGroup[ml.LimitReached]) -> ml.LimitReached:
    first = group.exceptions[0]
    return first if not isinstance(first, BaseExceptionGroup) else _first_leaf(first)


# ---- route budgets ----


def _state_of(scope: Scope, what: str) -> _Request:
    request = scope.get(_STATE_KEY)
    if not isinstance(request, _Request):
        raise RuntimeError(
            f"{what} needs memlimits_async.asgi.BudgetMiddleware around the "
            f"app: it turns their breaches into error responses"
        )
    return request


class RouteBudget:
    """A narrower budget for some routes: a pure ASGI middleware for
    Starlette's ``Route(..., middleware=[Middleware(RouteBudget, memory=
    "20 MiB")])`` (also ``Mount`` and ``WebSocketRoute``), or around any
    ASGI app inside :class:`BudgetMiddleware`.

    It opens a scope of its own inside the request's: usage is charged to
    both, so it can only narrow the middleware's budget, never widen it.  It
    covers the whole route, streamed body included.  Its breach reaches the
    middleware as a ``LimitReached``, which answers or aborts the request
    like any breach.

    :param memory, allocations, timeout, preempt: as in ``limit_scope``; or
        ``budget=ml.Budget(...)``.
    :param stream_timeout: as in :class:`BudgetMiddleware`: ``timeout`` is
        then the time to the first byte.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        memory: int | str | None = None,
        allocations: int | str | None = None,
        timeout: float | None = None,
        stream_timeout: float | None = None,
        preempt: float | bool | None = None,
        budget: ml.Budget | None = None,
    ) -> None:
        if not callable(app):
            raise TypeError(f"app must be an ASGI app, not {type(app).__name__}")
        self.app = app
        self.budget, self._first_byte = _policy(
            memory, allocations, timeout, stream_timeout, preempt, budget
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request = _state_of(scope, "RouteBudget")
        if self._first_byte is not None:
            request.narrow_first_byte(self._first_byte)
        with request.route_scope(self.budget):
            await self.app(scope, receive, send)


async def _release_on_failure(request: _Request) -> None:
    """The app failed otherwise than by a breach after answering a route's
    breach itself: its answer goes out, as it would without us."""
    if request.withheld is not None:
        try:
            await request.release_withheld()
        except Exception:
            request.withheld = None  # the client is gone: the failure stands


def budget_dependency(
    *,
    memory: int | str | None = None,
    allocations: int | str | None = None,
    timeout: float | None = None,
    stream_timeout: float | None = None,
    preempt: float | bool | None = None,
    budget: ml.Budget | None = None,
) -> Callable[[HTTPConnection], AsyncIterator[None]]:
    """A FastAPI dependency that narrows the request's budget for a route:
    ``@app.get("/report", dependencies=[Depends(budget_dependency(memory=
    "20 MiB"))])`` (or on an ``APIRouter`` for a group of routes).

    Like :class:`RouteBudget`: a scope inside the request's, that covers the
    endpoint and the response (FastAPI ends dependencies with ``yield``
    after the response is sent), whose breach reaches
    :class:`BudgetMiddleware` as a ``LimitReached``.
    """
    from starlette.requests import HTTPConnection

    route_budget, first_byte = _policy(
        memory, allocations, timeout, stream_timeout, preempt, budget
    )

    async def budget_dependency(connection: HTTPConnection) -> AsyncIterator[None]:
        request = _state_of(connection.scope, "budget_dependency")
        if first_byte is not None:
            request.narrow_first_byte(first_byte)
        with request.route_scope(route_budget):
            yield

    # The annotation FastAPI reads, as a class (this module's annotations
    # are strings, which it would resolve in this module's globals).
    budget_dependency.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(
                "connection",
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                annotation=HTTPConnection,
            )
        ]
    )
    return budget_dependency


P = ParamSpec("P")
T = TypeVar("T")


def preemptible(function: Callable[P, T]) -> Callable[P, Awaitable[T]]:
    """Run a synchronous endpoint through ``ml.run_sync`` instead of the
    framework's threadpool, so that it is preempted when the request's
    budget is breached on every Python version.

    ``@app.get("/x") @preemptible def endpoint(...)`` (FastAPI), or
    ``Route("/x", preemptible(endpoint))`` (Starlette).  The result is a
    coroutine function with the same signature.  On Python 3.12 and later,
    work in the frameworks' own threadpool is preempted too (when the
    request's scope owns the task that awaits it, as
    :class:`BudgetMiddleware`'s does); on 3.11 only ``ml.run_sync``'s
    workers are.
    """
    if not callable(function):
        raise TypeError(f"function must be callable, not {type(function).__name__}")
    if inspect.iscoroutinefunction(function):
        raise TypeError("preemptible() is for synchronous functions")

    @functools.wraps(function)
    async def run(*args: P.args, **kwargs: P.kwargs) -> T:
        return await ml.run_sync(functools.partial(function, *args, **kwargs))

    return run
