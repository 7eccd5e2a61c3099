"""Imported from a source tree without its built extension: a clear ImportError.

``python -m pytest`` (or ``python``) started in a checkout puts the checkout
first on sys.path, so ``import memlimits_async`` finds the sources, which
have no ``_core`` extension unless built in place.  That used to fail with
"cannot import name '_core' from partially initialized module ... (most
likely due to a circular import)".  The README's ``.venv/bin/pytest`` does
not import the sources: its sys.path starts with the venv's bin directory,
and pytest adds ``tests/`` (where conftest.py is), not the checkout.
"""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

import memlimits_async as ml

README_COMMAND = ".venv/bin/pytest"


def _copy_sources(tmp_path: Path, checkout: bool) -> Path:
    """The package's Python files (no extension), in a checkout's layout
    (with pyproject.toml) or alone, as an installation that lost it."""
    root = tmp_path / ("checkout" if checkout else "site-packages")
    package = Path(ml.__file__).resolve().parent
    shutil.copytree(
        package,
        root / "memlimits_async",
        ignore=shutil.ignore_patterns("*.so", "__pycache__"),
    )
    if checkout:
        (root / "pyproject.toml").write_text('[project]\nname = "memlimits_async"\n')
    return root


def _python(
    *args: str, cwd: Path, path: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    if path is not None:
        env["PYTHONPATH"] = str(path)
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_import_from_a_checkout_without_the_extension_says_what_to_run(
    tmp_path: Path,
) -> None:
    checkout = _copy_sources(tmp_path, checkout=True)
    # As `python` started in the checkout: its directory first on sys.path.
    result = _python("-c", "import memlimits_async", cwd=checkout)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "ImportError: memlimits_async was imported from its source tree"
    )
    assert str(checkout) in last
    assert README_COMMAND in last and "python -P -m pytest" in last
    assert "circular import" not in result.stderr
    assert "During handling" not in result.stderr


def test_python_m_pytest_in_a_checkout_without_the_extension_says_what_to_run(
    tmp_path: Path,
) -> None:
    checkout = _copy_sources(tmp_path, checkout=True)
    tests = checkout / "tests"
    tests.mkdir()
    shutil.copy(Path(__file__).with_name("conftest.py"), tests)
    (tests / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    result = _python("-m", "pytest", "-p", "no:cacheprovider", cwd=checkout)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "memlimits_async was imported from its source tree" in output
    assert README_COMMAND in output
    assert "circular import" not in output


def test_installation_without_the_extension_says_to_reinstall(tmp_path: Path) -> None:
    site = _copy_sources(tmp_path, checkout=False)
    result = _python("-c", "import memlimits_async", cwd=tmp_path, path=site)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "installed without its C extension" in last
    assert "--force-reinstall" in last


def test_an_extension_that_does_not_load_keeps_its_own_error(tmp_path: Path) -> None:
    checkout = _copy_sources(tmp_path, checkout=True)
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (checkout / "memlimits_async" / "_meter" / f"_core{suffix}").write_bytes(
        b"not a shared object"
    )
    result = _python("-c", "import memlimits_async", cwd=checkout)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:")
    assert "source tree" not in last  # the loader's reason, not a guess
