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


@pytest.mark.parametrize(
    "update",
    ["in_place", "load_state_dict", "replace_data", "new_parameter", "new_submodule", "buffer"],
)
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
    elif update == "replace_data":
        conv.weight.data = conv.weight.data * 3
    elif update == "new_parameter":
        conv.weight = torch.nn.Parameter(conv.weight.detach() * -1.5)
    elif update == "new_submodule":
        model.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
    else:
        norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        norm.running_mean = torch.rand_like(norm.running_mean)
    _check(occlusion, model, inputs)
    assert len(_plans(occlusion)) == 2


def test_state_walk_names_what_the_module_names():
    """The state key and values come from one walk over the modules' own tables:
    the same tensors, in the same order, as named_parameters and named_buffers,
    shared parameters (tied weights) once in the key, under each name in the
    values."""
    from captum_krypton.capture.graph import _module_state, _unique

    model = torch.nn.Sequential(
        models.small_cnn(), torch.nn.Flatten(), torch.nn.Linear(5, 5), torch.nn.Linear(5, 5)
    )
    model[3].weight = model[2].weight  # tied
    model.add_module("again", model[2])  # one module under two names
    parameters, buffers = _module_state(model)
    seen: set[int] = set()
    first_names = []
    for name, tensor in parameters.items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            first_names.append((name, tensor))
    assert first_names == list(model.named_parameters())
    assert list(buffers.items()) == list(model.named_buffers())
    assert parameters["3.weight"] is model[2].weight
    assert [id(t) for t in _unique(parameters.values())] == [id(t) for t in model.parameters()]
