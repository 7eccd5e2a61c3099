"""CancelToken under a storm of signals: ``cancel()`` from a signal handler
never deadlocks, and every token invariant survives the handler running in
the middle of any token operation.

A Python signal handler runs in the main thread wherever the interpreter
checks for signals (calls and loop back-edges): possibly in the middle of a
``cancel()``, ``on_cancel()``, ``child()`` or unregistration of the very token
it touches, and possibly inside another run of itself.

Each case runs in a fresh interpreter (``run_python``) so that a deadlock
fails the test instead of hanging the suite: the child arms
``faulthandler.dump_traceback_later`` again whenever it makes progress, so it
dumps every thread's stack and exits with status 1 only once it has been
stuck for ``WATCHDOG`` seconds, and ``run_python`` has its own timeout behind
that.

The signals adapt to the speed the machine achieves instead of assuming
one: the outermost handler run arms a one-shot SIGALRM ``GAP`` after its own
end, so the main code gets ``GAP`` of the clock between two runs, and
thousands of runs land in the middle of token operations however slow or
busy the machine.  A timer firing at a fixed rate does not: on a loaded
machine a run that is descheduled for a few milliseconds has the next
signal waiting when it resumes, the nested run can be descheduled in turn,
and the runs pile up until ``RecursionError`` (measured: 545 deep).  Every
``NEST_EVERY``-th outermost run also arms a signal ``NEST_DELAY`` after its
start, so that runs inside another run happen on any machine too; a nested
run arms nothing, and one deeper than ``MAX_DEPTH`` does nothing.

The child checks the invariants of every token as it goes and prints its
counters as JSON; the parent asserts exit status 0, the counters, and that
enough signals really ran.  No assertion is about time: each loop ends after
a number of iterations and of signals, not of seconds.
"""

from __future__ import annotations

import json
import signal
from textwrap import dedent
from typing import Any

import pytest

from helpers import run_python

pytestmark = pytest.mark.skipif(
    not hasattr(signal, "setitimer"), reason="needs SIGALRM and setitimer"
)

WATCHDOG = 60  # seconds without progress before the child dumps its stacks
GAP = 50e-6  # seconds from the end of a handler run to the next SIGALRM
NEST_EVERY = 8  # every this many outermost runs arm a signal at their start,
NEST_DELAY = 1e-6  # this many seconds later: mostly inside the run itself
BACKSTOP = 0.01  # seconds between SIGALRMs while no handler run re-arms them
MAX_DEPTH = 8  # a run nested deeper does nothing
MIN_SIGNALS = 2000  # handler runs that each case needs before it stops

COMMON = """
import faulthandler, itertools, json, signal, sys, time

import memlimits_async as ml

params = json.loads(sys.argv[1])
# Shared by the main code and handlers that may interrupt each other (and
# themselves): only single C calls touch them, which the GIL makes atomic.
ids = itertools.count()  # one id per handler run
runs = []  # one item per handler run
errors = []
# A callback that raised is reported here (the token carries on): an error.
sys.unraisablehook = lambda u: errors.append(f"unraisable: {u.exc_value!r}")

# Touched by the handler runs only, each of which leaves them as it found
# them or as a complete run would (a nested run is over before the run it
# interrupted goes on).
depth = [0]  # handler runs under way
deepest = [0]  # the most runs under way at once
nested = []  # one item per run that started inside another
outermost = itertools.count()
signalling = [False]
last_progress = [float("-inf")]


def progress():
    # The watchdog measures time without progress, not the whole run: a
    # busy machine may be slow, only a stuck child is killed.
    now = time.monotonic()
    if now - last_progress[0] > 1:
        last_progress[0] = now
        faulthandler.dump_traceback_later(params["watchdog"], exit=True)


def signals_run():
    return len(runs)


def start_signals(work):
    def handler(signum, frame):
        depth[0] += 1
        try:
            if depth[0] > 1:
                nested.append(None)
                deepest[0] = max(deepest[0], depth[0])
                if depth[0] > params["max_depth"]:
                    return  # never a pile-up, whatever the machine does
            elif next(outermost) % params["nest_every"] == 0:
                arm(params["nest_delay"])
            work(signum, frame)
        finally:
            # Only the outermost run arms the next signal, from its end and
            # before it counts itself out: a signal that fires before the
            # run has returned (a gap shorter than the return, a run
            # descheduled there) starts a nested run that arms nothing, so
            # the runs cannot pile up one inside the other, and the main
            # code gets its gap however long this run took.
            if depth[0] == 1 and signalling[0]:
                arm(params["gap"])
            depth[0] -= 1

    signalling[0] = True
    signal.signal(signal.SIGALRM, handler)
    arm(params["gap"])


def arm(delay):
    # Then every BACKSTOP while no run re-arms it: a signal that arrives
    # just before the main thread blocks in C (an event loop's select) runs
    # its handler only once the thread wakes up, and nothing else would
    # wake it.
    signal.setitimer(signal.ITIMER_REAL, delay, params["backstop"])


def stop_signals():
    signalling[0] = False
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, signal.SIG_IGN)


def finish(counts):
    counts["signals"] = signals_run()
    counts["nested"] = len(nested)
    counts["deepest"] = deepest[0]
    counts["errors"] = errors[:20]
    counts["error_count"] = len(errors)
    print(json.dumps(counts))
    faulthandler.cancel_dump_traceback_later()
"""

# The main loop creates a token, a child of it, registers callbacks (one of
# them unregistered again) and cancels the token; the signal handler cancels
# the newest token or its child, registers callbacks on it (some removed at
# once) and makes grandchildren that it drops.  Each token is checked once
# the handler can no longer reach it: after the next one is published.
TOKENS = (
    COMMON
    + """
class Record:
    __slots__ = (
        "token", "child", "wins", "child_wins", "kept", "removed",
        "child_calls", "late_ids", "late_calls", "clean_ids", "clean_calls",
        "before_remove", "after_remove",
    )

    def __init__(self, token):
        self.token = token
        self.child = None
        for name in self.__slots__[2:-2]:
            setattr(self, name, [])
        self.before_remove = self.after_remove = None


current = [None]  # the newest record; one STORE_SUBSCR publishes it


def on_signal(signum, frame):
    runs.append(None)
    n = next(ids)
    rec = current[0]
    if rec is None:
        return
    action = n % 5
    if action == 0:
        if rec.token.cancel(f"signal {n}"):
            rec.wins.append(f"signal {n}")
    elif action == 1:
        child = rec.child
        if child is not None and child.cancel(f"signal {n}"):
            rec.child_wins.append(f"signal {n}")
    elif action == 2:
        rec.late_ids.append(n)
        rec.token.on_cancel(lambda reason, n=n: rec.late_calls.append((n, reason)))
    elif action == 3:
        remove = rec.token.on_cancel(lambda r, n=n: rec.clean_calls.append(n))
        remove()
        if not rec.token.cancelled:  # removed before any cancel: never runs
            rec.clean_ids.append(n)
    else:
        grandchild = rec.token.child()
        parent_cancelled = rec.token.cancelled
        if parent_cancelled and not grandchild.cancelled:
            errors.append(f"signal {n}: child() of a cancelled token is active")


def check(i, rec):
    def fail(what):
        errors.append(f"token {i}: {what}")

    token, child = rec.token, rec.child
    reason = token.reason
    if not token.cancelled:
        return fail("not cancelled")
    if len(rec.wins) != 1:
        return fail(f"cancel() returned True {len(rec.wins)} times")
    if reason != rec.wins[0]:
        fail(f"reason {reason!r}, but {rec.wins[0]!r} won")
    if rec.kept != [reason]:
        fail(f"kept callback calls {rec.kept}")
    if rec.before_remove and rec.removed != [reason]:
        fail(f"callback removed after the cancel: calls {rec.removed}")
    if not rec.after_remove and rec.removed:
        fail(f"callback removed before the cancel ran: {rec.removed}")
    if rec.removed not in ([], [reason]):
        fail(f"removed callback calls {rec.removed}")
    if not child.cancelled or len(rec.child_wins) > 1:
        fail(f"child {child!r}, {len(rec.child_wins)} winning cancels")
    elif child.reason != (rec.child_wins[0] if rec.child_wins else reason):
        fail(f"child reason {child.reason!r}, wins {rec.child_wins}")
    if rec.child_calls != [child.reason]:
        fail(f"child callback calls {rec.child_calls}")
    if sorted(rec.late_calls) != [(n, reason) for n in sorted(rec.late_ids)]:
        fail(f"late callbacks {rec.late_ids} ran as {rec.late_calls}")
    if set(rec.clean_ids) & set(rec.clean_calls):
        fail(f"callbacks removed before any cancel ran: {rec.clean_calls}")
    if token._callbacks or child._callbacks:
        fail("callbacks left registered after the cancel")
    counts["signal_wins"] += rec.wins[0].startswith("signal")
    counts["child_signal_wins"] += len(rec.child_wins)
    counts["late_callbacks"] += len(rec.late_ids)
    counts["removed_callback_ran"] += len(rec.removed)


counts = dict.fromkeys(
    ["tokens", "signal_wins", "child_signal_wins", "late_callbacks",
     "removed_callback_ran", "main_wins"], 0
)
start = time.perf_counter()
start_signals(on_signal)
i = 0
while i < params["tokens"] or (
    signals_run() < params["min_signals"] and i < params["max_iterations"]
):
    progress()
    token = ml.CancelToken()
    rec = Record(token)
    previous, current[0] = current[0], rec
    if previous is not None:
        check(i - 1, previous)
    rec.child = token.child()
    token.on_cancel(rec.kept.append)
    remove = token.on_cancel(rec.removed.append)
    rec.child.on_cancel(rec.child_calls.append)
    rec.before_remove = token.cancelled
    remove()
    rec.after_remove = token.cancelled
    if token.cancel(f"main {i}"):
        rec.wins.append(f"main {i}")
        counts["main_wins"] += 1
    i += 1
stop_signals()
counts["seconds"] = round(time.perf_counter() - start, 2)
current[0] = None
check(i - 1, rec)
counts["tokens"] = i
finish(counts)
"""
)

# Scopes entered and exited in a loop while the handler cancels the token of
# the current one (or registers callbacks on it, or makes children of it).
# Every other scope blocks until a token cancellation wakes it.
SCOPES = (
    COMMON
    + """
import anyio

current = [None]  # the token watched by the current scope


def on_signal(signum, frame):
    runs.append(None)
    n = next(ids)
    token = current[0]
    if token is None:
        return
    action = n % 3
    if action == 0:
        token.cancel(f"signal {n}")
    elif action == 1:
        token.on_cancel(lambda reason: None)()
    else:
        token.child()


async def main():
    counts = dict.fromkeys(
        ["scopes", "blocking", "token_breaches", "cancelled_during_exit"], 0
    )
    outer_token = ml.CancelToken()
    start = time.perf_counter()
    start_signals(on_signal)
    i = 0
    async with ml.limit_scope(token=outer_token) as outer:
        while i < params["scopes"] or (
            signals_run() < params["min_signals"] and i < params["max_iterations"]
        ):
            progress()
            token = ml.CancelToken()
            watched = token if i % 4 < 2 else token.child()
            blocking = i % 2 == 0
            cancelled_in_body = None
            current[0] = token
            async with ml.limit_scope(token=watched) as scope:
                try:
                    if blocking:  # only the token ends this (else: watchdog)
                        await anyio.sleep_forever()
                    else:
                        for _ in range(3):
                            await anyio.sleep(0)
                finally:
                    cancelled_in_body = watched.cancelled
            cancelled_after = watched.cancelled
            current[0] = None
            breach = scope.breach
            if breach is not None and breach.kind is ml.BreachKind.TOKEN:
                counts["token_breaches"] += 1
                if breach.reason != f"token cancelled: {watched.reason}":
                    errors.append(f"scope {i}: {breach.reason!r}, {watched!r}")
            if cancelled_in_body and (
                breach is None or breach.kind is not ml.BreachKind.TOKEN
            ):
                errors.append(f"scope {i}: token cancelled, breach {breach!r}")
            if not cancelled_after and breach is not None:
                errors.append(f"scope {i}: token not cancelled, breach {breach!r}")
            if cancelled_after and not cancelled_in_body:
                counts["cancelled_during_exit"] += 1
            # Left registered: only a live child's link to its active parent.
            linked = watched is not token and not token.cancelled
            if watched._callbacks or len(token._callbacks) != linked:
                errors.append(f"scope {i}: left callbacks registered")
            counts["blocking"] += blocking
            i += 1
    stop_signals()
    counts["seconds"] = round(time.perf_counter() - start, 2)
    counts["scopes"] = i
    counts["outer_breach"] = repr(outer.breach)
    return counts


finish(anyio.run(main, backend=params["backend"]))
"""
)


def _run(code: str, **params: Any) -> dict[str, Any]:
    params = {
        "watchdog": WATCHDOG,
        "gap": GAP,
        "nest_every": NEST_EVERY,
        "nest_delay": NEST_DELAY,
        "backstop": BACKSTOP,
        "max_depth": MAX_DEPTH,
        "min_signals": MIN_SIGNALS,
        **params,
    }
    result = run_python("-c", dedent(code), json.dumps(params))
    assert result.returncode == 0, (
        f"exit status {result.returncode} (1 after a faulthandler dump means "
        f"the child made no progress for {WATCHDOG} s)\n{result.stderr}"
    )
    assert "Traceback" not in result.stderr, result.stderr
    counts: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    print(counts)  # shown by pytest -s or on failure
    return counts


def test_cancel_from_a_signal_handler_never_deadlocks_nor_breaks_invariants() -> None:
    counts = _run(TOKENS, tokens=100_000, max_iterations=1_000_000)
    assert counts["error_count"] == 0, counts["errors"]
    assert counts["tokens"] >= 100_000
    assert counts["signals"] >= MIN_SIGNALS
    # The handler really raced the main loop: it won some cancellations of
    # tokens and of children, and registered callbacks on live tokens.
    assert counts["signal_wins"] > 0
    assert counts["child_signal_wins"] > 0
    assert counts["late_callbacks"] > 0
    assert counts["main_wins"] + counts["signal_wins"] == counts["tokens"]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_scopes_watching_tokens_cancelled_by_signals(backend: str) -> None:
    counts = _run(SCOPES, backend=backend, scopes=6000, max_iterations=60_000)
    assert counts["error_count"] == 0, counts["errors"]
    assert counts["scopes"] >= 6000
    assert counts["signals"] >= MIN_SIGNALS
    # Every blocking scope was woken by its token (else it would have blocked
    # until the watchdog ended the child), and the outer scope, whose token
    # nobody cancels, was never disturbed.
    assert counts["token_breaches"] >= counts["blocking"] >= 3000
    assert counts["outer_breach"] == "None"
