"""When incremental evaluation does not apply: Captum's path, with the reason."""

from __future__ import annotations

import pytest
import torch
from captum.attr import Occlusion
from torch import nn

from captum_krypton import FallbackWarning, IncrementalNotApplicable, IncrementalOcclusion
from tests import models


def _cases():
    cnn = models.small_cnn()
    x = torch.randn(2, 3, 12, 12)
    training = models.small_cnn().train()
    return [
        ("lambda", lambda inp: cnn(inp), x, "neither an nn.Module"),
        ("tuple", models.small_cnn(models.TwoInputCNN), (x, x.clone()), "several input tensors"),
        ("training", training, x, "training mode"),
        ("untraceable", models.small_cnn(models.DataDependentCNN), x, "could not capture"),
        ("aggregated", models.small_cnn(models.SummedCNN), x, "aggregated output"),
        (
            "mutates input",
            nn.Sequential(nn.ReLU(inplace=True), models.small_cnn()).eval(),
            x,
            "writes into the model's input",
        ),
        ("no spatial dims", torch.nn.Linear(6, 3).eval(), torch.randn(2, 6), "no spatial"),
    ]


CASES = _cases()


def _window(inputs):
    if isinstance(inputs, tuple):
        return tuple((3, 4, 4) for _ in inputs)
    return (3, 4, 4) if inputs.dim() == 4 else (2,)


@pytest.mark.parametrize("name,forward,inputs,reason", CASES, ids=[c[0] for c in CASES])
def test_fallback_equals_captum_and_says_why(name, forward, inputs, reason):
    target = None if name == "aggregated" else 1
    strides = tuple(2 for _ in inputs) if isinstance(inputs, tuple) else 2
    torch.manual_seed(0)
    expected = Occlusion(forward).attribute(inputs, _window(inputs), strides=strides, target=target)
    torch.manual_seed(0)
    with pytest.warns(FallbackWarning, match=reason):
        actual = IncrementalOcclusion(forward).attribute(
            inputs, _window(inputs), strides=strides, target=target
        )
    if name == "training":  # BatchNorm in training mode: batch statistics, same batches
        expected = expected if not isinstance(expected, tuple) else expected
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name,forward,inputs,reason", CASES, ids=[c[0] for c in CASES])
def test_engine_incremental_raises_instead(name, forward, inputs, reason):
    strides = tuple(2 for _ in inputs) if isinstance(inputs, tuple) else 2
    with pytest.raises(IncrementalNotApplicable, match=reason):
        IncrementalOcclusion(forward).attribute(
            inputs, _window(inputs), strides=strides, target=None, engine="incremental"
        )


def test_warning_is_given_once_per_reason():
    model = models.small_cnn(models.DataDependentCNN)
    occlusion = IncrementalOcclusion(model)
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(FallbackWarning):
        occlusion.attribute(x, (3, 4, 4), strides=4, target=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        occlusion.attribute(x, (3, 4, 4), strides=4, target=0)


def test_engine_captum_runs_captums_path_with_perturbations_per_eval():
    model = models.small_cnn()
    x = torch.randn(2, 3, 10, 10)
    expected = Occlusion(model).attribute(
        x, (3, 4, 4), strides=2, target=1, perturbations_per_eval=8
    )
    actual = IncrementalOcclusion(model).attribute(
        x, (3, 4, 4), strides=2, target=1, perturbations_per_eval=8, engine="captum"
    )
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_unknown_engine_is_rejected():
    with pytest.raises(ValueError, match="engine must be"):
        IncrementalOcclusion(models.small_cnn()).attribute(
            torch.randn(1, 3, 8, 8), (3, 4, 4), target=0, engine="fast"
        )


def test_unknown_ops_run_full_but_stay_exact():
    """An op with no rule makes the rest of the graph `full`; results still match."""

    class Flipping(models.SmallCNN):
        def forward(self, x):
            x = torch.flip(self.conv1(x), dims=(-1,))
            return self.fc(self.conv3(torch.relu(x)).mean((2, 3)))

    model = models.small_cnn(Flipping)
    x = torch.randn(2, 3, 16, 16)
    plan = IncrementalOcclusion(model).plan(x, (3, 4, 4), strides=2)
    rows = plan.table()
    assert rows[1]["op"] == "conv2d" and rows[1]["mode"] == "box"
    flip = next(row for row in rows if row["op"] == "flip")
    assert flip["mode"] == "full"
    assert "no box rule" in flip["reason"]
    expected = Occlusion(model).attribute(x, (3, 4, 4), strides=2, target=2)
    actual = IncrementalOcclusion(model).attribute(x, (3, 4, 4), strides=2, target=2)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_plans_that_save_little_rerun_the_whole_model():
    """Squeeze-excite on the input leaves nothing to save: the batch runs as plain
    re-inference (no bookkeeping), and the result still equals Captum's."""

    class EarlySqueezeExcite(models.SmallCNN):
        def forward(self, x):
            x = x * torch.sigmoid(x.mean((2, 3), keepdim=True))
            return super().forward(x)

    model = models.small_cnn(EarlySqueezeExcite)
    x = torch.randn(2, 3, 16, 16)
    plan = IncrementalOcclusion(model).plan(x, (3, 4, 4), strides=2)
    assert plan.rerun_whole_model and plan.theoretical_speedup == 1.0
    assert "plain re-inference" in plan.summary()
    expected = Occlusion(model).attribute(x, (3, 4, 4), strides=2, target=[1, 4])
    actual = IncrementalOcclusion(model).attribute(x, (3, 4, 4), strides=2, target=[1, 4])
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_a_trace_that_disagrees_with_forward_runs_on_captums_path():
    """Python state read in forward is baked into the capture (here a scale the
    user changes between calls): one forward compared with the captured clean run
    catches it, and the call runs on Captum's path."""
    from tests import models

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = models.small_cnn()
            self.scale = 1.0

        def forward(self, x):
            return self.inner(x) * self.scale

    model = Scaled()
    inputs = torch.randn(1, 3, 12, 12)
    args = dict(sliding_window_shapes=(3, 4, 4), strides=4, target=0)
    occlusion = IncrementalOcclusion(model)
    occlusion.attribute(inputs, engine="incremental", **args)
    model.scale = 3.0
    expected = Occlusion(model).attribute(inputs, **args)
    with pytest.warns(FallbackWarning, match="trace disagree"):
        actual = occlusion.attribute(inputs, **args)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    with pytest.raises(IncrementalNotApplicable, match="trace disagree"):
        occlusion.attribute(inputs, engine="incremental", **args)


def _hooked_models() -> list[tuple[str, nn.Module]]:
    """Hooks that change what a layer computes: the capture runs them as code."""
    post = models.small_cnn()
    post.conv2.register_forward_hook(lambda module, args, output: output * 0.5 + 0.1)
    pre = models.small_cnn()
    pre.conv2.register_forward_pre_hook(lambda module, args: (args[0].clamp(min=-0.2),))
    weight_norm = models.small_cnn()
    weight_norm.conv1 = nn.utils.weight_norm(weight_norm.conv1)  # a pre-hook
    parametrized = models.small_cnn()
    nn.utils.parametrizations.weight_norm(parametrized.conv2)
    return [("post-hook", post), ("pre-hook", pre), ("weight_norm", weight_norm),
            ("parametrization", parametrized)]  # fmt: skip


@pytest.mark.parametrize("name,model", _hooked_models(), ids=[n for n, _ in _hooked_models()])
def test_hooks_and_parametrizations_run_incrementally(name, model):
    """Forward hooks, hook-based weight norm and parametrizations are captured as
    the code they run: incremental (no fallback) and equal to Captum."""
    model = model.eval().double()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    expected = Occlusion(model).attribute(x, (3, 4, 4), strides=2, target=1)
    explainer = IncrementalOcclusion(model)
    actual = explainer.attribute(x, (3, 4, 4), strides=2, target=1, engine="incremental")
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    assert explainer.last_run.engine == "incremental"


def test_a_rule_that_fails_while_planning_falls_back(monkeypatch):
    """A rule raising while the plan is made (an engine bug on this model) is a
    reason for Captum's path, not an error of the call."""
    from captum_krypton.ops.convolution import ConvRule

    def broken(self, info):
        raise TypeError("a dtype the rule did not expect")

    monkeypatch.setattr(ConvRule, "spec", broken)
    model = models.small_cnn()
    x = torch.randn(2, 3, 12, 12)
    args = dict(sliding_window_shapes=(3, 4, 4), strides=2, target=1)
    expected = Occlusion(model).attribute(x, **args)
    with pytest.warns(FallbackWarning, match="planning failed .TypeError: a dtype"):
        actual = IncrementalOcclusion(model).attribute(x, **args)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    with pytest.raises(IncrementalNotApplicable, match="planning failed"):
        IncrementalOcclusion(model).attribute(x, engine="incremental", **args)
