"""Build the C meter.  Everything else is in pyproject.toml.

MEMLIMITS_WERROR=1 (set by CI) turns compiler warnings into errors.
MEMLIMITS_SANITIZE=address,undefined (set by tools/check-native.sh) builds
with those -fsanitize= checks, -O1 and frame pointers; such a build must be
run with the sanitizer runtime preloaded (the script does it).
"""

import os

from setuptools import Extension, setup

compile_args = [
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
    "-Wno-missing-field-initializers",
    # One %fs-relative access per hook instead of a __tls_get_addr call.
    "-ftls-model=initial-exec",
    # Hidden globals are reached RIP-relative, not through the GOT.
    "-fvisibility=hidden",
    "-std=gnu11",
]
link_args: list[str] = []
if os.environ.get("MEMLIMITS_WERROR") == "1":
    compile_args.append("-Werror")
sanitize = os.environ.get("MEMLIMITS_SANITIZE", "")
if sanitize:
    # After Python's own -O3, -DNDEBUG and -fno-strict-overflow: these win
    # (the last one would make signed overflow defined, hence unchecked).
    compile_args += [
        f"-fsanitize={sanitize}",
        "-fno-omit-frame-pointer",
        "-fno-optimize-sibling-calls",
        "-g",
        "-O1",
        "-UNDEBUG",
        "-fstrict-overflow",
        # Undefined behaviour executes a trap (SIGILL) instead of printing
        # from libubsan, whose messages cannot be sent to a log file when
        # libasan is preloaded: ASan's report of the SIGILL (its log, a stack
        # through the meter) catches it in every process, children included.
        "-fsanitize-undefined-trap-on-error",
        # Should a check ever call the runtime instead, it still stops there
        # (tools/check-native.sh refuses a build whose checks would recover).
        "-fno-sanitize-recover=all",
    ]
    link_args.append(f"-fsanitize={sanitize}")

setup(
    ext_modules=[
        Extension(
            "memlimits_async._meter._core",
            sources=[
                "memlimits_async/_meter/module.c",
                "memlimits_async/_meter/hooks.c",
                "memlimits_async/_meter/accounts.c",
                "memlimits_async/_meter/blocks.c",
                "memlimits_async/_meter/sampler.c",
                "memlimits_async/_meter/interrupts.c",
                "memlimits_async/_meter/numpy_handler.c",
                "memlimits_async/_meter/frames.c",
                "memlimits_async/_meter/sites.c",
            ],
            depends=["memlimits_async/_meter/meter.h"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            libraries=["m"],
        )
    ]
)
