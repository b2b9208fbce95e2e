"""Adaptive drill-down (Krypton): a coarse pass over a lattice of the windows, then
the requested stride only where the coarse heatmap is largest or changes most.

Every window of the coarse pass is a window of the requested grid (the lattice
takes every `factor`-th window along each spatial dim, plus the last), so no
window is ever computed twice and drill-down never computes more windows than
exact occlusion. Windows left out get their output difference interpolated
(linearly, per dim) from the lattice; the heatmap is then Captum's average over
covering windows, as in exact mode, so the result keeps Captum's shape.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from scipy import ndimage


def lattice_indices(count: int, factor: int) -> np.ndarray:
    """Every `factor`-th of `count` positions, always with the last one."""
    indices = np.arange(0, count, factor)
    if indices[-1] != count - 1:
        indices = np.append(indices, count - 1)
    return indices


def coarse_lattice(counts: tuple[int, ...], factor: int) -> tuple[np.ndarray, ...]:
    """Per dim of a window grid with `counts` windows along each dim (channel
    first), the window indices of the coarse pass: every one along the channel
    dim, every `factor`-th along spatial dims."""
    return (np.arange(counts[0]),) + tuple(lattice_indices(c, factor) for c in counts[1:])


def sub_lattice(lattice: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """Every other lattice point along spatial dims, with the last: one level coarser."""
    return (lattice[0],) + tuple(axis[lattice_indices(len(axis), 2)] for axis in lattice[1:])


def window_ids(counts: tuple[int, ...], lattice: tuple[np.ndarray, ...]) -> np.ndarray:
    """Ids (C order over a grid of `counts`, as WindowGrid numbers windows) of every
    point of the lattice, in C order over the lattice."""
    mesh = np.meshgrid(*lattice, indexing="ij")
    return np.ravel_multi_index(tuple(m.ravel() for m in mesh), counts)


def interpolation_matrix(known: np.ndarray, count: int) -> torch.Tensor:
    """(len(known), count) weights: linear interpolation from the known positions
    (sorted, first 0, last count - 1) to every position 0..count-1."""
    left, right, fraction = _interpolation(tuple(int(k) for k in known), count)
    weights = np.zeros((len(known), count))
    positions = np.arange(count)
    np.add.at(weights, (left, positions), 1.0 - fraction)
    np.add.at(weights, (right, positions), fraction)
    return torch.from_numpy(weights)


@functools.lru_cache(maxsize=64)
def _interpolation(known: tuple[int, ...], count: int) -> tuple[np.ndarray, ...]:
    """Per position 0..count-1: the known neighbours' indices (into `known`) on
    either side and the weight of the right one."""
    positions = np.arange(count)
    if len(known) == 1:
        zero = np.zeros(count, dtype=np.int64)
        return zero, zero, np.zeros(count)
    points = np.asarray(known)
    right = np.clip(np.searchsorted(points, positions, side="right"), 1, len(points) - 1)
    left = right - 1
    fraction = (positions - points[left]) / (points[right] - points[left])
    return left, right, fraction


def interpolate(
    counts: tuple[int, ...], lattice: tuple[np.ndarray, ...], values: torch.Tensor
) -> torch.Tensor:
    """Values at every grid point (prod(counts), outputs), float64, from values at
    the lattice points ((prod of lattice sizes), outputs), separably per dim (in
    numpy, as WindowGrid.accumulate)."""
    return torch.from_numpy(_interpolate(counts, lattice, _numpy(values)))


def _numpy(values: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values.astype(np.float64, copy=False)
    return values.detach().to(torch.float64).cpu().numpy()


def _interpolate(
    counts: tuple[int, ...], lattice: tuple[np.ndarray, ...], values: np.ndarray
) -> np.ndarray:
    outputs = values.shape[1]
    field = values.reshape(*(len(a) for a in lattice), outputs)
    for dim, (known, count) in enumerate(zip(lattice, counts)):
        left, right, fraction = _interpolation(tuple(int(k) for k in known), count)
        view = [1] * field.ndim
        view[dim] = -1
        weight = fraction.reshape(view)
        field = (
            np.take(field, left, axis=dim) * (1.0 - weight)
            + np.take(field, right, axis=dim) * weight
        )
    return np.ascontiguousarray(field.reshape(-1, outputs))


def refinement_scores(
    counts: tuple[int, ...], lattice: tuple[np.ndarray, ...], lattice_diffs: torch.Tensor
) -> torch.Tensor:
    """How much computing each window at the requested stride should matter: its
    interpolated |output difference| (importance) plus the spread of the coarse
    differences around it (how far interpolation can be off), the largest over
    outputs. (windows,), float64."""
    sizes = tuple(len(axis) for axis in lattice)
    values = _numpy(lattice_diffs).reshape(*sizes, -1)
    neighbourhood = (3,) * len(sizes) + (1,)  # lattice neighbours, per output
    spread = ndimage.maximum_filter(values, neighbourhood, mode="nearest") - (
        ndimage.minimum_filter(values, neighbourhood, mode="nearest")
    )
    flat = values.shape[-1]
    estimate = _interpolate(counts, lattice, values.reshape(-1, flat))
    uncertainty = _interpolate(counts, lattice, spread.reshape(-1, flat))
    return torch.from_numpy((np.abs(estimate) + uncertainty).max(axis=1))


def refinement_order(scores: torch.Tensor, fraction: float, computed: np.ndarray) -> np.ndarray:
    """Windows to compute at the requested stride: the `fraction` of all windows with
    the highest scores, less those already computed, highest first (so a partial
    refinement covers what matters most). scores, computed: (windows,)."""
    chosen = math.ceil(fraction * len(scores))
    ranked = np.argsort(-scores.numpy(), kind="stable")[:chosen]
    return ranked[~computed[ranked]]


def compose(
    counts: tuple[int, ...],
    lattice: tuple[np.ndarray, ...],
    lattice_diffs: torch.Tensor,
    diffs: torch.Tensor,
    computed: np.ndarray,
) -> torch.Tensor:
    """Every window's difference: computed where `computed`, else interpolated from
    the lattice. diffs: (windows, outputs) with rows of computed windows filled."""
    estimate = _interpolate(counts, lattice, _numpy(lattice_diffs))
    return torch.from_numpy(np.where(computed[:, None], _numpy(diffs), estimate))
