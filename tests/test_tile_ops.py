"""The engine's tile primitives against plain per-row slicing."""

from __future__ import annotations

import pytest
import torch

from captum_krypton.kernels import torch_ops


def _slices(start, size):
    return tuple(slice(int(s), int(s) + z) for s, z in zip(start, size))


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_gather_tiles(ndim):
    source = torch.randn((3,) + (9,) * ndim + (4,))
    rows = 5
    source_row = torch.tensor([0, 2, 1, 2, 0])
    size = (4, 3, 2)[:ndim]
    starts = torch.stack([torch.randint(0, 9 - z + 1, (rows,)) for z in size], 1)
    tiles = torch_ops.gather_tiles(source, source_row, starts, size)
    for r in range(rows):
        torch.testing.assert_close(tiles[r], source[source_row[r]][_slices(starts[r], size)])


@pytest.mark.parametrize("inside", [True, False])
def test_overlay_box(inside):
    rows, tile_size, box_size = 6, (7, 6), (3, 4)
    tile = torch.randn(rows, *tile_size, 2)
    box = torch.randn(rows, *box_size, 2)
    tile_starts = torch.randint(-3, 5, (rows, 2))
    if inside:
        offset = torch.stack(
            [torch.randint(0, t - b + 1, (rows,)) for t, b in zip(tile_size, box_size)], 1
        )
    else:
        offset = torch.randint(-4, 7, (rows, 2))
    box_starts = tile_starts + offset
    expected = tile.clone()
    for r in range(rows):
        for i in range(tile_size[0]):
            for j in range(tile_size[1]):
                bi, bj = i - offset[r, 0], j - offset[r, 1]
                if 0 <= bi < box_size[0] and 0 <= bj < box_size[1]:
                    expected[r, i, j] = box[r, bi, bj]
    actual = torch_ops.overlay_box(tile.clone(), tile_starts, box, box_starts)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_scatter_boxes():
    full = torch.randn(4, 8, 9, 3)
    box = torch.randn(4, 3, 2, 3)
    starts = torch.tensor([[0, 0], [5, 7], [2, 3], [5, 0]])
    expected = full.clone()
    for r in range(4):
        expected[r][_slices(starts[r], (3, 2))] = box[r]
    torch_ops.scatter_boxes(full, box, starts)
    torch.testing.assert_close(full, expected, rtol=0, atol=0)
