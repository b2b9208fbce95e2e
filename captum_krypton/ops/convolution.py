"""Convolution: `aten.conv1d/2d/3d` (both padding overloads) and `aten.convolution`.

A box grows by the kernel's reach (DESIGN.md's formula); the box is computed from
a tile read over (box | clean view | zero padding), or, on CUDA, by the implicit
GEMM kernel reading the same region without building the tile. An eval
BatchNorm that follows is folded into the weights and a ReLU into the epilogue.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from captum_krypton.kernels import conv_supports_implicit_gemm as triton_conv_supports
from captum_krypton.ops.registry import Geometry, NodeInfo, OpRule, bind, register

aten = torch.ops.aten


def as_tuple(value: Any, ndim: int) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return tuple(int(value[0]) for _ in range(ndim))
        return tuple(int(v) for v in value)
    return tuple(int(value) for _ in range(ndim))


def first_arg(info: NodeInfo) -> fx.Node | None:
    arg = info.node.args[0] if info.node.args else None
    return arg if isinstance(arg, fx.Node) else None


def is_box_tensor(info: NodeInfo) -> bool:
    """A value with a batch, channels and at least one spatial dim."""
    return isinstance(info.value, torch.Tensor) and info.value.dim() >= 3


@dataclass(frozen=True)
class WindowSpec:
    """A sliding-window op (conv or pool) along the spatial dims."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    pad_lo: tuple[int, ...]
    dilation: tuple[int, ...]

    @property
    def extent(self) -> tuple[int, ...]:
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation))

    def grow(self, geom: Geometry, out_size: tuple[int, ...]) -> Geometry:
        """Output rows whose receptive fields meet the input box (DESIGN.md formula)."""
        stride = np.asarray(self.stride)
        pad = np.asarray(self.pad_lo)
        extent = np.asarray(self.extent)
        a = geom.starts
        b = geom.starts + np.asarray(geom.size)
        lo = np.maximum(-((extent - 1 - a - pad) // stride), 0)  # ceil((a-(E-1)+P)/S)
        hi = np.minimum((b - 1 + pad) // stride + 1, np.asarray(out_size))
        hi = np.maximum(hi, lo + 1)
        return Geometry.from_bounds(lo, hi, out_size)

    def read_window(
        self, out_starts: torch.Tensor, out_size: tuple[int, ...], run: Any
    ) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Input rows read to produce an output box: starts (may be negative) and size."""
        stride = run.views.constant(self.stride, out_starts.device)
        pad = run.views.constant(self.pad_lo, out_starts.device)
        size = tuple((z - 1) * s + e for z, s, e in zip(out_size, self.stride, self.extent))
        return out_starts * stride - pad, size

    def pad_hi(self, in_size: tuple[int, ...], out_size: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(
            max(0, (n - 1) * s - p + e - h)
            for n, s, p, e, h in zip(out_size, self.stride, self.pad_lo, self.extent, in_size)
        )


class SlidingWindowRule(OpRule):
    """Shared propagation of conv and pooling: grow the box by the kernel's reach."""

    pad_value = 0.0

    def propagate(self, info, spec, in_geoms):
        geom = in_geoms.get(first_arg(info))
        if geom is None or len(in_geoms) != 1:
            return None
        return spec.window.grow(geom, info.spatial_shape)

    def read_volume(self, info, spec, geometry):
        window = spec.window
        return math.prod(
            (z - 1) * s + e for z, s, e in zip(geometry.size, window.stride, window.extent)
        )

    def read_tile(self, run: Any, info: NodeInfo, spec: Any) -> torch.Tensor:
        out_starts = run.starts(info.node)
        out_size = run.size(info.node)
        starts, size = spec.window.read_window(out_starts, out_size, run)
        source = first_arg(info)
        in_size = tuple(run.clean_value(source).shape[2:])
        return run.read(
            source,
            starts,
            size,
            pad_lo=spec.window.pad_lo,
            pad_hi=spec.window.pad_hi(in_size, info.spatial_shape),
            pad_value=self.pad_value,
        )


@dataclass(frozen=True)
class ConvSpec:
    window: WindowSpec
    weight: torch.Tensor
    bias: torch.Tensor | None
    groups: int
    activation: str | None = None  # a ReLU absorbed into the conv's epilogue

    @functools.cached_property
    def gemm_weight(self) -> torch.Tensor:
        """The weight as the implicit-GEMM kernel reads it, made once."""
        from captum_krypton.kernels.triton_conv import gemm_weight

        return gemm_weight(self.weight)


_RELU = (aten.relu.default, aten.relu_.default)
_BATCH_NORM = (aten.batch_norm.default,)


class ConvRule(SlidingWindowRule):
    name = "conv"
    _functional = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

    def spec(self, info):
        if not is_box_tensor(info):
            return None
        b = bind(info.node, info.args, info.kwargs)
        if b.get("transposed") or any(b.get("output_padding") or ()):
            return None
        weight, bias = b["weight"], b["bias"]
        if not isinstance(weight, torch.Tensor):
            return None
        ndim = info.value.dim() - 2
        kernel = tuple(weight.shape[2:])
        dilation = as_tuple(b["dilation"], ndim)
        padding = b["padding"]
        if isinstance(padding, str):
            if padding == "valid":
                pad_lo = (0,) * ndim
            else:  # "same": torch pads the smaller half on the left
                pad_lo = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
        else:
            pad_lo = as_tuple(padding, ndim)
        window = WindowSpec(kernel, as_tuple(b["stride"], ndim), pad_lo, dilation)
        return ConvSpec(window, weight, bias, int(b["groups"]))

    def absorb(self, spec: ConvSpec, consumer: NodeInfo) -> ConvSpec | None:
        """Fold an eval BatchNorm that follows the conv into its weight and bias, and
        a ReLU after them into the epilogue."""
        target = consumer.node.target
        if target in _RELU and spec.activation is None:
            return dataclasses.replace(spec, activation="relu")
        if target not in _BATCH_NORM or spec.activation is not None:
            return None
        bn = bind(consumer.node, consumer.args, consumer.kwargs)
        mean, var = bn["running_mean"], bn["running_var"]
        if (
            bn["training"]
            or not isinstance(mean, torch.Tensor)
            or not isinstance(var, torch.Tensor)
        ):
            return None
        params = [t for t in (mean, var, bn["weight"], bn["bias"]) if isinstance(t, torch.Tensor)]
        if any(t.dtype != spec.weight.dtype for t in params):
            return None  # a BatchNorm kept in another dtype: folding would change the conv's
        if spec.weight.dtype == torch.float16:
            # fp16's range: the conv's own output may overflow where the folded
            # conv's does not (or the folded weights may), so they run apart
            return None
        scale = torch.rsqrt(var + bn["eps"])
        if bn["weight"] is not None:
            scale = scale * bn["weight"]
        bias = spec.bias if spec.bias is not None else torch.zeros_like(mean)
        bias = (bias - mean) * scale
        if bn["bias"] is not None:
            bias = bias + bn["bias"]
        weight = spec.weight * scale.view(-1, *([1] * (spec.weight.dim() - 1)))
        return ConvSpec(spec.window, weight.detach(), bias.detach(), spec.groups)

    def run_box(self, run, info, spec):
        window = spec.window
        out_size = run.size(info.node)
        source = first_arg(info)

        def tile_then_conv():
            tile = self.read_tile(run, info, spec)
            conv = self._functional[tile.dim() - 2]
            out = conv(tile, spec.weight, spec.bias, window.stride, 0, window.dilation, spec.groups)
            return out.relu_() if spec.activation == "relu" else out

        candidates = {"tile+conv": tile_then_conv}
        if run.use_triton and run.device.type == "cuda" and spec.activation == "relu":

            def tile_then_fused_conv():
                tile = self.read_tile(run, info, spec)
                return torch.cudnn_convolution_relu(
                    tile,
                    spec.weight,
                    spec.bias,
                    window.stride,
                    [0] * len(out_size),
                    window.dilation,
                    spec.groups,
                )

            candidates["tile+conv_relu"] = tile_then_fused_conv
        if run.use_triton and triton_conv_supports(spec.weight, spec.groups):

            def implicit_gemm():
                starts, _ = window.read_window(run.starts(info.node), out_size, run)
                return run.conv_region(source, starts, out_size, spec)

            candidates["implicit_gemm"] = implicit_gemm
        key = (
            "conv",
            1 << (run.rows - 1).bit_length(),  # a partial last batch shares the choice
            tuple(run.clean_value(source).shape[1:]),
            run.plan.nodes[source].geometry.size if run.boxed(source) else None,
            tuple(spec.weight.shape),
            window,
            out_size,
            spec.activation,
            spec.weight.dtype,
            torch.backends.cudnn.allow_tf32,
        )
        return run.fastest(key, candidates)

    def flops(self, info):
        spec = self.spec(info)
        if spec is None:
            return super().flops(info)
        per_output = 2 * spec.weight.shape[1] * math.prod(spec.window.kernel)
        return float(info.value[0].numel() * per_output)


CONV_RULE = register(
    ConvRule(),
    aten.conv1d.default,
    aten.conv2d.default,
    aten.conv3d.default,
    aten.conv1d.padding,
    aten.conv2d.padding,
    aten.conv3d.padding,
    aten.convolution.default,
)
