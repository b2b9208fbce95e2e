"""Normalization: `aten.batch_norm` in eval mode is per-channel pointwise.

In training mode BatchNorm normalizes by the batch's statistics (and updates its
running ones), which only Captum's path reproduces, with one exception: weight
standardization (timm's StdConv2d, NFNets, BiT) runs `batch_norm` in training
mode on a weight, with no running statistics. It does not see the input, so it
is computed once per call, in the clean run, as the model computes it.
`aten.layer_norm` over trailing dims that are not the box's (ConvNeXt's
LayerNorm over channels after a permute to channels-last, timm's LayerNorm2d)
normalizes each position alone: the box stays. Over the box's dims, and group
and instance norms, it mixes positions: `full`.
"""

from __future__ import annotations

import torch

from captum_krypton.capture import UnsupportedForIncremental
from captum_krypton.ops.pointwise import PointwiseRule, TrailingDimsRule
from captum_krypton.ops.registry import NodeInfo, bind, register

aten = torch.ops.aten


class BatchNormRule(PointwiseRule):
    name = "batch_norm"
    any_layout = False

    def __init__(self) -> None:
        super().__init__(channel_operands=True)

    def check(self, info: NodeInfo) -> None:
        b = bind(info.node, info.args, info.kwargs)
        if not b["training"] or not info.depends_on_input:
            return
        if b["running_mean"] is None:
            raise UnsupportedForIncremental(
                f"'{info.node.name}' (batch_norm) uses batch statistics (no running statistics)"
            )
        raise UnsupportedForIncremental(
            f"model is in training mode ('{info.node.name}': batch_norm uses batch statistics)"
        )


BATCH_NORM_RULE = register(BatchNormRule(), aten.batch_norm.default)


class LayerNormRule(TrailingDimsRule):
    name = "layer_norm"

    def trailing_dims(self, info):
        return len(bind(info.node, info.args, info.kwargs)["normalized_shape"])


LAYER_NORM_RULE = register(LayerNormRule(), aten.layer_norm.default)
