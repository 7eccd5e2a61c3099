"""The C meter: allocator hooks, sampler, accounts, sampled-block table.

This package is the hook layer: it knows nothing of event loops.  Everything
above it talks to it through ``_core`` (see ``_core.pyi`` for the contract).
"""

from . import _core

__all__ = ["_core"]
