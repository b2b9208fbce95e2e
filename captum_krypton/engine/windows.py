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

    def coverage(self, dim: int) -> np.ndarray:
        """(windows along dim, size of dim) 0/1 matrix: which positions each covers."""
        return self._coverage[dim]

    @functools.cached_property
    def _coverage(self) -> tuple[np.ndarray, ...]:
        matrices = []
        for dim in range(len(self.shape)):
            starts = np.arange(self.counts[dim]) * self.strides[dim]
            positions = np.arange(self.shape[dim])
            covered = (positions >= starts[:, None]) & (
                positions < starts[:, None] + self.window[dim]
            )
            matrices.append(covered.astype(np.float64))
        return tuple(matrices)

    def accumulate(self, diffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of each window's output difference over the positions it covers, and counts.

        diffs: (num_windows, outputs). The sum over windows is separable per dim,
        so it is a chain of small matrix products rather than a loop over windows,
        in numpy on the host: on a busy CPU, torch's intra-op threads wait for each
        other at every small op, far longer than these products take.
        """
        total = diffs.detach().to(torch.float64).cpu().numpy()
        total = total.reshape(*self.counts, diffs.shape[1])
        count = np.ones(())
        for dim in range(len(self.shape)):
            matrix = self._coverage[dim]
            total = np.tensordot(total, matrix, axes=([0], [0]))
            count = count[..., None] * matrix.sum(axis=0)
        return torch.from_numpy(np.ascontiguousarray(total)), torch.from_numpy(count)

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
