"""Structural ops: concatenation over channels, and reshapes that change nothing.

`aten.cat` along channels keeps the operands' boxes (bounding box, each operand
read over it); along any other dim it would move boxes: `full`. A view or
reshape whose output has its input's shape (`x.view(x.size(0), C, H, W)`) is the
identity. Other views, permutes, splits and indexing are `full`.
"""

from __future__ import annotations

import torch

from captum_krypton.ops.convolution import first_arg, is_box_tensor
from captum_krypton.ops.pointwise import bounding_box
from captum_krypton.ops.registry import OpRule, bind, register

aten = torch.ops.aten


class CatRule(OpRule):
    """Concatenation along channels."""

    name = "cat"

    def spec(self, info):
        if not is_box_tensor(info):
            return None
        dim = bind(info.node, info.args, info.kwargs)["dim"]
        return True if dim % info.value.dim() == 1 else None

    def propagate(self, info, spec, in_geoms):
        out = tuple(info.value.shape)
        return bounding_box(info, in_geoms, lambda node: (out[0], node.meta["shape"][1], *out[2:]))

    def run_box(self, run, info, spec):
        tiles = [run.read_operand(t, info.node) for t in info.node.args[0]]
        return torch.cat(tiles, dim=1)


class SameShapeViewRule(OpRule):
    """A view to the shape its input already has: the box passes unchanged."""

    name = "view"

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


CAT_RULE = register(CatRule(), aten.cat.default, aten.concat.default, aten.concatenate.default)
VIEW_RULE = register(
    SameShapeViewRule(),
    aten.view.default,
    aten.reshape.default,
    aten.flatten.using_ints,
    aten.expand.default,
)
