"""The runnable examples of the guides run, on asyncio and on trio."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import run_python

DOCS = Path(__file__).parent.parent / "docs"
_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
_RUN = "anyio.run(main)\n"


def _scripts(page: str) -> list[str]:
    blocks = _BLOCK.findall((DOCS / page).read_text())
    return [block for block in blocks if block.endswith(_RUN)]


SCRIPTS = [
    pytest.param(page, index, script, id=f"{page}#{index}")
    for page in ("recovering.md", "supervision.md", "sites.md")
    for index, script in enumerate(_scripts(page))
]


def test_the_guide_has_runnable_examples() -> None:
    assert len(_scripts("recovering.md")) >= 5
    assert len(_scripts("supervision.md")) >= 2
    assert len(_scripts("sites.md")) >= 1


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize(("page", "index", "script"), SCRIPTS)
def test_doc_example_runs(page: str, index: int, script: str, backend: str) -> None:
    script = script.removesuffix(_RUN) + f"anyio.run(main, backend={backend!r})\n"
    result = run_python("-W", "error", "-c", script)
    assert result.returncode == 0, f"{page} example {index}:\n{result.stderr}"
    assert result.stdout.strip()
