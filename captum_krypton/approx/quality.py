"""Heatmap quality: SSIM of an attribution against the exact one (scikit-image)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
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
        window = _window_side(a.shape[1:])
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


def attribution_ssim_many(
    approximate: torch.Tensor | np.ndarray, exact: torch.Tensor | np.ndarray
) -> np.ndarray:
    """`attribution_ssim` of many maps at once: scikit-image's formula (uniform
    window, sample covariance, the window's half-width left out at the borders,
    the mean over channels), vectorized for the calibration's many
    comparisons (torch's intra-op threads would wait for each other at every
    small op on a busy CPU). exact: (maps, C, *spatial); approximate: the same,
    or one map (1, C, *spatial) compared with each. Returns (maps,). Maps with no
    spatial dims, more than three, or too small for a 3-wide window go to
    `attribution_ssim`."""
    if approximate.shape != exact.shape and (
        approximate.shape[0] != 1 or approximate.shape[1:] != exact.shape[1:]
    ):
        raise ValueError(f"shapes differ: {tuple(approximate.shape)} vs {tuple(exact.shape)}")
    if _on_gpu(approximate) and _on_gpu(exact):
        return _ssim_many_on_device(approximate, exact)
    ours, reference = _float64(approximate), _float64(exact)
    if (ours == ours[:, :1]).all() and (reference == reference[:, :1]).all():
        ours, reference = ours[:, :1], reference[:, :1]  # the same map on every channel
    spatial = ours.ndim - 2
    window = _window_side(ours.shape[2:])
    if not 1 <= spatial <= 3 or window < 3:
        ours = np.broadcast_to(ours, reference.shape).copy()
        return attribution_ssim(torch.from_numpy(ours), torch.from_numpy(reference))

    half = (window - 1) // 2
    inside = (slice(None),) * 3 + (slice(half, -half),) * spatial
    size = (1, 1, 1) + (window,) * spatial

    def mean(x: np.ndarray) -> np.ndarray:
        """scipy's uniform filter, as scikit-image filters, on the part it keeps."""
        return ndimage.uniform_filter(x, size)[inside]

    flat = reference.reshape(len(reference), -1)
    data_range = flat.max(axis=1) - flat.min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = _ssim_map(_means(ours, reference, mean, np.stack), data_range, window**spatial)
    scores = score.reshape(*score.shape[:2], -1).mean(axis=2).mean(axis=1)
    constant = data_range == 0
    if constant.any():
        equal = (ours == reference).reshape(len(reference), -1).all(axis=1).astype(np.float64)
        scores = np.where(constant, equal, scores)
    return scores


def _ssim_many_on_device(approximate: torch.Tensor, exact: torch.Tensor) -> np.ndarray:
    """`attribution_ssim_many` in torch on the maps' GPU: the same formula, with
    the uniform window's means as a valid average pooling (the part of scipy's
    filter that scikit-image keeps)."""
    ours, reference = approximate.detach().double(), exact.detach().double()
    if (ours == ours[:, :1]).all() and (reference == reference[:, :1]).all():
        ours, reference = ours[:, :1], reference[:, :1]
    spatial = ours.dim() - 2
    window = _window_side(tuple(ours.shape[2:]))
    if not 1 <= spatial <= 3 or window < 3:
        return attribution_ssim_many(ours.cpu(), reference.cpu())
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[spatial - 1]

    def mean(x: torch.Tensor) -> torch.Tensor:
        pooled = pool(x.reshape(-1, 1, *x.shape[3:]), window, stride=1)
        return pooled.reshape(*x.shape[:3], *pooled.shape[2:])

    flat = reference.reshape(len(reference), -1)
    data_range = flat.amax(dim=1) - flat.amin(dim=1)
    score = _ssim_map(_means(ours, reference, mean, torch.stack), data_range, window**spatial)
    scores = score.reshape(*score.shape[:2], -1).mean(dim=2).mean(dim=1)
    constant = data_range == 0
    if bool(constant.any()):
        equal = (ours == reference).reshape(len(reference), -1).all(dim=1).double()
        scores = torch.where(constant, equal, scores)
    return scores.cpu().numpy()


def _window_side(spatial_shape: tuple[int, ...]) -> int:
    """SSIM's window: scikit-image's 7, shrunk (odd) to fit the smallest side."""
    side = min(spatial_shape, default=0)
    return min(DEFAULT_WINDOW, side if side % 2 else side - 1)


def _means(ours: Any, reference: Any, mean: Callable, stack: Callable) -> tuple:
    """Windowed means of x, y, x*x, y*y and x*y; one map `ours` against many
    references takes its own means once."""
    if len(ours) == len(reference):
        products = stack([ours, reference, ours * ours, reference * reference, ours * reference])
        return tuple(mean(products))
    ux, uxx = mean(stack([ours, ours * ours]))
    uy, uyy, uxy = mean(stack([reference, reference * reference, ours * reference]))
    return ux, uy, uxx, uyy, uxy


def _ssim_map(means: tuple, data_range: Any, points: int) -> Any:
    """scikit-image's SSIM at each window position, from the windowed means
    (sample covariance, K1 = 0.01, K2 = 0.03); numpy arrays or tensors alike."""
    ux, uy, uxx, uyy, uxy = means
    covariance = points / (points - 1)
    vx = covariance * (uxx - ux * ux)
    vy = covariance * (uyy - uy * uy)
    vxy = covariance * (uxy - ux * uy)
    shape = (-1,) + (1,) * (ux.ndim - 1)
    c1 = (0.01 * data_range).reshape(shape) ** 2
    c2 = (0.03 * data_range).reshape(shape) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))


def _on_gpu(values: torch.Tensor | np.ndarray) -> bool:
    return isinstance(values, torch.Tensor) and values.device.type != "cpu"


def _float64(values: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values.astype(np.float64, copy=False)
    return values.detach().double().cpu().numpy()
