"""Pure planning: topology in, frozen deployment plan out."""

from widep.plan.core import DeploymentPlan, Rank, RolePlan, expert_slots, plan, resolve_arch
from widep.plan.memory import MemoryBudget

__all__ = ["DeploymentPlan", "MemoryBudget", "Rank", "RolePlan", "expert_slots", "plan", "resolve_arch"]
