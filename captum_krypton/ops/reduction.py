"""Reductions and global pooling: global reach, so `full` by construction.

They have rules only so that the cost model counts their work (they read their
whole input) and plans name them; a box entering one becomes the whole map.
A reduction over every spatial dim (global average / max pooling, `mean` over
dims 2, 3, ...) is a global statistic: frozen global context may take it from the
clean run instead (plan/context.py).
"""

from __future__ import annotations

import torch

from captum_krypton.ops.registry import NodeInfo, OpRule, bind, register

aten = torch.ops.aten

ADAPTIVE_POOLS = (
    aten.adaptive_avg_pool1d.default,
    aten.adaptive_avg_pool2d.default,
    aten.adaptive_avg_pool3d.default,
    aten.adaptive_max_pool1d.default,
    aten.adaptive_max_pool2d.default,
    aten.adaptive_max_pool3d.default,
)


class ReductionRule(OpRule):
    name = "reduction"

    def flops(self, info: NodeInfo) -> float:
        source = info.args[0] if info.args else None
        if isinstance(source, torch.Tensor) and source.dim() > 1:
            return float(source[0].numel())
        return super().flops(info)

    def global_statistic(self, info: NodeInfo) -> bool:
        source = info.args[0] if info.args else None
        if not isinstance(source, torch.Tensor) or source.dim() < 3:
            return False
        spatial = set(range(2, source.dim()))
        if info.node.target in ADAPTIVE_POOLS:
            return all(size == 1 for size in bind(info.node, info.args)["output_size"])
        dims = bind(info.node, info.args, info.kwargs).get("dim")
        if dims is None:  # every dim, the batch's too
            return False
        dims = [dims] if isinstance(dims, int) else list(dims)
        return {d % source.dim() for d in dims} == spatial


REDUCTION_RULE = register(
    ReductionRule(),
    aten.mean.dim,
    aten.mean.default,
    aten.sum.dim_IntList,
    aten.sum.default,
    aten.amax.default,
    aten.amin.default,
    *ADAPTIVE_POOLS,
)
