"""The pytest plugin, run on generated test files through pytester.

Each run is a subprocess: the meter and its hooks are process-wide, and a
fresh process is what a user's ``pytest`` run is.  pytest-memray is turned
off (``-p no:memray``) except in the coexistence tests: installed, it would
also act on ``limit_memory`` markers.  The runaway tests are bounded (300 MB,
or 10**8 steps) so that a broken plugin fails them instead of hanging.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

import memlimits_async as ml
from memlimits_async.pytest_plugin import _lower, _upper, parse_test_size

pytest_plugins = ["pytester"]

INI = """
[pytest]
asyncio_default_fixture_loop_scope = function
"""

RUNAWAY = """
import asyncio
import pytest

@pytest.mark.limit_memory("24 MB")
def test_sync_runaway():
    kept = []
    for _ in range(3000):
        kept.append(bytearray(100_000))

@pytest.mark.asyncio
@pytest.mark.limit_memory("24 MB")
async def test_asyncio_runaway():
    kept = []
    for _ in range(3000):
        kept.append(bytearray(100_000))
        await asyncio.sleep(0)

@pytest.mark.asyncio
@pytest.mark.limit_memory("24 MB")
async def test_asyncio_never_awaits():
    kept = []
    for _ in range(3000):
        kept.append(bytearray(100_000))

@pytest.mark.anyio
@pytest.mark.limit_memory("24 MB")
async def test_anyio_runaway(anyio_backend):
    import anyio
    kept = []
    for _ in range(3000):
        kept.append(bytearray(100_000))
        await anyio.sleep(0)

@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param

@pytest.mark.limit_memory("24 MB")
def test_within():
    kept = [bytearray(100_000) for _ in range(20)]
    assert len(kept) == 20
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    pytester.makefile(".ini", pytest=INI)
    return pytester.runpytest_subprocess(
        "-p", "no:memray", "-p", "no:cacheprovider", *args
    )


def test_parse_test_size_reads_units_as_pytest_memray() -> None:
    assert parse_test_size("24 MB") == 24 * 1024**2
    assert parse_test_size("24 MiB") == 24 * 1024**2
    assert parse_test_size("1.5KB") == 1536
    assert parse_test_size("100 B") == 100
    assert parse_test_size(4096) == 4096
    for bad in ("24 M", "24 MBs", "lots", "-1 MB"):
        with pytest.raises(ValueError, match="size"):
            parse_test_size(bad)
    with pytest.raises(TypeError, match="size"):
        parse_test_size([24])


def test_runaway_tests_stop_at_the_limit_in_their_own_task_or_frame(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(RUNAWAY)
    result = run(pytester, "-q")
    result.assert_outcomes(failed=5, passed=1)
    out = result.stdout.str()
    # The lines of each test's loop: where it may be stopped.
    for name, lines in (
        ("test_sync_runaway", (7, 8)),
        ("test_asyncio_runaway", (14, 15, 16)),
        ("test_asyncio_never_awaits", (22, 23)),
        ("test_anyio_runaway[asyncio]", (30, 31, 32)),
        ("test_anyio_runaway[trio]", (30, 31, 32)),
    ):
        section = out.split(f" {name} ")[1]
        first = section.splitlines()[1]
        assert first.startswith("memory limit 24 MiB: peak "), first
        assert int(first.rpartition(".py:")[2]) in lines, first
        assert section.splitlines()[2].startswith("memory limit of 24 MiB exceeded")
    # The status letter, and its word in the summary.
    assert any(line.startswith("LLLLL.") for line in result.stdout.lines)
    result.stdout.fnmatch_lines(["LIMIT *::test_sync_runaway*"])
    # No internals: neither the package's frames nor a traceback.
    assert "_scope.py" not in out
    assert "pytest_plugin.py" not in out
    assert "Traceback" not in out
    assert "INTERNALERROR" not in out


def test_a_run_without_limits_installs_no_per_test_hook(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        def test_unlimited(pytestconfig):
            manager = pytestconfig.pluginmanager
            assert manager.has_plugin("memlimits_async-collector")
            assert not manager.has_plugin("memlimits_async-runner")
            kept = [bytearray(1_000_000) for _ in range(50)]
        """
    )
    run(pytester).assert_outcomes(passed=1)


def test_defaults_from_options_and_ini_and_the_opt_out(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import pytest

        def test_big():
            kept = [bytearray(1_000_000) for _ in range(30)]

        @pytest.mark.no_memlimits
        def test_opted_out():
            kept = [bytearray(1_000_000) for _ in range(30)]

        @pytest.mark.limit_memory("64 MB")
        def test_marker_wins():
            kept = [bytearray(1_000_000) for _ in range(30)]
        """
    )
    result = run(pytester, "--limit-memory", "10 MB", "-q")
    result.assert_outcomes(failed=1, passed=2)
    # 30 MB in a few milliseconds: preempted, or done before the poll.
    result.stdout.fnmatch_lines(["memory limit 10 MiB: peak * live, *"])
    pytester.makefile(".ini", pytest=INI + "limit_memory = 10 MB\n")
    result = pytester.runpytest_subprocess("-p", "no:memray", "-q")
    result.assert_outcomes(failed=1, passed=2)


def test_allocations_leaks_and_time(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.limit_allocations("10 MB")
        def test_copies():
            for _ in range(2000):
                block = bytes(100_000)

        KEPT = []

        @pytest.mark.limit_leaks("1 MB")
        def test_leaks():
            KEPT.append(bytearray(5_000_000))

        @pytest.mark.limit_leaks("1 MB")
        def test_frees():
            block = bytearray(5_000_000)
            del block

        @pytest.mark.limit_time(0.2)
        def test_spins():
            for _ in range(10**8):
                pass

        @pytest.mark.asyncio
        @pytest.mark.limit_time(0.2)
        async def test_sleeps():
            import asyncio
            await asyncio.sleep(30)
        """
    )
    result = run(pytester, "-q")
    result.assert_outcomes(failed=4, passed=1)
    result.stdout.fnmatch_lines_random(
        [
            "allocations limit 10 MiB: peak * live, * allocated, * s; *",
            "leak limit 1 MiB: the test still holds about * after a collection*",
            "time limit 0.2 s: peak *; stopped at *.py:2[12]",
            "time limit 0.2 s: peak *; stopped at *.py:28",
        ]
    )


@pytest.mark.parametrize(
    "marker",
    [
        'limit_memory("24 MBs")',
        "limit_memory()",
        'limit_memory("1 MB", "2 MB")',
        'limit_leaks("1 MB", filter_fn=None)',
        "limit_time(-1)",
        'limit_time("soon")',
        "limit_allocations([1])",
    ],
)
def test_bad_marker_arguments_are_a_usage_error_naming_the_test(
    pytester: pytest.Pytester, marker: str
) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.{marker}
        def test_badly_marked():
            pass
        """
    )
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: *::test_badly_marked: @pytest.mark.limit_*"])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_bad_option_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = run(pytester, "--limit-memory", "lots")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --limit-memory must look like*"])


def test_summary_and_json(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.limit_memory("64 MB")
        def test_small():
            kept = bytearray(1_000_000)

        @pytest.mark.limit_memory("64 MB")
        def test_large():
            kept = bytearray(20_000_000)
        """
    )
    report = pytester.path / "usage.json"
    result = run(pytester, "--memlimits-top", "1", "--memlimits-json", str(report))
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*memlimits_async report*",
            "highest peak live:",
            "*MiB  test_summary_and_json.py::test_large",
            "highest allocated:",
            "*MiB  test_summary_and_json.py::test_large",
        ]
    )
    records = {each["nodeid"]: each for each in json.loads(report.read_text())["tests"]}
    assert set(records) == {
        "test_summary_and_json.py::test_small",
        "test_summary_and_json.py::test_large",
    }
    large = records["test_summary_and_json.py::test_large"]
    assert large["breach"] is None
    assert large["limits"]["memory"] == 64 * 1024**2
    # Sampled: 20 MB is within +-20% except with probability < 1e-9 at the
    # interval a 64 MiB limit sets (docs/accuracy.md).
    assert 16_000_000 < large["peak"] < 24_000_000


def test_coexists_with_pytest_memray(pytester: pytest.Pytester) -> None:
    pytest.importorskip("pytest_memray")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.limit_memory("24 MB")
        def test_within():
            kept = bytearray(1_000_000)

        @pytest.mark.limit_memory("24 MB")
        def test_runaway():
            kept = []
            for _ in range(3000):
                kept.append(bytearray(100_000))
        """
    )
    pytester.makefile(".ini", pytest=INI)
    for args in ((), ("--memray",)):
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
        result.assert_outcomes(passed=1, failed=1)
        result.stdout.fnmatch_lines(["*memory limit 24 MiB: peak * live*stopped at *"])
        assert "INTERNALERROR" not in result.stdout.str()


def test_pytest_trio(pytester: pytest.Pytester) -> None:
    pytest.importorskip("pytest_trio")
    pytester.makepyfile(
        """
        import pytest
        import trio

        @pytest.mark.trio
        @pytest.mark.limit_memory("24 MB")
        async def test_trio_runaway():
            kept = []
            for _ in range(3000):
                kept.append(bytearray(100_000))
                await trio.sleep(0)
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "memory limit 24 MiB: peak * live*stopped at *.py:10",
            # The breach's reason names the line that holds the memory.
            "memory limit of 24 MiB exceeded: *"
            " from test_pytest_trio.py:9 (test_trio_runaway)*",
        ]
    )


def test_fixtures_are_not_charged(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def big():
            return bytearray(30_000_000)

        @pytest.mark.limit_memory("10 MB")
        def test_uses_a_big_fixture(big):
            assert len(big) == 30_000_000
        """
    )
    run(pytester).assert_outcomes(passed=1)


def test_a_test_that_swallows_its_cancellation_still_fails(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import asyncio
        import pytest

        @pytest.mark.asyncio
        @pytest.mark.limit_memory("10 MB")
        async def test_swallows():
            kept = []
            try:
                for _ in range(3000):
                    kept.append(bytearray(100_000))
                    await asyncio.sleep(0)
            except asyncio.CancelledError:
                pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["memory limit 10 MiB: peak * live, *; ran to the end"])


# ---- pytest-xdist ----

XDIST_SUITE = """
import asyncio
import pytest

@pytest.mark.parametrize("n", range(6))
@pytest.mark.limit_memory("64 MB")
def test_sync(n):
    kept = bytearray((n + 1) * 500_000)

@pytest.mark.asyncio
@pytest.mark.limit_memory("64 MB")
async def test_asyncio():
    kept = bytearray(10_000_000)
    await asyncio.sleep(0)

@pytest.mark.limit_memory("24 MB")
def test_runaway():
    kept = []
    for _ in range(3000):
        kept.append(bytearray(100_000))
"""


def run_xdist(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    pytest.importorskip("xdist")
    return run(pytester, "-p", "xdist", "-n", "2", *args)


def test_xdist_workers_send_their_records_to_the_controller(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(XDIST_SUITE)
    report = pytester.path / "usage.json"
    result = run_xdist(
        pytester, "--memlimits-top", "2", "--memlimits-json", str(report)
    )
    result.assert_outcomes(passed=7, failed=1)
    # The order of the top 2 by peak: the runaway's estimate passed 24 MiB;
    # at the ~56 KiB interval a 64 MB limit sets, 10 MB is estimated under
    # 24 MiB and 3 MB under 10 MB except with probability < 1e-9 each.
    result.stdout.fnmatch_lines(
        [
            "*memory limit 24 MiB: peak * live*stopped at *.py:1[89]",
            "memlimits_async: 8 tests written to *usage.json",
            "*memlimits_async report*",
            "highest peak live:",
            "* MiB  test_xdist_workers_*.py::test_runaway",
            "* MiB  test_xdist_workers_*.py::test_asyncio",
            "highest allocated:",
        ]
    )
    # The status letter and word come from the controller too.
    result.stdout.fnmatch_lines(["LIMIT *::test_runaway*"])
    assert "L" in next(line for line in result.stdout.lines if "[100%]" in line)
    records = json.loads(report.read_text())["tests"]
    names = sorted(record["nodeid"].partition("::")[2] for record in records)
    assert names == sorted(
        ["test_asyncio", "test_runaway", *(f"test_sync[{n}]" for n in range(6))]
    )
    # xdist hands the first tests out to both workers.
    assert {record["extra"]["worker"] for record in records} == {"gw0", "gw1"}
    outcomes = {record["nodeid"].partition("::")[2]: record for record in records}
    assert outcomes["test_runaway"]["outcome"] == "failed"
    assert outcomes["test_runaway"]["breach"] == "memory"
    assert outcomes["test_asyncio"]["outcome"] == "passed"
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_xdist_compares_with_a_baseline(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        test_grows="""
        import os
        import pytest

        TIMES = int(os.environ.get("TIMES", "1"))

        @pytest.mark.parametrize("n", range(4))
        @pytest.mark.limit_allocations("1 GB")
        def test_copies(n):
            for _ in range(100 * (TIMES if n == 0 else 1)):
                block = bytes(1_000_000)
        """
    )
    baseline = pytester.path / "baseline.json"
    run_xdist(pytester, "--memlimits-json", str(baseline)).assert_outcomes(passed=4)
    monkeypatch.setenv("TIMES", "2")
    result = run_xdist(pytester, "--memlimits-fail-on-increase", str(baseline))
    # 100 MB against 200 MB at the 64 KiB interval a 1 GB limit leaves: the
    # doubling goes unseen with probability 3e-25 (summed over the Poisson
    # counts of both runs with the plugin's own bounds), and the 3 tests
    # that did not change fail with probability < 1e-9 each (by
    # construction: docs/pytest.md).
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(
        [
            "allocated grew +* over *baseline.json: * MiB -> * MiB, at least +*% "
            "beyond sampling error (1e-9); margin 10%",
            "memlimits_async: 4 tests compared with *baseline.json: 1 grew beyond "
            "the 10% margin",
            "LIMIT *test_copies?0?*",
        ]
    )


def test_the_plugin_does_not_import_xdist(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        """
        import sys
        import pytest

        @pytest.mark.limit_memory("64 MB")
        def test_alone(pytestconfig):
            assert pytestconfig.pluginmanager.has_plugin("memlimits_async-runner")
            assert "xdist" not in sys.modules
        """
    )
    pytester.makefile(".ini", pytest=INI)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    result = pytester.runpytest_subprocess(
        "-p", "memlimits_async.pytest_plugin", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=1)


# ---- threads started by the test ----

THREADS = """
import asyncio
import threading
import pytest

def grow(kept, count):
    for _ in range(count):
        kept.append(bytearray(100_000))

@pytest.mark.limit_memory("24 MB")
def test_sync_thread():
    kept = []
    thread = threading.Thread(target=grow, args=(kept, 400))
    thread.start()
    thread.join()

@pytest.mark.asyncio
@pytest.mark.limit_memory("24 MB")
async def test_asyncio_thread():
    kept = []
    thread = threading.Thread(target=grow, args=(kept, 400))
    thread.start()
    while thread.is_alive():
        await asyncio.sleep(0.001)

@pytest.mark.limit_memory("64 MB")
def test_counted():
    kept = []
    thread = threading.Thread(target=grow, args=(kept, 100))
    thread.start()
    thread.join()
"""


def _allocated(report: Any, name: str) -> int:
    for record in json.loads(report.read_text())["tests"]:
        if record["nodeid"].endswith("::" + name):
            return int(record["allocated"])
    raise AssertionError(f"no record of {name}")


def test_threads_started_by_the_test_are_charged_as_an_option(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(THREADS)
    report = pytester.path / "usage.json"
    # The default: a plain thread starts in an empty context, charged to no
    # test.
    result = run(pytester, "--memlimits-json", str(report))
    result.assert_outcomes(passed=3)
    assert _allocated(report, "test_counted") < 2_000_000
    result = run(pytester, "--memlimits-threads", "--memlimits-json", str(report))
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines_random(
        [
            "memory limit 24 MiB: peak * live*; ran to the end",
            "memory limit 24 MiB: peak * live*; stopped at *.py:2[23]",
        ]
    )
    # 10 MB at the ~56 KiB interval a 64 MB limit sets: between 5 and 16 MB
    # except with probability 1e-13 (Poisson tails, docs/accuracy.md).
    assert 5_000_000 < _allocated(report, "test_counted") < 16_000_000
    # The same from the ini file.
    pytester.makefile(".ini", pytest=INI + "memlimits_threads = true\n")
    result = pytester.runpytest_subprocess("-p", "no:memray", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2)


# ---- --memlimits-fail-on-increase ----

GROWING = """
import os
import pytest

TIMES = float(os.environ.get("TIMES", "1"))

@pytest.mark.limit_allocations("1 GB")
def test_copies():
    for _ in range(int(100 * TIMES)):
        block = bytes(1_000_000)

@pytest.mark.limit_memory("1 GB")
def test_holds():
    kept = [bytes(1_000_000) for _ in range(int(100 * TIMES))]

@pytest.mark.limit_memory("1 GB")
def test_same():
    kept = [bytes(1_000_000) for _ in range(50)]
"""


def test_fail_on_increase_against_a_previous_run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(GROWING)
    baseline = pytester.path / "baseline.json"
    run(pytester, "--memlimits-json", str(baseline)).assert_outcomes(passed=3)
    # The same code: no test fails except with probability < 1e-9 per test
    # (by construction of the bounds, docs/pytest.md).
    result = run(pytester, "--memlimits-fail-on-increase", str(baseline))
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        ["memlimits_async: 3 tests compared with *baseline.json: 0 grew *"]
    )
    # Twice the work: 100 MB -> 200 MB at a 64 KiB interval goes unseen with
    # probability 3e-25 for the allocated bytes (as in the xdist test above)
    # and 9e-20 for test_holds' peak; test_copies' 2 MB peak did not grow.
    monkeypatch.setenv("TIMES", "2")
    result = run(pytester, "--memlimits-fail-on-increase", str(baseline), "-q")
    result.assert_outcomes(passed=1, failed=2)
    out = result.stdout.str()
    copies = out.split(" test_copies ")[1].splitlines()[1:]
    assert copies[0].startswith("allocated grew +"), copies
    assert not copies[1].startswith("peak grew"), copies  # 1 MB at a time
    holds = out.split(" test_holds ")[1].splitlines()[1:3]
    assert [line.split()[0] for line in holds] == ["allocated", "peak"], holds
    assert "Traceback" not in out
    assert any(line.startswith("LL.") for line in result.stdout.lines)
    # A margin that covers the doubling lets it pass.
    result = run(
        pytester,
        "--memlimits-fail-on-increase",
        str(baseline),
        "--memlimits-increase-margin",
        "300%",
    )
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*: 0 grew beyond the 300% margin"])


def test_fail_on_increase_with_exact_accounting(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(GROWING)
    baseline = pytester.path / "baseline.json"
    exact = ("--memlimits-sampling-interval", "1")
    result = run(pytester, *exact, "--memlimits-json", str(baseline))
    result.assert_outcomes(passed=3)
    records = json.loads(baseline.read_text())["tests"]
    assert {record["sampling_interval"] for record in records} == {1}
    # Exact: 50 blocks of 1,000,000 bytes and the list that holds them.
    same = next(r for r in records if r["nodeid"].endswith("test_same"))
    assert 50_000_000 < same["peak"] < 50_010_000
    monkeypatch.setenv("TIMES", "1.05")
    result = run(pytester, *exact, "--memlimits-fail-on-increase", str(baseline))
    result.assert_outcomes(passed=3)
    monkeypatch.setenv("TIMES", "1.2")
    result = run(pytester, *exact, "--memlimits-fail-on-increase", str(baseline))
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        ["allocated grew +20% over *: * MiB -> * MiB, exact figures; margin 10%"]
    )


def test_fail_on_increase_skips_what_it_cannot_compare(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        test_a="""
        import os
        import pytest

        @pytest.mark.limit_memory("1 GB")
        def test_failed_before():
            assert os.environ.get("FIXED")
        """
    )
    baseline = pytester.path / "baseline.json"
    run(pytester, "--memlimits-json", str(baseline)).assert_outcomes(failed=1)
    pytester.makepyfile(
        test_b="""
        import pytest

        @pytest.mark.limit_memory("1 GB")
        def test_new():
            pass
        """
    )
    monkeypatch.setenv("FIXED", "1")
    result = run(pytester, "--memlimits-fail-on-increase", str(baseline))
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "memlimits_async: 0 tests compared with *: 0 grew beyond the 10% margin; "
            "1 not in it; 1 not compared (failed there or here)"
        ]
    )


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (None, "*cannot read it*"),
        ("{not json", "*not a JSON file"),
        ('{"rows": []}', "*not a --memlimits-json report*"),
        (
            '{"tests": [{"nodeid": "t.py::t", "peak": 1, "allocated": 1}]}',
            "*t.py::t has no sampling_interval: the file was written by an earlier*",
        ),
        (
            '{"tests": [{"nodeid": "t.py::t", "peak": -1, "allocated": 1, '
            '"sampling_interval": 1}]}',
            "*t.py::t: peak must be a whole number of bytes",
        ),
    ],
)
def test_a_bad_baseline_is_a_usage_error(
    pytester: pytest.Pytester, content: str | None, error: str
) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    baseline = pytester.path / "baseline.json"
    if content is not None:
        baseline.write_text(content)
    result = run(pytester, "--memlimits-fail-on-increase", str(baseline))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --memlimits-fail-on-increase *" + error])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("--memlimits-increase-margin", "lots", "*must be a percentage such as 10*"),
        ("--memlimits-increase-margin", "-5%", "*must be a percentage of 0 or more*"),
        ("--memlimits-sampling-interval", "fine", "*must look like '24 MB'*"),
    ],
)
def test_bad_comparison_options_are_a_usage_error(
    pytester: pytest.Pytester, option: str, value: str, error: str
) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = run(pytester, f"{option}={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {option}{error}"])


def test_the_bounds_hold_against_exact_poisson_tails() -> None:
    stats = pytest.importorskip("scipy.stats")
    optimize = pytest.importorskip("scipy.optimize")
    log_odds = math.log(1e9)
    for count in (0, 1, 5, 50, 500, 5000, 50000):
        # The exact means at which this count is a 1e-9 tail; Chernoff's
        # bounds lie outside them (valid), by a few percent (useful).
        upper = optimize.brentq(
            lambda mean, k=count: stats.poisson.cdf(k, mean) - 1e-9,
            count,
            10 * count + 100,
        )
        high = _upper(count * 1000, 1000, log_odds) / 1000
        assert upper * (1 - 1e-12) <= high <= 1.06 * upper
        if count:
            lower = optimize.brentq(
                lambda mean, k=count: stats.poisson.sf(k - 1, mean) - 1e-9, 1e-12, count
            )
            low = _lower(count * 1000, 1000, log_odds) / 1000
            assert low <= lower * (1 + 1e-12)
            assert count < 50 or low >= 0.92 * lower
    # Exact accounting: the figures themselves.
    assert _upper(12345, 1, log_odds) == _lower(12345, 1, log_odds) == 12345


def test_a_growing_string_counts_every_realloc_in_full(
    pytester: pytest.Pytester,
) -> None:
    # What "allocated" means for a block that grows in place: each realloc
    # counts its whole new size (docs/pytest.md), so appending 10 characters
    # 2,000 times counts about 10 * 2000**2 / 2 = 20 MB, not 20 KB.
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.limit_allocations("1 GB")
        def test_appends():
            s = ""
            for _ in range(2000):
                s += "abcdefghij"
        """
    )
    report = pytester.path / "usage.json"
    result = run(
        pytester, "--memlimits-sampling-interval", "1", "--memlimits-json", str(report)
    )
    result.assert_outcomes(passed=1)
    assert 19_000_000 < _allocated(report, "test_appends") < 22_000_000


def test_xdist_says_when_a_crashed_workers_records_are_lost(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import os
        import pytest

        @pytest.mark.parametrize("n", range(4))
        @pytest.mark.limit_memory("64 MB")
        def test_fine(n):
            pass

        @pytest.mark.limit_memory("64 MB")
        def test_crashes():
            os._exit(3)
        """
    )
    report = pytester.path / "usage.json"
    result = run_xdist(pytester, "--memlimits-json", str(report))
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(
        [
            "memlimits_async: worker gw? went down (*): the records of its tests are "
            "missing from the report"
        ]
    )
    records = json.loads(report.read_text())["tests"]
    assert 0 < len(records) < 5
    assert "test_crashes" not in str(records)


def test_the_stopping_line_survives_a_second_preemption(
    pytester: pytest.Pytester,
) -> None:
    # A sync test is preempted without grace, and again while the body
    # runs: the second one used to land in the plugin's own bookkeeping as
    # it read the first one's traceback (slow here, 800 frames deep), which
    # lost the test's line ("stopped", with no "at").
    pytester.makepyfile(
        """
        import pytest

        def dig(depth, kept):
            if depth:
                return dig(depth - 1, kept)
            for _ in range(3000):
                kept.append(bytearray(100_000))

        @pytest.mark.limit_memory("24 MB")
        def test_deep_runaway():
            dig(800, [])
        """
    )
    for _ in range(3):
        result = run(pytester)
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(["memory limit 24 MiB: peak *; stopped at *.py:11"])


def test_a_preemption_after_the_test_returned_is_no_stop() -> None:
    # Seen under load on 3.11 with --memlimits-threads: a sync test's thread
    # passed the limit while the test waited in join(), and the preemption
    # landed in the plugin's wrapper just after the test returned (3.11
    # checks for pending calls after a call returns); the test was reported
    # "stopped", with no line, though it ran to its end.  A Preempted whose
    # traceback holds only the wrapper's frame came after the body.
    from memlimits_async.pytest_plugin import _Limits, _Run

    def body() -> None:
        pass

    def wrapper(run: _Run, raise_in: str) -> None:
        with run:
            if raise_in == "body":
                raise_preempted()
            body()
            if raise_in == "wrapper":
                raise ml.Preempted("preempted: after the body")

    def raise_preempted() -> None:
        raise ml.Preempted("preempted: in the body")

    for raise_in, ran_to_end in (("wrapper", True), ("body", False)):
        run = _Run(_Limits(memory=2**30), "t.py::t", raise_preempted.__code__, 0)
        with pytest.raises(ml.Preempted):
            wrapper(run, raise_in)
        assert run.ran_to_end is ran_to_end
        assert (run.where is None) is ran_to_end
