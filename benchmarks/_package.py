"""The package under benchmark, imported the same way by every benchmark.

An installed copy if there is one, else this checkout (built in place with
``setup.py build_ext --inplace``).  trio is imported up front when it is
installed, so that every variant runs in the same process state: once trio
is imported, ``limit_scope`` asks it whether a trio task is running.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

try:
    import trio

    HAVE_TRIO = trio is not None
except ImportError:  # trio is an optional dependency
    HAVE_TRIO = False

try:
    import memlimits_async as ml
except ImportError:  # a checkout built with setup.py build_ext --inplace
    sys.path.insert(0, str(REPO_ROOT))
    import memlimits_async as ml

__all__ = [
    "HAVE_TRIO",
    "REPO_ROOT",
    "add_run_options",
    "backends_of",
    "fill_counts",
    "ml",
    "ratio_target",
    "verdict",
]


def add_run_options(parser: argparse.ArgumentParser, quick: str) -> None:
    """``--quick`` (``quick`` says what it sets), ``--backend`` and ``--json``,
    as every benchmark that runs on both backends takes them."""
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument(
        "--backend",
        action="append",
        choices=("asyncio", "trio"),
        help="repeatable; default: asyncio, and trio if installed",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")


def fill_counts(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    quick: dict[str, int],
    full: dict[str, int],
) -> None:
    """Give the count options left unset their ``--quick`` or full default,
    and refuse a count below 1 (a parser error naming the options)."""
    for name, default in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if min(getattr(args, name) for name in full) < 1:
        options = [f"--{name.replace('_', '-')}" for name in full]
        parser.error(f"{', '.join(options[:-1])} and {options[-1]} must be >= 1")


def ratio_target(ratio: float, worst: float) -> dict[str, object]:
    """The ``target`` figures of a benchmark whose worst median ratio must
    stay at or under ``ratio``."""
    return {"ratio": ratio, "worst": worst, "met": worst <= ratio}


def verdict(met: bool) -> str:
    """How a ``target:`` line says whether the run met it."""
    return "met" if met else "NOT met"


def backends_of(args: argparse.Namespace) -> list[str]:
    """``--backend`` as given, else asyncio and (if installed) trio."""
    chosen: list[str] = args.backend or (
        ["asyncio", "trio"] if HAVE_TRIO else ["asyncio"]
    )
    return chosen
