"""Resampling: interpolation (`aten.upsample_*`, nearest, nearest-exact, linear,
bilinear, trilinear, bicubic, antialiased) and transposed convolution
(`aten.conv_transpose1d/2d/3d`).

Interpolation is separable: along each dim an output position is a weighted sum
of a few input positions, whose choice and weights depend on the position's
global coordinate (and on scale, size and align_corners), so running the op on
a tile would not give the map's numbers. The weights are read off the op itself:
run once per dim on a one-hot probe (the dim's input, output size and scale; the
other dims 1 -> 1; antialiased kernels, which take another path for a 1-wide
dim, keep the other dims' sizes), it returns the dim's (out, in) weight matrix as
its kernel computes it. The weights are then checked against the op on a random
input of the node's shape; a mismatch leaves the node `full`. The output box is
every output position with a nonzero weight on the input box; its values are
those weights applied to a tile read over (box | clean view), one dim at a time
(nearest: a gather, bit for bit).

A transposed conv scatters each input position over a kernel-sized stretch of
the output: an input box changes output rows [a*S - P, (b-1)*S - P + D*(K-1) + 1).
The box is computed by the op itself, unpadded, on the input tile that reaches
it (box | clean view | zero outside the map), then cropped per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from captum_krypton.kernels import torch_ops
from captum_krypton.ops.convolution import as_tuple, first_arg, is_box_tensor
from captum_krypton.ops.padding import Taps, propagate_taps, run_taps, taps_read_volume
from captum_krypton.ops.registry import Geometry, NodeInfo, OpRule, bind, overloads, register

aten = torch.ops.aten


@dataclass(frozen=True, eq=False)
class InterpolationSpec:
    dims: list[Taps]


#: Interpolation ops: name -> (spatial dims, whether each output copies one input).
_INTERPOLATIONS = {
    "upsample_nearest1d": (1, True),
    "upsample_nearest2d": (2, True),
    "upsample_nearest3d": (3, True),
    "_upsample_nearest_exact1d": (1, True),
    "_upsample_nearest_exact2d": (2, True),
    "_upsample_nearest_exact3d": (3, True),
    "upsample_linear1d": (1, False),
    "upsample_bilinear2d": (2, False),
    "upsample_trilinear3d": (3, False),
    "upsample_bicubic2d": (2, False),
    "_upsample_bilinear2d_aa": (2, False),
    "_upsample_bicubic2d_aa": (2, False),
}


class InterpolationRule(OpRule):
    name = "interpolate"

    def spec(self, info):
        source = first_arg(info)
        if not is_box_tensor(info) or source is None or not info.value.is_floating_point():
            return None
        packet = info.node.target.overloadpacket
        ndim, copy = _INTERPOLATIONS[packet.__name__]
        if info.value.dim() != ndim + 2:
            return None
        if not copy and torch.finfo(info.value.dtype).bits < 32:
            # In bf16/fp16 ATen's kernels weigh the sources in float32 and round
            # once; taps applied one dim at a time would round at every dim.
            return None
        b = bind(info.node, info.args, info.kwargs)
        if info.node.target._overloadname == "vec":
            scales = b.get("scale_factors") or [None] * ndim
        else:
            scales = [v for k, v in b.items() if k.startswith("scales")]
        if len(scales) != ndim:
            return None
        align = b.get("align_corners")
        in_size = tuple(info.args[0].shape[2:])
        # Antialiased kernels take another path when a dim is 1 wide: their probes
        # keep the other dims' real sizes.
        whole = packet.__name__.endswith("_aa")
        matrices = []
        for d in range(ndim):
            matrix = self._weights(packet.default, info, in_size, d, scales, align, whole)
            if matrix is None:
                return None
            matrices.append(matrix)
        if not self._reproduces(info, matrices):
            return None
        dims = [Taps.from_matrix(matrix, copy) for matrix in matrices]
        return None if any(taps is None for taps in dims) else InterpolationSpec(dims)

    @staticmethod
    def _weights(
        op: Any,
        info: NodeInfo,
        in_size: tuple[int, ...],
        d: int,
        scales: list[float | None],
        align: bool | None,
        whole: bool,
    ) -> torch.Tensor | None:
        """The (out, in) weights along dim d: the op on a one-hot probe per input
        position, with this dim's sizes and scale; the other dims 1 -> 1 (or, with
        `whole`, their own sizes and scales)."""
        value = info.value
        ndim = value.dim() - 2
        size = in_size[d]
        shape = [in_size[k] if whole else 1 for k in range(ndim)]
        shape[d] = size
        eye_shape = [1] * ndim
        eye_shape[d] = size
        probe = torch.eye(size, dtype=value.dtype, device=value.device).view(size, 1, *eye_shape)
        probe = probe.expand(size, 1, *shape).contiguous()
        sizes = [value.shape[2 + k] if whole or k == d else 1 for k in range(ndim)]
        dim_scales = [scales[k] if whole or k == d else None for k in range(ndim)]
        args = (probe, sizes) + (() if align is None else (align,)) + tuple(dim_scales)
        try:
            result = op(*args)
        except (RuntimeError, TypeError, ValueError):
            return None
        line = result[(slice(None), 0, *(slice(None) if k == d else 0 for k in range(ndim)))]
        return line.T.contiguous()

    @staticmethod
    def _reproduces(info: NodeInfo, matrices: list[torch.Tensor]) -> bool:
        """Whether the weights, applied one dim at a time, give the op's output on a
        random input of the node's shape (else the probes missed something)."""
        value = info.value
        generator = torch.Generator(device=value.device).manual_seed(0)
        x = torch.randn(
            (1, 1, *info.args[0].shape[2:]),
            generator=generator,
            dtype=value.dtype,
            device=value.device,
        )
        try:
            expected = info.node.target(x, *info.args[1:], **info.kwargs)
        except (RuntimeError, TypeError, ValueError):
            return False
        y = x
        for d in reversed(range(len(matrices))):
            y = torch.movedim(torch.movedim(y, 2 + d, -1) @ matrices[d].T, -1, 2 + d)
        if y.shape != expected.shape:
            return False
        tolerance = 10 * torch.finfo(value.dtype).eps ** 0.5
        return bool(((y - expected).abs() <= tolerance * (1 + expected.abs())).all())

    def propagate(self, info, spec, in_geoms):
        geom = in_geoms.get(first_arg(info))
        if geom is None or len(in_geoms) != 1:
            return None
        return propagate_taps(spec.dims, geom, info.spatial_shape)

    def read_volume(self, info, spec, geometry):
        return taps_read_volume(spec.dims, geometry)

    def run_box(self, run, info, spec):
        return run_taps(run, info.node, first_arg(info), spec.dims)

    def flops(self, info):
        """Two per source read (a copy for nearest): 2^ndim linear sources."""
        value = info.value
        if not is_box_tensor(info):
            return super().flops(info)
        name = info.node.target.overloadpacket.__name__
        ndim, copy = _INTERPOLATIONS[name]
        taps = 1 if copy else (4 if "cubic" in name else 2) ** ndim
        return float(value[0].numel() * (1 if copy else 2 * taps))


@dataclass(frozen=True, eq=False)
class TransposedConvSpec:
    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    @property
    def extent(self) -> tuple[int, ...]:
        return tuple(d * (k - 1) + 1 for k, d in zip(self.weight.shape[2:], self.dilation))

    def input_window(
        self, out_starts: np.ndarray, size: tuple[int, ...]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per output box start: the tile's first input position (its output starts
        at or before the box) and how many input positions the tile needs so that
        its unpadded transposed conv covers the box."""
        stride, pad, extent = (np.asarray(v) for v in (self.stride, self.padding, self.extent))
        # floor, not ceil: the tile's output must start at or before the box even
        # where the box starts in a gap no input reaches (kernel smaller than stride).
        first = (out_starts + pad - extent + 1) // stride
        last = (out_starts + np.asarray(size) - 1 + pad) // stride
        offset = out_starts + pad - first * stride  # box start in the tile's output
        covering = -((extent - offset - np.asarray(size)) // stride) + 1
        return first, np.maximum(last - first + 1, covering)


_TRANSPOSED = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class TransposedConvRule(OpRule):
    name = "conv_transpose"

    def spec(self, info):
        if not is_box_tensor(info) or first_arg(info) is None:
            return None
        b = bind(info.node, info.args, info.kwargs)
        weight = b["weight"]
        if not isinstance(weight, torch.Tensor):
            return None
        ndim = info.value.dim() - 2
        return TransposedConvSpec(
            weight,
            b["bias"],
            as_tuple(b["stride"], ndim),
            as_tuple(b["padding"], ndim),
            as_tuple(b["dilation"], ndim),
            int(b["groups"]),
        )

    def propagate(self, info, spec, in_geoms):
        geom = in_geoms.get(first_arg(info))
        if geom is None or len(in_geoms) != 1:
            return None
        stride, pad, extent = (np.asarray(v) for v in (spec.stride, spec.padding, spec.extent))
        limit = np.asarray(info.spatial_shape)
        lo = np.clip(geom.starts * stride - pad, 0, limit - 1)
        last = (geom.starts + np.asarray(geom.size) - 1) * stride - pad + extent
        hi = np.minimum(last, limit)
        return Geometry.from_bounds(lo, np.maximum(hi, lo + 1), info.spatial_shape)

    def read_volume(self, info, spec, geometry):
        _, tile = spec.input_window(geometry.starts, geometry.size)
        return int(math.prod(tile.max(0)))

    def run_box(self, run, info, spec):
        node, source = info.node, first_arg(info)
        size = run.size(node)
        _, tile = spec.input_window(run.plan.nodes[node].geometry.starts, size)
        tile = tuple(int(t) for t in tile.max(0))
        device = run.device
        stride = run.views.constant(spec.stride, device)
        pad = run.views.constant(spec.padding, device)
        extent = run.views.constant(spec.extent, device)
        out_starts = run.starts(node)
        first = torch.div(out_starts + pad - extent + 1, stride, rounding_mode="floor")
        x = run.read(source, first, tile)
        y = _TRANSPOSED[len(size)](
            x, spec.weight, spec.bias, spec.stride, 0, 0, spec.groups, spec.dilation
        )
        offset = out_starts + pad - first * stride
        rows = torch.arange(y.shape[0], device=device)
        box = torch_ops.gather_tiles(y.movedim(1, -1), rows, offset, size)
        return box.movedim(-1, 1)

    def flops(self, info):
        spec = self.spec(info)
        source = info.args[0] if info.args else None
        if spec is None or not isinstance(source, torch.Tensor):
            return super().flops(info)
        per_input = 2 * spec.weight.shape[1] * math.prod(spec.weight.shape[2:])
        return float(source[0].numel() * per_input)


INTERPOLATION_RULE = register(
    InterpolationRule(), *overloads(*_INTERPOLATIONS, only=("default", "vec"))
)
TRANSPOSED_CONV_RULE = register(
    TransposedConvRule(),
    aten.conv_transpose1d.default,
    aten.conv_transpose2d.input,
    aten.conv_transpose3d.input,
)
