"""Memory limits, allocation limits and cancel tokens for async Python tasks.

``async with limit_scope(memory="50 MiB"):`` cancels its body, like a
deadline, when the bytes held by its tasks pass 50 MiB.  See the docs/
folder for the guide.
"""

from ._accounts import Breach, BreachKind, Usage
from ._config import MeterStats, configure, stats
from ._exceptions import (
    AllocationLimitReached,
    LimitReached,
    MemoryLimitReached,
    TimeLimitReached,
    TokenCancelled,
)
from ._global_limit import global_memory_limit, set_global_memory_limit
from ._masking import InterruptSafe, interrupt_safe, is_interrupted, with_resource
from ._scope import LimitScope, limit_scope
from ._tokens import CancelToken
from ._units import format_size, parse_size

__all__ = [
    "AllocationLimitReached",
    "Breach",
    "BreachKind",
    "CancelToken",
    "InterruptSafe",
    "LimitReached",
    "LimitScope",
    "MemoryLimitReached",
    "MeterStats",
    "TimeLimitReached",
    "TokenCancelled",
    "Usage",
    "configure",
    "format_size",
    "global_memory_limit",
    "interrupt_safe",
    "is_interrupted",
    "limit_scope",
    "parse_size",
    "set_global_memory_limit",
    "stats",
    "with_resource",
]
