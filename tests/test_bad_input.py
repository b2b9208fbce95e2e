"""Every bad input and fault of docs/bad_input.md: the same error as Captum's
Occlusion (its AssertionErrors with their messages) or the same result, and the
model exactly as it was."""

from __future__ import annotations

import pytest
import torch
from captum.attr import Occlusion

from captum_krypton import FallbackWarning, IncrementalOcclusion
from captum_krypton.engine import occlusion as occlusion_module
from tests import models
from tests.bad_inputs import CASES, run


def _same_model(model, before):
    assert model.training == before.training
    after, original = model.state_dict(), before.state_dict()
    assert after.keys() == original.keys()
    for key in original:
        assert torch.equal(after[key], original[key]), key


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_captums_answer_and_leaves_the_model(case):
    theirs, _, _ = run(Occlusion, case, ours=False)
    ours, model, before = run(IncrementalOcclusion, case, ours=True)
    _same_model(model, before)
    if case.ours_error is not None:
        assert isinstance(ours.error, case.ours_error), ours.describe()
        assert "positive" in str(ours.error)
        return
    if theirs.error is not None:
        assert type(ours.error) is type(theirs.error), (ours.describe(), theirs.describe())
        if isinstance(theirs.error, AssertionError):
            assert str(ours.error) == str(theirs.error)
        return
    assert ours.error is None, ours.describe()
    expected, actual = theirs.result, ours.result
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    finite = torch.isfinite(expected)
    if finite.any():
        scale = max(expected[finite].abs().max().item(), 1.0)
        torch.testing.assert_close(
            actual[finite].float(), expected[finite].float(), rtol=0, atol=case.tolerance * scale
        )


@pytest.mark.parametrize(
    "error,self_check",
    [
        (RuntimeError("fault in a window batch"), False),
        (KeyboardInterrupt(), True),
        (KeyboardInterrupt(), False),
    ],
)
def test_a_fault_inside_the_engine_propagates_and_leaves_everything_reusable(
    error, self_check, monkeypatch
):
    """Without the self-check an engine error reaches the caller; an interrupt always does."""
    model = models.small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = torch.randn(2, 3, 12, 12)
    args = dict(
        sliding_window_shapes=(3, 4, 4),
        strides=2,
        target=1,
        windows_per_batch=4,
        self_check=self_check,
    )
    occlusion = IncrementalOcclusion(model)
    original = occlusion_module.PreparedOcclusion.run_window_ids
    calls = []

    def failing(self, ids):
        calls.append(len(ids))
        if len(calls) == 3:
            raise error
        return original(self, ids)

    monkeypatch.setattr(occlusion_module.PreparedOcclusion, "run_window_ids", failing)
    with pytest.raises(type(error)):
        occlusion.attribute(inputs, **args)
    monkeypatch.setattr(occlusion_module.PreparedOcclusion, "run_window_ids", original)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    expected = Occlusion(model).attribute(inputs, (3, 4, 4), strides=2, target=1)
    torch.testing.assert_close(occlusion.attribute(inputs, **args), expected, rtol=0, atol=1e-5)


def test_with_the_self_check_an_engine_error_gives_captums_result(monkeypatch):
    model = models.small_cnn()
    inputs = torch.randn(2, 3, 12, 12)
    original = occlusion_module.PreparedOcclusion.run_window_ids
    calls = []

    def failing(self, ids):
        calls.append(len(ids))
        if len(calls) == 3:
            raise RuntimeError("fault in a window batch")
        return original(self, ids)

    monkeypatch.setattr(occlusion_module.PreparedOcclusion, "run_window_ids", failing)
    with pytest.warns(FallbackWarning, match="self-check 'engine run' failed.*fault in a window"):
        actual = IncrementalOcclusion(model).attribute(
            inputs, (3, 4, 4), strides=2, target=1, windows_per_batch=4
        )
    assert calls  # the engine ran, then Captum's path
    expected = Occlusion(model).attribute(inputs, (3, 4, 4), strides=2, target=1)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_a_forward_replaced_on_a_layer_is_captured_as_the_code_it_runs():
    """A layer's forward patched on the instance runs in the capture as it is:
    the result is incremental and equal to Captum's."""
    model = models.small_cnn()
    seen = []
    original = model.conv2.forward

    def patched(x):
        seen.append(x.shape[0])
        return original(x) * 2

    model.conv2.forward = patched
    inputs = torch.randn(1, 3, 12, 12)
    args = dict(sliding_window_shapes=(3, 4, 4), strides=4, target=0)
    expected = Occlusion(model).attribute(inputs, **args)
    explainer = IncrementalOcclusion(model)
    actual = explainer.attribute(inputs, engine="incremental", **args)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    assert seen and explainer.last_run.engine == "incremental"
