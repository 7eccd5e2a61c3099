"""Where the memory went: allocation sites of a stopped request, and of a
running server, from the samples the limits already take.

Three "requests" run in one event loop, each in its own ``limit_scope``:

* ``report``  builds a large report and is stopped by its memory limit;
  the breach names the three lines that allocated most of what it held;
* ``search``  and ``export`` keep working; while they run, ``ml.snapshot()``
  shows the live bytes of the whole process grouped by scope and task.

Then the stopped request's snapshot is written as a flame graph (one HTML
file, nothing fetched; open it in a browser) and dumped for
``python -m memlimits_async flamegraph``.

Run:  python examples/where_memory_went.py [--backend asyncio|trio] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

import memlimits_async as ml

KIB = 1024


def build_rows(count: int) -> list[dict[str, object]]:
    return [
        {"row": i, "cells": [f"cell {i}:{j}" for j in range(12)]} for i in range(count)
    ]


def render_html(rows: list[dict[str, object]]) -> str:
    return "".join(
        f"<tr><td>{row['row']}</td><td>{row['cells']}</td></tr>" for row in rows
    )


async def report(held: list[object]) -> None:
    while True:
        rows = build_rows(200)
        held.append(rows)
        held.append(render_html(rows))
        held.append(json.dumps(rows))
        await anyio.sleep(0)


async def search(ready: anyio.Event, done: anyio.Event) -> None:
    index = {f"term{i}": list(range(i % 50)) for i in range(20_000)}
    ready.set()
    await done.wait()
    del index


async def export(ready: anyio.Event, done: anyio.Event) -> None:
    chunks = [bytes(64 * KIB) for _ in range(40)]
    ready.set()
    await done.wait()
    del chunks


async def main(out: Path) -> None:
    # Denser sampling while we look (the limits keep working): finer sites.
    async with ml.profile("16 KiB"):
        held: list[object] = []
        async with ml.limit_scope(memory="24 MiB") as stopped:
            await report(held)
        assert stopped.breach is not None
        print("report stopped:", stopped.breach.reason)
        for site in stopped.breach.top_sites:
            print("  ", site)
        # Its sites as they were at the stop, before its data goes (as a
        # server's would): for the flame graph below.
        at_stop = stopped.snapshot()
        held.clear()

        done = anyio.Event()
        ready = [anyio.Event(), anyio.Event()]

        async def scoped(
            fn: Callable[[anyio.Event, anyio.Event], Awaitable[None]],
            event: anyio.Event,
        ) -> None:
            async with ml.limit_scope(memory="64 MiB"):
                await fn(event, done)

        async with anyio.create_task_group() as group:
            group.start_soon(scoped, search, ready[0], name="search")
            group.start_soon(scoped, export, ready[1], name="export")
            for event in ready:
                await event.wait()
            process = ml.snapshot()
            done.set()
        print("while search and export ran, live bytes by scope:")
        for name in process.groups()[:3]:
            group_snapshot = process.group(name)
            top = group_snapshot.statistics("lineno")[0]
            print(f"   {ml.format_size(group_snapshot.total())} in {name}")
            print(f"      most from {top.traceback}")

    page = out / "report.html"
    at_stop.flamegraph(page, title="report: live bytes at the stop")
    at_stop.dump(out / "report.json")
    print(f"flame graph: {page} (and report.json for the command line)")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--out", type=Path, help="where to write (a temporary dir)")
    args = parser.parse_args()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        anyio.run(main, args.out, backend=args.backend)
        return
    with tempfile.TemporaryDirectory() as out:
        anyio.run(main, Path(out), backend=args.backend)


if __name__ == "__main__":
    cli()
