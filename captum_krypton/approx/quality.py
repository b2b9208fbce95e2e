"""Heatmap quality: SSIM of an attribution against the exact one (scikit-image)."""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import structural_similarity

#: scikit-image's default Gaussian-free window side.
DEFAULT_WINDOW = 7


def attribution_ssim(approximate: torch.Tensor, exact: torch.Tensor) -> np.ndarray:
    """SSIM of each example's attribution against the exact one: shape (examples,).

    Both tensors are shaped like Captum's result for one input, (N, C, *spatial).
    Each example's map is compared over its channels (`channel_axis`), with the data
    range of the exact map, and SSIM's window shrunk (odd, at least 3) to fit maps
    smaller than 7 along a side (under 3: 1 - RMSE / range). A constant exact map
    scores 1 only where the approximation equals it.
    """
    if approximate.shape != exact.shape:
        raise ValueError(f"shapes differ: {tuple(approximate.shape)} vs {tuple(exact.shape)}")
    ours = approximate.detach().double().cpu().numpy()
    reference = exact.detach().double().cpu().numpy()
    scores = []
    for a, e in zip(ours, reference):
        if a.ndim == 1:  # no spatial dims: one value per channel
            a, e = a[:, None], e[:, None]
        if (a == a[:1]).all() and (e == e[:1]).all():
            # Windows spanning every channel give the same map on each: SSIM over
            # channels is then that of one channel, at a third of the work.
            a, e = a[:1], e[:1]
        data_range = float(e.max() - e.min())
        if data_range == 0.0:
            scores.append(1.0 if np.array_equal(a, e) else 0.0)
            continue
        side = min(a.shape[1:])
        window = min(DEFAULT_WINDOW, side if side % 2 else side - 1)
        if window < 3:  # no room for a structural window: 1 - RMSE / range instead
            error = np.sqrt(np.mean((a - e) ** 2)) / data_range
            scores.append(float(max(0.0, 1.0 - error)))
            continue
        scores.append(
            float(
                structural_similarity(a, e, data_range=data_range, channel_axis=0, win_size=window)
            )
        )
    return np.asarray(scores)
