"""Adaptive drill-down: lattice and interpolation math, window counts, exactness at r=1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from captum.attr import Occlusion

from captum_krypton import IncrementalOcclusion
from captum_krypton.approx import drilldown as dd
from captum_krypton.engine.windows import WindowGrid
from tests import models
from tests.conftest import assert_close_to_captum

ARGS = dict(sliding_window_shapes=(3, 4, 4), strides=1, target=2)


@pytest.mark.parametrize("count, factor", [(1, 2), (2, 2), (5, 2), (9, 4), (10, 4), (13, 3)])
def test_lattice_takes_every_factor_th_window_and_the_last(count, factor):
    indices = dd.lattice_indices(count, factor)
    assert indices[0] == 0 and indices[-1] == count - 1
    assert (np.diff(indices) <= factor).all() and (np.diff(indices) > 0).all()
    assert set(range(0, count, factor)) <= set(indices.tolist())


def test_interpolation_is_exact_at_known_points_and_linear_between():
    known = np.array([0, 3, 7, 8])
    weights = dd.interpolation_matrix(known, 9)
    values = torch.tensor([1.0, 4.0, -4.0, 10.0], dtype=torch.float64)
    field = values @ weights
    torch.testing.assert_close(field[known], values)
    torch.testing.assert_close(field[1], torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(field[5], torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(weights.sum(0), torch.ones(9, dtype=torch.float64))


def test_interpolating_a_linear_field_over_the_grid_reproduces_it():
    grid = WindowGrid((3, 20, 17), (3, 4, 4), (3, 2, 2))
    counts = grid.counts
    lattice = dd.coarse_lattice(counts, 3)
    c, y, x = np.meshgrid(*(np.arange(n) for n in counts), indexing="ij")
    linear = torch.from_numpy(np.stack([2.0 * y - 0.5 * x + 1, y + x], axis=-1).reshape(-1, 2))
    ids = dd.window_ids(counts, lattice)
    torch.testing.assert_close(dd.interpolate(counts, lattice, linear[ids]), linear)


def test_refinement_skips_computed_windows_and_ranks_highest_first():
    scores = torch.tensor([0.1, 5.0, 3.0, 4.0, 0.0, 2.0], dtype=torch.float64)
    computed = np.array([False, True, False, False, False, False])
    order = dd.refinement_order(scores, 0.5, computed)
    assert order.tolist() == [3, 2]  # top half is {1, 3, 2}; 1 is already done


def test_scores_favour_large_and_changing_coarse_values():
    counts = (1, 9, 9)
    lattice = (np.arange(1), dd.lattice_indices(9, 2), dd.lattice_indices(9, 2))
    values = torch.zeros(25, 1, dtype=torch.float64)
    values[12] = 1.0  # one large coarse value in the middle
    scores = dd.refinement_scores(counts, lattice, values).reshape(9, 9)
    assert scores[4, 4] == scores.max()
    assert scores[0, 0] == 0 and scores[8, 8] == 0


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.7])
def test_drilldown_never_computes_more_windows_than_exact(fraction):
    model = models.small_cnn()
    inputs = torch.randn(2, 3, 20, 20)
    occlusion = IncrementalOcclusion(model)
    occlusion.attribute(inputs, drilldown=fraction, **ARGS)
    report = occlusion.last_run
    total = 17 * 17
    assert report.windows_total == total
    lattice = len(dd.lattice_indices(17, 4)) ** 2
    assert report.windows_computed <= total
    assert report.windows_computed <= lattice + math.ceil(fraction * total)
    assert report.windows_computed >= max(lattice, math.ceil(fraction * total))


def test_drilldown_of_every_window_equals_captum():
    model = models.small_cnn()
    inputs = torch.randn(2, 3, 16, 16)
    expected = Occlusion(model).attribute(inputs, perturbations_per_eval=32, **ARGS)
    occlusion = IncrementalOcclusion(model)
    actual = occlusion.attribute(inputs, drilldown=1.0, drilldown_factor=3, **ARGS)
    assert occlusion.last_run.windows_computed == 13 * 13
    assert_close_to_captum(expected, actual, model(inputs).detach().abs().max())


def test_drilldown_keeps_captums_shape_and_differs_only_where_not_refined():
    model = models.small_cnn()
    inputs = torch.randn(1, 3, 24, 24)
    occlusion = IncrementalOcclusion(model)
    exact = occlusion.attribute(inputs, **ARGS)
    approx = occlusion.attribute(inputs, drilldown=0.2, **ARGS)
    assert approx.shape == exact.shape and approx.dtype == exact.dtype
    assert torch.isfinite(approx).all()
    assert not torch.equal(approx, exact)
    # The three channels of a full-depth window's map stay identical.
    torch.testing.assert_close(approx[:, 0], approx[:, 2], rtol=0, atol=0)


def test_drilldown_works_per_example_with_several_targets():
    model = models.small_cnn()
    inputs = torch.randn(3, 3, 16, 16)
    occlusion = IncrementalOcclusion(model)
    args = dict(sliding_window_shapes=(3, 4, 4), strides=2, target=[0, 1, 4])
    exact = occlusion.attribute(inputs, **args)
    approx = occlusion.attribute(inputs, drilldown=1.0, **args)
    torch.testing.assert_close(approx, exact, rtol=0, atol=1e-5 * exact.abs().max().item())


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(drilldown=0), "drilldown"),
        (dict(drilldown=1.5), "drilldown"),
        (dict(drilldown=0.5, drilldown_factor=1), "drilldown_factor"),
        (dict(drilldown=0.5, drilldown_factor=2.5), "drilldown_factor"),
        (dict(target_ssim=1.0), "target_ssim"),
        (dict(target_ssim=0), "target_ssim"),
        (dict(target_ssim=0.9, tau=0.5), "target_ssim"),
        (dict(target_ssim=0.9, drilldown=0.5), "target_ssim"),
    ],
)
def test_bad_approximation_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        IncrementalOcclusion(models.small_cnn()).attribute(
            torch.randn(1, 3, 8, 8), **ARGS, **options
        )


def test_calibration_probes_tau_only_where_asked():
    """Where the plans promise tau a large saving, the calibration probes it; with
    no thresholds to try (CUDA, where tau never paid for its probe) it runs no
    probe and keeps tau 1."""
    import torch

    from captum_krypton.approx import calibrate as cal
    from captum_krypton.plan import EXACT

    counts = (1, 24, 24)
    # Detail finer than any lattice: drill-down leaves most windows to compute,
    # which a cheaper plan would speed up.
    field = np.random.default_rng(0).normal(size=(24, 24))
    exact = torch.from_numpy(field.reshape(-1, 1))

    def heatmap(diffs):  # (windows, k) -> k maps of one channel
        return diffs.reshape(24, 24, -1).permute(2, 0, 1)[:, None].to(torch.float64)

    def run(tau_probes):
        probed = []

        def run_with(approximation, ids):
            probed.append(approximation.tau)
            return exact[torch.from_numpy(ids)] * 1.001

        calibration = cal.calibrate(
            0.9,
            counts,
            4,
            cal.first_windows(counts, 4),
            lambda ids: exact[torch.from_numpy(ids)],
            heatmap,
            run_with,
            lambda approximation: 1.0 if approximation == EXACT else 0.1,
            tau_probes=tau_probes,
        )
        return probed, calibration

    probed, calibration = run(cal.TAU_PROBES)
    assert probed and calibration.windows_run > 0
    probed, calibration = run(cal.tau_probes_for(torch.device("cuda")))
    assert probed == [] and calibration.windows_run == 0
    assert calibration.approximation.tau == 1.0
    assert cal.tau_probes_for(torch.device("cpu")) == cal.TAU_PROBES
