"""Build the C meter.  Everything else is in pyproject.toml.

MEMLIMITS_WERROR=1 (set by CI) turns compiler warnings into errors.
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
if os.environ.get("MEMLIMITS_WERROR") == "1":
    compile_args.append("-Werror")

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
            ],
            depends=["memlimits_async/_meter/meter.h"],
            extra_compile_args=compile_args,
            libraries=["m"],
        )
    ]
)
