"""Which loop shapes get a preemptive interrupt, and does their `finally` run?

CPython 3.11-3.13 check for interrupts at a loop's back edge, and for some
shapes the back edge lies outside the `try` (or `with`) around the loop
(cpython#108214, #130279): an exception raised there skips the `finally`.
memlimits_async refuses to land where that would happen.  On the main
thread (and in other threads on 3.11) it lands at the interpreter's own
checks, so such a loop is stopped at another check (a call in its body) or,
if it has none, not preemptively at all; in other threads on 3.12 and later
it lands at the first instruction of a line or the head of a loop, where
the handler in force is known (docs/preemption.md).  This script runs each
shape under a breached scope, on the main thread and in a worker thread,
and prints what happened; the table in docs/preemption.md comes from it.

    python tools/finally_shapes.py          # this interpreter
"""

from __future__ import annotations

import sys
import threading
import time

import memlimits_async as ml

LIMIT = 2_000_000  # iterations x 50: ~1 s of work if nothing stops it
log: list[str] = []


def shape_loop_first() -> None:
    x = 0
    try:
        while x < LIMIT * 50:
            x += 1
    finally:
        log.append("finally")


def shape_statement_before_loop() -> None:
    x = 0
    try:
        x = 1
        while x < LIMIT * 50:
            x += 1
    finally:
        log.append("finally")


def shape_condition_loop() -> None:
    flag = {"stop": False}
    timer = threading.Timer(1.0, flag.update, kwargs={"stop": True})
    timer.start()
    try:
        while not flag["stop"]:
            pass
    finally:
        timer.cancel()
        log.append("finally")


def shape_call_in_loop() -> None:
    x = 0
    try:
        while x < LIMIT * 15:
            x += abs(1)
    finally:
        log.append("finally")


def shape_for_range() -> None:
    try:
        for _ in range(LIMIT * 50):
            pass
    finally:
        log.append("finally")


class _Exit:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        log.append("finally")


def shape_with_loop_first() -> None:
    x = 0
    with _Exit():
        while x < LIMIT * 50:
            x += 1


SHAPES = {
    "try: while <no call>: x += 1": shape_loop_first,
    "try: x = 1; while <no call>: ...": shape_statement_before_loop,
    "try: while not flag[k]: pass (2 lines)": shape_condition_loop,
    "try: while ...: x += abs(1)": shape_call_in_loop,
    "try: for _ in range(n): pass": shape_for_range,
    "with cm: while <no call>: ...": shape_with_loop_first,
}


def run(shape: object) -> str:
    log.clear()
    token = ml.CancelToken()
    threading.Timer(0.02, token.cancel).start()
    started = time.perf_counter()
    with ml.limit_scope(token=token, preempt=0) as scope:
        shape()  # type: ignore[operator]
    elapsed = time.perf_counter() - started
    if not scope._preempted:
        return f"not preempted (ran to its end, {elapsed:.2f} s)"
    return (
        "preempted, finally ran" if log == ["finally"] else "preempted, FINALLY SKIPPED"
    )


def _run_in(where: str, shape: object) -> str:
    if where == "main thread":
        return run(shape)
    result: list[str] = []
    worker = threading.Thread(target=lambda: result.append(run(shape)))
    worker.start()
    worker.join()
    return result[0]


def main() -> None:
    version = ".".join(map(str, sys.version_info[:2]))
    for where in ("main thread", "worker thread"):
        for name, shape in SHAPES.items():
            print(f"| {version} | {where} | `{name}` | {_run_in(where, shape)} |")


if __name__ == "__main__":
    main()
