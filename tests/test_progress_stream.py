"""Anytime results: heatmaps while attribute runs, the final one last, cancellation."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from captum.attr import Occlusion

from captum_krypton import FallbackWarning, IncrementalOcclusion, OcclusionProgress
from tests import models
from tests.conftest import assert_close_to_captum

ARGS = dict(sliding_window_shapes=(3, 4, 4), strides=1, target=1)


def _reports(occlusion, inputs, **options):
    reports: list[OcclusionProgress] = []
    result = occlusion.attribute(inputs, **ARGS, on_progress=reports.append, **options)
    return result, reports


def test_exact_stream_fills_in_and_ends_with_the_returned_attribution():
    model = models.small_cnn()
    inputs = torch.randn(2, 3, 16, 16)
    occlusion = IncrementalOcclusion(model)
    result, reports = _reports(occlusion, inputs, windows_per_batch=40)
    assert len(reports) == 5  # 169 windows in batches of 40
    assert reports[-1].attribution is result and reports[-1].complete
    assert not any(r.complete for r in reports[:-1])
    assert [r.windows_done for r in reports] == [40, 80, 120, 160, 169]
    assert all(r.windows_planned == r.windows_total == 169 for r in reports)
    assert all(r.stage == "exact" for r in reports)
    # Unfinished maps: NaN where no computed window covers yet, fewer NaN each time.
    missing = [int(torch.isnan(r.attribution).sum()) for r in reports]
    assert missing[0] > 0 and missing[-1] == 0
    assert all(a >= b for a, b in zip(missing, missing[1:]))
    # Positions whose covering windows are all done already hold their final value.
    first = reports[0].attribution
    torch.testing.assert_close(first[..., :2, :], result[..., :2, :], rtol=0, atol=0)
    expected = Occlusion(model).attribute(inputs, perturbations_per_eval=32, **ARGS)
    assert_close_to_captum(expected, result, model(inputs).detach().abs().max())


def test_reporting_changes_no_bit_of_the_result():
    model = models.small_cnn()
    inputs = torch.randn(1, 3, 16, 16)
    occlusion = IncrementalOcclusion(model)
    quiet = occlusion.attribute(inputs, **ARGS, windows_per_batch=30)
    reported, _ = _reports(occlusion, inputs, windows_per_batch=30)
    assert torch.equal(quiet, reported)


def test_drilldown_stream_shows_the_coarse_map_first_then_refines():
    model = models.small_cnn()
    inputs = torch.randn(1, 3, 24, 24)
    occlusion = IncrementalOcclusion(model)
    result, reports = _reports(occlusion, inputs, drilldown=0.3, windows_per_batch=16)
    stages = [r.stage for r in reports]
    assert stages[0] == "coarse" and stages[-1] == "refine"
    assert stages == sorted(stages, key=["coarse", "refine"].index)
    coarse_done = [r for r in reports if r.stage == "coarse"][-1]
    # After the coarse pass the whole map is estimated (interpolated): no NaN.
    first_refine = next(r for r in reports if r.stage == "refine")
    assert torch.isfinite(first_refine.attribution).all()
    assert coarse_done.windows_done == 6 * 6  # 21 windows per dim, every 4th and the last
    assert reports[-1].attribution is result
    assert (
        reports[-1].windows_done
        == reports[-1].windows_planned
        == (occlusion.last_run.windows_computed)
    )


def test_stream_iterator_matches_attribute_and_reports_progress():
    model = models.small_cnn()
    inputs = torch.randn(1, 3, 16, 16)
    occlusion = IncrementalOcclusion(model)
    stream = list(occlusion.attribute_stream(inputs, **ARGS, windows_per_batch=50))
    assert [r.windows_done for r in stream] == [50, 100, 150, 169]
    assert torch.equal(stream[-1].attribution, occlusion.attribute(inputs, **ARGS))


@pytest.mark.parametrize("options", [{}, dict(drilldown=0.4), dict(target_ssim=0.9)])
def test_cancel_returns_the_map_so_far_and_leaves_the_engine_reusable(options):
    model = models.small_cnn()
    inputs = torch.randn(1, 3, 24, 24)
    occlusion = IncrementalOcclusion(model)
    cancel = threading.Event()
    seen = []

    def on_progress(report):
        seen.append(report)
        if len(seen) == 2:
            cancel.set()

    partial = occlusion.attribute(
        inputs, **ARGS, windows_per_batch=20, on_progress=on_progress, cancel=cancel, **options
    )
    assert occlusion.last_run.cancelled
    assert seen[-1].attribution is partial and not seen[-1].complete
    # Nothing ran after the report during which cancel was set.
    assert occlusion.last_run.windows_computed == seen[-1].windows_done == seen[1].windows_done
    assert seen[-1].windows_done < seen[-1].windows_total
    assert partial.shape == (1, 3, 24, 24)
    # The engine is fine afterwards: a plain call equals Captum.
    expected = Occlusion(model).attribute(inputs, perturbations_per_eval=64, **ARGS)
    again = occlusion.attribute(inputs, **ARGS)
    assert not occlusion.last_run.cancelled
    assert_close_to_captum(expected, again, model(inputs).detach().abs().max())


def test_closing_the_stream_early_leaves_the_engine_reusable():
    model = models.small_cnn()
    inputs = torch.randn(1, 3, 16, 16)
    occlusion = IncrementalOcclusion(model)
    exact = occlusion.attribute(inputs, **ARGS)
    stream = occlusion.attribute_stream(inputs, **ARGS, windows_per_batch=10)
    next(stream)
    stream.close()
    assert torch.equal(occlusion.attribute(inputs, **ARGS), exact)


def test_a_cancel_set_before_the_call_computes_nothing():
    model = models.small_cnn()
    cancel = threading.Event()
    cancel.set()
    occlusion = IncrementalOcclusion(model)
    result = occlusion.attribute(torch.randn(1, 3, 12, 12), **ARGS, cancel=cancel)
    assert torch.isnan(result).all() and occlusion.last_run.windows_computed == 0


def test_captums_path_reports_one_final_map():
    model = models.small_cnn()
    inputs = torch.randn(1, 3, 12, 12)
    occlusion = IncrementalOcclusion(model)
    reports = []
    result = occlusion.attribute(inputs, **ARGS, engine="captum", on_progress=reports.append)
    assert len(reports) == 1 and reports[0].attribution is result and reports[0].complete
    assert occlusion.last_run.engine == "captum"
    assert occlusion.last_run.windows_computed == reports[0].windows_total == 81


def test_fallback_with_approximations_is_exact_and_says_so():
    def forward(x):  # a plain function: the engine can't capture it as a module
        return models.small_cnn()(x)

    torch.manual_seed(0)
    occlusion = IncrementalOcclusion(forward)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        occlusion.attribute(torch.randn(1, 3, 12, 12), **ARGS, drilldown=0.2)
    assert any(issubclass(w.category, FallbackWarning) for w in caught)
    assert occlusion.last_run.engine == "captum" and occlusion.last_run.approximation.exact


def test_progress_bar_total_follows_the_windows_drilldown_plans(capsys):
    model = models.small_cnn()
    occlusion = IncrementalOcclusion(model)
    occlusion.attribute(torch.randn(1, 3, 24, 24), **ARGS, drilldown=0.2, show_progress=True)
    done = occlusion.last_run.windows_computed
    assert done < 21 * 21
    last_line = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert f"{done}/{done}" in last_line and "100%" in last_line
