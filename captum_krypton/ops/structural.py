"""Structural ops: concatenation, splits, permutes and reshapes that keep the box.

A box spans the value's spatial dims and takes every other dim whole, so:
- `aten.cat` and `aten.split`/`chunk` along a dim outside the box (channels)
  keep it: cat reads each operand over the bounding box, a split splits it.
- `aten.permute`/`transpose` that keep the batch first move the box's dims
  (ConvNeXt's channels-last blocks, timm's LayerNorm2d).
- A view or reshape keeps the box where every box dim and the batch survive
  whole (the product of the dims before it is the same on both sides):
  ShuffleNet's channel shuffle, `x.view(x.size(0), C, H, W)`.
Views that merge or split a box dim (`flatten(2)`), and indexing, are `full`.
"""

from __future__ import annotations

import math
import operator

import torch

from captum_krypton.ops.convolution import first_arg, is_box_tensor
from captum_krypton.ops.pointwise import bounding_box
from captum_krypton.ops.registry import (
    OpRule,
    bind,
    box_shape,
    call_on_tile,
    overloads,
    register,
    rule_for,
)

aten = torch.ops.aten


class CatRule(OpRule):
    """Concatenation along a dim outside the box (channels)."""

    name = "cat"
    any_layout = True

    def spec(self, info):
        if not is_box_tensor(info):
            return None
        dim = bind(info.node, info.args, info.kwargs)["dim"] % info.value.dim()
        return dim if dim != 0 else None

    def propagate(self, info, spec, in_geoms):
        if any(spec in g.box_dims() for g in in_geoms.values()):
            return None
        out = list(info.value.shape)

        def expected(node):
            shape = list(out)
            shape[spec] = node.meta["shape"][spec]
            return tuple(shape)

        return bounding_box(info, in_geoms, expected)

    def run_box(self, run, info, spec):
        tiles = [run.read_operand(t, info.node) for t in info.node.args[0]]
        return torch.cat(tiles, dim=spec)


class SameShapeViewRule(OpRule):
    """A view to the shape its input already has: the box passes unchanged."""

    name = "view"
    any_layout = True

    def spec(self, info):
        source = first_arg(info)
        if not is_box_tensor(info) or source is None:
            return None
        return True if tuple(source.meta["shape"]) == tuple(info.value.shape) else None

    def propagate(self, info, spec, in_geoms):
        source = first_arg(info)
        return in_geoms.get(source) if set(in_geoms) == {source} else None

    def run_box(self, run, info, spec):
        return run.read_at(first_arg(info), info.node)


class ReshapeRule(OpRule):
    """view / reshape / flatten / unflatten keeping the batch and every box dim whole."""

    name = "reshape"
    any_layout = True

    def spec(self, info):
        source = first_arg(info)
        if not is_box_tensor(info) or source is None or not source.meta.get("is_tensor"):
            return None
        return tuple(source.meta["shape"]), tuple(info.value.shape)

    @staticmethod
    def surviving_dim(in_shape, out_shape, dim: int) -> int | None:
        """Where input dim `dim` lies whole in the output, if it does."""
        before = math.prod(in_shape[:dim])
        for position, extent in enumerate(out_shape):
            if extent == in_shape[dim] and math.prod(out_shape[:position]) == before:
                return position
        return None

    def propagate(self, info, spec, in_geoms):
        source = first_arg(info)
        if set(in_geoms) != {source}:
            return None
        in_shape, out_shape = spec
        geometry = in_geoms[source]
        if self.surviving_dim(in_shape, out_shape, 0) != 0:
            return None
        moved = [self.surviving_dim(in_shape, out_shape, d) for d in geometry.box_dims()]
        if None in moved or len(set(moved)) != len(moved):
            return None
        return geometry.moved_to(tuple(moved))

    def run_box(self, run, info, spec):
        source = first_arg(info)
        tile = run.read_at(source, source)
        dims = run.plan.nodes[info.node].geometry.box_dims()
        return tile.reshape(box_shape(info.value.shape, run.rows, dims, run.size(info.node)))


class PermuteRule(OpRule):
    """permute / transpose with the batch first: the box's dims move along."""

    name = "permute"
    any_layout = True

    def spec(self, info):
        if not is_box_tensor(info) or first_arg(info) is None:
            return None
        ndim = info.value.dim()
        params = bind(info.node, info.args, info.kwargs)
        if "dims" in params:
            order = [d % ndim for d in params["dims"]]
        else:  # transpose's dim0/dim1, swapaxes' axis0/axis1
            first, second = (params[k] for k in params if k != "self")
            order = list(range(ndim))
            a, b = first % ndim, second % ndim
            order[a], order[b] = order[b], order[a]
        return tuple(order) if order[0] == 0 else None

    def propagate(self, info, spec, in_geoms):
        source = first_arg(info)
        if set(in_geoms) != {source}:
            return None
        geometry = in_geoms[source]
        return geometry.moved_to(tuple(spec.index(d) for d in geometry.box_dims()))

    def run_box(self, run, info, spec):
        source = first_arg(info)
        return run.read_at(source, source).permute(spec)


class SplitRule(OpRule):
    """split / chunk along a dim outside the box: every piece keeps the box."""

    name = "split"
    any_layout = True

    def spec(self, info):
        source = first_arg(info)
        if source is None or not isinstance(info.value, (list, tuple)):
            return None
        ndim = source.meta.get("ndim", 0)
        if ndim < 3:
            return None
        dim = bind(info.node, info.args, info.kwargs)["dim"] % ndim
        return dim if dim != 0 else None

    def propagate(self, info, spec, in_geoms):
        source = first_arg(info)
        if set(in_geoms) != {source} or spec in in_geoms[source].box_dims():
            return None
        return in_geoms[source]

    def run_box(self, run, info, spec):
        source = first_arg(info)
        return call_on_tile(run, info, run.read_at(source, source))

    def flops(self, info):
        return 0.0


class PieceRule(OpRule):
    """One piece of a boxed split (`operator.getitem`)."""

    name = "piece"
    any_layout = True

    def spec(self, info):
        source = first_arg(info)
        if source is None or not isinstance(rule_for(source), SplitRule):
            return None
        return info.node.args[1] if isinstance(info.node.args[1], int) else None

    def propagate(self, info, spec, in_geoms):
        source = first_arg(info)
        return in_geoms.get(source) if set(in_geoms) == {source} else None

    def run_box(self, run, info, spec):
        source = first_arg(info)
        return run.read_at(source, source)[spec]


CAT_RULE = register(CatRule(), aten.cat.default, aten.concat.default, aten.concatenate.default)
VIEW_RULE = register(SameShapeViewRule(), aten.expand.default)
RESHAPE_RULE = register(
    ReshapeRule(),
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.flatten.using_ints,
    aten.unflatten.int,
)
PERMUTE_RULE = register(
    PermuteRule(),
    aten.permute.default,
    aten.transpose.int,
    *overloads("swapaxes", "swapdims", only=("default",)),
)
SPLIT_RULE = register(
    SplitRule(),
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.chunk.default,
    aten.unsafe_split.Tensor,
)
PIECE_RULE = register(PieceRule(), operator.getitem)
