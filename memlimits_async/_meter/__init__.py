"""The C meter: allocator hooks, sampler, accounts, sampled-block table.

This package is the hook layer: it knows nothing of event loops.  Everything
above it talks to it through ``_core`` (see ``_core.pyi`` for the contract).

Only the main interpreter may import it.  The hooks meter the main
interpreter alone (hooks.c), so scopes in a subinterpreter would measure
nothing; and the extension's state is process-wide: a legacy subinterpreter
that imported it would, as it ended, run our atexit handler (which stops all
metering in the process) or abort on our delivery thread.  CPython already
refuses the single-phase ``_core`` in isolated subinterpreters; this refuses
it in legacy ones too, with the same exception.
"""

import _thread
import importlib
import importlib.util
import os


def _in_main_interpreter() -> bool:
    is_main = getattr(_thread, "_is_main_interpreter", None)  # 3.12+
    if is_main is not None:
        return bool(is_main())
    for name in ("_interpreters", "_xxsubinterpreters"):  # 3.11
        try:
            interpreters = importlib.import_module(name)
        except ImportError:
            continue
        return bool(interpreters.get_current() == interpreters.get_main())
    return True  # no subinterpreters can be made from Python


if not _in_main_interpreter():
    raise ImportError(
        "memlimits_async cannot be imported in a subinterpreter: its "
        "allocator hooks are process-wide and meter the main interpreter "
        "only; import it in the main interpreter",
        name=__name__,
    )


def _not_built_message() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    if os.path.exists(os.path.join(root, "pyproject.toml")):
        # As numpy does when imported from its source tree: say so, and how
        # to get out (python -m pytest, or python run from the checkout,
        # put the current directory first on sys.path).
        return (
            f"memlimits_async was imported from its source tree ({root}), "
            "where its C extension memlimits_async._meter._core is not "
            "built: `python -m pytest` and `python` started in the checkout "
            "put it first on sys.path.  Test the installed package as the "
            "README does: `.venv/bin/pip install '.[test]' && "
            ".venv/bin/pytest` (or `python -P -m pytest`, which keeps the "
            "checkout off sys.path); or build the extension into the "
            "checkout with an editable install: `pip install -e '.[test]'`."
        )
    return (
        "memlimits_async is installed without its C extension "
        f"memlimits_async._meter._core (in {here}): reinstall it, "
        "`pip install --force-reinstall memlimits_async`, with a C compiler "
        "and Python's headers if it is built from source."
    )


try:
    from . import _core
except ImportError:
    if importlib.util.find_spec(f"{__name__}._core") is not None:
        raise  # built, but it does not load: its own error says why
    raise ImportError(_not_built_message(), name=f"{__name__}._core") from None

__all__ = ["_core"]
