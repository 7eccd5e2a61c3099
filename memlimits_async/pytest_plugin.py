"""Per-test memory, allocation, leak and time budgets for pytest.

Loaded through the ``pytest11`` entry point.  A run that sets no default
limit and marks no test with ``limit_memory``, ``limit_allocations``,
``limit_leaks`` or ``limit_time`` registers no per-test hook and opens no
scope: the module only declares its options and markers.

The scope is opened inside the test function itself (``item.obj`` is
replaced for the call by a wrapper with the test's signature), so it runs in
the test's own task for async tests, whatever the runner (pytest-asyncio,
anyio on asyncio or trio, pytest-trio), and in the frame that calls the test
for sync ones: a test is cancelled at its next checkpoint, or preempted if
it never reaches one.  Fixtures are not charged.  See docs/pytest.md.

Under pytest-xdist each worker limits the tests it runs and hands its
records to the controller when it finishes (``config.workeroutput``, read in
``pytest_testnodedown``), which reports them all; xdist is never imported.

Built only on the public API, as a user could have written it.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import json
import math
import os
import re
import time
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

import memlimits_async as ml

__all__ = ["parse_test_size"]

_MARKERS = {
    "limit_memory": (
        "limit_memory(size): stop the test when the live bytes it holds pass "
        "size ('24 MB' = 24 MiB, as pytest-memray reads it; or an int of bytes)"
    ),
    "limit_allocations": (
        "limit_allocations(size): stop the test when the bytes it allocates in "
        "all pass size (a measure of work done)"
    ),
    "limit_leaks": (
        "limit_leaks(size): fail the test if, after a collection at its end, it "
        "still holds more than size of what it allocated"
    ),
    "limit_time": "limit_time(seconds): stop the test after this many seconds",
    "no_memlimits": "no_memlimits: apply no memlimits_async limit to this test",
}

# pytest-memray's units: "<NUMBER> ([KMGTP]B|B)", powers of 1024.  The IEC
# spellings (KiB, MiB, ...) mean the same here, so a limit reads the same
# under both plugins.
_SIZE = re.compile(
    r"^\s*(\+?\d*\.\d+|\+?\d+)\s*(?:([kmgtp])i?)?(b)?\s*$", re.IGNORECASE
)
_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_test_size(value: object, *, name: str = "size") -> int:
    """A size as the plugin's markers and options read it, in bytes.

    An int (bytes), or a string ``"<number> <unit>"`` with pytest-memray's
    units: ``B``, ``KB``, ``MB``, ``GB``, ``TB``, ``PB`` are powers of 1024
    (``"24 MB"`` is 24 MiB, 25,165,824 bytes), and ``KiB``, ``MiB``, ...
    mean the same.  (``ml.parse_size`` reads ``MB`` as 10**6.)  Errors name
    the argument: ``TypeError`` for a wrong type, ``ValueError`` for a bad
    value.
    """
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match is None or (match.group(2) and not match.group(3)):
            raise ValueError(
                f"{name} must look like '24 MB' (MB = MiB, as in pytest-memray), "
                f"'512 KiB' or '4096', got {value!r}"
            )
        number, prefix, _ = match.groups()
        size = float(number) * 1024 ** _POWER[(prefix or "").lower()]
        return ml.parse_size(int(size), name=name)
    return ml.parse_size(value, name=name)


def _parse_seconds(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(f"{name} must be a number of seconds, not {type(value)!r}")
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {value!r}") from None
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return seconds


@dataclass(frozen=True)
class _Limits:
    memory: int | None = None
    allocations: int | None = None
    leaks: int | None = None
    time: float | None = None

    def any(self) -> bool:
        return (self.memory, self.allocations, self.leaks, self.time) != (None,) * 4


@dataclass
class _Record:
    """What one test used, for the summary and the JSON file."""

    nodeid: str
    peak: int
    allocated: int
    held_at_end: int | None
    duration: float
    limits: dict[str, float | None]
    # The largest mean sampling interval (bytes) the meter can have used
    # while the test ran: 1 means the figures are exact.
    sampling_interval: int = 1
    outcome: str | None = None  # the call's: "passed", "failed" or "skipped"
    breach: str | None = None  # the BreachKind's value, "leaks" or "increase"
    stopped: bool = False
    where: str | None = None
    message: str | None = None
    # With --memlimits-fail-on-increase: "within" or "grew" (compared),
    # "new" (not in the baseline), "not compared" (a failed run on either
    # side, whose figures are those of a test cut short).
    baseline: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: object) -> _Record:
        """A record read back (a worker's, or a baseline's); ValueError if it
        is not one this version writes."""
        if not isinstance(data, dict) or not isinstance(data.get("nodeid"), str):
            raise ValueError(f"not a test record: {data!r:.200}")
        nodeid = data["nodeid"]
        if "sampling_interval" not in data:
            raise ValueError(
                f"{nodeid} has no sampling_interval: the file was written by an "
                f"earlier version of the plugin; write it again"
            )
        for name in ("peak", "allocated", "sampling_interval"):
            value = data.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{nodeid}: {name} must be a whole number of bytes")
        if data["sampling_interval"] < 1:
            raise ValueError(f"{nodeid}: sampling_interval must be at least 1")
        known = {each.name for each in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


_OPTIONS = (
    ("memory", "limit_memory", "SIZE", "default peak live memory per test"),
    ("allocations", "limit_allocations", "SIZE", "default allocations per test"),
    ("leaks", "limit_leaks", "SIZE", "default memory a test may still hold at its end"),
    ("time", "limit_time", "SECONDS", "default time limit per test"),
)

_DEFAULT_MARGIN = 10.0  # percent


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("memlimits_async", "per-test limits (memlimits_async)")
    for _, option, metavar, help in _OPTIONS:
        group.addoption(
            "--" + option.replace("_", "-"),
            dest=f"memlimits_{option}",
            metavar=metavar,
            default=None,
            help=f"{help} (ini: {option}); sizes as in pytest-memray, MB = MiB",
        )
        parser.addini(option, f"{help} (memlimits_async)", default=None)
    group.addoption(
        "--memlimits-top",
        dest="memlimits_top",
        metavar="N",
        type=int,
        default=None,
        help="list the N limited tests with the highest peak and allocations",
    )
    group.addoption(
        "--memlimits-json",
        dest="memlimits_json",
        metavar="FILE",
        default=None,
        help="write what each limited test used to FILE (JSON)",
    )
    parser.addini("memlimits_top", "as --memlimits-top", default=None)
    group.addoption(
        "--memlimits-fail-on-increase",
        dest="memlimits_fail_on_increase",
        metavar="FILE",
        default=None,
        help="fail the limited tests whose peak or allocated bytes grew beyond "
        "--memlimits-increase-margin over those in FILE, a --memlimits-json "
        "report of an earlier run, by more than sampling can explain "
        "(except with probability 1e-9 per test) "
        "(ini: memlimits_fail_on_increase)",
    )
    parser.addini(
        "memlimits_fail_on_increase", "as --memlimits-fail-on-increase", default=None
    )
    group.addoption(
        "--memlimits-increase-margin",
        dest="memlimits_increase_margin",
        metavar="PERCENT",
        default=None,
        help=f"growth that --memlimits-fail-on-increase lets pass, in percent "
        f"(default {_DEFAULT_MARGIN:g}; ini: memlimits_increase_margin)",
    )
    parser.addini(
        "memlimits_increase_margin", "as --memlimits-increase-margin", default=None
    )
    group.addoption(
        "--memlimits-sampling-interval",
        dest="memlimits_sampling_interval",
        metavar="SIZE",
        default=None,
        help="the meter's largest mean sampling interval for this run "
        "(ml.configure(sampling_interval=...); default 64 KiB); 1 counts every "
        "byte exactly (ini: memlimits_sampling_interval)",
    )
    parser.addini(
        "memlimits_sampling_interval", "as --memlimits-sampling-interval", default=None
    )
    group.addoption(
        "--memlimits-threads",
        dest="memlimits_threads",
        action="store_true",
        default=None,
        help="charge a limited test for the threading.Thread objects it starts "
        "(ini: memlimits_threads)",
    )
    parser.addini(
        "memlimits_threads", "as --memlimits-threads", type="bool", default=False
    )


@dataclass(frozen=True)
class _Settings:
    defaults: _Limits
    top: int | None
    json_path: str | None
    threads: bool
    baseline_path: str | None
    baseline: dict[str, _Record] | None
    margin: float  # a fraction: 0.1 for 10 %
    sampling_interval: int | None


def pytest_configure(config: pytest.Config) -> None:
    for text in _MARKERS.values():
        config.addinivalue_line("markers", text)
    settings = _settings(config)
    config.pluginmanager.register(_Collector(settings), "memlimits_async-collector")


def _option(config: pytest.Config, dest: str, ini: str) -> tuple[Any, str]:
    """The command line's value, else the ini file's, and where it came from."""
    value = config.getoption(dest)
    if value is not None:
        return value, "--" + dest.replace("_", "-")
    return config.getini(ini) or None, f"ini option {ini}"


def _settings(config: pytest.Config) -> _Settings:
    top = config.getoption("memlimits_top")
    if top is None and config.getini("memlimits_top"):
        top = _parse_count(config.getini("memlimits_top"), "memlimits_top")
    threads = config.getoption("memlimits_threads")
    if threads is None:
        threads = bool(config.getini("memlimits_threads"))
    margin, source = _option(
        config, "memlimits_increase_margin", "memlimits_increase_margin"
    )
    interval, interval_source = _option(
        config, "memlimits_sampling_interval", "memlimits_sampling_interval"
    )
    baseline_path, _ = _option(
        config, "memlimits_fail_on_increase", "memlimits_fail_on_increase"
    )
    try:
        return _Settings(
            defaults=_default_limits(config),
            top=top,
            json_path=config.getoption("memlimits_json"),
            threads=threads,
            baseline_path=baseline_path,
            baseline=None if baseline_path is None else _load_baseline(baseline_path),
            margin=_DEFAULT_MARGIN / 100
            if margin is None
            else _parse_percent(margin, source),
            sampling_interval=None
            if interval is None
            else parse_test_size(interval, name=interval_source),
        )
    except (TypeError, ValueError) as error:
        raise pytest.UsageError(str(error)) from None


def _parse_count(value: object, name: str) -> int:
    try:
        count = int(str(value))
    except ValueError:
        raise pytest.UsageError(
            f"{name} must be a whole number, got {value!r}"
        ) from None
    return count


def _parse_percent(value: object, name: str) -> float:
    """A margin: a number of percent, "10" or "10%"; as a fraction."""
    text = str(value).strip().removesuffix("%")
    try:
        percent = float(text)
    except ValueError:
        raise ValueError(
            f"{name} must be a percentage such as 10 or '10%', got {value!r}"
        ) from None
    if not (percent >= 0 and math.isfinite(percent)):
        raise ValueError(f"{name} must be a percentage of 0 or more, got {value!r}")
    return percent / 100


def _load_baseline(path: str) -> dict[str, _Record]:
    where = f"--memlimits-fail-on-increase {path}"
    try:
        data = json.loads(Path(path).read_text())
    except OSError as error:
        raise ValueError(f"{where}: cannot read it: {error.strerror}") from None
    except ValueError:
        raise ValueError(f"{where}: not a JSON file") from None
    tests = data.get("tests") if isinstance(data, dict) else None
    if not isinstance(tests, list):
        raise ValueError(
            f"{where}: not a --memlimits-json report (it has no list of tests)"
        )
    records: dict[str, _Record] = {}
    for each in tests:
        try:
            record = _Record.from_json(each)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from None
        records[record.nodeid] = record  # a test run twice: its last run
    return records


def _default_limits(config: pytest.Config) -> _Limits:
    values: dict[str, Any] = {}
    for key, option, _, _ in _OPTIONS:
        value = config.getoption(f"memlimits_{option}")
        source = "--" + option.replace("_", "-")
        if value is None:
            value = config.getini(option) or None
            source = f"ini option {option}"
        if value is None:
            continue
        try:
            values[key] = (
                _parse_seconds(value, source)
                if key == "time"
                else parse_test_size(value, name=source)
            )
        except (TypeError, ValueError) as error:
            raise pytest.UsageError(str(error)) from None
    return _Limits(**values)


def _marker_limits(item: pytest.Item, defaults: _Limits) -> _Limits:
    """The test's limits: its markers over the defaults."""
    if item.get_closest_marker("no_memlimits") is not None:
        return _Limits()
    values = asdict(defaults)
    for key, option, _, _ in _OPTIONS:
        marker = item.get_closest_marker(option)
        if marker is None:
            continue
        where = f"{item.nodeid}: @pytest.mark.{option}"
        kwargs = dict(marker.kwargs)
        args = marker.args
        if not args and len(kwargs) == 1:
            args = tuple(kwargs.values())
            kwargs = {}
        if len(args) != 1 or kwargs:
            raise pytest.UsageError(
                f"{where} takes one argument, the limit "
                f"(e.g. {option}({'2.5' if key == 'time' else repr('24 MB')})); "
                f"got args={marker.args!r} kwargs={marker.kwargs!r}"
            )
        try:
            values[key] = (
                _parse_seconds(args[0], f"{where}(...)")
                if key == "time"
                else parse_test_size(args[0], name=f"{where}(...)")
            )
        except (TypeError, ValueError) as error:
            raise pytest.UsageError(str(error)) from None
    return _Limits(**values)


def _teststatus(report: pytest.TestReport) -> tuple[str, str, str] | None:
    if report.when == "call" and report.failed:
        for name, _ in report.user_properties:
            if name == "memlimits_breach":
                return "failed", "L", "LIMIT"
    return None


class _Collector:
    """Finds the tests to limit and registers the per-test hooks only if
    there are any; reports on the records at the end of the session (the
    records of its own tests, or under xdist, on the controller, those the
    workers sent)."""

    def __init__(self, settings: _Settings) -> None:
        self.settings = settings
        self.records: list[_Record] = []
        self.workers_lost: list[str] = []
        self.configured_interval: int | None = None

    @pytest.hookimpl
    def pytest_configure(self, config: pytest.Config) -> None:
        if self.settings.sampling_interval is not None:
            self.configured_interval = ml.stats().configured_sampling_interval
            ml.configure(sampling_interval=self.settings.sampling_interval)

    @pytest.hookimpl
    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self.configured_interval is not None:
            ml.configure(sampling_interval=self.configured_interval)

    @pytest.hookimpl
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        # pytest-xdist's controller runs no test: it gets its workers'
        # records when each is done (the names are xdist's; looked up here,
        # so nothing is imported for a run without it).
        manager = session.config.pluginmanager
        if manager.has_plugin("dsession") and not manager.has_plugin(
            "memlimits_async-controller"
        ):
            manager.register(_Controller(self), "memlimits_async-controller")

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(
        self, session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        limited: dict[str, _Limits] = {}
        names = {option for _, option, _, _ in _OPTIONS}
        for item in items:
            if not isinstance(item, pytest.Function):
                continue
            if not self.settings.defaults.any() and not any(
                mark.name in names for mark in item.iter_markers()
            ):
                continue
            limits = _marker_limits(item, self.settings.defaults)
            if limits.any():
                limited[item.nodeid] = limits
        if limited and not config.pluginmanager.has_plugin("memlimits_async-runner"):
            config.pluginmanager.register(
                _Runner(limited, self.settings, self.records), "memlimits_async-runner"
            )

    @pytest.hookimpl
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        # An xdist worker: its records go to the controller with the output
        # it sends as it finishes (xdist's own hook wraps this one).
        output = getattr(session.config, "workeroutput", None)
        if output is None:
            return
        worker = getattr(session.config, "workerinput", {}).get("workerid")
        records = []
        for record in self.records:
            data = asdict(record)
            data["extra"]["worker"] = worker
            records.append(data)
        output["memlimits_async"] = records

    def pytest_terminal_summary(
        self, terminalreporter: Any, exitstatus: int, config: pytest.Config
    ) -> None:
        if hasattr(config, "workerinput"):
            return  # the controller reports
        records = self.records
        write = terminalreporter.write_line
        for lost in self.workers_lost:
            write(
                f"memlimits_async: worker {lost}: the records of its tests are "
                f"missing from the report"
            )
        if self.settings.json_path is not None:
            Path(self.settings.json_path).write_text(
                json.dumps({"tests": [asdict(r) for r in records]}, indent=1)
            )
            write(
                f"memlimits_async: {len(records)} tests written to "
                f"{self.settings.json_path}"
            )
        if self.settings.baseline is not None:
            write(_baseline_summary(records, self.settings))
        if not self.settings.top or not records:
            return
        terminalreporter.section("memlimits_async report")
        for title, key in (("peak live", "peak"), ("allocated", "allocated")):
            write(f"highest {title}:")
            ranked = sorted(records, key=lambda r: getattr(r, key), reverse=True)
            for record in ranked[: self.settings.top]:
                write(f"  {ml.format_size(getattr(record, key)):>10}  {record.nodeid}")


def _baseline_summary(records: list[_Record], settings: _Settings) -> str:
    counts: dict[str | None, int] = {}
    for record in records:
        counts[record.baseline] = counts.get(record.baseline, 0) + 1
    compared = counts.get("within", 0) + counts.get("grew", 0)
    text = (
        f"memlimits_async: {compared} tests compared with "
        f"{settings.baseline_path}: {counts.get('grew', 0)} grew beyond the "
        f"{settings.margin * 100:g}% margin"
    )
    if counts.get("new"):
        text += f"; {counts['new']} not in it"
    if counts.get("not compared"):
        text += f"; {counts['not compared']} not compared (failed there or here)"
    return text


class _Controller:
    """pytest-xdist's controller: gathers the workers' records."""

    def __init__(self, collector: _Collector) -> None:
        self.collector = collector

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object) -> None:
        output = getattr(node, "workeroutput", None) or {}
        raw = output.get("memlimits_async")
        if raw is None:
            if error is not None:
                name = getattr(getattr(node, "gateway", None), "id", "?")
                self.collector.workers_lost.append(f"{name} went down ({error})")
            return
        self.collector.records.extend(_Record.from_json(each) for each in raw)
        # Their order says nothing under xdist: by test, for stable reports.
        self.collector.records.sort(key=lambda record: record.nodeid)

    @pytest.hookimpl
    def pytest_report_teststatus(
        self, report: pytest.TestReport, config: pytest.Config
    ) -> tuple[str, str, str] | None:
        return _teststatus(report)


class _Runner:
    """Opens each limited test's scope inside the test function."""

    def __init__(
        self, limited: dict[str, _Limits], settings: _Settings, records: list[_Record]
    ):
        self.limited = limited
        self.settings = settings
        self.records = records

    # Outermost, so that runners that wrap item.obj themselves (pytest-trio)
    # wrap this wrapper, and the scope is inside the task they start.
    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, Any, None]:
        limits = self.limited.get(item.nodeid)
        if limits is None or not isinstance(item, pytest.Function):
            yield
            return
        original = item.obj
        if getattr(original, "is_hypothesis_test", False):
            yield  # hypothesis runs the body many times: not limited as a whole
            return
        runs: list[_Run] = []
        item.obj = _wrap(original, limits, item.nodeid, self.settings, runs.append)
        try:
            outcome = yield
        finally:
            item.obj = original
        records = [run.record for run in runs if run.record is not None]
        self.records.extend(records)
        message = next((r.message for r in records if r.message), None)
        baseline = self.settings.baseline
        if baseline is not None:
            for record in records:
                if message is None and outcome.excinfo is None:
                    message = _compare(record, baseline, self.settings)
                else:
                    record.baseline = "not compared"
        if message is not None and outcome.excinfo is None:
            # Raised here rather than in the test's task, where a runner
            # (pytest-trio's nursery) would wrap it in an exception group.
            outcome.force_exception(pytest.fail.Exception(message, pytrace=False))

    @pytest.hookimpl
    def pytest_report_teststatus(
        self, report: pytest.TestReport, config: pytest.Config
    ) -> tuple[str, str, str] | None:
        return _teststatus(report)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, Any, None]:
        outcome = yield
        report: pytest.TestReport = outcome.get_result()
        if call.when != "call":
            return
        for record in reversed(self.records):
            if record.nodeid == item.nodeid:
                record.outcome = report.outcome
                if record.breach is not None and report.failed:
                    report.user_properties.append(("memlimits_breach", record.breach))
                break


# The false-failure probability of --memlimits-fail-on-increase, per test:
# what sampling alone makes it fail a test whose true figures grew by no more
# than the margin.  Shared between the two figures and, within each, between
# the bounds that each side's estimate is held to (docs/pytest.md).
_FALSE_FAILURE = 1e-9
_FALSE_FAILURE_TEXT = "1e-9"


def _compare(
    record: _Record, baseline: dict[str, _Record], settings: _Settings
) -> str | None:
    """Compare a test's figures with its baseline's; the failure message if
    either grew beyond the margin by more than sampling can explain."""
    base = baseline.get(record.nodeid)
    if base is None:
        record.baseline = "new"
        return None
    if base.outcome != "passed" or base.breach is not None:
        record.baseline = "not compared"
        return None
    lines = []
    for what, bounds in (
        ("allocated", _allocated_bounds(base, record)),
        ("peak", _peak_bounds(base, record)),
    ):
        base_high, current_low = bounds
        if current_low > (1 + settings.margin) * base_high:
            before, after = getattr(base, what), getattr(record, what)
            growth = f"{after / before - 1:+.0%}" if before else "from nothing"
            if record.sampling_interval == 1 and base.sampling_interval == 1:
                certainty = "exact figures"
            else:
                surely = f"{current_low / base_high - 1:+.0%}" if base_high else "some"
                certainty = (
                    f"at least {surely} beyond sampling error ({_FALSE_FAILURE_TEXT})"
                )
            lines.append(
                f"{what} grew {growth} over {settings.baseline_path}: "
                f"{ml.format_size(before)} -> {ml.format_size(after)}, "
                f"{certainty}; margin {settings.margin * 100:g}%"
            )
    record.baseline = "grew" if lines else "within"
    if not lines:
        return None
    record.breach = "increase"
    record.message = "\n".join(lines)
    return record.message


def _allocated_bounds(base: _Record, current: _Record) -> tuple[float, float]:
    """An upper bound of the baseline's true allocated bytes and a lower
    bound of the current run's, each wrong with probability at most a
    quarter of _FALSE_FAILURE.

    The estimate is R * Poisson(true / R) at a sampling interval R
    (docs/accuracy.md); an interval that changed during the test, but never
    above the R recorded, only narrows the spread, and the Chernoff bounds
    used here hold for any such mix."""
    log_odds = math.log(4 / _FALSE_FAILURE)
    return (
        _upper(base.allocated, base.sampling_interval, log_odds),
        _lower(current.allocated, current.sampling_interval, log_odds),
    )


def _peak_bounds(base: _Record, current: _Record) -> tuple[float, float]:
    """The same for the peaks, each side wrong with probability at most
    _FALSE_FAILURE / 4 in all.

    The baseline's peak estimate is at least its estimate of the live bytes
    at the moment of the true peak, R * Poisson(peak / R): its upper bound
    is the allocated one's.  The current run's is a maximum over the whole
    test, which can exceed the true peak more often: the estimate rises only
    when a sample is charged, and by Mecke's formula the expected number of
    samples at which it reaches x is at most (marks drawn) * P(R * Poisson
    (peak / R) >= x - R), with marks drawn at most allocated / R_min (R_min:
    the smallest interval the meter can use) for allocated bytes at their
    upper bound (half the share)."""
    share = _FALSE_FAILURE / 4
    base_high = _upper(base.peak, base.sampling_interval, math.log(1 / share))
    interval = current.sampling_interval
    if interval == 1:
        return base_high, float(current.peak)
    allocated_high = _upper(current.allocated, interval, math.log(2 / share))
    stats = ml.stats()
    smallest = min(stats.configured_sampling_interval, stats.min_adaptive_interval)
    marks = max(1.0, allocated_high / smallest)
    low = _lower(max(0, current.peak - interval), interval, math.log(2 * marks / share))
    return base_high, low


def _kl(mean: float, count: float) -> float:
    """The exponent of the Chernoff bounds of a Poisson count N of this
    mean: P(N >= count) <= exp(-kl) above the mean, P(N <= count) below."""
    if count == 0:
        return mean
    return mean - count + count * math.log(count / mean)


def _upper(estimate: int, interval: int, log_odds: float) -> float:
    """The largest true value whose estimate falls this low with probability
    exp(-log_odds) or more (the estimate itself when exact)."""
    if interval <= 1:
        return float(estimate)
    count = estimate / interval
    low, high = count, count + 2 * log_odds + 2 * math.sqrt(count * log_odds) + 1
    for _ in range(100):
        middle = (low + high) / 2
        if _kl(middle, count) > log_odds:
            high = middle
        else:
            low = middle
    return high * interval


def _lower(estimate: int, interval: int, log_odds: float) -> float:
    """The smallest true value whose estimate reaches this high with
    probability exp(-log_odds) or more (the estimate itself when exact)."""
    if interval <= 1:
        return float(estimate)
    count = estimate / interval
    if count == 0:
        return 0.0
    low, high = 0.0, count
    for _ in range(100):
        middle = (low + high) / 2
        if middle == 0 or _kl(middle, count) > log_odds:
            low = middle
        else:
            high = middle
    return low * interval


def _sampling_interval(limits: _Limits) -> int:
    """The largest mean interval the meter can sample a test's body at: its
    own byte limits (open all along) keep it at or below about L / 1200
    (recompute_interval in sampler.c rounds L down, which only lowers it)."""
    stats = ml.stats()
    interval = stats.configured_sampling_interval
    byte_limits = [
        each for each in (limits.memory, limits.allocations) if each is not None
    ]
    if byte_limits:
        adaptive = max(
            stats.min_adaptive_interval, min(byte_limits) // stats.samples_per_limit
        )
        interval = min(interval, adaptive)
    return max(1, interval)


def _wrap(
    function: Callable[..., Any],
    limits: _Limits,
    nodeid: str,
    settings: _Settings,
    add: Callable[[_Run], None],
) -> Callable[..., Any]:
    code = getattr(inspect.unwrap(function), "__code__", None)
    if inspect.iscoroutinefunction(function):

        @functools.wraps(function)
        async def limited_async(*args: Any, **kwargs: Any) -> Any:
            __tracebackhide__ = True
            run = _Run(limits, nodeid, code, None)
            add(run)
            result = None  # stopped: the scope absorbed the cancellation
            try:
                async with run.scope:
                    with _threads(settings), run:
                        result = await function(*args, **kwargs)
            finally:
                run.finish()
            return result

        return limited_async

    @functools.wraps(function)
    def limited(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        # A sync test has no checkpoint to wait for: preempted at once.
        run = _Run(limits, nodeid, code, 0)
        add(run)
        result = None  # stopped: the scope absorbed the preemption
        try:
            with run.scope, _threads(settings), run:
                result = function(*args, **kwargs)
        finally:
            run.finish()
        return result

    return limited


def _threads(settings: _Settings) -> contextlib.AbstractContextManager[None]:
    if settings.threads:
        return ml.threads_inherit_context()
    return contextlib.nullcontext()


class _Run:
    """One limited call of a test: its scope, and what it reports."""

    def __init__(
        self, limits: _Limits, nodeid: str, code: object, preempt: float | None
    ) -> None:
        self.limits = limits
        self.nodeid = nodeid
        self.code = code
        self.where: str | None = None
        self.held: int | None = None
        self.ran_to_end = False
        self.record: _Record | None = None
        self.started = time.monotonic()
        self.scope = ml.limit_scope(
            memory=limits.memory,
            allocations=limits.allocations,
            timeout=limits.time,
            preempt=preempt,
        )

    # Entered inside the scope, around the test's call: its exit sees how
    # the body ended.  Interrupt-safe (and so is all it calls), because it
    # runs inside the breached scope, which preempts again and again while
    # its body runs (a sync test's without grace): a preemption landing here
    # would replace the one that stopped the test, and lose its line.
    def __enter__(self) -> None:
        return None

    @ml.interrupt_safe
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A preemption raised in the wrapper's own frame (its traceback goes
        # no further) landed after the body returned: 3.11 looks for pending
        # calls just after a call returns.
        after_the_body = (
            isinstance(exc, ml.Preempted) and tb is not None and tb.tb_next is None
        )
        if exc is not None and not after_the_body:
            self.where = _test_line(tb, self.code)
            return
        self.ran_to_end = True
        if self.limits.leaks is not None:
            gc.collect()  # what cycles held is no leak
            self.held = self.scope.usage.live

    def finish(self) -> None:
        usage = self.scope.usage
        breach = self.scope.breach
        record = _Record(
            nodeid=self.nodeid,
            peak=usage.peak_live,
            allocated=usage.allocated,
            held_at_end=self.held,
            duration=time.monotonic() - self.started,
            limits=asdict(self.limits),
            sampling_interval=_sampling_interval(self.limits),
        )
        message = None
        if breach is not None:
            record.breach = breach.kind.value
            record.stopped = not self.ran_to_end
            record.where = self.where if record.stopped else None
            message = _message(self.limits, breach, record)
        elif (
            self.limits.leaks is not None
            and self.held is not None
            and self.held > self.limits.leaks
        ):
            record.breach = "leaks"
            message = (
                f"leak limit {ml.format_size(self.limits.leaks)}: the test still "
                f"holds about {ml.format_size(self.held)} of what it allocated "
                f"after a collection at its end (peak "
                f"{ml.format_size(record.peak)}, allocated "
                f"{ml.format_size(record.allocated)})"
            )
        record.message = message
        self.record = record


def _message(limits: _Limits, breach: ml.Breach, record: _Record) -> str:
    kind = breach.kind
    if kind is ml.BreachKind.TIMEOUT:
        head = f"time limit {limits.time:g} s"
    else:
        head = f"{kind.value} limit {ml.format_size(int(breach.limit or 0))}"
    figures = (
        f"peak {ml.format_size(record.peak)} live, "
        f"{ml.format_size(record.allocated)} allocated, "
        f"{record.duration:.2f} s"
    )
    if record.stopped:
        where = f" at {record.where}" if record.where else ""
        outcome = f"stopped{where}"
    else:
        outcome = "ran to the end"
    return f"{head}: {figures}; {outcome}\n{breach.reason}"


def _test_line(tb: TracebackType | None, code: object) -> str | None:
    """The innermost line of the test function in ``tb``, else the innermost
    line outside this package and pytest."""
    found: str | None = None
    fallback: str | None = None
    while tb is not None:
        frame = tb.tb_frame
        text = f"{_relative(frame.f_code.co_filename)}:{tb.tb_lineno}"
        if frame.f_code is code:
            found = text
        module = frame.f_globals.get("__name__", "")
        if not module.startswith(("memlimits_async", "_pytest", "pytest", "anyio")):
            fallback = text
        tb = tb.tb_next
    return found or fallback


def _relative(path: str) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive
        return path
