"""Plans are reused across calls only while everything they were made from holds."""

from __future__ import annotations

import pytest
import torch
from captum.attr import Occlusion

from captum_krypton import IncrementalOcclusion
from tests import models
from tests.conftest import assert_close_to_captum

ARGS = dict(sliding_window_shapes=(3, 4, 4), strides=3, target=1)


def _check(occlusion, model, inputs):
    expected = Occlusion(model).attribute(inputs, perturbations_per_eval=16, **ARGS)
    actual = occlusion.attribute(inputs, **ARGS)
    assert_close_to_captum(expected, actual, model(inputs).detach().abs().max())


def _plans(occlusion):
    """Every plan the instance holds (a capture per input shape)."""
    return {
        (key, plan_key): plan
        for key, captured in occlusion._preparer.captures.items()
        for plan_key, plan in captured.plans.items()
    }


def test_same_shapes_reuse_the_plan_with_new_values():
    model = models.small_cnn()
    occlusion = IncrementalOcclusion(model)
    _check(occlusion, model, torch.randn(2, 3, 12, 12))
    (plan,) = _plans(occlusion).values()
    _check(occlusion, model, torch.randn(2, 3, 12, 12))
    assert list(_plans(occlusion).values()) == [plan]
    # The reused plan keeps shapes only, not the first call's activations.
    assert all(
        p.info.value.device.type == "meta"
        for n, p in plan.nodes.items()
        if n in plan.captured.depends_on_input and isinstance(p.info.value, torch.Tensor)
    )


def test_new_shape_or_window_makes_a_new_plan():
    model = models.small_cnn()
    occlusion = IncrementalOcclusion(model)
    _check(occlusion, model, torch.randn(1, 3, 12, 12))
    _check(occlusion, model, torch.randn(1, 3, 15, 13))
    occlusion.attribute(torch.randn(1, 3, 15, 13), sliding_window_shapes=(3, 5, 5), target=1)
    assert len(_plans(occlusion)) == 3


@pytest.mark.parametrize("update", ["in_place", "load_state_dict", "replace_data"])
def test_parameter_updates_make_a_new_plan(update):
    model = models.small_cnn()
    occlusion = IncrementalOcclusion(model)
    inputs = torch.randn(2, 3, 12, 12)
    _check(occlusion, model, inputs)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    if update == "in_place":
        with torch.no_grad():
            conv.weight.mul_(-2)
    elif update == "load_state_dict":
        state = {k: v * 0.5 for k, v in model.state_dict().items()}
        model.load_state_dict(state)
    else:
        conv.weight.data = conv.weight.data * 3
    _check(occlusion, model, inputs)
    assert len(_plans(occlusion)) == 2


class ClampedCNN(models.SmallCNN):
    """A tensor argument without a batch dim acting on boxed values."""

    def forward(self, x, floor):
        y = torch.clamp(self.conv1(x), min=floor)
        return self.fc(self.conv3(self.pool(y[:, :8])).mean((2, 3)))


def test_tensor_arguments_are_read_each_call():
    model = models.small_cnn(ClampedCNN)
    occlusion = IncrementalOcclusion(model)
    inputs = torch.randn(2, 3, 12, 12)
    floor = torch.tensor(0.1)
    for value in (0.1, -0.4):
        floor.fill_(value)  # the same tensor, written in place
        expected = Occlusion(model).attribute(
            inputs, additional_forward_args=(floor,), perturbations_per_eval=16, **ARGS
        )
        actual = occlusion.attribute(inputs, additional_forward_args=(floor,), **ARGS)
        assert_close_to_captum(expected, actual, model(inputs, floor).detach().abs().max())
