"""Plan: per node of the captured graph, `none`, `box` or `full`, and what it costs."""

from captum_krypton.plan.approximation import EXACT, PlanApproximation
from captum_krypton.plan.context import GlobalContext, find_global_context
from captum_krypton.plan.cost import DeviceCosts, device_costs
from captum_krypton.plan.plan import (
    MIN_INCREMENTAL_GAIN,
    PLANNING_ROWS,
    NodePlan,
    RegionPlan,
    build_plan,
    check_ops,
)

__all__ = [
    "EXACT",
    "GlobalContext",
    "PlanApproximation",
    "find_global_context",
    "MIN_INCREMENTAL_GAIN",
    "PLANNING_ROWS",
    "DeviceCosts",
    "NodePlan",
    "RegionPlan",
    "build_plan",
    "check_ops",
    "device_costs",
]
