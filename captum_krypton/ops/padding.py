"""Explicit padding over the spatial dims: `aten.pad` (constant, reflect, replicate,
circular) and the per-mode ops (`constant_pad_nd`, `reflection_pad1d/2d/3d`,
`replication_pad1d/2d/3d`, `_pad_circular`).

Constant padding shifts the box by the low padding (negative padding crops: the
box is clamped to the map) and reads the fill value outside the input map. In
the other modes every output position copies one input position, possibly far
from it (a mirrored or wrapped border), so a dim's padding is a table, output
position -> source position, read off the op itself run once on an index ramp:
PyTorch's own mapping, not a re-derivation. The output box is then every output
position whose source lies in the input box, and its values are gathered from a
tile read over (box | clean view). Padding of the batch or channel dims is
`full`.

The tables (`Taps`) also serve resampling (ops/resampling.py): there an output
position reads a few input positions with weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torch import fx

from captum_krypton.ops.convolution import first_arg, is_box_tensor
from captum_krypton.ops.registry import Geometry, NodeInfo, OpRule, bind, register

aten = torch.ops.aten


@dataclass(frozen=True, eq=False)
class Taps:
    """Along one spatial dim, the input positions each output position reads and
    their weights (None: each output position is a copy of one input position).

    `index` and `weight_t` are (out, K): an output with fewer than K sources
    repeats its last one with weight 0. `lo` and `hi` bound the sources each
    output really depends on (nonzero weight): [lo, hi)."""

    index: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    index_t: torch.Tensor
    weight_t: torch.Tensor | None

    @staticmethod
    def copies(sources: np.ndarray, device: torch.device) -> Taps:
        sources = np.asarray(sources, dtype=np.int64)
        index = sources[:, None]
        return Taps(index, sources, sources + 1, torch.from_numpy(index).to(device), None)

    @staticmethod
    def from_matrix(matrix: torch.Tensor, copy: bool) -> Taps | None:
        """Taps of the (out, in) weight matrix of a linear op along one dim; with
        `copy`, every row must hold one weight of exactly 1. None if unusable."""
        nonzero = (matrix != 0).cpu().numpy()
        counts = nonzero.sum(1)
        if counts.min() < 1:
            return None
        if copy:
            if counts.max() != 1 or not bool((matrix.sum(1) == 1).all()):
                return None
            return Taps.copies(nonzero.argmax(1), matrix.device)
        taps = int(counts.max())
        positions = np.arange(matrix.shape[1])
        # Each row's nonzero columns in order, padded by repeating the last one.
        order = np.argsort(~nonzero, axis=1, kind="stable")[:, :taps]
        valid = np.arange(taps)[None, :] < counts[:, None]
        last = order[np.arange(len(order)), counts - 1]
        index = np.where(valid, order, last[:, None]).astype(np.int64)
        index_t = torch.from_numpy(index).to(matrix.device)
        weight_t = torch.gather(matrix, 1, index_t) * torch.from_numpy(valid).to(matrix.device)
        lo = np.where(nonzero, positions, matrix.shape[1]).min(1)
        hi = np.where(nonzero, positions, -1).max(1) + 1
        return Taps(index, lo, hi, index_t, weight_t)

    @property
    def count(self) -> int:
        return self.index.shape[1]

    def reach(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each input interval [a, b): the output positions reading from it, as
        [lo, hi) (lo = hi = 0 when none does)."""
        pairs, inverse = np.unique(np.stack([a, b], 1), axis=0, return_inverse=True)
        hits = (self.lo[None, :] < pairs[:, 1:2]) & (self.hi[None, :] > pairs[:, 0:1])
        some = hits.any(1)
        lo = np.where(some, hits.argmax(1), 0)
        hi = np.where(some, hits.shape[1] - hits[:, ::-1].argmax(1), 0)
        inverse = inverse.reshape(-1)
        return lo[inverse], hi[inverse]

    def tile(self, size: int, starts: np.ndarray) -> tuple[np.ndarray, int]:
        """For output boxes of `size` at each start: where the input tile starts
        (a table over every start) and the tile size that holds every box's sources."""
        lo = sliding_window_view(self.lo, size).min(1)
        hi = sliding_window_view(self.hi, size).max(1)
        return lo, int((hi[starts] - lo[starts]).max())


def propagate_taps(dims: list[Taps], geom: Geometry, out_size: tuple[int, ...]) -> Geometry:
    """The output box of ops whose every dim is described by taps: per dim, the
    output positions that read the input box."""
    a = geom.starts
    b = geom.starts + np.asarray(geom.size)
    bounds = [taps.reach(a[:, d], b[:, d]) for d, taps in enumerate(dims)]
    lo = np.stack([np.minimum(bound[0], n - 1) for bound, n in zip(bounds, out_size)], 1)
    hi = np.stack([bound[1] for bound in bounds], 1)
    return Geometry.from_bounds(lo, np.maximum(hi, lo + 1), out_size)


def taps_read_volume(dims: list[Taps], geometry: Geometry) -> int:
    return math.prod(
        taps.tile(size, geometry.starts[:, d])[1]
        for d, (taps, size) in enumerate(zip(dims, geometry.size))
    )


def run_taps(run: Any, node: fx.Node, source: fx.Node, dims: list[Taps]) -> torch.Tensor:
    """The node's box from its taps: a tile of `source` over (box | clean view)
    holding every source of the box, reduced one dim at a time (the last dim
    first, as PyTorch's separable interpolation does)."""
    out_starts = run.starts(node)
    size = run.size(node)
    window_starts = run.plan.nodes[node].geometry.starts
    tile_starts, extent = [], []
    for d, taps in enumerate(dims):
        table, tile_size = taps.tile(size[d], window_starts[:, d])
        table = run.views.device_array((node, "taps_tile", d), table, run.device)
        tile_starts.append(table[out_starts[:, d]])
        extent.append(tile_size)
    starts = torch.stack(tile_starts, 1)
    x = run.read(source, starts, tuple(extent))
    for d in reversed(range(len(dims))):
        x = _reduce_dim(x, d, dims[d], out_starts[:, d], size[d], starts[:, d])
    return x


def _reduce_dim(
    x: torch.Tensor,
    d: int,
    taps: Taps,
    out_start: torch.Tensor,
    size: int,
    tile_start: torch.Tensor,
) -> torch.Tensor:
    axis = 2 + d
    positions = out_start[:, None] + torch.arange(size, device=x.device)
    index = taps.index_t[positions] - tile_start[:, None, None]  # (rows, size, K)
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    shape[axis] = size
    target = list(x.shape)
    target[axis] = size
    if taps.weight_t is None:
        return torch.gather(x, axis, index[:, :, 0].reshape(shape).expand(target))
    weights = taps.weight_t[positions]
    result = None
    for k in range(taps.count):
        term = torch.gather(x, axis, index[:, :, k].reshape(shape).expand(target))
        term = term * weights[:, :, k].reshape(shape)
        result = term if result is None else result + term
    return result


@dataclass(frozen=True, eq=False)
class PadSpec:
    #: Constant mode: low padding per spatial dim (negative: cropped) and the fill.
    shift: tuple[int, ...] | None
    fill: float
    #: The other modes: per spatial dim, each output position's source.
    dims: list[Taps] | None = None


_MODES = {
    "constant_pad_nd": "constant",
    "reflection_pad1d": "reflect",
    "reflection_pad2d": "reflect",
    "reflection_pad3d": "reflect",
    "replication_pad1d": "replicate",
    "replication_pad2d": "replicate",
    "replication_pad3d": "replicate",
    "_pad_circular": "circular",
}


class PadRule(OpRule):
    name = "pad"

    def spec(self, info):
        source = first_arg(info)
        if not is_box_tensor(info) or source is None or not info.value.is_floating_point():
            return None
        b = bind(info.node, info.args, info.kwargs)
        name = info.node.target.overloadpacket.__name__
        mode = b.get("mode", "constant") if name == "pad" else _MODES[name]
        pads = [int(p) for p in (b["pad"] if "pad" in b else b["padding"])]
        ndim = info.value.dim() - 2
        if len(pads) % 2 or any(pads[2 * ndim :]):
            return None  # pads the channel or batch dim
        pads = pads[: 2 * ndim] + [0] * max(0, 2 * ndim - len(pads))
        lows = tuple(reversed(pads[0::2]))  # pads run from the last dim backwards
        if mode == "constant":
            value = b.get("value")
            return PadSpec(lows, 0.0 if value is None else float(value))
        if mode not in ("reflect", "replicate", "circular"):
            return None
        dims = []
        in_size = tuple(info.args[0].shape[2:])
        for d in range(ndim):
            sources = self._sources(info, in_size, d)
            if sources is None or len(sources) != info.spatial_shape[d]:
                return None
            dims.append(Taps.copies(sources, info.value.device))
        return PadSpec(None, 0.0, dims)

    @staticmethod
    def _sources(info: NodeInfo, in_size: tuple[int, ...], d: int) -> np.ndarray | None:
        """Each output position's source along dim d: the op run on an index ramp."""
        device = info.value.device
        shape = [1] * len(in_size)
        shape[d] = in_size[d]
        ramp = torch.arange(in_size[d], dtype=torch.float64, device=device).view(1, 1, *shape)
        try:
            out = info.node.target(ramp.expand(1, 1, *in_size), *info.args[1:], **info.kwargs)
        except (RuntimeError, TypeError, ValueError):
            return None
        line = out[(0, 0, *(slice(None) if k == d else 0 for k in range(len(in_size))))]
        sources = line.cpu().numpy()
        if (sources < 0).any() or (sources != np.round(sources)).any():
            return None
        return sources.astype(np.int64)

    def propagate(self, info, spec, in_geoms):
        source = first_arg(info)
        geom = in_geoms.get(source)
        if geom is None or len(in_geoms) != 1:
            return None
        out_size = info.spatial_shape
        if spec.dims is not None:
            return propagate_taps(spec.dims, geom, out_size)
        limit = np.asarray(out_size)
        shift = np.asarray(spec.shift)
        lo = np.clip(geom.starts + shift, 0, limit - 1)
        hi = np.clip(geom.starts + np.asarray(geom.size) + shift, 0, limit)
        return Geometry.from_bounds(lo, np.maximum(hi, lo + 1), out_size)

    def read_volume(self, info, spec, geometry):
        if spec.dims is not None:
            return taps_read_volume(spec.dims, geometry)
        return geometry.volume

    def run_box(self, run, info, spec):
        source = first_arg(info)
        if spec.dims is not None:
            return run_taps(run, info.node, source, spec.dims)
        shift = run.views.constant(spec.shift, run.device)
        return run.read(
            source, run.starts(info.node) - shift, run.size(info.node), pad_value=spec.fill
        )


PAD_RULE = register(
    PadRule(),
    aten.pad.default,
    aten.constant_pad_nd.default,
    aten.reflection_pad1d.default,
    aten.reflection_pad2d.default,
    aten.reflection_pad3d.default,
    aten.replication_pad1d.default,
    aten.replication_pad2d.default,
    aten.replication_pad3d.default,
    aten._pad_circular.default,
)
