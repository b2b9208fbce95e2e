"""Reductions and global pooling: global reach, so `full` by construction.

They have rules only so that the cost model counts their work (they read their
whole input) and plans name them; a box entering one becomes the whole map.
"""

from __future__ import annotations

import torch

from captum_krypton.ops.registry import NodeInfo, OpRule, register

aten = torch.ops.aten


class ReductionRule(OpRule):
    name = "reduction"

    def flops(self, info: NodeInfo) -> float:
        source = info.args[0] if info.args else None
        if isinstance(source, torch.Tensor) and source.dim() > 1:
            return float(source[0].numel())
        return super().flops(info)


REDUCTION_RULE = register(
    ReductionRule(),
    aten.mean.dim,
    aten.mean.default,
    aten.sum.dim_IntList,
    aten.sum.default,
    aten.amax.default,
    aten.amin.default,
    aten.adaptive_avg_pool1d.default,
    aten.adaptive_avg_pool2d.default,
    aten.adaptive_avg_pool3d.default,
    aten.adaptive_max_pool1d.default,
    aten.adaptive_max_pool2d.default,
    aten.adaptive_max_pool3d.default,
)
