"""Windows of one call shared across several devices: same result as one device."""

from __future__ import annotations

import threading

import pytest
import torch
from captum.attr import Occlusion

from captum_krypton import IncrementalOcclusion
from tests import models
from tests.conftest import assert_close_to_captum

ARGS = dict(sliding_window_shapes=(3, 4, 4), strides=2)


def test_two_cpu_shards_equal_one_device_and_captum():
    model = models.small_cnn(models.ScaledCNN)
    torch.manual_seed(2)
    inputs = torch.randn(3, 3, 16, 16)
    scale = torch.tensor([0.5, 1.0, 2.0])
    args = dict(target=[0, 2, 4], additional_forward_args=(scale,), baselines=0.3, **ARGS)
    occlusion = IncrementalOcclusion(model)
    single = occlusion.attribute(inputs, windows_per_batch=10, **args)
    shared = occlusion.attribute(inputs, devices=["cpu", "cpu"], windows_per_batch=10, **args)
    torch.testing.assert_close(shared, single, rtol=0, atol=1e-6)
    assert occlusion.last_run.windows_computed == 49 and not occlusion.last_run.cancelled
    expected = Occlusion(model).attribute(inputs, perturbations_per_eval=8, **args)
    with torch.no_grad():
        output_scale = model(inputs, scale).abs().max()
    assert_close_to_captum(expected, shared, output_scale)


def test_a_changed_model_gets_new_replicas():
    model = models.small_cnn()
    inputs = torch.randn(1, 3, 12, 12)
    occlusion = IncrementalOcclusion(model)
    before = occlusion.attribute(inputs, target=1, devices=["cpu", "cpu"], **ARGS)
    with torch.no_grad():
        model.conv1.weight.mul_(2.0)
    after = occlusion.attribute(inputs, target=1, devices=["cpu", "cpu"], **ARGS)
    expected = Occlusion(model).attribute(inputs, target=1, **ARGS)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-5)


def test_cancel_and_errors_with_devices():
    model = models.small_cnn()
    cancel = threading.Event()
    cancel.set()
    occlusion = IncrementalOcclusion(model)
    result = occlusion.attribute(
        torch.randn(1, 3, 16, 16),
        target=0,
        devices=["cpu", "cpu"],
        cancel=cancel,
        windows_per_batch=5,
        **ARGS,
    )
    assert occlusion.last_run.cancelled and torch.isnan(result).any()
    with pytest.raises(ValueError, match="exact occlusion"):
        occlusion.attribute(torch.randn(1, 3, 16, 16), target=0, devices=["cpu"], tau=0.5, **ARGS)
