"""Memory limits, allocation limits and cancel tokens for async Python tasks.

``async with limit_scope(memory="50 MiB"):`` cancels its body, like a
deadline, when the bytes held by its tasks pass 50 MiB.  See the docs/
folder for the guide.
"""

from ._accounts import Breach, BreachKind, Usage
from ._budget import Budget
from ._config import MeterStats, configure, stats
from ._exceptions import (
    AllocationLimitReached,
    LimitReached,
    MemoryLimitReached,
    Preempted,
    TimeLimitReached,
    TokenCancelled,
)
from ._global_limit import global_memory_limit, set_global_memory_limit
from ._groups import (
    BudgetedTaskGroup,
    ChildCancelled,
    ChildHandle,
    ChildInfo,
    ChildStatus,
    create_task_group,
)
from ._masking import InterruptSafe, interrupt_safe, is_interrupted, with_resource
from ._profile import Profile, profile
from ._scope import LimitScope, limit_scope
from ._sites import (
    Frame,
    OpenScope,
    Snapshot,
    Statistic,
    StatisticDiff,
    Trace,
    Traceback,
    open_scopes,
)
from ._sites import process_snapshot as snapshot
from ._supervisor import (
    Backoff,
    ChildSpec,
    EventKind,
    Restart,
    Strategy,
    Supervisor,
    SupervisorEvent,
    SupervisorGaveUp,
    trap_shutdown,
)
from ._threads import run_sync, threads_inherit_context
from ._tokens import CancelToken
from ._units import format_size, parse_size

__all__ = [
    "AllocationLimitReached",
    "Backoff",
    "Breach",
    "BreachKind",
    "Budget",
    "BudgetedTaskGroup",
    "CancelToken",
    "ChildCancelled",
    "ChildHandle",
    "ChildInfo",
    "ChildSpec",
    "ChildStatus",
    "EventKind",
    "Frame",
    "InterruptSafe",
    "LimitReached",
    "LimitScope",
    "MemoryLimitReached",
    "MeterStats",
    "OpenScope",
    "Preempted",
    "Profile",
    "Restart",
    "Snapshot",
    "Statistic",
    "StatisticDiff",
    "Strategy",
    "Supervisor",
    "SupervisorEvent",
    "SupervisorGaveUp",
    "TimeLimitReached",
    "TokenCancelled",
    "Trace",
    "Traceback",
    "Usage",
    "configure",
    "create_task_group",
    "format_size",
    "global_memory_limit",
    "interrupt_safe",
    "is_interrupted",
    "limit_scope",
    "open_scopes",
    "parse_size",
    "profile",
    "run_sync",
    "set_global_memory_limit",
    "snapshot",
    "stats",
    "threads_inherit_context",
    "trap_shutdown",
    "with_resource",
]
