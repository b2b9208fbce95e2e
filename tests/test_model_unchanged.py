"""The model is left exactly as it was: parameters, buffers, flags, no hooks."""

from __future__ import annotations

import copy

import pytest
import torch

from captum_krypton import FallbackWarning, IncrementalOcclusion
from tests import models


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {name: m.training for name, m in model.named_modules()},
        {name: id(p) for name, p in model.named_parameters()},
        {
            name: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
            for name, m in model.named_modules()
        },
    )


def _assert_same(model, snapshot):
    state, flags, ids, hooks = snapshot
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert {name: id(p) for name, p in model.named_parameters()} == ids
    assert {
        name: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
        for name, m in model.named_modules()
    } == hooks


def test_model_unchanged_after_attribution():
    model = models.small_cnn()
    snapshot = _snapshot(model)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 12, 12)
    IncrementalOcclusion(model).attribute(x, (3, 4, 4), strides=2, target=0)
    _assert_same(model, snapshot)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_model_unchanged_after_error_midway_and_instance_reusable():
    model = models.small_cnn(models.FailsMidwayCNN)
    snapshot = _snapshot(model)
    occlusion = IncrementalOcclusion(model)
    x = torch.randn(2, 3, 12, 12)
    with pytest.raises(RuntimeError, match="too large"):
        occlusion.attribute(
            x, (3, 4, 4), strides=2, target=0, windows_per_batch=4, self_check=False
        )
    _assert_same(model, snapshot)
    # With the self-check, the engine's error means Captum's path, which runs the
    # model one window at a time.
    with pytest.warns(FallbackWarning, match="engine run"):
        fallback = occlusion.attribute(x, (3, 4, 4), strides=2, target=0, windows_per_batch=4)
    _assert_same(model, snapshot)
    # Two windows x two examples = four rows is within the model's limit.
    from captum.attr import Occlusion

    expected = Occlusion(model).attribute(x, (3, 4, 4), strides=2, target=0)
    actual = occlusion.attribute(x, (3, 4, 4), strides=2, target=0, windows_per_batch=2)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(fallback, expected, rtol=0, atol=0)
    _assert_same(model, snapshot)


def test_training_model_is_left_as_captum_leaves_it():
    """In training mode BatchNorm updates its running stats on every forward: the
    model must end exactly as after Captum's own Occlusion, and stay in training."""
    from captum.attr import Occlusion

    model = models.small_cnn().train()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning):
        IncrementalOcclusion(model).attribute(x, (3, 4, 4), strides=4, target=0)
    Occlusion(twin).attribute(x, (3, 4, 4), strides=4, target=0)
    assert model.training
    _assert_same(model, _snapshot(twin)[:1] + _snapshot(model)[1:])
