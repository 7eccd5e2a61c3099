"""A TCP server with one cancel token and one memory budget per request.

Each connection carries one request.  The server runs it inside
``ml.limit_scope(token=token, memory=...)``, where ``token`` is a child of the
server's token, kept in a table under the request's name.  So a request is
stopped when

* its client disconnects: a reader task watches the connection and cancels
  the token with the reason "client disconnected" (``TOKEN``);
* it holds more memory than its budget (``MEMORY``);
* an administrator cancels it by name from another connection (``TOKEN``);
* the server shuts down: cancelling the server's token cancels every
  request's token at once (``TOKEN``).

One request per connection, one line each way (a request is acknowledged
with ``ACCEPTED <name>`` once it is in the table)::

    WORK <name> <rounds>     compute for a while    -> DONE <name> <result>
    LEAK <name>              hold ever more memory  -> STOPPED <name> MEMORY <reason>
    CANCEL <name> <reason>   (admin) cancel a request in flight -> CANCELLED <name>

A stopped request replies ``STOPPED <name> <KIND> <reason>``.  A client keeps
its connection open until it has its reply: closing it earlier means "I am
gone, stop working for me".

``main()`` starts the server on 127.0.0.1 (an ephemeral port), plays a script
of clients against it, shuts it down and exits.  Each line of output is one
event; the server reports how each request ended as
``request <name>: finished ...`` or
``request <name>: stopped <KIND> (<reason>), peak <peak live bytes>``.

Run:  python examples/server_tokens.py [--backend asyncio|trio]
"""

from __future__ import annotations

import argparse
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
from anyio.abc import Listener, SocketAttribute, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

import memlimits_async as ml

KIB = 1024
HOST = "127.0.0.1"
MEMORY_BUDGET = "4 MiB"  # per request
LEAK_CHUNK = 64 * KIB
LEAK_GIVES_UP_AT = 256  # chunks (16 MiB): a safety net, the budget stops it first
FOREVER = 10**9  # rounds of WORK: a request that only a cancellation ends
MAX_LINE = 1024

CLIENT_DISCONNECTED = "client disconnected"
ADMIN_REASON = "too slow, cancelled by an administrator"
SHUTDOWN_REASON = "server shutting down"
SCRIPT_TIMEOUT = 60  # seconds for the whole script; only a bug comes near it


def log(message: str) -> None:
    print(message, flush=True)


# ---- the work a request does ----


async def work(rounds: int) -> str:
    """Compute for ``rounds`` rounds, with a checkpoint after each.

    Each round builds a list of 1000 numbers and keeps the last 32 lists (a
    sliding window), so a request holds about 1 MiB however long it runs.
    """
    window: deque[list[int]] = deque(maxlen=32)
    total = 0
    for round_number in range(rounds):
        numbers = list(range(round_number * 1000, (round_number + 1) * 1000))
        window.append(numbers)
        total += sum(numbers)
        await anyio.sleep(0.001)
    return f"{rounds} rounds, sum {total}"


async def leak() -> str:
    """Hold ever more memory, until the budget stops it."""
    held: list[bytes] = []
    while len(held) < LEAK_GIVES_UP_AT:
        held.append(bytes(LEAK_CHUNK))
        await anyio.sleep(0.001)
    return f"held {ml.format_size(LEAK_GIVES_UP_AT * LEAK_CHUNK)}, never stopped"


# ---- the server ----


class Connection:
    """A line-based view of a TCP stream (used at both ends)."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.received = BufferedByteReceiveStream(stream)

    async def send_line(self, line: str) -> None:
        await self.stream.send(line.encode() + b"\n")

    async def receive_line(self) -> str:
        return (await self.received.receive_until(b"\n", MAX_LINE)).decode()

    async def wait_until_peer_leaves(self) -> None:
        """Return when the peer closes the connection or it breaks.

        Whatever else the peer sends meanwhile is read and ignored.
        """
        try:
            while True:
                await self.received.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return


class Server:
    """Runs each request under a child of ``self.token`` and a memory budget."""

    def __init__(self, memory: str) -> None:
        self.memory = memory
        self.token = ml.CancelToken()
        # name -> token of each request in flight, for CANCEL <name>
        self.in_flight: dict[str, ml.CancelToken] = {}
        self._ended: dict[str, anyio.Event] = {}

    async def serve(self, listener: Listener[SocketStream]) -> None:
        async with listener:
            await listener.serve(self.handle)

    def shut_down(self) -> None:
        """Cancel every request in flight, and every request to come."""
        log(f"server: cancelling the server token ({SHUTDOWN_REASON})")
        self.token.cancel(SHUTDOWN_REASON)

    async def request_ended(self, name: str) -> None:
        """Wait until the request ``name`` has ended and its end is logged."""
        await self._ended_event(name).wait()

    def _ended_event(self, name: str) -> anyio.Event:
        if name not in self._ended:
            self._ended[name] = anyio.Event()
        return self._ended[name]

    async def handle(self, stream: SocketStream) -> None:
        """One connection: one request line, answered."""
        async with stream:
            connection = Connection(stream)
            try:
                line = await connection.receive_line()
                match line.split(" ", 2):
                    case ["WORK", name, rounds] if rounds.isdecimal():
                        count = int(rounds)
                        await self.run_request(
                            connection, name, f"WORK {count}", lambda: work(count)
                        )
                    case ["LEAK", name]:
                        await self.run_request(connection, name, "LEAK", leak)
                    case ["CANCEL", name, reason]:
                        await self.cancel_request(connection, name, reason)
                    case _:
                        log(f"server: bad request {line!r}")
                        await connection.send_line("ERROR bad request")
            except (
                anyio.EndOfStream,
                anyio.IncompleteRead,
                anyio.DelimiterNotFound,
                anyio.BrokenResourceError,
            ) as exc:
                log(f"server: dropped a connection ({type(exc).__name__})")

    async def run_request(
        self,
        connection: Connection,
        name: str,
        what: str,
        job: Callable[[], Awaitable[str]],
    ) -> None:
        if name in self.in_flight:
            await connection.send_line(f"ERROR {name} is already in flight")
            return
        try:
            reply = await self.run_watched(connection, name, what, job)
        finally:
            self._ended_event(name).set()
        if reply is not None:
            await connection.send_line(reply)

    async def run_watched(
        self,
        connection: Connection,
        name: str,
        what: str,
        job: Callable[[], Awaitable[str]],
    ) -> str | None:
        """Run the job under the request's token and budget, log how it
        ended, and return the reply (None if the client is gone)."""
        token = self.token.child()
        self.in_flight[name] = token
        try:
            log(f"request {name}: started {what}, memory budget {self.memory}")
            await connection.send_line(f"ACCEPTED {name}")
            result = ""
            async with anyio.create_task_group() as watcher:
                watcher.start_soon(self.watch_client, connection, name, token)
                async with ml.limit_scope(token=token, memory=self.memory) as scope:
                    result = await job()
                # Stop watching before replying: a client that closes its
                # connection once it has its reply cancels nothing.
                watcher.cancel_scope.cancel()
        finally:
            del self.in_flight[name]

        peak = ml.format_size(scope.usage.peak_live)
        if scope.breach is None:
            log(f"request {name}: finished ({result}), peak {peak}")
            return f"DONE {name} {result}"
        kind, reason = scope.breach.kind.name, scope.breach.reason
        log(f"request {name}: stopped {kind} ({reason}), peak {peak}")
        if token.reason == CLIENT_DISCONNECTED:
            return None  # nobody to tell
        return f"STOPPED {name} {kind} {reason}"

    async def watch_client(
        self, connection: Connection, name: str, token: ml.CancelToken
    ) -> None:
        """The client went away: stop the work done on its behalf."""
        await connection.wait_until_peer_leaves()
        log(f"request {name}: the client disconnected, cancelling its token")
        token.cancel(CLIENT_DISCONNECTED)

    async def cancel_request(
        self, connection: Connection, name: str, reason: str
    ) -> None:
        token = self.in_flight.get(name)
        if token is None:
            log(f"admin: no request {name} in flight")
            await connection.send_line(f"UNKNOWN {name}")
            return
        log(f"admin: cancelling request {name} ({reason})")
        token.cancel(reason)
        await connection.send_line(f"CANCELLED {name}")


# ---- the scripted clients ----


@asynccontextmanager
async def connect(port: int) -> AsyncIterator[Connection]:
    async with await anyio.connect_tcp(HOST, port) as stream:
        yield Connection(stream)


async def send(connection: Connection, who: str, request: str) -> None:
    """Send a request and wait for the server to accept it."""
    log(f"client {who}: sends {request!r}")
    await connection.send_line(request)
    if not request.startswith("CANCEL"):
        acknowledgement = await connection.receive_line()
        if acknowledgement.split() != ["ACCEPTED", who]:
            raise RuntimeError(f"{who}: unexpected {acknowledgement!r}")


async def receive_reply(connection: Connection, who: str) -> str:
    reply = await connection.receive_line()
    log(f"client {who}: got {reply!r}")
    return reply


async def play_clients(port: int, server: Server) -> None:
    log("== 1. a normal request")
    async with connect(port) as client:
        await send(client, "normal", "WORK normal 40")
        await receive_reply(client, "normal")

    log("== 2. a client that disconnects in the middle of its request")
    async with connect(port) as client:
        await send(client, "abandoned", f"WORK abandoned {FOREVER}")
        log("client abandoned: disconnects")
    await server.request_ended("abandoned")

    log("== 3. a leaky request, and 4. a normal one beside it")
    async with connect(port) as steady, connect(port) as leaky:
        await send(steady, "concurrent", "WORK concurrent 300")
        await send(leaky, "leaky", "LEAK leaky")
        await receive_reply(leaky, "leaky")
        await receive_reply(steady, "concurrent")

    log("== 5. an administrator cancels a long request by name")
    async with connect(port) as client:
        await send(client, "long", f"WORK long {FOREVER}")
        async with connect(port) as admin:
            await send(admin, "admin", f"CANCEL long {ADMIN_REASON}")
            await receive_reply(admin, "admin")
        await receive_reply(client, "long")

    log("== 6. shutdown: the server token cancels what is still in flight")
    async with connect(port) as client:
        await send(client, "late", f"WORK late {FOREVER}")
        server.shut_down()
        await receive_reply(client, "late")


async def main(backend: str = "asyncio") -> None:
    server = Server(memory=MEMORY_BUDGET)
    listener = await anyio.create_tcp_listener(local_host=HOST, local_port=0)
    port = listener.extra(SocketAttribute.local_port)
    log(f"server: listening on {HOST}:{port} ({backend})")
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, listener)
        with anyio.fail_after(SCRIPT_TIMEOUT):
            await play_clients(port, server)
        tg.cancel_scope.cancel()
    log("server: stopped")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    backend = parser.parse_args().backend
    anyio.run(main, backend, backend=backend)
