"""Models with several outputs: Captum's exception with the fix, and SelectOutput."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from captum.attr import Occlusion
from torch import nn

from captum_krypton import IncrementalOcclusion, SelectOutput

Heads = namedtuple("Heads", ["scores", "features"])
ARGS = dict(sliding_window_shapes=(3, 4, 4), strides=4, target=1)


class TwoHeads(nn.Module):
    """A detection-style model: scores and features, as a tuple, dict or namedtuple."""

    def __init__(self, form: str):
        super().__init__()
        torch.manual_seed(0)
        self.form = form
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        features = torch.relu(self.conv(x)).mean((2, 3))
        scores = self.head(features)
        if self.form == "tuple":
            return scores, features
        if self.form == "dict":
            return {"scores": scores, "features": features}
        return Heads(scores, features)


KEYS = {"tuple": 0, "dict": "scores", "namedtuple": "scores"}


@pytest.mark.parametrize("form", list(KEYS))
def test_several_outputs_raise_captums_error_with_the_fix(form):
    model = TwoHeads(form).double().eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    with pytest.raises(AttributeError):
        Occlusion(model).attribute(x, **ARGS)
    with pytest.raises(AttributeError, match=r"not one tensor.*SelectOutput\(model, ") as raised:
        IncrementalOcclusion(model).attribute(x, **ARGS)
    assert "Tensor(2, 4)" in str(raised.value)  # names what the model returned


@pytest.mark.parametrize("form", list(KEYS))
def test_select_output_runs_incrementally_and_equals_captum(form):
    model = TwoHeads(form).double().eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    selected = SelectOutput(model, KEYS[form])
    expected = Occlusion(
        lambda inputs: (
            model(inputs)[0]
            if form == "tuple"
            else (model(inputs)["scores"] if form == "dict" else model(inputs).scores)
        )
    ).attribute(x, **ARGS)
    explainer = IncrementalOcclusion(selected)
    actual = explainer.attribute(x, engine="incremental", **ARGS)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    assert explainer.last_run.engine == "incremental"


def test_select_output_rejects_a_non_tensor_output():
    with pytest.raises(TypeError, match="not a tensor"):
        SelectOutput(nn.Identity(), 0)(["a"])


def test_select_output_passes_additional_forward_args():
    """Additional arguments reach the model through the wrapper's *args, and the
    capture keeps them per example."""

    class Scaled(TwoHeads):
        def forward(self, x, scale):
            features = torch.relu(self.conv(x)).mean((2, 3)) * scale
            return self.head(features), features

    model = Scaled("tuple").double().eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    scale = torch.rand(2, 1, dtype=torch.float64)
    args = dict(additional_forward_args=(scale,), **ARGS)
    expected = Occlusion(lambda inputs, s: model(inputs, s)[0]).attribute(x, **args)
    actual = IncrementalOcclusion(SelectOutput(model, 0)).attribute(x, engine="incremental", **args)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
