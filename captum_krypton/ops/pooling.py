"""Pooling: `aten.max_pool1d/2d/3d` and `aten.avg_pool1d/2d/3d` over boxes.

Max pooling reads -inf outside the map, average pooling zero (its divisor is the
kernel's size where `count_include_pad` holds, which a ceil-mode border window
or excluded padding would break: those are `full`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from captum_krypton.ops.convolution import SlidingWindowRule, WindowSpec, as_tuple, is_box_tensor
from captum_krypton.ops.registry import bind, register

aten = torch.ops.aten


@dataclass(frozen=True)
class PoolSpec:
    window: WindowSpec
    kind: str  # "max" or "avg"
    divisor_override: int | None


class PoolRule(SlidingWindowRule):
    name = "pool"
    _max = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
    _avg = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}

    def __init__(self, kind: str):
        self.kind = kind
        self.pad_value = -math.inf if kind == "max" else 0.0

    def spec(self, info):
        if not is_box_tensor(info) or not info.value.is_floating_point():
            return None
        ndim = info.value.dim() - 2
        params = bind(info.node, info.args, info.kwargs)
        kernel = as_tuple(params["kernel_size"], ndim)
        stride = params.get("stride")
        stride = kernel if not stride else as_tuple(stride, ndim)
        padding = as_tuple(params.get("padding", 0), ndim)
        dilation = as_tuple(params.get("dilation", 1), ndim)
        window = WindowSpec(kernel, stride, padding, dilation)
        if self.kind == "avg":
            in_size = info.args[0].shape[2:]
            floor_size = tuple(
                (h + 2 * p - k) // s + 1 for h, p, k, s in zip(in_size, padding, kernel, stride)
            )
            if params.get("ceil_mode") and floor_size != info.spatial_shape:
                return None  # ceil-mode border windows divide by a shrunken count
            if not params.get("count_include_pad", True) and any(padding):
                return None
        return PoolSpec(window, self.kind, params.get("divisor_override"))

    def run_box(self, run, info, spec):
        tile = self.read_tile(run, info, spec)
        w = spec.window
        ndim = tile.dim() - 2
        if spec.kind == "max":
            return self._max[ndim](tile, w.kernel, w.stride, 0, w.dilation)
        if ndim == 1:
            return F.avg_pool1d(tile, w.kernel, w.stride, 0)
        return self._avg[ndim](tile, w.kernel, w.stride, 0, divisor_override=spec.divisor_override)

    def flops(self, info):
        spec = self.spec(info)
        if spec is None:
            return super().flops(info)
        return float(info.value[0].numel() * math.prod(spec.window.kernel))


MAX_POOL_RULE = register(
    PoolRule("max"), aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default
)
AVG_POOL_RULE = register(
    PoolRule("avg"), aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default
)
