"""Plan: per node of the captured graph, `none`, `box` or `full`, and what it costs."""

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
    "MIN_INCREMENTAL_GAIN",
    "PLANNING_ROWS",
    "DeviceCosts",
    "NodePlan",
    "RegionPlan",
    "build_plan",
    "check_ops",
    "device_costs",
]
