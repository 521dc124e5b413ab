"""Pure planning: topology in, frozen deployment plan out.

The names below load on first use: ``widep.plan.memory`` (the memory budget alone, which ``widep sweep``'s fast
feasibility path needs for every candidate) must not pull in the planner and the pydantic topology schema.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "DeploymentPlan": "widep.plan.core",
    "Rank": "widep.plan.core",
    "RolePlan": "widep.plan.core",
    "expert_slots": "widep.plan.core",
    "plan": "widep.plan.core",
    "resolve_arch": "widep.plan.core",
    "MemoryBudget": "widep.plan.memory",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    if name == "api":
        return importlib.import_module("widep.plan.api")
    raise AttributeError(f"module 'widep.plan' has no attribute {name!r}")
