"""Ops: one rule per ATen op, one module per op family (importing them registers)."""

from captum_krypton.ops import (  # noqa: F401  (each module registers its rules)
    convolution,
    linear,
    normalization,
    padding,
    pointwise,
    pooling,
    reduction,
    resampling,
    structural,
)
from captum_krypton.ops.pointwise import FUSED_RULE
from captum_krypton.ops.registry import (
    FULL_RULE,
    Geometry,
    NodeInfo,
    OpRule,
    bind,
    box_shape,
    call_on_tile,
    describe_target,
    functional_op,
    overloads,
    register,
    registered_ops,
    rule_for,
)

__all__ = [
    "FULL_RULE",
    "FUSED_RULE",
    "Geometry",
    "NodeInfo",
    "OpRule",
    "bind",
    "box_shape",
    "call_on_tile",
    "describe_target",
    "functional_op",
    "overloads",
    "register",
    "registered_ops",
    "rule_for",
]
