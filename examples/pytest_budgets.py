"""Run the example suite in examples/pytest_suite/ under the pytest plugin.

The runaway tests are stopped at their limits (in their own frame for the
sync test, in their own task for pytest-asyncio and anyio on asyncio and
trio), the O(n^2) copy fails its allocation budget, the rest pass.  Prints
each test's outcome with its figures, from the plugin's JSON report.

Run:  python examples/pytest_budgets.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

SUITE = Path(__file__).parent / "pytest_suite"


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "memlimits.json"
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                str(SUITE),
                "-q",
                "-p",
                "no:cacheprovider",
                "-p",
                "no:memray",  # if installed: it would act on limit_memory too
                "--memlimits-top",
                "3",
                "--memlimits-json",
                str(report),
            ],
            capture_output=True,
            text=True,
            cwd=SUITE,
            timeout=300,
        )
        print(run.stdout)
        tests = json.loads(report.read_text())["tests"]
    failed = set()
    for test in tests:
        name = test["nodeid"].partition("::")[2]
        outcome = test["breach"] or "passed"
        if test["breach"]:
            failed.add(name.partition("[")[0])
        print(
            f"{name:36} {outcome:12} peak {test['peak'] / 2**20:6.1f} MiB, "
            f"allocated {test['allocated'] / 2**20:6.1f} MiB"
        )
    expected = {
        "test_runaway_sync",
        "test_runaway_asyncio",
        "test_runaway_anyio",
        "test_quadratic",
    }
    if failed != expected:
        print(f"expected these to fail: {sorted(expected)}; got {sorted(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
