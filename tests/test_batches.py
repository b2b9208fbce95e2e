"""Many images in one call, and repeatability."""

from __future__ import annotations

import torch
from captum.attr import Occlusion

from captum_krypton import IncrementalOcclusion
from tests import models
from tests.conftest import assert_close_to_captum

ARGS = dict(sliding_window_shapes=(3, 4, 4), strides=2)


def test_hundreds_of_images_with_per_example_targets_equal_per_image_calls():
    model = models.small_cnn()
    torch.manual_seed(3)
    inputs = torch.randn(256, 3, 10, 10)
    targets = torch.randint(0, 5, (256,))
    occlusion = IncrementalOcclusion(model)
    batched = occlusion.attribute(inputs, target=targets, **ARGS)
    assert occlusion.last_run.engine == "incremental"
    singles = torch.cat(
        [
            occlusion.attribute(inputs[i : i + 1], target=int(targets[i]), **ARGS)
            for i in range(0, 256, 17)
        ]
    )
    torch.testing.assert_close(batched[::17], singles, rtol=0, atol=1e-5)
    expected = Occlusion(model).attribute(inputs, target=targets, perturbations_per_eval=4, **ARGS)
    with torch.no_grad():
        scale = model(inputs).abs().max()
    assert_close_to_captum(expected, batched, scale)


def test_small_memory_budget_splits_windows_not_results():
    model = models.small_cnn()
    inputs = torch.randn(64, 3, 10, 10)
    occlusion = IncrementalOcclusion(model)
    whole = occlusion.attribute(inputs, target=1, **ARGS)
    tight = occlusion.attribute(inputs, target=1, max_memory=1 << 16, **ARGS)
    torch.testing.assert_close(tight, whole, rtol=0, atol=1e-6)


def test_repeated_runs_on_the_cpu_are_identical():
    model = models.small_cnn()
    inputs = torch.randn(4, 3, 16, 16)
    occlusion = IncrementalOcclusion(model)
    first = occlusion.attribute(inputs, target=2, windows_per_batch=7, **ARGS)
    for _ in range(3):
        assert torch.equal(
            occlusion.attribute(inputs, target=2, windows_per_batch=7, **ARGS), first
        )
    fresh = IncrementalOcclusion(model).attribute(inputs, target=2, windows_per_batch=7, **ARGS)
    assert torch.equal(fresh, first)


def test_more_examples_than_one_run_takes_are_split_into_chunks(monkeypatch):
    """Past EXAMPLES_PER_RUN examples a call runs in chunks of examples; per-example
    targets, baselines and additional arguments go with their examples."""
    from captum_krypton import chunks

    monkeypatch.setattr(chunks, "EXAMPLES_PER_RUN", 64)
    model = models.small_cnn(models.ScaledCNN)
    torch.manual_seed(4)
    inputs = torch.randn(150, 3, 10, 10)
    targets = torch.randint(0, 5, (150,))
    baselines = torch.randn(150, 3, 10, 10)
    scale = torch.rand(150) + 0.5
    args = dict(target=targets, baselines=baselines, additional_forward_args=(scale,), **ARGS)
    expected = Occlusion(model).attribute(inputs, perturbations_per_eval=8, **args)
    reports = []
    occlusion = IncrementalOcclusion(model)
    actual = occlusion.attribute(inputs, on_progress=reports.append, **args)
    with torch.no_grad():
        output_scale = model(inputs, scale).abs().max()
    assert_close_to_captum(expected, actual, output_scale)
    assert [r.complete for r in reports] == [False, False, True]
    assert torch.isnan(reports[0].attribution[64:]).all()
    assert torch.isfinite(reports[0].attribution[:64]).all()
    assert reports[-1].attribution is actual
    assert occlusion.last_run.windows_computed == occlusion.last_run.windows_total == 3 * 16
