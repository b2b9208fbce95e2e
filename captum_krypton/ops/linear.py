"""Linear layers over the last dim: `aten.linear`.

On a value with spatial dims before its features (ConvNeXt's MLP after a
permute to channels-last, (N, H, W, C)) each position is transformed alone, so
a box over the other dims stays. Over a dim of the box (the usual classifier
head after flatten or pooling) it mixes positions: `full`.
"""

from __future__ import annotations

import torch

from captum_krypton.ops.pointwise import TrailingDimsRule
from captum_krypton.ops.registry import register

aten = torch.ops.aten


class LinearRule(TrailingDimsRule):
    name = "linear"

    def trailing_dims(self, info):
        return 1

    def flops(self, info):
        value = info.value
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            return super().flops(info)
        in_features = info.args[1].shape[-1]
        return 2.0 * value[0].numel() * in_features


LINEAR_RULE = register(LinearRule(), aten.linear.default)
