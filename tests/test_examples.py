"""Every script in examples/ runs to completion (as the README promises)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import run_python

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


def test_there_are_examples() -> None:
    assert EXAMPLES


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda path: path.name)
def test_example_runs(script: Path) -> None:
    result = run_python(str(script))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_demo_reports_each_kind_of_stop() -> None:
    script = next(path for path in EXAMPLES if path.name == "demo.py")
    for backend in ("asyncio", "trio"):
        result = run_python(str(script), "--backend", backend)
        assert result.returncode == 0, result.stderr
        lines = {line.split()[0]: line for line in result.stdout.splitlines() if line}
        assert lines["leaky"].endswith("MEMORY")
        assert lines["steady"].endswith("finished")
        assert lines["churner"].endswith("ALLOCATIONS")
        assert lines["sleepy"].endswith("TIMEOUT")
