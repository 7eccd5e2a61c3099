"""``memlimits-async run``: real programs run in a fresh interpreter."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

import memlimits_async as ml

PACKAGE_PARENT = str(Path(ml.__file__).resolve().parent.parent)
ENV = {**os.environ, "PYTHONPATH": PACKAGE_PARENT, "PYTHONUNBUFFERED": "1"}


def write(tmp_path: Path, source: str, name: str = "prog.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def cli(
    *args: str, cwd: Path | None = None, python: str = sys.executable
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, "-P", "-m", "memlimits_async", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        cwd=cwd,
    )


def plain(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )


HOG = """
import asyncio, sys

async def hog():
    data = []
    while True:
        data.append(bytearray(64 * 1024))
        await asyncio.sleep(0)

async def churn():
    while True:
        for _ in range(16):
            bytes(64 * 1024)
        await asyncio.sleep(0)

async def sleeper():
    await asyncio.sleep(30)

async def quick(i):
    await asyncio.sleep(0.01)
    return i

async def main(kind):
    task = asyncio.create_task({"hog": hog, "churn": churn, "sleep": sleeper}[kind](),
                               name="worker-1")
    try:
        await task
    except asyncio.CancelledError:
        print("awaiter saw CancelledError", task.cancelled())
    print(await asyncio.gather(*(quick(i) for i in range(3))))
    sys.exit(3)

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.parametrize(
    ("option", "value", "kind", "argument"),
    [
        ("--task-memory", "8 MiB", "memory", "hog"),
        ("--task-allocations", "16 MiB", "allocations", "churn"),
        ("--task-timeout", "0.2", "timeout", "sleep"),
    ],
)
def test_breached_task_is_cancelled(
    tmp_path: Path, option: str, value: str, kind: str, argument: str
) -> None:
    script = write(tmp_path, HOG)
    result = cli("run", option, value, "--tasks", "worker-*", str(script), argument)
    assert result.returncode == 3, result.stderr
    assert "awaiter saw CancelledError True" in result.stdout
    assert "[0, 1, 2]" in result.stdout  # the other tasks ran on
    lines = [line for line in result.stderr.splitlines() if line]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        f"memlimits-async: task 'worker-1' stopped by its {kind} limit: "
    )
    assert f"{kind} limit" in lines[0]
    assert "Traceback" not in result.stderr


def test_console_script(tmp_path: Path) -> None:
    script_path = Path(sys.executable).parent / "memlimits-async"
    if not script_path.exists():
        pytest.skip("the console script is not installed next to this interpreter")
    script = write(tmp_path, HOG)
    result = subprocess.run(
        [str(script_path), "run", "--task-memory", "8 MiB", str(script), "hog"],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert result.returncode == 3, result.stderr
    assert "task 'worker-1' stopped by its memory limit" in result.stderr


def test_program_sees_what_python_gives_it(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "VALUE = 'beside the script'\n", "neighbour.py")
    script = write(
        tmp_path / "sub",
        """
        import sys, pickle
        import neighbour
        class Point:
            pass
        pickle.dumps(Point())   # classes of __main__ pickle, as under python
        print(__name__, sys.argv, neighbour.VALUE)
        """,
    )
    result = cli("run", str(script), "-x", "--task-memory", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"__main__ {[str(script), '-x', '--task-memory', '1']} beside the script"
    )
    assert result.stdout == plain(script, "-x", "--task-memory", "1").stdout


def test_module(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    write(
        package,
        """
        import asyncio, sys
        async def main():
            print(__name__, sys.argv[1:], asyncio.current_task().get_name())
        asyncio.run(main())
        """,
        "tool.py",
    )
    result = cli(
        "run", "--json", "out.json", "-m", "pkg.tool", "a", "--b", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("__main__ ['a', '--b'] Task-")
    records = json.loads((tmp_path / "out.json").read_text())["tasks"]
    assert [record["name"] for record in records] == [result.stdout.split()[-1]]
    glued = cli("run", "-mpkg.tool", "c", cwd=tmp_path)
    assert glued.stdout.startswith("__main__ ['c']"), glued.stderr


def test_exception_status_and_traceback(tmp_path: Path) -> None:
    script = write(
        tmp_path,
        """
        import asyncio
        async def fail():
            raise ValueError("the program's own error")
        asyncio.run(fail())
        """,
    )
    result = cli("run", "--task-memory", "1 GiB", str(script))
    assert result.returncode == 1 == plain(script).returncode
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert "ValueError: the program's own error" in result.stderr
    assert 'prog.py", line 4, in fail' in result.stderr
    assert "cli.py" not in result.stderr
    assert "runpy" not in result.stderr


@pytest.mark.parametrize(
    ("body", "status"),
    [("sys.exit(7)", 7), ("sys.exit('bye')", 1), ("sys.exit()", 0)],
)
def test_system_exit(tmp_path: Path, body: str, status: int) -> None:
    script = write(tmp_path, f"import sys\n{body}\n")
    result = cli("run", str(script))
    assert result.returncode == status == plain(script).returncode
    assert result.stderr == plain(script).stderr


def test_keyboard_interrupt_ends_as_under_python(tmp_path: Path) -> None:
    script = write(
        tmp_path,
        """
        import asyncio, atexit
        atexit.register(print, "the program's atexit handler ran")
        async def main():
            raise KeyboardInterrupt
        asyncio.run(main())
        """,
    )
    result = cli("run", str(script))
    assert result.returncode == plain(script).returncode == -2  # SIGINT; shells: 130
    assert result.stdout == plain(script).stdout == "the program's atexit handler ran\n"
    assert "KeyboardInterrupt" in result.stderr
    assert "cli.py" not in result.stderr


def test_sigint_while_running(tmp_path: Path) -> None:
    script = write(
        tmp_path,
        """
        import asyncio
        async def main():
            print("ready", flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
        """,
    )
    process = subprocess.Popen(
        [sys.executable, "-P", "-m", "memlimits_async", "run", str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "ready\n"
    process.send_signal(2)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -2, stderr
    assert "KeyboardInterrupt" in stderr


def test_patterns_select_tasks(tmp_path: Path) -> None:
    script = write(
        tmp_path,
        """
        import asyncio
        async def hog():
            data = [bytearray(4 << 20) for _ in range(4)]   # 16 MiB
            # Awaits long enough for a breach to reach it on a busy machine
            # (one step later, the delivery may find it done already).
            await asyncio.sleep(2)
            return len(data)
        async def main():
            named = [asyncio.create_task(hog(), name=n) for n in ("keep-1", "cut-1")]
            later = asyncio.create_task(hog())
            later.set_name("cut-2")       # named after creation: seen at its start
            for task in [*named, later]:
                try:
                    print(task.get_name(), await task)
                except asyncio.CancelledError:
                    print(task.get_name(), "cancelled")
        asyncio.run(main())
        """,
    )
    result = cli("run", "--task-memory", "8 MiB", "--tasks", "cut-*", str(script))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == [
        "keep-1 4",
        "cut-1 cancelled",
        "cut-2 cancelled",
    ]
    assert result.stderr.count("stopped by its memory limit") == 2
    several = cli(
        "run",
        "--task-memory",
        "8 MiB",
        "--tasks",
        "nope",
        "--tasks",
        "keep-*",
        str(script),
    )
    assert several.stdout.split("\n")[:3] == ["keep-1 cancelled", "cut-1 4", "cut-2 4"]


def test_global_memory(tmp_path: Path) -> None:
    script = write(
        tmp_path,
        """
        import asyncio
        async def grow(held):
            while True:
                held.append(bytearray(64 * 1024))
                await asyncio.sleep(0)
        async def main():
            held = []
            task = asyncio.create_task(grow(held), name="grower")
            try:
                await task
            except asyncio.CancelledError:
                print("stopped near", len(held) * 64 // 1024, "MiB")
        asyncio.run(main())
        """,
    )
    result = cli("run", "--global-memory", "32 MiB", "--tasks", "grower", str(script))
    assert result.returncode == 0, result.stderr
    assert "stopped near" in result.stdout
    assert "stopped by its global memory limit" in result.stderr
    megabytes = int(result.stdout.split()[2])
    assert 16 <= megabytes <= 40


def test_program_task_factory_is_kept(tmp_path: Path) -> None:
    script = write(
        tmp_path,
        """
        import asyncio, sys
        made = []
        def factory(loop, coro, **kwargs):
            made.append(coro.__qualname__)
            return asyncio.Task(coro, loop=loop, **kwargs)
        async def hog():
            data = [bytearray(1 << 20) for _ in range(32)]
            await asyncio.sleep(30)  # cancelled long before, once breached
        async def main():
            loop = asyncio.get_running_loop()
            loop.set_task_factory(factory)
            try:
                await asyncio.create_task(hog(), name="hog")
            except asyncio.CancelledError:
                print("cancelled", made)
        asyncio.run(main())
        """,
    )
    result = cli("run", "--task-memory", "8 MiB", str(script))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "cancelled ['hog']"


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks are 3.12+")
@pytest.mark.parametrize(
    "start",
    [
        'asyncio.create_task(hog(), name="eager-hog")',
        'group.create_task(hog(), name="eager-hog")',
    ],
    ids=["create_task", "TaskGroup"],
)
def test_eager_tasks(tmp_path: Path, start: str) -> None:
    # On 3.12 the name given to create_task reaches the task only after its
    # eager first step: the tool must select it by that name all the same.
    script = write(
        tmp_path,
        f"""
        import asyncio
        started = []
        async def hog():
            started.append("hog")
            data = [bytearray(1 << 20) for _ in range(32)]
            await asyncio.sleep(30)  # cancelled long before, once breached
        async def main():
            asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
            try:
                async with asyncio.TaskGroup() as group:
                    task = {start}
                    print("started at once:", started)   # eager: before any await
                    await task
            except BaseException as exc:
                print("cancelled", type(exc).__name__, task.cancelled())
        asyncio.run(main())
        """,
    )
    result = cli("run", "--task-memory", "8 MiB", "--tasks", "eager-*", str(script))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == [
        "started at once: ['hog']",
        "cancelled CancelledError True",
    ]
    assert "task 'eager-hog' stopped by its memory limit" in result.stderr


def test_task_cancelled_before_it_starts_warns_nothing(tmp_path: Path) -> None:
    script = write(
        tmp_path,
        """
        import asyncio, gc
        async def never():
            pass
        async def main():
            task = asyncio.create_task(never())
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                print("cancelled")
            gc.collect()
        asyncio.run(main())
        """,
    )
    result = subprocess.run(
        [
            sys.executable,
            "-P",
            "-W",
            "error::RuntimeWarning",
            "-m",
            "memlimits_async",
            "run",
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "cancelled\n"
    assert result.stderr == ""


def test_json(tmp_path: Path) -> None:
    script = write(tmp_path, HOG)
    out = tmp_path / "tasks.json"
    result = cli(
        "run", "--task-memory", "8 MiB", "--json", str(out), str(script), "hog"
    )
    assert result.returncode == 3, result.stderr
    records = {
        record["name"]: record for record in json.loads(out.read_text())["tasks"]
    }
    assert set(records) >= {"worker-1"}
    assert len(records) == 5  # main, worker-1, three quick ones
    hog = records["worker-1"]
    assert hog["finished"] is True
    assert hog["peak_live"] >= 6 << 20
    assert hog["allocated"] >= hog["peak_live"]
    assert hog["duration"] > 0
    [breach] = hog["breaches"]
    assert breach["kind"] == "memory"
    assert breach["limit"] == 8 << 20
    assert breach["reason"].startswith("memory limit of 8 MiB exceeded")
    quick = [record for name, record in records.items() if name.startswith("Task-")]
    assert all(record["breaches"] == [] for record in quick)
    assert any(record["duration"] >= 0.01 for record in quick)


BAD_INPUT = [
    (["run", "--bogus", "prog.py"], "unrecognized arguments: --bogus"),
    (["run", "--task-memory", "5 parsecs", "prog.py"], "--task-memory"),
    (["run", "--task-memory", "-1", "prog.py"], "--task-memory"),
    (["run", "--task-allocations", "lots", "prog.py"], "--task-allocations"),
    (["run", "--global-memory", "1 XB", "prog.py"], "--global-memory"),
    (["run", "--task-timeout", "soon", "prog.py"], "--task-timeout"),
    (["run", "--task-timeout", "-3", "prog.py"], "--task-timeout"),
    (["run", "--task-timeout", "nan", "prog.py"], "--task-timeout"),
    (["run", "missing.py"], "can't open file 'missing.py'"),
    (["run", "-m", "no_such_module_here"], "no module named 'no_such_module_here'"),
    (["run", "-m"], "-m"),
    (["run"], "the program to run is missing"),
    (["run", "--task-memory"], "--task-memory"),
    (["run", "--json", "/nonexistent-dir/x.json", "prog.py"], "--json"),
    (["run", "--report", "/nonexistent-dir/x.html", "prog.py"], "--report"),
    ([], "a command is required"),
    (["nosuchcommand"], "invalid choice"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT, ids=lambda x: repr(x))
def test_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    write(tmp_path, "print('ran')\n")
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_help() -> None:
    result = cli("run", "--help")
    assert result.returncode == 0
    for option in (
        "--task-memory",
        "--task-allocations",
        "--task-timeout",
        "--tasks",
        "--global-memory",
        "--json",
        "--report",
        "--attachable",
        "--top",
        "-m",
    ):
        assert option in result.stdout


# -------------------------------------------------------------- --top in tmux

TMUX = shutil.which("tmux")


def tmux(*args: str, server: str | None = None) -> str:
    """``tmux args``; on the tmux server ``server`` (``-L``) if given: a
    server of a test's own, which no other test's ``kill-session`` can be
    shutting down (the default server exits with its last session, and a
    ``new-session`` then may fail: "server exited unexpectedly")."""
    assert TMUX is not None
    return subprocess.run(
        [TMUX, *(() if server is None else ("-L", server)), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout


def wait_for_screen(
    session: str, predicate: str, timeout: float = 30, server: str | None = None
) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = tmux("capture-pane", "-p", "-t", session, server=server)
        if predicate in screen:
            return screen
        time.sleep(0.2)
    raise AssertionError(f"{predicate!r} never appeared on:\n{screen}")


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed")
def test_top_in_tmux(tmp_path: Path) -> None:
    pytest.importorskip("rich")
    script = write(
        tmp_path,
        """
        import asyncio
        async def big():
            data = bytearray(24 << 20)
            await asyncio.sleep(3600)
        async def small():
            data = bytearray(2 << 20)
            await asyncio.sleep(3600)
        async def main():
            print("the program's own output", flush=True)
            await asyncio.gather(asyncio.create_task(big(), name="big-one"),
                                 asyncio.create_task(small(), name="small-one"))
        asyncio.run(main())
        """,
    )
    out = tmp_path / "stdout.txt"
    session = f"mlt{os.getpid()}"
    command = (
        f"PYTHONPATH={PACKAGE_PARENT} {sys.executable} -P -m memlimits_async run "
        f"--top --task-memory '1 GiB' {script} > {out}"
    )
    tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "30", command)
    try:
        screen = wait_for_screen(session, "small-one")
        lines = screen.splitlines()
        big = next(i for i, line in enumerate(lines) if "big-one" in line)
        small = next(i for i, line in enumerate(lines) if "small-one" in line)
        assert big < small  # sorted by live bytes
        assert "MiB" in lines[big] and "1 GiB" in lines[big]
        tmux("send-keys", "-t", session, "n")  # sort by name
        time.sleep(1.5)
        screen = wait_for_screen(session, "sorted by name")
        lines = screen.splitlines()
        names = [line for line in lines if "-one" in line]
        assert "big-one" in names[0]
        tmux("send-keys", "-t", session, "q")  # quit the view; the program runs on
        wait_for_screen(session, "live view closed")
        assert out.read_text() == "the program's own output\n"  # stdout untouched
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def top_on_its_own_terminal(tmp_path: Path, source: str, limit: str) -> list[str]:
    """Run ``source`` with ``--top`` in tmux (140x30, as in the report of
    the bug), its stdout and stderr the terminal the view draws on; the
    program waits for the file ``GO`` (substituted), which is made once the
    table shows the task ``job-shown``, so that it writes its last lines
    while the table is on the screen.  Returns every line of the pane,
    scrolled off or not, once the program has ended."""
    go = tmp_path / "go"
    script = write(tmp_path, source.replace("GO", repr(str(go))))
    server = session = f"mlo{os.getpid()}-{tmp_path.name}"
    command = (
        f"PYTHONPATH={PACKAGE_PARENT} {sys.executable} -P -m memlimits_async run "
        f"--top --task-memory '{limit}' --tasks 'job-*' {script}; "
        "echo run-exit=$?; sleep 60"
    )
    size = ("-x", "140", "-y", "30")
    tmux("new-session", "-d", "-s", session, *size, command, server=server)
    try:
        wait_for_screen(session, "job-shown", server=server)
        go.touch()
        wait_for_screen(session, "run-exit=", timeout=60, server=server)
        return tmux(
            "capture-pane", "-p", "-S", "-", "-t", session, server=server
        ).splitlines()
    finally:
        subprocess.run(["tmux", "-L", server, "kill-server"], capture_output=True)


def one_table(lines: list[str]) -> int:
    """The index of the table's title line in ``lines``, checking that the
    table shows once: no title or column header left over from a frame."""
    titles = [i for i, line in enumerate(lines) if "memlimits-async top " in line]
    headers = [i for i, line in enumerate(lines) if re.match(r" task +live ", line)]
    screen = "\n".join(lines)
    assert len(titles) == 1, screen
    assert headers == [titles[0] + 1], screen
    return titles[0]


def index(lines: list[str], text: str) -> int:
    found = [i for i, line in enumerate(lines) if text in line]
    assert len(found) == 1, (text, "\n".join(lines))
    return found[0]


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed")
def test_top_keeps_the_program_s_output_on_its_terminal(tmp_path: Path) -> None:
    # The table was drawn over what the program printed to the same
    # terminal: its last line ended up on the table's footer line, erased
    # by the next redraw.  Now what it writes goes above the table.
    pytest.importorskip("rich")
    lines = top_on_its_own_terminal(
        tmp_path,
        """
        import asyncio, os, sys
        async def shown():
            data = bytearray(2 << 20)
            while not os.path.exists(GO):
                await asyncio.sleep(0.05)
        async def main():
            print("the program's first line", flush=True)
            await asyncio.create_task(shown(), name="job-shown")
            print("a line on stderr", file=sys.stderr)
            print("an unfinished line", end="", flush=True)
            await asyncio.sleep(0.3)
            print(" ended later")
            print("the program's last line")
        asyncio.run(main())
        """,
        "1 GiB",
    )
    table = one_table(lines)
    first = index(lines, "the program's first line")
    stderr = index(lines, "a line on stderr")
    unfinished = index(lines, "an unfinished line")
    ended = index(lines, " ended later")
    last = index(lines, "the program's last line")
    assert first < stderr < unfinished <= ended < last < table, "\n".join(lines)
    assert table < index(lines, "run-exit=0")


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed")
def test_top_breach_lines_then_one_table(tmp_path: Path) -> None:
    # Handlers stopped by their limit, then the program prints its results:
    # the screen showed the top of an old frame above the breach lines.
    pytest.importorskip("rich")
    lines = top_on_its_own_terminal(
        tmp_path,
        """
        import asyncio, os
        async def handler():
            held = bytearray(8 << 20)
            await asyncio.sleep(3600)
        async def shown():
            while not os.path.exists(GO):
                await asyncio.sleep(0.05)
        async def main():
            tasks = [asyncio.create_task(handler(), name=f"job-handler{i}")
                     for i in range(3)]
            tasks.append(asyncio.create_task(shown(), name="job-shown"))
            results = await asyncio.gather(*tasks, return_exceptions=True)
            print("results:", [type(result).__name__ for result in results])
        asyncio.run(main())
        """,
        "4 MiB",
    )
    table = one_table(lines)
    breaches = [
        index(lines, f"task 'job-handler{i}' stopped by its memory limit")
        for i in range(3)
    ]
    results = index(lines, "results: ['CancelledError'")
    assert max(breaches) < results < table, "\n".join(lines)
    assert "3 breaches" in lines[table], "\n".join(lines)


def test_each_task_has_a_budget_of_its_own(tmp_path: Path) -> None:
    # Ten children of 5 MiB each under one parent: 50 MiB in all, but each
    # task's budget of 8 MiB covers only what it holds itself.
    script = write(
        tmp_path,
        """
        import asyncio
        async def child(held):
            held.append(bytearray(5 << 20))
            await asyncio.sleep(0.05)
        async def main():
            held = []
            async with asyncio.TaskGroup() as group:
                for i in range(10):
                    group.create_task(child(held), name=f"child-{i}")
            print("held", sum(map(len, held)) >> 20, "MiB")
        asyncio.run(main())
        """,
    )
    result = cli("run", "--task-memory", "8 MiB", str(script))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "held 50 MiB\n"
    assert result.stderr == ""


def test_top_without_a_terminal_draws_on_stderr(tmp_path: Path) -> None:
    pytest.importorskip("rich")
    script = write(
        tmp_path,
        """
        import asyncio
        async def main():
            await asyncio.sleep(1.5)
            print("out")
        asyncio.run(main())
        """,
    )
    result = subprocess.run(
        [sys.executable, "-P", "-m", "memlimits_async", "run", "--top", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # no controlling terminal: no /dev/tty
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "out\n"
    assert "memlimits-async top" in result.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium_dom(page: Path) -> str:
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",  # tests may run as root
                "--disable-gpu",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--dump-dom",
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=180,
            env={
                name: value
                for name, value in os.environ.items()
                if name != "LD_PRELOAD" and not name.endswith("SAN_OPTIONS")
            },
        )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


class _Frames(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcdocs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "iframe":
            self.srcdocs.extend(
                value or "" for name, value in attrs if name == "srcdoc"
            )


def test_report(tmp_path: Path) -> None:
    script = write(tmp_path, HOG)
    report = tmp_path / "report.html"
    result = cli(
        "run", "--task-memory", "8 MiB", "--report", str(report), str(script), "hog"
    )
    assert result.returncode == 3, result.stderr
    page = report.read_text()
    assert page.startswith("<!DOCTYPE html>")
    rows = [line for line in page.splitlines() if line.startswith("<tr")]
    assert len(rows) == 5  # main, worker-1, three quick ones
    assert rows[0].startswith("<tr class=breach><td>worker-1</td>")  # largest first
    assert "memory limit of 8 MiB exceeded" in rows[0]
    assert all("class=breach" not in row for row in rows[1:])

    # The flame graph: the package's page, inline in a sandboxed frame.
    parser = _Frames()
    parser.feed(page)
    [graph] = parser.srcdocs
    for html in (page, graph):
        # Self-contained: nothing to fetch, no external script, style,
        # font or image (the SVG namespace is a name, not a fetch).
        assert not re.search(r"""\b(src|href)\s*=""", html)
        assert "<link" not in html and "@import" not in html and "url(" not in html
        assert "http" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "<script" not in page  # the frame's script is in its srcdoc only
    data = re.search(r'<script type="application/json" id="data">(.*?)</script>', graph)
    assert data is not None
    nodes = json.loads(data.group(1))
    assert nodes[0]["n"] == "all" and nodes[0]["u"] == -1
    # Each stack starts at the task's coroutine: the tool's, runpy's and the
    # loop's frames are left out.  The hog's line holds most of the bytes:
    # it allocated at least the 8 MiB limit, sampled at about 7 KiB while
    # the limit was open (about 1200 marks: 4 MiB is 50 % below, beyond
    # 1e-9 by the Poisson tail of docs/sites.md).
    top = [node for node in nodes if node["u"] == 0]
    assert top[0]["n"] == "hog" and top[0]["f"] == str(script), top
    assert top[0]["v"] >= 4 << 20
    assert {node["n"] for node in top} <= {
        "hog",
        "quick",
        "main",
        "Handle._run",
        "(memlimits-async run's own bookkeeping)",
    }, top
    names = {node["n"] for node in nodes}
    assert not names & {"Tracker._budgeted", "_run_program", "run_path", "run"}
    if CHROMIUM is None:
        return
    dom = chromium_dom(report)
    assert "worker-1" in dom
    assert dom.count("<tr") == 6  # the header and the five tasks
    # The page in the frame draws its boxes (its script ran).
    framed = tmp_path / "framed.html"
    framed.write_text(graph)
    boxes = re.findall(r'<g class="frame" data-name="([^"]*)"', chromium_dom(framed))
    assert boxes[:2] == ["all", "hog"], boxes


def test_crawler_example_under_the_tool(tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "examples" / "cli_crawler.py"
    result = cli("run", "--task-memory", "16 MiB", "--tasks", "fetch-*", str(example))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[7] == "fetch-7: cancelled"
    assert len(lines) == 12
    assert sum("cancelled" in line for line in lines) == 1
    assert "task 'fetch-7' stopped by its memory limit" in result.stderr


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed")
def test_top_attaches_to_a_running_process(tmp_path: Path) -> None:
    pytest.importorskip("rich")
    script = write(
        tmp_path,
        """
        import asyncio, sys
        async def held():
            data = bytearray(12 << 20)
            await asyncio.sleep(float(sys.argv[1]))
        async def main():
            print("started", flush=True)
            await asyncio.create_task(held(), name="holder-1")
        asyncio.run(main())
        """,
    )
    program = subprocess.Popen(
        [sys.executable, "-P", "-m", "memlimits_async", "run", str(script), "8"],
        stdout=subprocess.PIPE,
        text=True,
        env={**ENV, "MEMLIMITS_ASYNC_ATTACH": "1"},
    )
    session = f"mla{os.getpid()}"
    try:
        assert program.stdout is not None
        assert program.stdout.readline() == "started\n"
        socket = Path(tempfile.gettempdir(), f"memlimits-async-{os.getuid()}")
        assert (socket / f"{program.pid}.sock").exists()
        assert socket.stat().st_mode & 0o777 == 0o700
        command = (
            f"PYTHONPATH={PACKAGE_PARENT} {sys.executable} -P -m memlimits_async "
            f"top {program.pid}; echo top-exit=$?; sleep 60"
        )
        tmux("new-session", "-d", "-s", session, "-x", "150", "-y", "20", command)
        screen = wait_for_screen(session, "holder-1")
        line = next(line for line in screen.splitlines() if "holder-1" in line)
        assert "MiB" in line
        # The program ends: the view says so and exits.
        screen = wait_for_screen(session, "top-exit=0", timeout=60)
        assert "the process is gone" in screen
        assert program.wait(timeout=60) == 0
        assert not (socket / f"{program.pid}.sock").exists()  # removed at exit
    finally:
        program.kill()
        program.wait()
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_top_bad_input() -> None:
    for args, message in (
        (["top", "abc"], "not a process id"),
        (["top", "0"], "not a process id"),
        (["top", "999999999"], "no process 999999999"),
        (["top", "--wait", "soon", "1"], "--wait"),
        (["top", "--wait", "-1", "1"], "--wait"),
        (["top"], "pid"),
    ):
        result = cli(*args)
        assert result.returncode == 2, result
        assert message in result.stderr
        assert "Traceback" not in result.stderr


# ------------------------------------------- top PID without opting in

REMOTE_EXEC = hasattr(sys, "remote_exec")


def _may_ptrace_siblings() -> bool:
    # `top PID` runs beside the program, not above it: under Yama's
    # ptrace_scope 1 only root may attach to a sibling.
    try:
        scope = int(Path("/proc/sys/kernel/yama/ptrace_scope").read_text())
    except (OSError, ValueError):
        return True  # no Yama: the classic rule (same user, or root)
    return scope == 0 or (scope == 1 and os.geteuid() == 0)


needs_remote_exec = pytest.mark.skipif(
    not REMOTE_EXEC,
    reason="sys.remote_exec (PEP 768) is Python 3.14+: before it, top PID "
    "attaches only to a process that opted in (run --attachable)",
)

# Both programs count exactly (interval 1): with the sampling interval a
# 1 GiB or 64 MiB limit gives (0.85 MiB, 55 KiB), one 3 MiB block's estimate
# has a standard deviation of 1.6 MiB, and no tight bound on it holds with
# a probability anywhere near 1 - 1e-9.
HELD = """
import asyncio, sys
import memlimits_async as ml
ml.configure(sampling_interval=1)
async def held(size):
    data = bytearray(size << 20)
    for _ in range(int(float(sys.argv[1]) * 20)):
        await asyncio.sleep(0.05)
async def main():
    tasks = [asyncio.create_task(held(12), name="holder-1"),
             asyncio.create_task(held(3), name="holder-2")]
    await asyncio.sleep(0.2)
    print("started", flush=True)
    await asyncio.gather(*tasks)
asyncio.run(main())
"""

OWN_SCOPES = """
import asyncio, sys
import memlimits_async as ml
ml.configure(sampling_interval=1)
async def held(size):
    async with ml.limit_scope(memory="64 MiB"):
        data = bytearray(size << 20)
        for _ in range(int(float(sys.argv[1]) * 20)):
            await asyncio.sleep(0.05)
async def main():
    tasks = [asyncio.create_task(held(12), name="holder-1"),
             asyncio.create_task(held(3), name="holder-2")]
    await asyncio.sleep(0.2)
    print("started", flush=True)
    await asyncio.gather(*tasks)
asyncio.run(main())
"""


def _inet_sockets(pid: int) -> set[str]:
    """The inodes of the process's sockets that are TCP or UDP ones."""
    mine = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                mine.add(target[8:-1])
    inet = set()
    for table in ("tcp", "tcp6", "udp", "udp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                inet.add(line.split()[9])
    return mine & inet


def _started(args: list[str]) -> subprocess.Popen[str]:
    program = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=ENV)
    assert program.stdout is not None
    assert program.stdout.readline() == "started\n"
    return program


@needs_remote_exec
def test_top_attaches_through_remote_exec_to_run(tmp_path: Path) -> None:
    # Started by run without --attachable, --top or --json: no records; the
    # tasks started before top attached are shown all the same.
    from memlimits_async import cli as tool

    script = write(tmp_path, HELD)
    program = _started(
        [
            sys.executable,
            "-P",
            "-m",
            "memlimits_async",
            "run",
            "--task-memory",
            "1 GiB",
            str(script),
            "3",
        ]
    )
    path = Path(tool.socket_path(program.pid))
    try:
        assert not path.exists()
        source = tool.attach(program.pid, wait=30)
        try:
            snapshot = source()
        finally:
            source.close()
        rows = {task.name: task for task in snapshot.tasks}
        assert set(rows) == {"Task-1", "holder-1", "holder-2"}, rows
        # 12 and 3 MiB held, and the task's small objects.
        assert 12 << 20 < rows["holder-1"].live < 13 << 20
        assert 3 << 20 < rows["holder-2"].live < 4 << 20
        assert snapshot.memory == 1 << 30
        # A Unix socket of the user's own, in a folder of the user's own;
        # no network port.
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.parent.stat().st_mode & 0o777 == 0o700
        assert _inet_sockets(program.pid) == set()
        # A second top finds the endpoint open.
        again = tool.attach(program.pid, wait=0)
        again.close()
        assert program.wait(timeout=60) == 0
    finally:
        program.kill()
        program.wait()
    assert not path.exists()  # removed at exit


@needs_remote_exec
def test_top_attaches_through_remote_exec_to_a_program_of_its_own(
    tmp_path: Path,
) -> None:
    # Not started by run: the program's own open scopes, named by their tasks.
    from memlimits_async import cli as tool

    script = write(tmp_path, OWN_SCOPES)
    program = _started([sys.executable, "-P", str(script), "30"])
    try:
        source = tool.attach(program.pid, wait=30)
        try:
            snapshot = source()
        finally:
            source.close()
    finally:
        program.terminate()
        program.wait(timeout=60)
    rows = {task.name: task for task in snapshot.tasks}
    assert set(rows) == {"holder-1", "holder-2"}, rows
    assert rows["holder-1"].memory_limit == 64 << 20
    assert rows["holder-1"].allocation_limit is None
    assert 12 << 20 < rows["holder-1"].live < 13 << 20
    assert 3 << 20 < rows["holder-2"].live < 4 << 20


@needs_remote_exec
@pytest.mark.skipif(TMUX is None, reason="tmux is not installed")
@pytest.mark.skipif(
    not _may_ptrace_siblings(),
    reason="Yama's ptrace_scope keeps top from attaching to a sibling process",
)
def test_top_through_remote_exec_in_tmux(tmp_path: Path) -> None:
    pytest.importorskip("rich")
    script = write(tmp_path, OWN_SCOPES)
    program = _started([sys.executable, "-P", str(script), "6"])
    session = f"mlr{os.getpid()}"
    try:
        command = (
            f"PYTHONPATH={PACKAGE_PARENT} {sys.executable} -P -m memlimits_async "
            f"top {program.pid}; echo top-exit=$?; sleep 60"
        )
        tmux("new-session", "-d", "-s", session, "-x", "150", "-y", "20", command)
        screen = wait_for_screen(session, "holder-2")
        lines = screen.splitlines()
        one = next(i for i, line in enumerate(lines) if "holder-1" in line)
        two = next(i for i, line in enumerate(lines) if "holder-2" in line)
        assert one < two  # sorted by live bytes
        assert "MiB" in lines[one] and "64 MiB" in lines[one]
        screen = wait_for_screen(session, "top-exit=0", timeout=60)
        assert "the process is gone" in screen
        assert program.wait(timeout=60) == 0
    finally:
        program.kill()
        program.wait()
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


@needs_remote_exec
@pytest.mark.skipif(
    not _may_ptrace_siblings(),
    reason="Yama's ptrace_scope keeps top from attaching to a sibling process",
)
def test_top_through_remote_exec_refusals(tmp_path: Path) -> None:
    scripts = set(Path(tempfile.gettempdir()).glob("memlimits-async-attach-*"))
    # A Python process that never imported memlimits_async: none is
    # imported into it.
    plain = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "for _ in range(60): time.sleep(0.05)\n"
            "sys.exit('memlimits_async' in sys.modules)",
        ]
    )
    # A main thread blocked in one long call runs the script only after it.
    blocked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    try:
        time.sleep(0.5)
        result = cli("top", str(plain.pid))
        assert result.returncode == 2, result
        assert "has not imported memlimits_async" in result.stderr
        assert "Traceback" not in result.stderr
        result = cli("top", "--wait", "0.5", str(blocked.pid))
        assert result.returncode == 2, result
        assert "did not open its endpoint within 0.5 s" in result.stderr
        for args, env, message in (
            (["sleep", "30"], {}, "through sys.remote_exec"),
            (
                [sys.executable, "-c", "import time; time.sleep(30)"],
                {"PYTHON_DISABLE_REMOTE_DEBUG": "1"},
                "Remote debugging is not enabled",
            ),
        ):
            other = subprocess.Popen(args, env={**os.environ, **env})
            try:
                result = cli("top", str(other.pid))
            finally:
                other.kill()
                other.wait()
            assert result.returncode == 2, result
            assert f"cannot attach to process {other.pid}" in result.stderr
            assert message in result.stderr
            assert "Traceback" not in result.stderr
    finally:
        assert plain.wait(timeout=60) == 0
        # The script left for the blocked process removes itself when it
        # runs, and nothing else runs there.
        assert blocked.wait(timeout=60) == 0
    assert set(Path(tempfile.gettempdir()).glob("memlimits-async-attach-*")) == scripts


@pytest.mark.skipif(REMOTE_EXEC, reason="3.14+ attaches through sys.remote_exec")
def test_top_before_3_14_needs_the_opt_in(tmp_path: Path) -> None:
    script = write(tmp_path, OWN_SCOPES)
    program = _started([sys.executable, "-P", str(script), "30"])
    try:
        result = cli("top", str(program.pid))
    finally:
        program.kill()
        program.wait()
    assert result.returncode == 2, result
    assert (
        "--attachable" in result.stderr and "MEMLIMITS_ASYNC_ATTACH=1" in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_task_that_never_awaits_is_preempted(tmp_path: Path) -> None:
    script = write(
        tmp_path,
        """
        import asyncio, time
        async def spin():
            end = time.monotonic() + 60
            try:
                while time.monotonic() < end:
                    pass
            finally:
                print("finally ran")
        async def main():
            try:
                await asyncio.create_task(spin(), name="spinner")
            except asyncio.CancelledError:
                print("cancelled")
        asyncio.run(main())
        """,
    )
    result = cli("run", "--task-timeout", "0.3", "--tasks", "spin*", str(script))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "finally ran\ncancelled\n"
    assert "task 'spinner' stopped by its timeout limit" in result.stderr


def test_anyio_task_group_child(tmp_path: Path) -> None:
    # anyio's rule for a child cancelled from outside its scopes (also after
    # task.cancel()): the group is cancelled, and exits without an error.
    script = write(
        tmp_path,
        """
        import anyio
        async def hog():
            data = []
            while True:
                data.append(bytearray(64 * 1024))
                await anyio.sleep(0)
        async def sibling():
            try:
                await anyio.sleep(30)
            finally:
                print("sibling cancelled")
        async def main():
            async with anyio.create_task_group() as tg:
                tg.start_soon(hog, name="hog")
                tg.start_soon(sibling, name="sibling")
            print("group exited")
        anyio.run(main)
        """,
    )
    result = cli("run", "--task-memory", "8 MiB", "--tasks", "hog", str(script))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "sibling cancelled\ngroup exited\n"
    assert "task 'hog' stopped by its memory limit" in result.stderr


EAGER_ON_UVLOOP = """
import asyncio, uvloop
async def child():
    await asyncio.sleep(0)
async def main():
    asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
    await asyncio.create_task(child(), name="child")
uvloop.run(main())
"""


@pytest.mark.parametrize("factory", ["none", "factory", "eager"])
def test_uvloop(tmp_path: Path, factory: str) -> None:
    # uvloop's Loop is no asyncio.BaseEventLoop: run wraps its create_task
    # when the program imports uvloop (after run started).
    pytest.importorskip("uvloop")
    if factory == "eager" and sys.version_info < (3, 12):
        pytest.skip("eager tasks are 3.12+")
    script = write(
        tmp_path,
        f"""
        import asyncio, json, sys
        import uvloop

        async def hog():
            data = []
            while len(data) < 768:  # 48 MiB: stopped at 8 MiB long before
                data.append(bytearray(64 * 1024))
                await asyncio.sleep(0)

        async def small():
            await asyncio.sleep(0.01)

        def factory(loop, coro, **kwargs):
            return asyncio.Task(coro, loop=loop, **kwargs)

        async def main():
            loop = asyncio.get_running_loop()
            assert not isinstance(loop, asyncio.BaseEventLoop), loop
            kind = {factory!r}
            if kind == "factory":
                loop.set_task_factory(factory)
            elif kind == "eager":
                loop.set_task_factory(asyncio.eager_task_factory)
            async with asyncio.TaskGroup() as group:
                group.create_task(small(), name="small-1")
            task = asyncio.create_task(hog(), name="hog-1")
            try:
                await task
            except asyncio.CancelledError:
                print("cancelled", task.cancelled())

        uvloop.run(main())
        """,
    )
    if factory == "eager":
        alone = subprocess.run(
            [sys.executable, "-c", EAGER_ON_UVLOOP],
            capture_output=True,
            text=True,
            timeout=120,
            env=ENV,
        )
        if alone.returncode != 0:
            lines = alone.stderr.splitlines() or [""]
            pytest.skip(
                "this uvloop fails with eager_task_factory on this Python, "
                "without the tool too: "
                + next((line for line in reversed(lines) if "Error" in line), lines[-1])
            )
    out = tmp_path / "tasks.json"
    result = cli("run", "--task-memory", "8 MiB", "--json", str(out), str(script))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "cancelled True\n"
    assert "task 'hog-1' stopped by its memory limit" in result.stderr
    names = {record["name"] for record in json.loads(out.read_text())["tasks"]}
    assert {"hog-1", "small-1"} <= names
    assert len(names) == 3  # and uvloop.run's main task


def test_anyio_on_uvloop(tmp_path: Path) -> None:
    pytest.importorskip("uvloop")
    script = write(
        tmp_path,
        """
        import anyio, asyncio
        async def hog():
            data = []
            while len(data) < 768:  # 48 MiB: stopped at 8 MiB long before
                data.append(bytearray(64 * 1024))
                await anyio.sleep(0)
            print("hog finished")
        async def main():
            print(type(asyncio.get_running_loop()).__module__)
            async with anyio.create_task_group() as tg:
                tg.start_soon(hog, name="hog")
            print("group exited")
        anyio.run(main, backend_options={"use_uvloop": True})
        """,
    )
    result = cli("run", "--task-memory", "8 MiB", "--tasks", "hog", str(script))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "uvloop\ngroup exited\n"
    assert "task 'hog' stopped by its memory limit" in result.stderr


def test_trio_runs_unbudgeted(tmp_path: Path) -> None:
    # trio has no task factory: the program runs as without the tool, and
    # no task is budgeted (docs/cli.md says so).
    pytest.importorskip("trio")
    script = write(
        tmp_path,
        """
        import trio
        async def child():
            data = bytearray(16 << 20)
            await trio.sleep(0.01)
            print("child done", len(data) >> 20)
        async def main():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(child, name="child")
        trio.run(main)
        """,
    )
    out = tmp_path / "tasks.json"
    result = cli("run", "--task-memory", "8 MiB", "--json", str(out), str(script))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "child done 16\n"
    assert result.stderr == ""
    assert json.loads(out.read_text()) == {"tasks": []}
