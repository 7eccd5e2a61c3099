#!/usr/bin/env bash
# The C meter under AddressSanitizer + UndefinedBehaviorSanitizer (and
# LeakSanitizer for the C meter's own allocations), with the whole test suite.
#
#   tools/check-native.sh [--quick] [--keep] [PYTHON ...] [-- PYTEST-ARGS ...]
#
# PYTHON: interpreters that have the test dependencies (pip install '.[test]');
# default .venv/bin/python if it exists, else python3.  For each, the working
# tree (tracked and untracked, not ignored, files) is copied to a scratch
# directory, the extension is built there with MEMLIMITS_SANITIZE (setup.py)
# and -Werror, and the whole test suite runs from that copy against the
# instrumented build.  Nothing in the working tree is written, so in-place
# builds and test runs of others are left alone.
#
# The interpreter itself is not instrumented: libasan is preloaded, and
# PYTHONMALLOC=malloc sends every MEM and OBJ allocation (the blocks our hooks
# see) to the sanitizer's malloc instead of pymalloc's arenas, so that a
# use-after-free, overflow or double free of a Python block by our hooks is
# seen.  Subprocesses started by the tests inherit all of it.
#
# Findings (exit status 1): a test failure; any AddressSanitizer error
# (use-after-free, overflow, double free, ...; it stops that process); any
# undefined behaviour (signed overflow, shift, bounds, float cast,
# misalignment, ...: it traps, and ASan reports the SIGILL with its stack);
# any block that nothing points to any more once the tests are done (the
# main pytest process, LeakSanitizer) and whose allocation stack passes
# through the meter's own code (blocks that merely passed through the hooks
# on their way to malloc are CPython's).  tools/native_findings.py reads the
# logs of every process, test subprocesses included.
#
# --quick: the first PYTHON only, the test modules that drive the meter in
# the test process (listed below), stopping at the first failing test: about
# a minute.  The full run: the whole suite on every PYTHON, about 2.5 times
# as long as the suite takes without the sanitizers, for each.
# --keep: keep the scratch directory (logs, build) even when clean.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
quick=0
keep=0
pythons=()
pytest_args=()
while [ $# -gt 0 ]; do
    case $1 in
        --quick) quick=1 ;;
        --keep) keep=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        --) shift; pytest_args=("$@"); break ;;
        -*) echo "check-native: unknown option $1" >&2; exit 2 ;;
        *) pythons+=("$1") ;;
    esac
    shift
done
if [ ${#pythons[@]} -eq 0 ]; then
    if [ -x "$root/.venv/bin/python" ]; then
        pythons=("$root/.venv/bin/python")
    else
        pythons=(python3)
    fi
fi
# Absolute paths (the builds and runs happen in the copy), venv links kept.
for i in "${!pythons[@]}"; do
    p=${pythons[$i]}
    if [[ $p == */* ]]; then
        pythons[$i]="$(cd "$(dirname "$p")" && pwd)/$(basename "$p")"
    else
        pythons[$i]=$(command -v "$p") || { echo "check-native: $p not found" >&2; exit 2; }
    fi
done
if [ $quick = 1 ]; then
    pythons=("${pythons[0]}")
    # Unless tests are named: the modules that drive the meter in the test
    # process (tools/refleak.py --quick runs the same), fork and the debug
    # allocator hooks, and the coexistence tests (numpy's wrapped handler,
    # memray); not the long stress and timing tests.
    named=0
    for arg in "${pytest_args[@]}"; do
        [[ $arg == -* ]] || named=1
    done
    if [ $named = 0 ]; then
        for module in exact scope sync tokens masking global_limit tracemalloc \
            bad_input units huge_allocations refuse process coexistence sites \
            flamegraph; do
            pytest_args+=("tests/test_$module.py")
        done
    fi
    pytest_args=(-x "${pytest_args[@]}")
fi

cc=${CC:-gcc}
libasan=$("$cc" -print-file-name=libasan.so)
if [ ! -e "$libasan" ]; then
    echo "check-native: $cc has no libasan.so (install gcc's libasan)" >&2
    exit 2
fi
libasan=$(readlink -f "$libasan")

work=$(mktemp -d "${TMPDIR:-/tmp}/memlimits-native.XXXXXX")
echo "check-native: scratch directory $work"
src="$work/src"
mkdir -p "$src"
# The working tree as it is (uncommitted edits included), without build
# products: no in-place .so, no build/ directory.
(cd "$root" && git ls-files -z --cached --others --exclude-standard) \
    | (cd "$root" && tar --null --ignore-failed-read -T - -cf -) \
    | tar -xf - -C "$src"
find "$src" -name '*.so' -delete
# Leak checking, in the main pytest process only: once the tests are done
# (at its Python exit, the modules still alive), LeakSanitizer looks for
# blocks nothing points to any more, without touching the exit status.  Not
# in the test subprocesses: at their exit LeakSanitizer would replace their
# exit status (which tests check), its thread-stopping tracer can crash
# (seen with threads still running at exit), and it cannot see pointers held
# in pymalloc's arenas (a test may ask for PYTHONMALLOC=debug).
cat >"$src/sitecustomize.py" <<'PY'
"""Written by tools/check-native.sh into its scratch copy (see there)."""

import os

_children = os.environ.pop("MEMLIMITS_NATIVE_CHILD_ASAN_OPTIONS", None)
if _children is not None:  # the main process of the run
    import atexit
    import ctypes

    os.environ["ASAN_OPTIONS"] = _children
    atexit.register(ctypes.CDLL(None).__lsan_do_recoverable_leak_check)
PY

status=0
for python in "${pythons[@]}"; do
    tag=$("$python" -c 'import sys; print("%d.%d%s" % (*sys.version_info[:2], sys.abiflags))')
    logs="$work/logs-$tag"
    mkdir -p "$logs"
    echo "=== check-native: Python $tag ($python)"
    start=$SECONDS

    # Build: setup.py if this Python has setuptools >= 77 (pyproject.toml),
    # else an isolated pip wheel build (as `pip install .` does); the .so
    # lands in the copy only.
    if "$python" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null; then
        (cd "$src" && MEMLIMITS_WERROR=1 MEMLIMITS_SANITIZE="address,undefined,float-cast-overflow,float-divide-by-zero" \
            "$python" setup.py -q build_ext --inplace \
            --build-temp "$work/build-temp-$tag" >"$logs/build.log" 2>&1) \
            || { cat "$logs/build.log"; echo "check-native: build failed" >&2; exit 1; }
    else
        (cd "$src" && MEMLIMITS_WERROR=1 MEMLIMITS_SANITIZE="address,undefined,float-cast-overflow,float-divide-by-zero" \
            "$python" -m pip wheel -q --no-deps -w "$work/wheel-$tag" . >"$logs/build.log" 2>&1) \
            || { cat "$logs/build.log"; echo "check-native: build failed" >&2; exit 1; }
        "$python" - "$work/wheel-$tag" "$src" <<'PY'
import pathlib, sys, zipfile
wheel, = pathlib.Path(sys.argv[1]).glob("*.whl")
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("memlimits_async/_meter/_core") and name.endswith(".so"):
            z.extract(name, sys.argv[2])
PY
        rm -rf "$src/build"
    fi

    # Undefined behaviour must stop the process that meets it, or a test
    # that passes over it would hide it: every UBSan check of the build traps
    # (setup.py), none calls a runtime handler that reports and carries on.
    so=$(find "$src/memlimits_async/_meter" -name '_core*.so')
    recovering=$(nm -D --undefined-only "$so" | grep -oE '__ubsan_handle_[a-z_0-9]+' \
        | grep -v '_abort$' || true)
    if [ -n "$recovering" ]; then
        echo "check-native: the build's UBSan checks report and continue:" $recovering >&2
        exit 1
    fi

    # The sanitizer's runtime settings, for this process and its children
    # (PYTHONPATH: the copy's sitecustomize.py, above).
    # allocator_may_return_null: a huge request gives MemoryError, as
    # without ASan.  handle_sigill: the report of an undefined-behaviour trap.
    # detect_leaks with leak_check_at_exit=0: the main process checks when
    # its tests are done (sitecustomize.py); its children do not check.
    options="allocator_may_return_null=1:handle_sigill=1:log_path=$logs/asan"
    sanitize_env=(
        "LD_PRELOAD=$libasan"
        "PYTHONMALLOC=malloc"
        "PYTHONDONTWRITEBYTECODE=1"
        "PYTHONPATH=$src"
        "ASAN_OPTIONS=$options:detect_leaks=0"
    )
    main_env=(
        "ASAN_OPTIONS=$options:detect_leaks=1:leak_check_at_exit=0"
        "MEMLIMITS_NATIVE_CHILD_ASAN_OPTIONS=$options:detect_leaks=0"
    )

    # Are the tests about to run on the instrumented build, with ASan live?
    if ! (cd "$src" && env "${sanitize_env[@]}" "$python" -c '
import sys, memlimits_async._meter._core as core
maps = open("/proc/self/maps").read()
assert core.__file__.startswith(sys.argv[1]), core.__file__
assert "libasan" in maps, "sanitizer runtime not loaded"
' "$src/"); then
        echo "check-native: the instrumented build is not the one imported" >&2
        exit 1
    fi

    # -m pytest from the copy: its directory comes first on sys.path, before
    # any installed memlimits_async; run_python() children follow (PYTHONPATH).
    test_rc=0
    (cd "$src" && env "${sanitize_env[@]}" "${main_env[@]}" "$python" -m pytest -q -p no:cacheprovider \
        "${pytest_args[@]}") || test_rc=$?
    findings_rc=0
    "$python" "$root/tools/native_findings.py" "$logs" || findings_rc=$?
    echo "check-native: Python $tag: tests exit $test_rc, findings exit $findings_rc, $((SECONDS - start)) s"
    if [ $test_rc != 0 ] || [ $findings_rc != 0 ]; then
        status=1
        [ $quick = 1 ] && break
    fi
done

if [ $status = 0 ] && [ $keep = 0 ]; then
    rm -rf "$work"
    echo "check-native: clean"
else
    echo "check-native: logs and build kept in $work"
    [ $status = 0 ] || echo "check-native: FAILED" >&2
fi
exit $status
