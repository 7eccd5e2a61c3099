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

from . import _core  # noqa: E402

__all__ = ["_core"]
