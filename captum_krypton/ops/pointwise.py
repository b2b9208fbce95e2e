"""Pointwise ops: each output element from the same position of its operands.

Unary ops (activations, casts, copies, and `ones_like`-style factories, whose
value over a box is their value anywhere) keep the box; their other operands may be
per-channel constants (PReLU's weight). Ops of several tensors (add, mul, where,
...) take the bounding box of their boxed operands, each read over it: its own
box where it has one, its clean view elsewhere; unboxed operands broadcast.
Dropout in eval mode is the identity.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import fx

from captum_krypton.capture import UnsupportedForIncremental
from captum_krypton.ops.convolution import first_arg, is_box_tensor
from captum_krypton.ops.registry import (
    Geometry,
    NodeInfo,
    OpRule,
    bind,
    call_on_tile,
    overloads,
    register,
)

aten = torch.ops.aten


class PointwiseRule(OpRule):
    """Ops acting on each element (or each channel) alone: the box stays the same.

    Other tensor operands broadcast from the right, so they must have no extent
    over the box's dims; with `channel_operands` (PReLU, BatchNorm) they apply
    to dim 1, which must then be the channels (a channels-first box)."""

    name = "pointwise"
    any_layout = True

    def __init__(self, channel_operands: bool = False):
        self.channel_operands = channel_operands

    def spec(self, info):
        first = first_arg(info)
        if not is_box_tensor(info) or first is None:
            return None
        for other in info.node.all_input_nodes:
            # Extra tensors must broadcast per channel at most and be the same
            # for every row (no batch dim), e.g. BatchNorm's running stats.
            if (
                other is not first
                and other.meta.get("is_tensor")
                and (other.meta["ndim"] > 1 or other.meta["batch_aligned"])
            ):
                return None
        return True

    def propagate(self, info, spec, in_geoms):
        source = first_arg(info)
        if set(in_geoms) != {source}:
            return None
        geometry = in_geoms[source]
        ndim = info.value.dim()
        for other in info.node.all_input_nodes:
            if other is source or not other.meta.get("is_tensor"):
                continue
            shape = tuple(other.meta["shape"])
            if self.channel_operands:
                if geometry.dims is not None and math.prod(shape) != 1:
                    return None
                continue
            aligned = (1,) * (ndim - len(shape)) + shape
            if any(aligned[d] != 1 for d in geometry.box_dims()):
                return None  # varies along the box: position-dependent
        return geometry

    def run_box(self, run, info, spec):
        source = first_arg(info)
        tile = run.read_at(source, info.node)
        if run.mutates(info.node):
            tile = run.owned(source, tile)
        return call_on_tile(run, info, tile)


class IdentityRule(PointwiseRule):
    """Dropout in eval mode passes the box unchanged; in training mode it draws a
    new mask per forward, which only Captum's path reproduces."""

    name = "identity"

    def check(self, info):
        b = bind(info.node, info.args, info.kwargs)
        if b.get("train") and info.depends_on_input:
            raise UnsupportedForIncremental(f"'{info.node.name}' runs in training mode")

    def run_box(self, run, info, spec):
        return run.read_at(first_arg(info), info.node)

    def run_full(self, run, info):
        return run.full_value(first_arg(info))


class FusedRule(OpRule):
    """A node whose op was folded into its producer: it passes the box on."""

    name = "fused"

    def run_box(self, run, info, spec):
        return run.read_at(first_arg(info), info.node)


FUSED_RULE = FusedRule()


class ElementwiseRule(OpRule):
    """Ops over several same-shaped tensors: the boxes' bounding box."""

    name = "elementwise"
    any_layout = True

    def spec(self, info):
        return True if is_box_tensor(info) else None

    def propagate(self, info, spec, in_geoms):
        return bounding_box(info, in_geoms, lambda node: tuple(info.value.shape))

    def run_box(self, run, info, spec):
        def read(arg):
            return run.read_operand(arg, info.node) if isinstance(arg, fx.Node) else arg

        args = tuple(read(a) for a in info.node.args)
        kwargs = {k: read(v) for k, v in info.node.kwargs.items()}
        if run.mutates(info.node) and isinstance(info.node.args[0], fx.Node):
            args = (run.owned(info.node.args[0], args[0]), *args[1:])
        return run.call(info.node, args, kwargs)


class TrailingDimsRule(OpRule):
    """An op over the value's last `k` dims only (LayerNorm over channels, Linear
    over features): each position of the other dims alone, so a box that leaves
    those `k` dims whole stays the same box. Its parameters are operands."""

    any_layout = True

    def trailing_dims(self, info: NodeInfo) -> int:
        raise NotImplementedError

    def spec(self, info):
        source = first_arg(info)
        if not is_box_tensor(info) or source is None:
            return None
        for other in info.node.all_input_nodes:
            if other is not source and other.meta.get("batch_aligned"):
                return None
        return self.trailing_dims(info)

    def propagate(self, info, spec, in_geoms):
        source = first_arg(info)
        if set(in_geoms) != {source}:
            return None
        geometry = in_geoms[source]
        first_trailing = info.value.dim() - spec
        return geometry if all(d < first_trailing for d in geometry.box_dims()) else None

    def run_box(self, run, info, spec):
        return call_on_tile(run, info, run.read_at(first_arg(info), info.node))


def bounding_box(info: NodeInfo, in_geoms: dict, expected_shape) -> Geometry | None:
    """The bounding box of the operands' boxes, or None when a boxed operand does
    not have the expected shape (a boxed operand that broadcasts changes all)."""
    if not in_geoms:
        return None
    for node in in_geoms:
        if tuple(node.meta["shape"]) != expected_shape(node):
            return None
    first = next(iter(in_geoms.values()))
    if any(g.dims != first.dims for g in in_geoms.values()):
        return None
    lo = np.minimum.reduce([g.starts for g in in_geoms.values()])
    hi = np.maximum.reduce([g.starts + np.asarray(g.size) for g in in_geoms.values()])
    return Geometry.from_bounds(lo, hi, first.map_size, first.dims)


UNARY_OPS = overloads(
    "absolute", "negative", "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu",
    "silu", "mish",
    "sigmoid", "tanh", "hardtanh", "hardswish", "hardsigmoid", "softplus", "log_sigmoid",
    "threshold", "hardshrink", "softshrink",
    "exp", "expm1", "log", "log1p", "abs", "neg", "sqrt", "rsqrt", "reciprocal", "square",
    "sign", "erf", "sin", "cos", "clamp", "clamp_min", "clamp_max", "clip", "nan_to_num",
    "_to_copy", "clone", "detach", "alias", "contiguous", "lift_fresh_copy",
    "zeros_like", "ones_like", "full_like", "logical_not",
)  # fmt: skip
UNARY_OPS += [aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten.type_as.default]
#: Ops of several operands, every overload (a Python number as an operand is fine),
#: under all their ATen spellings (`subtract` is `sub`, `multiply` is `mul`).
ELEMENTWISE_OPS = overloads(
    "add", "sub", "subtract", "rsub", "mul", "multiply", "div", "divide", "true_divide",
    "maximum", "minimum", "fmax", "fmin", "where", "pow", "gt", "lt", "ge", "le", "eq", "ne",
    "greater", "less", "greater_equal", "less_equal", "logical_and", "logical_or",
)  # fmt: skip
POINTWISE_RULE = register(PointwiseRule(), *UNARY_OPS)
#: PReLU's weight applies per channel, to dim 1.
PRELU_RULE = register(PointwiseRule(channel_operands=True), *overloads("prelu", "_prelu_kernel"))
ELEMENTWISE_RULE = register(ElementwiseRule(), *ELEMENTWISE_OPS)
IDENTITY_RULE = register(
    IdentityRule(),
    *overloads("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"),
)
