"""The package under benchmark, imported the same way by every benchmark.

An installed copy if there is one, else this checkout (built in place with
``setup.py build_ext --inplace``).  trio is imported up front when it is
installed, so that every variant runs in the same process state: once trio
is imported, ``limit_scope`` asks it whether a trio task is running.
"""

from __future__ import annotations

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

__all__ = ["HAVE_TRIO", "REPO_ROOT", "ml"]
