"""What ``memlimits_async.asgi.BudgetMiddleware`` costs a real server, and
what memory a server keeps after many breached requests.

Run ``python benchmarks/asgi.py`` (``--quick`` for a smoke run).  Needs
uvicorn and starlette (the ``test`` extra), and ``wrk`` for the load
(``apt-get install wrk``); without wrk an httpx load loop stands in, which
cannot load the server fully (see below).

Throughput (the default): one uvicorn process per variant of the same
Starlette app, each on 127.0.0.1 with one worker, all started at once and
loaded one after the other, in an order rotated from round to round:

* ``bare`` (the denominator): the app alone;
* ``move_on_after``: each request inside ``anyio.move_on_after(30)`` in a
  pure ASGI middleware, what users write without this package;
* ``limit_scope``: inside ``ml.limit_scope(budget=...)`` in a pure ASGI
  middleware, with no token and no disconnect watch: the core's own cost;
* ``BudgetMiddleware``: behind ``BudgetMiddleware(memory="100 MiB",
  allocations="2 GiB", timeout=30)``: a scope, a disconnect token, the
  wrapped ``receive`` and ``send``, the sweeper (and, numpy being
  installed, numpy imported at start-up);
* ``BudgetMiddleware, no numpy``: the same with ``preload_numpy=False``.

Each measurement is ``wrk -t1 -c16 -d4s --latency`` after a 1 s warm-up:
requests per second, the 99th percentile latency, and the server's CPU time
per request (``/proc/PID/stat``, which a busy machine disturbs less than
wall-clock throughput).  Ratios are taken within a round, to ``bare``;
printed as ``median [min-max]`` over rounds.  The issue's targets:
``BudgetMiddleware`` throughput >= 0.85x and p99 <= 1.2x.

``--rss``: a uvicorn server with ``BudgetMiddleware(memory="50 MiB")``
serves N requests (default 200, 8 at a time) that each try to hold 500 MB
(in 1 MiB chunks, or as small objects), so every one is stopped near
50 MiB; the server's resident set size before, right after and 2 s after,
and its peak, with and without ``trim_memory=True``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from _package import REPO_ROOT, ml, ratio_target, verdict

VARIANTS = (
    "bare",
    "move_on_after",
    "limit_scope",
    "BudgetMiddleware",
    "BudgetMiddleware, no numpy",
)
THROUGHPUT_TARGET = 0.85
P99_TARGET = 1.2
ROUTES = {
    "plaintext": "/plaintext",
    "json": "/json",
    "page": "/page",
}

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]


# ---- the server side (run as ``--serve VARIANT``) ----


def make_app(variant: str, trim: bool = False, framework: str = "starlette") -> ASGIApp:
    import anyio
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    from memlimits_async.asgi import BudgetMiddleware

    items = [
        {"id": i, "name": f"item {i}", "price": i * 1.25, "tags": ["a", "b"]}
        for i in range(100)
    ]

    async def plaintext(request: Request) -> Response:
        return PlainTextResponse("Hello, world!")

    async def json_route(request: Request) -> Response:
        return JSONResponse({"message": "Hello, world!"})

    async def page(request: Request) -> Response:
        return JSONResponse({"items": items, "count": len(items)})

    async def hog(request: Request) -> Response:
        # Tries to hold 500 MB (or, with fit=1, about 40 MB: within the
        # budget), in 1 MiB chunks or as small objects (about 200 bytes
        # each, with their share of the list).
        held: list[object] = []
        fits = request.query_params.get("fit") == "1"
        if request.query_params.get("kind") == "objects":
            for i in range(100_000 if fits else 2_500_000):
                held.append({"index": i, "name": f"row {i}", "values": [i, i]})
                if i % 1000 == 0:
                    await anyio.sleep(0)
        else:
            for _ in range(40 if fits else 500):
                held.append(bytearray(1 << 20))
                await anyio.sleep(0)
        return PlainTextResponse(f"held {len(held)}")

    middleware_of: list[Any] = []
    lag = {"max": 0.0}
    monitors: list[object] = []

    async def watch_the_loop() -> None:
        # The loop's longest stall (a trim's arena lock shows here).
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            lag["max"] = max(lag["max"], time.perf_counter() - started - 0.001)

    async def rss(request: Request) -> Response:
        if not monitors:
            monitors.append(asyncio.ensure_future(watch_the_loop()))
        max_lag, lag["max"] = lag["max"], 0.0
        status = Path("/proc/self/status").read_text()
        fields = {
            name: int(re.search(rf"^{name}:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]
            for name in ("VmRSS", "VmHWM")
        }
        trimmer = middleware_of[0].trimmer if middleware_of else None
        return JSONResponse(
            {
                # pymalloc's blocks in use: live Python objects, not the
                # memory kept around them.
                "blocks": sys.getallocatedblocks(),
                "rss_kib": fields["VmRSS"],
                "peak_kib": fields["VmHWM"],
                "trims": trimmer.trims if trimmer else 0,
                "max_loop_lag_ms": max_lag * 1000,
                "trim_seconds": trimmer.seconds if trimmer else 0.0,
                "live_accounts": ml.stats().live_accounts,
            }
        )

    app: ASGIApp
    if framework == "fastapi":
        # The same routes as FastAPI path operations, as most users write
        # them: return values serialised by FastAPI, a response model.
        from fastapi import FastAPI
        from pydantic import BaseModel

        class Item(BaseModel):
            id: int
            name: str
            price: float
            tags: list[str]

        class Page(BaseModel):
            items: list[Item]
            count: int

        api = FastAPI()

        @api.get("/plaintext", response_class=PlainTextResponse)
        async def fastapi_plaintext() -> str:
            return "Hello, world!"

        @api.get("/json")
        async def fastapi_json() -> dict[str, str]:
            return {"message": "Hello, world!"}

        @api.get("/page", response_model=Page)
        async def fastapi_page() -> dict[str, Any]:
            return {"items": items, "count": len(items)}

        api.add_route("/hog", hog)
        api.add_route("/rss", rss)
        app = api
    else:
        app = Starlette(
            routes=[
                Route("/plaintext", plaintext),
                Route("/json", json_route),
                Route("/page", page),
                Route("/hog", hog),
                Route("/rss", rss),
            ]
        )
    budget = ml.Budget(memory="100 MiB", allocations="2 GiB", timeout=30)
    inner = app
    if variant == "move_on_after":

        async def move_on_after(scope: Scope, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await inner(scope, receive, send)
                return
            with anyio.move_on_after(30):
                await inner(scope, receive, send)

        app = move_on_after
    elif variant == "limit_scope":

        async def limit_scope(scope: Scope, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await inner(scope, receive, send)
                return
            async with ml.limit_scope(budget=budget):
                await inner(scope, receive, send)

        app = limit_scope
    elif variant in ("BudgetMiddleware", "BudgetMiddleware, no numpy"):
        app = BudgetMiddleware(
            inner,
            memory="100 MiB",
            allocations="2 GiB",
            timeout=30,
            preload_numpy=variant == "BudgetMiddleware",
        )
    elif variant == "rss":
        app = BudgetMiddleware(inner, memory="50 MiB", trim_memory=trim)
        middleware_of.append(app)
    elif variant != "bare":
        raise SystemExit(f"unknown variant {variant}")
    return app


def serve(variant: str, fd: int, loop: str, trim: bool, framework: str) -> None:
    import uvicorn

    config = uvicorn.Config(
        make_app(variant, trim, framework),
        loop=loop,
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    # The listening socket is handed over as a socket (uvicorn's fd= takes
    # any descriptor for a Unix socket, and so leaves Nagle on: 40 ms
    # delayed acknowledgements per request).
    uvicorn.Server(config).run(sockets=[socket.socket(fileno=fd)])


# ---- the load side ----


class Server:
    def __init__(
        self, variant: str, loop: str, trim: bool = False, framework: str = "starlette"
    ) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        fd = self.sock.fileno()
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--serve",
            variant,
            "--fd",
            str(fd),
            "--loop",
            loop,
            "--framework",
            framework,
        ]
        if trim:
            command.append("--trim")
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "benchmarks"))
        self.process = subprocess.Popen(command, pass_fds=[fd], env=env)
        self.sock.close()  # the server holds it now
        self._wait_ready()

    def _wait_ready(self) -> None:
        import httpx

        for _ in range(300):
            try:
                httpx.get(self.url("/plaintext"), timeout=5)
                return
            except httpx.TransportError:
                if self.process.poll() is not None:
                    raise SystemExit("the server died at start-up") from None
                time.sleep(0.1)
        raise SystemExit("the server did not answer within 30 s")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1]
        utime, stime = fields.split()[11:13]
        return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def wrk(url: str, seconds: float, connections: int) -> tuple[int, float, float]:
    """(requests, requests per second, p99 latency in ms)."""
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds:g}s",
            "--latency",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    assert p99 is not None, out
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    return total, rate, float(p99.group(1)) * scale


def httpx_load(url: str, seconds: float, connections: int) -> tuple[int, float, float]:
    """The same figures from an httpx load loop (in this process)."""
    import httpx

    async def run() -> tuple[int, float, float]:
        latencies: list[float] = []
        stop = time.perf_counter() + seconds

        async def client() -> None:
            async with httpx.AsyncClient() as http:
                while time.perf_counter() < stop:
                    started = time.perf_counter()
                    (await http.get(url)).raise_for_status()
                    latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(connections)))
        elapsed = time.perf_counter() - started
        latencies.sort()
        p99 = latencies[int(len(latencies) * 0.99)] * 1000
        return len(latencies), len(latencies) / elapsed, p99

    return asyncio.run(run())


def measure(
    server: Server, path: str, seconds: float, connections: int, load: str
) -> dict[str, float]:
    generate = wrk if load == "wrk" else httpx_load
    generate(server.url(path), 1.0, connections)  # warm-up
    cpu = server.cpu_seconds()
    total, rate, p99 = generate(server.url(path), seconds, connections)
    cpu = server.cpu_seconds() - cpu
    return {"rate": rate, "p99_ms": p99, "cpu_us": cpu / max(total, 1) * 1e6}


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    path = ROUTES[args.route]
    servers = {
        variant: Server(variant, args.loop, framework=args.framework)
        for variant in VARIANTS
    }
    rounds: list[dict[str, dict[str, float]]] = []
    try:
        for round_index in range(args.rounds):
            order = (
                VARIANTS[round_index % len(VARIANTS) :]
                + VARIANTS[: round_index % len(VARIANTS)]
            )
            figures: dict[str, dict[str, float]] = {}
            for variant in order:
                figures[variant] = measure(
                    servers[variant], path, args.duration, args.connections, args.load
                )
                print(
                    f"round {round_index + 1} {variant}: "
                    f"{figures[variant]['rate']:.0f} req/s, "
                    f"p99 {figures[variant]['p99_ms']:.2f} ms, "
                    f"{figures[variant]['cpu_us']:.1f} µs CPU/req",
                    file=sys.stderr,
                )
            rounds.append(figures)
    finally:
        for server in servers.values():
            server.stop()
    rows: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        row: dict[str, Any] = {}
        for key in ("rate", "p99_ms", "cpu_us"):
            row[key] = statistics.median(r[variant][key] for r in rounds)
            ratios = [r[variant][key] / r["bare"][key] for r in rounds]
            row[f"{key}_ratio"] = {
                "median": statistics.median(ratios),
                "min": min(ratios),
                "max": max(ratios),
            }
        rows[variant] = row
    return {"rows": rows, "rounds": rounds}


def print_throughput(args: argparse.Namespace, result: dict[str, Any]) -> None:
    rows = result["rows"]

    def ratio(cell: dict[str, float]) -> str:
        return f"{cell['median']:.3f} [{cell['min']:.3f}-{cell['max']:.3f}]"

    print(
        f"\n### {sys.implementation.name} {sys.version.split()[0]}, "
        f"{args.framework}, uvicorn ({args.loop}, httptools), "
        f"route {ROUTES[args.route]}, load "
        f"{args.load} -c{args.connections} {args.duration:g} s x {args.rounds} "
        f"rounds\n"
    )
    print(
        "| variant | req/s | throughput ratio | p99 ms | p99 ratio | "
        "CPU µs/req | CPU ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for variant in VARIANTS:
        row = rows[variant]
        print(
            f"| {variant} | {row['rate']:.0f} | {ratio(row['rate_ratio'])} | "
            f"{row['p99_ms']:.2f} | {ratio(row['p99_ms_ratio'])} | "
            f"{row['cpu_us']:.1f} | {ratio(row['cpu_us_ratio'])} |"
        )
    budget = rows["BudgetMiddleware"]
    rate = budget["rate_ratio"]["median"]
    p99 = budget["p99_ms_ratio"]["median"]
    met = rate >= THROUGHPUT_TARGET and p99 <= P99_TARGET
    print(
        f"\ntarget (BudgetMiddleware throughput >= {THROUGHPUT_TARGET}x, "
        f"p99 <= {P99_TARGET}x): {verdict(met)} ({rate:.3f}x, {p99:.3f}x)"
    )
    if args.load != "wrk":
        print(
            "note: the httpx load loop cannot load the server fully; read "
            "the CPU ratios"
        )
    result["target"] = {
        "throughput": ratio_target(THROUGHPUT_TARGET, rate) | {"met": rate >= 0.85},
        "p99": ratio_target(P99_TARGET, p99),
    }


# ---- RSS after breached requests ----


def rss_run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    results: dict[str, Any] = {}
    for kind, fit, trim in (
        ("chunks", False, False),
        ("chunks", False, True),
        ("chunks", True, False),
        ("objects", False, False),
        ("objects", False, True),
        ("objects", True, False),
    ):
        server = Server("rss", args.loop, trim=trim)
        try:
            with httpx.Client(timeout=120) as http:
                for _ in range(20):
                    http.get(server.url("/plaintext")).raise_for_status()
                before = http.get(server.url("/rss")).json()

            async def hogs(url: str) -> dict[int, int]:
                statuses: dict[int, int] = {}
                limit = asyncio.Semaphore(args.concurrency)
                async with httpx.AsyncClient(timeout=120) as http:

                    async def one() -> None:
                        async with limit:
                            status = (await http.get(url)).status_code
                            statuses[status] = statuses.get(status, 0) + 1

                    await asyncio.gather(*(one() for _ in range(args.hogs)))
                return statuses

            fits = "&fit=1" if fit else ""
            statuses = asyncio.run(hogs(server.url(f"/hog?kind={kind}{fits}")))
            with httpx.Client(timeout=120) as http:
                right_after = http.get(server.url("/rss")).json()
                time.sleep(2.0)
                settled = http.get(server.url("/rss")).json()
        finally:
            server.stop()
        key = f"{kind}{' within the budget' if fit else ''}, trim_memory={trim}"
        results[key] = {
            "statuses": statuses,
            "before": before,
            "right_after": right_after,
            "settled": settled,
        }
        print(f"{key}: {results[key]}", file=sys.stderr)
    return results


def print_rss(args: argparse.Namespace, results: dict[str, Any]) -> None:
    print(
        f"\n### RSS after {args.hogs} requests that try to hold 500 MB, "
        f"stopped at 50 MiB (or hold 40 MB, within it), {args.concurrency} at "
        f"a time, {sys.version.split()[0]}, uvicorn ({args.loop}), "
        f"PYTHONMALLOC={os.environ.get('PYTHONMALLOC', '(default: pymalloc)')}\n"
    )
    print(
        "| requests | trim_memory | statuses | RSS before MiB | peak MiB | "
        "RSS right after MiB | RSS 2 s later MiB | pymalloc blocks before / "
        "after | trims | ms per trim | loop's longest stall after, ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key, row in results.items():
        kind, trim = key.split(", trim_memory=")
        before, settled = row["before"], row["settled"]
        trims = settled["trims"]
        per_trim = f"{settled['trim_seconds'] / trims * 1000:.1f}" if trims else "-"
        print(
            f"| {kind} | {trim} | {row['statuses']} | "
            f"{before['rss_kib'] / 1024:.0f} | "
            f"{settled['peak_kib'] / 1024:.0f} | "
            f"{row['right_after']['rss_kib'] / 1024:.0f} | "
            f"{settled['rss_kib'] / 1024:.0f} | "
            f"{before['blocks']:,} / {settled['blocks']:,} | {trims} | {per_trim} | "
            f"{settled['max_loop_lag_ms']:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--trim", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 s")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--duration", type=float, help="seconds of load (4)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--route", choices=tuple(ROUTES), default="plaintext")
    parser.add_argument(
        "--framework",
        choices=("starlette", "fastapi"),
        default="starlette",
        help="the app's framework (the same routes in each)",
    )
    parser.add_argument(
        "--load", choices=("wrk", "httpx"), help="default: wrk if installed"
    )
    parser.add_argument("--rss", action="store_true", help="the RSS study instead")
    parser.add_argument("--hogs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.fd, args.loop, args.trim, args.framework)
        return
    if args.rounds is None:
        args.rounds = 2 if args.quick else 5
    if args.duration is None:
        args.duration = 2.0 if args.quick else 4.0
    if args.load is None:
        args.load = "wrk" if shutil.which("wrk") else "httpx"
    if args.rounds < 1 or args.duration <= 0 or args.connections < 1:
        parser.error("--rounds, --duration and --connections must be positive")
    if args.rss:
        result: dict[str, Any] = rss_run(args)
        print_rss(args, result)
    else:
        result = throughput(args)
        print_throughput(args, result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
