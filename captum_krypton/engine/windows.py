"""The occlusion windows of one input, as Captum numbers and shapes them."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from captum_krypton.kernels import torch_ops
from captum_krypton.ops import Geometry


@dataclass(frozen=True)
class WindowGrid:
    """Windows of shape `window` moved by `strides` over the non-batch dims of `shape`.

    Per dim there are ceil((D - K) / s) + 1 windows starting at k * s; the last is
    cut off at the border (Captum's convention). Windows are numbered in C order
    over the grid, so per-window results reshape to the grid directly.
    """

    shape: tuple[int, ...]  # the input's non-batch shape (C, *spatial)
    window: tuple[int, ...]
    strides: tuple[int, ...]

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(
            math.ceil((d - k) / s) + 1 for d, k, s in zip(self.shape, self.window, self.strides)
        )

    @property
    def num_windows(self) -> int:
        return math.prod(self.counts)

    def bounds(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[lo, hi) of the given windows over every non-batch dim, clipped to the input."""
        grid_index = np.stack(np.unravel_index(windows, self.counts), axis=1)
        lo = grid_index * np.asarray(self.strides)
        hi = np.minimum(lo + np.asarray(self.window), np.asarray(self.shape))
        return lo.astype(np.int64), hi.astype(np.int64)

    @functools.cached_property
    def all_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.bounds(np.arange(self.num_windows))

    def input_geometry(self) -> Geometry:
        """The box each window changes at the input: its spatial extent, all channels."""
        lo, hi = self.all_bounds
        return Geometry.from_bounds(lo[:, 1:], hi[:, 1:], tuple(self.shape[1:]))

    @functools.cached_property
    def _covering(self) -> tuple[tuple[tuple[np.ndarray, np.ndarray], ...], ...]:
        """Per dim, per k < ceil(window / stride): the window k places before the
        last one starting at or before each position, and whether it covers it."""
        per_dim = []
        for size, count, window, stride in zip(self.shape, self.counts, self.window, self.strides):
            positions = np.arange(size)
            last = np.minimum(positions // stride, count - 1)
            shifts = []
            for k in range(-(-window // stride)):
                index = last - k
                covers = (index >= 0) & (index * stride + window > positions)
                shifts.append((np.clip(index, 0, count - 1), covers.astype(np.float64)))
            per_dim.append(tuple(shifts))
        return tuple(per_dim)

    def accumulate(self, diffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of each window's output difference over the positions it covers, and counts.

        diffs: (num_windows, outputs). Returns the sums, (outputs, *shape), and
        the counts, broadcastable to `shape`, both float64 on diffs' device.

        The sum is separable per dim: along each, a position sums the few
        windows that cover it (at most ceil(window / stride)). A dim that one
        window spans whole (every channel, usually) is a broadcast, made last.
        On the CPU it runs in numpy: neither BLAS nor torch's thread pool, whose
        threads wait for each other, and for the machine, around such small
        work. On a GPU it runs there, with the same operations in the same
        order, so both give the same bits.
        """
        if diffs.device.type == "cpu":
            table = diffs.detach().to(torch.float64).numpy()
            total, count = self._accumulate(np.ascontiguousarray(table.T), self._covering, _NUMPY)
            return torch.from_numpy(total), torch.from_numpy(count)
        return self._accumulate_on_device(diffs)

    def _accumulate_on_device(self, diffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`accumulate` in torch on diffs' device."""
        table = diffs.detach().to(torch.float64).t().contiguous()
        covering = _covering_on(self, diffs.device)
        return self._accumulate(table, covering, _TorchOps(diffs.device))

    def _accumulate(self, table: Any, tables: tuple, ops: Any) -> tuple[Any, Any]:
        outputs = table.shape[0]
        total = table.reshape(outputs, *self.counts)
        spanned = [
            count == 1 and window >= size
            for count, window, size in zip(self.counts, self.window, self.shape)
        ]
        # Dims whose windows cover the most positions each grow the array most: last.
        order = sorted(range(len(self.shape)), key=lambda d: self.shape[d] / self.counts[d])
        coverings = []
        for dim in order:
            if spanned[dim]:
                coverings.append(ops.ones(self.shape[dim]))
                continue
            summed, covering = 0.0, 0.0
            view = [1] * len(self.shape)
            view[dim] = -1
            for index, covers in tables[dim]:
                summed = summed + ops.take(total, index, dim + 1) * covers.reshape(view)
                covering = covering + covers
            total = summed
            coverings.append(covering)
        count = ops.ones(())
        for dim in range(len(self.shape)):
            count = count[..., None] * coverings[order.index(dim)]
        if tuple(total.shape) != (outputs, *self.shape):
            total = ops.contiguous(ops.broadcast(total, (outputs, *self.shape)))
        return total, count

    def occluded_tiles(
        self,
        inputs: torch.Tensor,
        baseline: Any,
        starts: torch.Tensor,
        size: tuple[int, ...],
        lo: torch.Tensor,
        hi: torch.Tensor,
    ) -> torch.Tensor:
        """The input box of each (window, example) row after occlusion: (rows, C, *size).

        starts: (rows, ndim) box starts; lo, hi: (rows, 1 + ndim) window bounds over
        (channel, *spatial), all on the input's device. Uses Captum's own formula,
        input * (1 - mask) + baseline * mask, on the box.
        """
        num_examples = inputs.shape[0]
        device = inputs.device
        rows = starts.shape[0]
        example = torch.arange(rows, device=device) % num_examples
        tile = torch_ops.gather_tiles(inputs.movedim(1, -1), example, starts, size)
        ndim = len(size)
        mask = torch.ones((), dtype=torch.bool, device=device)
        for d in range(ndim):
            position = torch_ops._axis_index(starts, size, d)
            lo_d = lo[:, d + 1].view([rows] + [1] * ndim)
            hi_d = hi[:, d + 1].view([rows] + [1] * ndim)
            mask = mask & (position >= lo_d) & (position < hi_d)
        channel = torch.arange(self.shape[0], device=device)
        channel_mask = (channel >= lo[:, :1]) & (channel < hi[:, :1])  # (rows, C)
        mask = (mask.unsqueeze(-1) & channel_mask.view([rows] + [1] * ndim + [-1])).float()

        if isinstance(baseline, torch.Tensor):
            full_baseline = torch.broadcast_to(baseline, inputs.shape).movedim(1, -1)
            baseline = torch_ops.gather_tiles(full_baseline, example, starts, size)
        one = torch.ones(1, dtype=torch.long, device=device)
        occluded = tile * (one - mask).to(tile.dtype) + baseline * mask.to(tile.dtype)
        return occluded.movedim(-1, 1)


@functools.lru_cache(maxsize=16)
def _covering_on(grid: WindowGrid, device: torch.device) -> tuple:
    """The grid's covering tables as tensors on `device`, made once."""
    return tuple(
        tuple(
            (
                torch.from_numpy(index.astype(np.int64)).to(device),
                torch.from_numpy(covers).to(device),
            )
            for index, covers in per_dim
        )
        for per_dim in grid._covering
    )


class _NumpyOps:
    """What `WindowGrid._accumulate` needs, in numpy."""

    @staticmethod
    def ones(shape: Any) -> np.ndarray:
        return np.ones(shape)

    @staticmethod
    def take(values: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
        return np.take(values, index, axis=axis)

    @staticmethod
    def broadcast(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return np.broadcast_to(values, shape)

    contiguous = staticmethod(np.ascontiguousarray)


_NUMPY = _NumpyOps()


class _TorchOps:
    """The same, in torch on one device (float64)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def ones(self, shape: Any) -> torch.Tensor:
        return torch.ones(shape, dtype=torch.float64, device=self.device)

    @staticmethod
    def take(values: torch.Tensor, index: torch.Tensor, axis: int) -> torch.Tensor:
        return values.index_select(axis, index)

    @staticmethod
    def broadcast(values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return values.expand(shape)

    @staticmethod
    def contiguous(values: torch.Tensor) -> torch.Tensor:
        return values.contiguous()
