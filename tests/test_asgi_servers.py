"""memlimits_async.asgi under real servers on 127.0.0.1: uvicorn (asyncio's
loop and uvloop) and hypercorn (asyncio and trio workers), driven by httpx
and a WebSocket client.  The app is tests/asgi_server.py.

No test times anything: waits are bounded loops for an event the server
records (a request started, a report written), and what is asserted is what
happened (status codes, breach kinds, how far a handler got).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("hypercorn")
websockets_sync = pytest.importorskip("websockets.sync.client")

import memlimits_async as ml  # noqa: E402

TESTS = Path(__file__).resolve().parent
SERVER_SCRIPT = TESTS / "asgi_server.py"
MIB = 1 << 20
LIMIT = 40 * MIB  # the app's BudgetMiddleware(memory=...)
SMALL_LIMIT = 8 * MIB  # its /small-hog route's RouteBudget
PATIENCE = 120.0  # seconds any awaited event may take on a loaded machine

SERVERS = [
    ("uvicorn", "asyncio"),
    ("uvicorn", "uvloop"),
    ("hypercorn", "asyncio"),
    ("hypercorn", "trio"),
]
# Worker threads of anyio's threadpool are preempted on 3.12 and later
# (docs/preemption.md, Threads); on 3.11 only ml.run_sync's are.
THREADPOOL_PREEMPTED = sys.version_info >= (3, 12)


class Server:
    """A server process serving tests/asgi_server.py on 127.0.0.1."""

    def __init__(self, server: str, loop: str, env: dict[str, str] | None = None):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            "w+", prefix=f"asgi-{server}-{loop}-", suffix=".log"
        )
        package_parent = str(Path(ml.__file__).resolve().parent.parent)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-P",
                str(SERVER_SCRIPT),
                "--server",
                server,
                "--loop",
                loop,
                "--fd",
                str(listener.fileno()),
            ],
            pass_fds=[listener.fileno()],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join([package_parent, str(TESTS)]),
                **(env or {}),
            },
        )
        listener.close()
        try:
            self._wait_until_it_answers()
            # Its descriptors before any test: the listening socket, the
            # log, the loop's own.
            self.fds_at_start = self.health()["fds"]
        except BaseException:
            self.stop()
            raise

    def _wait_until_it_answers(self) -> None:
        deadline = time.monotonic() + PATIENCE
        while True:
            try:
                self.get("/ok").raise_for_status()
                return
            except httpx.TransportError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    message = f"the server did not start:\n{self.output()}"
                    raise RuntimeError(message) from None
                time.sleep(0.05)

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def get(self, path: str, test_id: str | None = None) -> Any:
        # Connection: close, so that the server does not keep a connection
        # per call open for its keep-alive timeout (hypercorn does).
        headers = {"connection": "close"}
        if test_id:
            headers["x-test-id"] = test_id
        return httpx.get(self.url(path), headers=headers, timeout=PATIENCE)

    def events(self, test_id: str) -> list[list[Any]]:
        response = self.get(f"/_events/{test_id}")
        response.raise_for_status()
        events: list[list[Any]] = response.json()
        return events

    def wait_for(self, test_id: str, what: str) -> list[Any]:
        """The first event ``what`` recorded for ``test_id``, waiting for
        it as long as it takes (within PATIENCE)."""
        deadline = time.monotonic() + PATIENCE
        while True:
            for event in self.events(test_id):
                if event[0] == what:
                    return event
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what!r} for {test_id}:\n{self.output()}")
            time.sleep(0.02)

    def report(self, test_id: str) -> dict[str, Any]:
        report: dict[str, Any] = self.wait_for(test_id, "report")[1]
        return report

    def health(self, collect: bool = False) -> dict[str, Any]:
        """The server's descriptors, threads, accounts, memory, route
        stats; ``collect``: after a garbage collection."""
        health: dict[str, Any] = self.get(
            "/_health?collect=1" if collect else "/_health"
        ).json()
        return health

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="module", params=SERVERS, ids=lambda s: f"{s[0]}-{s[1]}")
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    served = Server(*request.param)
    try:
        yield served
    finally:
        served.stop()


def new_id() -> str:
    return uuid.uuid4().hex


def gather(*requests: tuple[str, str | None]) -> list[Any]:
    """GET each (url, test id) at once; the responses in order.  A request
    without a test id leaves nothing in the server's records."""

    async def run() -> list[Any]:
        async with httpx.AsyncClient(
            timeout=PATIENCE, limits=httpx.Limits(max_connections=None)
        ) as client:
            return list(
                await asyncio.gather(
                    *(
                        client.get(
                            url, headers={"x-test-id": test_id} if test_id else {}
                        )
                        for url, test_id in requests
                    )
                )
            )

    return asyncio.run(run())


def assert_stopped_near(
    report: dict[str, Any], limit: int, kind: str, asked: int | None = None
) -> None:
    """The request was stopped by its ``kind`` limit, near it: the
    sampling's error at this limit is a few per cent, and a handler that
    awaits between 1 MiB chunks is cancelled at the next chunk.  One that
    never awaits (``asked``: the MiB it asked for) runs on for its
    preemption grace, 0.05 s of its CPU time (~100 MB at 2 GB/s), and for
    as long as the delivery thread waits for the GIL on a loaded machine:
    that it was stopped before it had all it asked for is what holds."""
    assert report["kind"] == kind, report
    assert report["limit"] == limit, report
    if asked is None:
        assert report["peak_live"] <= 2 * limit, report
    else:
        assert report["peak_live"] < asked * MIB, report


# ---- memory hogs and normal requests side by side ----


def test_hogs_get_the_error_response_and_normal_requests_succeed(
    server: Server,
) -> None:
    before = server.health()
    hogs = [(server.url("/hog?mb=400"), new_id()) for _ in range(6)]
    normal = [(server.url("/ok"), new_id()) for _ in range(30)]
    responses = gather(*hogs, *normal)
    for response, (_, test_id) in zip(responses[: len(hogs)], hogs, strict=True):
        assert response.status_code == 503, response.text
        assert response.headers["memlimits-breach"] == "memory"
        assert response.json()["breach"] == "memory"
        report = server.report(test_id)
        assert report["phase"] == "before response"
        assert report["status"] == 503
        assert_stopped_near(report, LIMIT, "MEMORY")
        assert not any(e[0] == "held" for e in server.events(test_id))
    for response in responses[len(hogs) :]:
        assert response.status_code == 200
        assert response.text == "ok"
    # 6 hogs of 400 MiB would need 2.4 GB; stopped at 40 MiB each, the
    # server never held much more than 6 x 40 MiB above what it had.
    growth = server.health()["peak_rss"] - before["rss"]
    assert growth < 6 * LIMIT + 200 * MIB, growth


def test_a_route_budget_narrows_the_middleware_budget(server: Server) -> None:
    test_id = new_id()
    response = server.get("/small-hog?mb=400", test_id)
    assert response.status_code == 503
    report = server.report(test_id)
    assert_stopped_near(report, SMALL_LIMIT, "MEMORY")
    assert report["route"] == "/small-hog"


# ---- client disconnects ----


def test_a_client_disconnect_stops_the_handler(server: Server) -> None:
    test_id = new_id()

    async def go_away() -> None:
        async with httpx.AsyncClient(timeout=PATIENCE) as client:
            request = asyncio.ensure_future(
                client.get(server.url("/wait"), headers={"x-test-id": test_id})
            )
            while not any(e[0] == "started" for e in server.events(test_id)):
                await asyncio.sleep(0.02)
            request.cancel()  # httpx closes the connection
            with pytest.raises(asyncio.CancelledError):
                await request

    asyncio.run(go_away())
    report = server.report(test_id)
    # Its handler waits for 1000 s unless cancelled: a report means it was.
    assert report["kind"] == "TOKEN", report
    assert report["reason"] == "token cancelled: client disconnected"
    assert report["phase"] == "before response"
    assert report["disconnected"] is True
    assert report["status"] is None  # nothing was sent to a client gone
    assert server.get("/ok").status_code == 200


def test_the_disconnect_after_a_complete_response_cancels_nothing(
    server: Server,
) -> None:
    # uvicorn and hypercorn report a disconnect to a receive that waits
    # when the response is complete; the handler's background work goes on.
    test_ids = [new_id() for _ in range(5)]
    responses = gather(*((server.url("/background"), test_id) for test_id in test_ids))
    assert all(r.text == "answered" for r in responses)
    for test_id in test_ids:
        report = server.report(test_id)
        assert report["kind"] is None, report
        assert report["disconnected"] is False
        assert any(e[0] == "background done" for e in server.events(test_id))


# ---- code that never awaits ----


def test_a_memory_hog_that_never_awaits_is_preempted(server: Server) -> None:
    test_id = new_id()
    response = server.get("/hog?mb=1500&await=0", test_id)
    assert response.status_code == 503, response.text
    assert_stopped_near(server.report(test_id), LIMIT, "MEMORY", asked=1500)
    assert not any(e[0] == "held" for e in server.events(test_id))
    assert server.get("/ok").status_code == 200


def test_a_cpu_bound_handler_is_preempted_at_its_timeout(server: Server) -> None:
    # Its loop runs for hours unless preempted (issue 20 point 9: the public
    # memlimits_async.asgi is not framework code, so the endpoint it calls
    # can be interrupted).
    test_id = new_id()
    response = server.get("/spin", test_id)
    assert response.status_code == 503
    assert response.headers["memlimits-breach"] == "timeout"
    report = server.report(test_id)
    assert report["kind"] == "TIMEOUT"
    assert report["phase"] == "before response"
    assert server.get("/ok").status_code == 200


# ---- streaming ----


def test_a_breach_mid_stream_ends_the_response_cleanly(server: Server) -> None:
    test_id = new_id()
    received = b""
    with httpx.Client(timeout=PATIENCE) as client:
        with client.stream(
            "GET", server.url("/stream-hog"), headers={"x-test-id": test_id}
        ) as response:
            assert response.status_code == 200
            # The connection is closed before the body is complete.
            with pytest.raises(httpx.RemoteProtocolError):
                for chunk in response.iter_bytes():
                    received += chunk
    assert received.startswith(b"chunk\nchunk\nchunk\n")
    report = server.report(test_id)
    assert report["phase"] == "streaming"
    assert report["status"] == 200
    assert_stopped_near(report, LIMIT, "MEMORY")
    assert server.get("/ok").status_code == 200
    output = server.output()
    # One line from the middleware, nothing from the server.
    assert output.count("request stopped: route=/stream-hog") == 1, output
    assert "without completing response" not in output, output
    assert "Exception in ASGI application" not in output, output
    assert "Error in ASGI Framework" not in output, output


def test_the_time_to_the_first_byte_and_the_whole_stream(server: Server) -> None:
    late, streamed = new_id(), new_id()
    responses = gather(
        (server.url("/late"), late), (server.url("/long-stream"), streamed)
    )
    assert responses[0].status_code == 503
    assert responses[0].headers["memlimits-breach"] == "timeout"
    report = server.report(late)
    assert report["kind"] == "TIMEOUT"
    assert report["reason"].startswith("no response within 0.3 s")
    assert report["limit"] == 0.3
    # Started at once, then streamed past 0.3 s: within its stream_timeout.
    assert responses[1].status_code == 200
    assert responses[1].text == "tick\n" * 20
    assert server.report(streamed)["kind"] is None


# ---- synchronous endpoints (the threadpool) ----


# After /sync-hog has freed its 1000 MiB, glibc recycles that memory for
# /sync-hog-preemptible at many GB/s, fast enough to build all of it within
# the 0.05 s grace; the overrun rule (docs/preemption.md) stops it near the
# limit all the same (docs/asgi.md, Limits).


@pytest.mark.parametrize(
    "route",
    [
        "/sync-hog",
        "/sync-hog-preemptible",
    ],
)
def test_sync_endpoints_are_charged_and_stopped(server: Server, route: str) -> None:
    test_id = new_id()
    response = server.get(f"{route}?mb=1000", test_id)
    assert response.status_code == 503, response.text
    report = server.report(test_id)
    assert report["kind"] == "MEMORY"
    progress = next(e[1][0] for e in server.events(test_id) if e[0] == "progress")
    # Stopped in its thread, near the limit: each chunk is a request of
    # 1 MiB and a byte, and the first that would pass the limit is refused
    # (a MemoryError in the thread; docs/limit-scope.md), on 3.11 too, where
    # anyio's worker threads are not preempted (docs/asgi.md); a handler
    # that missed the refusal by sampling is preempted (3.12 on).
    assert progress < 1000, progress
    assert_stopped_near(report, LIMIT, "MEMORY", asked=1000)


# ---- WebSockets ----


def test_websockets_have_their_own_budget(server: Server) -> None:
    with websockets_sync.connect(server.url("/ws-echo", "ws")) as connection:
        for text in ("a", "b" * 1000, "c"):
            connection.send(text)
            assert connection.recv() == text
    with websockets_sync.connect(server.url("/ws-hog", "ws")) as connection:
        replies = 0
        with pytest.raises(Exception) as closed:
            for _ in range(100):  # 16 MiB more each: past 40 MiB by the 4th
                connection.send("more")
                connection.recv()
                replies += 1
        assert replies < 10
    error = closed.value
    assert getattr(error, "rcvd", None) is not None, repr(error)
    assert error.rcvd.code == 1013  # type: ignore[attr-defined]
    assert error.rcvd.reason == "memory limit exceeded"  # type: ignore[attr-defined]
    stats = server.health()["stats"]
    assert stats["/ws-hog"]["breaches"].get("memory", 0) >= 1


# ---- hundreds of breached requests ----


def test_nothing_leaks_over_hundreds_of_breached_requests(server: Server) -> None:
    def batches(count: int) -> None:
        for _ in range(count):
            # No test ids: the app would keep its records of each request,
            # which were allocated inside the request's scope.
            responses = gather(
                *((server.url("/small-hog?mb=100"), None) for _ in range(20))
            )
            assert all(r.status_code == 503 for r in responses)

    def settled() -> dict[str, Any]:
        """The server's figures once the connections of the batches are
        closed: hypercorn keeps a connection the client closed for its
        keep-alive timeout (5 s), and what a request allocated for its
        connection keeps that request's account alive until then.  A leak
        is what a garbage collection does not free: a breached scope and
        its preemption request are a small reference cycle, which holds
        the scope's account until the next collection."""
        deadline = time.monotonic() + PATIENCE
        while True:
            health = server.health(collect=True)
            if health["fds"] <= server.fds_at_start + 2:
                return health
            if time.monotonic() > deadline:
                raise AssertionError(f"descriptors left open: {health}")
            time.sleep(0.2)

    # The first of everything (caches, the threadpool's threads, the
    # sweeper), then 200 more.
    batches(5)
    before = settled()
    batches(10)
    after = settled()
    assert after["stats"]["/small-hog"]["breaches"]["memory"] >= 300
    assert after["threads"] <= before["threads"] + 2, (before, after)
    # Accounts live on while sampled blocks they were charged are alive
    # (an entry a request added to a cache): a few, not one per request.
    assert after["live_accounts"] <= before["live_accounts"] + 50, (before, after)


# ---- numpy ----


@pytest.mark.parametrize("served", [("uvicorn", "asyncio"), ("hypercorn", "trio")])
def test_numpy_is_metered_from_the_first_request(served: tuple[str, str]) -> None:
    pytest.importorskip("numpy")
    fresh = Server(*served)
    try:
        # Imported and wrapped at start-up (lifespan), before any request.
        health = fresh.health()
        assert health["numpy_imported"] and health["numpy_metered"], health
        # The app imports numpy only inside this route: its arrays are
        # metered from the first request on (without the start-up wrap the
        # first request allocates its 320 MiB unmetered).
        test_id = new_id()
        response = fresh.get("/numpy-first", test_id)
        assert fresh.wait_for(test_id, "metered at entry")[1] is True
        assert response.status_code == 503, response.text
        assert_stopped_near(fresh.report(test_id), LIMIT, "MEMORY")
    finally:
        fresh.stop()


def test_server_log_lines_are_structured(server: Server) -> None:
    test_id = new_id()
    assert server.get("/hog?mb=400", test_id).status_code == 503
    server.report(test_id)
    lines = [
        line
        for line in server.output().splitlines()
        if "request stopped: route=/hog " in line
    ]
    assert lines
    before_reason = lines[-1].split("request stopped: ", 1)[1].split(" reason=")[0]
    fields = dict(part.split("=", 1) for part in before_reason.split())
    assert fields["kind"] == "memory"
    assert fields["limit"] == str(LIMIT)
    assert fields["phase"] == "before-response"
    assert int(fields["peak_live"]) > 0
    reason = json.loads(lines[-1].split(" reason=", 1)[1])
    assert reason.startswith("memory limit of 40 MiB exceeded")
