"""Generated images for the demo model: one shape on clutter.

The class is decided only by the shape (circle, square, triangle, cross), which
sits somewhere on a cluttered background of smooth colour noise, stripes and
dots, so a good occlusion map lights up the shape and nothing else.
"""

from __future__ import annotations

import numpy as np
import torch

CLASSES = ("circle", "square", "triangle", "cross")
IMAGE_SIZE = 96


def _shape_mask(kind: int, size: int, radius: float, cy: float, cx: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = y - cy, x - cx
    if kind == 0:  # circle
        return dy**2 + dx**2 <= radius**2
    if kind == 1:  # square
        return (np.abs(dy) <= radius * 0.85) & (np.abs(dx) <= radius * 0.85)
    if kind == 2:  # triangle pointing up
        return (dy <= radius * 0.8) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)
    arm = radius * 0.3  # cross
    return ((np.abs(dy) <= arm) & (np.abs(dx) <= radius)) | (
        (np.abs(dx) <= arm) & (np.abs(dy) <= radius)
    )


def _clutter(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = rng.uniform(0.0, 0.6, size=(3, 6, 6)).astype(np.float32)
    image = torch.nn.functional.interpolate(
        torch.from_numpy(coarse)[None], size=(size, size), mode="bilinear", align_corners=False
    )[0].numpy()
    for _ in range(rng.integers(2, 6)):  # stripes
        colour = rng.uniform(0.0, 0.7, size=3).astype(np.float32)
        start, width = rng.integers(0, size), rng.integers(1, 3)
        if rng.random() < 0.5:
            image[:, start : start + width, :] = colour[:, None, None]
        else:
            image[:, :, start : start + width] = colour[:, None, None]
    for _ in range(rng.integers(5, 15)):  # dots
        colour = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
        cy, cx = rng.integers(0, size, size=2)
        image[:, max(cy - 1, 0) : cy + 2, max(cx - 1, 0) : cx + 2] = colour[:, None, None]
    return image


def make_image(
    rng: np.random.Generator, label: int, size: int = IMAGE_SIZE
) -> tuple[np.ndarray, tuple[int, int]]:
    """One (3, size, size) image of class `label` and the shape's centre."""
    image = _clutter(rng, size)
    radius = rng.uniform(size * 0.08, size * 0.14)
    margin = int(np.ceil(radius)) + 1
    cy, cx = (int(v) for v in rng.integers(margin, size - margin, size=2))
    mask = _shape_mask(label, size, radius, cy, cx)
    colour = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
    colour[rng.integers(0, 3)] = rng.uniform(0.0, 0.3)
    image[:, mask] = colour[:, None]
    return image, (cy, cx)


def make_dataset(
    count: int, seed: int, size: int = IMAGE_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` images with balanced labels, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % len(CLASSES)
    rng.shuffle(labels)
    images = np.stack([make_image(rng, int(label), size)[0] for label in labels])
    return torch.from_numpy(images), torch.from_numpy(labels).long()


def normalize(images: torch.Tensor) -> torch.Tensor:
    """The model's input scaling (kept outside the model so baselines stay simple)."""
    return (images - 0.5) / 0.25


def evaluation_set(count: int = 12, seed: int = 2027) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized held-out images and labels: a small data set for data-set runs."""
    images, labels = make_dataset(count, seed)
    return normalize(images), labels
