"""Judge the sanitizer logs of a tools/check-native.sh run.

    python tools/native_findings.py LOG_DIR

LOG_DIR holds ``asan.PID`` files (ASAN_OPTIONS ``log_path``), one per process
that had something to say.  Findings, printed in full, exit status 1:

* any AddressSanitizer error (use-after-free, overflow, double free, ...), and
  the SIGILL of undefined behaviour (UBSan built with trap-on-error);
* any UBSan message, should a build print them;
* any LeakSanitizer record whose allocation stack has a frame of the meter's
  own code, other than the hooks that only pass an allocation through to the
  allocator below (every Python block of an instrumented run passes there).

Other leak records are CPython's own lost blocks: counted, not findings; so
are leaked floats, whoever asked for them (3.15.2 leaves a few at exit: see
CPYTHON_OBJECTS).  A leak check that could not run (LeakSanitizer's fatal
error) is a finding.  Python objects that the meter leaks by reference count
are the business of tools/refleak.py.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# Frames of the meter's sources: "#3 0x7f... in account_new .../accounts.c:70"
OUR_FRAME = re.compile(r"#\d+ 0x[0-9a-f]+ in (\w+) \S*_meter/(\w+)\.c:\d+")
# Hooks that hand an allocation of someone else's through to the allocator
# below: a leaked block whose stack shows only these is not ours.
# tests/test_source_tree.py checks that each is defined in _meter/, so that a
# rename cannot turn every CPython block into a finding (or hide ours).
PASS_THROUGH = {
    "hook_malloc",
    "hook_calloc",
    "hook_realloc",
    "meter_malloc_slow",
    "meter_calloc_slow",
    "meter_realloc_slow",
    "np_malloc",
    "np_calloc",
    "np_realloc",
}
# A leaked float is CPython's, whoever asked for it.  A float refers to
# nothing, and the meter never keeps one: it builds them into tuples
# (Py_BuildValue in sites.c), and a tuple it leaked would be a record of its
# own here (tools/refleak.py counts the references).  3.15.2 leaves a few
# floats unfreed at exit: three in a --quick run, two from no meter code and
# one that sites.c had built into a tuple long freed.
CPYTHON_OBJECTS = {"PyFloat_FromDouble"}
# Frames above the sanitizer's own (#0, its malloc).
CALLER_FRAME = re.compile(r"#[1-9]\d* 0x[0-9a-f]+ in (\w+)")
LEAK_RECORD = re.compile(r"^(Direct|Indirect) leak of ", re.MULTILINE)
# allocator_may_return_null's note on every refused request (the tests of
# huge requests make dozens): not a finding, and noise above a report.
REFUSED = re.compile(
    r"^==\d+==WARNING: AddressSanitizer failed to allocate .*\n", re.MULTILINE
)


def leak_records(text: str) -> list[str]:
    starts = [m.start() for m in LEAK_RECORD.finditer(text)]
    ends = [*starts[1:], len(text)]
    return [text[s:e].split("\n\n", 1)[0] for s, e in zip(starts, ends, strict=True)]


def is_ours(record: str) -> bool:
    # The function that asked for the block, under the hooks it went through.
    allocator = next(
        (
            m.group(1)
            for m in CALLER_FRAME.finditer(record)
            if m.group(1) not in PASS_THROUGH
        ),
        None,
    )
    if allocator in CPYTHON_OBJECTS:
        return False
    return any(m.group(1) not in PASS_THROUGH for m in OUR_FRAME.finditer(record))


def main(log_dir: Path) -> int:
    findings: list[str] = []
    leak_files = foreign_records = 0
    for path in sorted(log_dir.glob("*san.*")):
        text = REFUSED.sub("", path.read_text(errors="replace"))
        if "runtime error:" in text:
            findings.append(f"--- {path.name}: UndefinedBehaviorSanitizer\n{text}")
        if "LeakSanitizer has encountered a fatal error" in text:
            findings.append(f"--- {path.name}: the leak check failed\n{text}")
        if "ERROR: AddressSanitizer" in text:
            findings.append(f"--- {path.name}: AddressSanitizer\n{text}")
        if "ERROR: LeakSanitizer" in text:
            leak_files += 1
            for record in leak_records(text):
                if is_ours(record):
                    findings.append(f"--- {path.name}: leak in the meter\n{record}")
                else:
                    foreign_records += 1
    print(
        f"native_findings: {leak_files} processes reported blocks held at exit, "
        f"{foreign_records} records not allocated by the meter (not findings)"
    )
    for finding in findings:
        print(finding)
    print(f"native_findings: {len(findings)} findings in {log_dir}")
    return 1 if findings else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))
