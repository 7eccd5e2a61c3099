"""Every script in examples/ runs to completion (as the README promises)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import run_python

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


def test_there_are_examples() -> None:
    assert EXAMPLES


# Examples of an integration need its extra.
NEEDS = {"dask_budgets.py": "distributed"}


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda path: path.name)
def test_example_runs(script: Path) -> None:
    if script.name in NEEDS:
        pytest.importorskip(NEEDS[script.name])
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


def request_outcomes(output: str) -> dict[str, str]:
    """``request <name>: finished ...`` / ``request <name>: stopped ...`` lines,
    by request name (each request ends exactly once)."""
    outcomes: dict[str, str] = {}
    for line in output.splitlines():
        if not line.startswith("request "):
            continue
        name, _, event = line.removeprefix("request ").partition(": ")
        if event.startswith(("finished", "stopped")):
            assert name not in outcomes, f"request {name} ended twice"
            outcomes[name] = event
    return outcomes


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_server_example_stops_the_right_requests(backend: str) -> None:
    script = next(path for path in EXAMPLES if path.name == "server_tokens.py")
    result = run_python(str(script), "--backend", backend)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    outcomes = request_outcomes(result.stdout)
    by_admin = "token cancelled: too slow, cancelled by an administrator"

    assert outcomes["normal"].startswith("finished (40 rounds")
    assert outcomes["abandoned"].startswith(
        "stopped TOKEN (token cancelled: client disconnected)"
    )
    assert outcomes["leaky"].startswith("stopped MEMORY (memory limit of 4 MiB")
    assert outcomes["concurrent"].startswith("finished (300 rounds")
    assert outcomes["long"].startswith(f"stopped TOKEN ({by_admin})")
    assert outcomes["late"].startswith(
        "stopped TOKEN (token cancelled: server shutting down)"
    )
    assert all(", peak " in event for event in outcomes.values())
    # Each client got its reply, except the one that left.
    assert any(line.startswith("client normal: got 'DONE") for line in lines)
    assert any(line.startswith("client concurrent: got 'DONE") for line in lines)
    assert f"client long: got 'STOPPED long TOKEN {by_admin}'" in lines
    assert not any(line.startswith("client abandoned: got") for line in lines)
    assert lines[-1] == "server: stopped"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_supervised_workers_restart_the_leaky_jobs_worker_alone(backend: str) -> None:
    script = next(path for path in EXAMPLES if path.name == "supervised_workers.py")
    result = run_python(str(script), "--backend", backend)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    events = [
        line.removeprefix("event pool: ") for line in lines if line.startswith("event ")
    ]
    workers = [f"worker-{number}" for number in range(1, 5)]
    assert events[:4] == [f"{worker} started" for worker in workers]
    (breach,) = [event for event in events if " breached " in event]
    worker = breach.split()[0]
    assert breach.startswith(f"{worker} breached MEMORY: memory limit of 4 MiB")
    assert events[events.index(breach) + 1] == f"{worker} restarted"
    assert [event for event in events if "restarted" in event] == [
        f"{worker} restarted"
    ]
    assert not [event for event in events if "crashed" in event or "gave up" in event]
    # The shutdown: every worker, in reverse start order.
    assert events[-4:] == [f"{worker} stopped" for worker in reversed(workers)]
    finished = [line for line in lines if ": finished by worker-" in line]
    jobs = sorted(int(line.split()[1].rstrip(":")) for line in finished)
    assert jobs == [job for job in range(1, 25) if job != 13]  # each exactly once
    assert any(line.startswith(f"job 13: stopped with {worker}") for line in lines)
    assert lines[-1] == (
        "summary: 23 of 24 jobs finished, each once; stopped by a budget: job 13; "
        f"restarted: {worker} x1"
    )


def test_dask_example_stops_the_leak_and_the_cancelled_task() -> None:
    pytest.importorskip("distributed")
    script = next(path for path in EXAMPLES if path.name == "dask_budgets.py")
    result = run_python(str(script))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "batch: 328350 (sum of 100 squares)"
    assert lines[1].startswith("leak: stopped: ")
    assert "memory limit of 64 MiB exceeded" in lines[1]
    assert lines[2] == "neighbour: finished, 100 MiB churned"
    peak = float(lines[3].removeprefix("worker RSS peak: ").split()[0])
    assert peak < 819  # the worker's pause threshold, in MiB
    assert lines[4].startswith("runaway: cancelled, its finally ran ")
    assert lines[5] == "next task ran in the freed thread: True"
    stopped = [line.split() for line in lines[7:-1]]
    assert sorted(line[:2] for line in stopped) == [
        ["leak", "breached"],
        ["runaway", "cancelled"],
        ["runaway", "cancelled"],
    ]
    assert lines[-1] == "events logged under 'memlimits_async': 3"
