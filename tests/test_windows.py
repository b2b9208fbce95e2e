"""Window numbering, input boxes and the accumulation, against Captum's own masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import Occlusion

from captum_krypton.engine.windows import WindowGrid


@pytest.mark.parametrize(
    "shape,window,strides",
    [
        ((3, 10, 9), (3, 4, 3), (1, 3, 2)),
        ((2, 7, 7), (1, 7, 2), (1, 1, 2)),
        ((1, 11), (1, 4), (1, 3)),
    ],
)
def test_accumulation_matches_captums_masks(shape, window, strides):
    grid = WindowGrid(shape, window, strides)
    occlusion = Occlusion(lambda x: x)
    counts = tuple(grid.counts)
    diffs = torch.randn(grid.num_windows, 2, dtype=torch.float64)
    expected = torch.zeros((2, *shape), dtype=torch.float64)
    expected_count = torch.zeros(shape, dtype=torch.float64)
    # Captum numbers windows with the first dim fastest; ours is C order.
    for w in range(grid.num_windows):
        index = np.unravel_index(w, counts)
        captum_number = int(np.ravel_multi_index(index, counts, order="F"))
        mask = occlusion._occlusion_mask(
            torch.zeros(1, *shape), captum_number, torch.ones(window), strides, counts, False
        )[0].double()
        expected += diffs[w].view(2, *([1] * len(shape))) * mask
        expected_count += mask
    total, count = grid.accumulate(diffs)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(count.expand(shape), expected_count)


def test_input_geometry_shifts_cut_off_windows_inward():
    grid = WindowGrid((3, 10, 10), (3, 4, 4), (1, 3, 3))
    geometry = grid.input_geometry()
    assert geometry.size == (4, 4)
    assert geometry.starts.max() == 6  # the window at 9 is cut off to [9, 10): box [6, 10)
    lo, hi = grid.bounds(np.arange(grid.num_windows))
    assert (geometry.starts <= lo[:, 1:]).all()
    assert (geometry.starts + 4 >= hi[:, 1:]).all()


@pytest.mark.parametrize(
    "shape, window, strides",
    [((3, 20, 17), (3, 5, 4), (1, 3, 2)), ((4, 9, 8, 7), (4, 3, 3, 2), (4, 2, 1, 2))],
)
def test_one_channel_grid_gives_each_channels_map(shape, window, strides):
    """Windows that span every channel give every channel the same map: the
    calibration computes one, on a grid over one channel with the same windows."""
    from captum_krypton.engine.occlusion import _one_channel

    grid = WindowGrid(shape, window, strides)
    single = _one_channel(grid)
    assert single.counts == grid.counts and single.num_windows == grid.num_windows
    diffs = torch.randn(grid.num_windows, 2, dtype=torch.float64)
    total, count = grid.accumulate(diffs)
    one_total, one_count = single.accumulate(diffs)
    full = total.numpy() / count.numpy()
    one = one_total.numpy() / one_count.numpy()
    assert one.shape == (2, 1, *shape[1:])
    np.testing.assert_array_equal(np.broadcast_to(one, full.shape), full)


@pytest.mark.parametrize(
    "shape, window, strides",
    [
        ((3, 20, 17), (3, 5, 4), (1, 3, 2)),
        ((2, 7, 7), (1, 7, 2), (1, 1, 2)),
        ((1, 11), (1, 4), (1, 3)),
        ((4, 9, 8, 7), (4, 3, 3, 2), (4, 2, 1, 2)),
        ((3, 8, 8), (3, 8, 8), (1, 1, 1)),
    ],
)
def test_accumulation_in_torch_gives_numpys_bits(shape, window, strides):
    """On a GPU the accumulation runs in torch there (`_accumulate_on_device`);
    here the same torch code runs on the CPU, against the numpy path."""
    grid = WindowGrid(shape, window, strides)
    diffs = torch.randn(grid.num_windows, 3, dtype=torch.float64)
    total, count = grid.accumulate(diffs)
    device_total, device_count = grid._accumulate_on_device(diffs)
    assert torch.equal(device_total, total) and torch.equal(device_count, count)
    assert total.shape == (3, *shape) and total.is_contiguous()
