"""A toy crawler to run under ``memlimits-async run`` (docs/cli.md).

It knows nothing of memlimits_async.  Run as is, it fetches every page, and
the one huge page makes it hold 64 MiB at once:

    python examples/cli_crawler.py

Run under the tool, each fetch task gets a budget of its own, and the huge
page's task is cancelled (its awaiter sees CancelledError) while the other
pages are fetched as before:

    memlimits-async run --task-memory "16 MiB" --tasks 'fetch-*' \\
        --report crawl.html examples/cli_crawler.py
"""

from __future__ import annotations

import asyncio
import sys


async def download(page: int) -> list[bytearray]:
    """Pretend to download ``page`` in chunks."""
    chunks: list[bytearray] = []
    size = 64 << 20 if page == 7 else (page + 1) << 18  # page 7 is huge
    while sum(map(len, chunks)) < size:
        chunks.append(bytearray(256 << 10))
        await asyncio.sleep(0.001)
    return chunks


def parse(chunks: list[bytearray]) -> list[str]:
    """Pretend to parse the page: its text, line by line."""
    return [bytes(chunk).decode("latin-1") for chunk in chunks]


async def fetch(page: int) -> int:
    """Download and parse ``page``; return its size."""
    chunks = await download(page)
    lines = parse(chunks)
    await asyncio.sleep(0.001)  # store it somewhere
    return sum(map(len, lines))


async def main() -> int:
    tasks = [
        asyncio.create_task(fetch(page), name=f"fetch-{page}") for page in range(12)
    ]
    failed = 0
    for task in tasks:
        try:
            size = await task
        except asyncio.CancelledError:
            failed += 1
            print(f"{task.get_name()}: cancelled")
        else:
            print(f"{task.get_name()}: {size >> 10} KiB")
    return failed


if __name__ == "__main__":
    sys.exit(1 if asyncio.run(main()) > 1 else 0)
