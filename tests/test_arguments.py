"""Every argument form of Occlusion.attribute, against Captum's own results."""

from __future__ import annotations

import io
import re
import warnings

import pytest
import torch
from captum.attr import Occlusion

from captum_krypton import FallbackWarning, IncrementalOcclusion
from tests import models
from tests.conftest import check_model


@pytest.fixture
def model():
    return models.small_cnn()


@pytest.mark.parametrize(
    "window,stride",
    [
        ((3, 6, 6), 3),  # all channels
        ((1, 6, 6), (1, 3, 3)),  # one channel at a time
        ((2, 5, 4), (1, 2, 3)),  # two of three channels, overlapping
        ((3, 7, 7), 5),  # stride does not divide: cut-off last windows
        ((3, 20, 4), (1, 1, 4)),  # window == whole height
        ((3, 20, 21), 1),  # window == whole input
        ((3, 1, 1), 1),  # single pixels
    ],
)
def test_windows_and_strides(model, window, stride):
    inputs = torch.randn(2, 3, 20, 21)
    check_model(model, inputs, sliding_window_shapes=window, strides=stride, target=2)


def test_default_stride_is_one(model):
    inputs = torch.randn(1, 3, 12, 12)
    check_model(model, inputs, sliding_window_shapes=(3, 4, 4), target=0)


@pytest.mark.parametrize("target", [3, torch.tensor(1), [0, 4, 2], torch.tensor([4, 1, 0])])
def test_targets(model, target):
    inputs = torch.randn(3, 3, 16, 16)
    check_model(model, inputs, sliding_window_shapes=(3, 5, 5), strides=3, target=target)


@pytest.mark.parametrize(
    "baseline",
    [
        0.5,
        -1,
        torch.tensor(0.25),
        torch.rand(1, 3, 16, 16),
        torch.rand(3, 16, 16),
        torch.rand(3, 1, 1),
        torch.rand(2, 3, 16, 16),  # per example
    ],
)
def test_baselines(model, baseline):
    inputs = torch.randn(2, 3, 16, 16)
    check_model(
        model, inputs, sliding_window_shapes=(3, 5, 5), strides=3, target=1, baselines=baseline
    )


def test_additional_forward_args_tensor_and_flag():
    model = models.small_cnn(models.ScaledCNN)
    inputs = torch.randn(2, 3, 16, 16)
    scale = torch.tensor([0.5, 2.0])
    for extra in [(scale,), (scale, True)]:
        check_model(
            model,
            inputs,
            additional_forward_args=extra,
            sliding_window_shapes=(3, 6, 6),
            strides=4,
            target=[0, 3],
        )


@pytest.mark.parametrize("keepdim", [False, True])
def test_single_output_models(keepdim):
    model = models.small_cnn(models.SingleOutputCNN, keepdim)
    inputs = torch.randn(2, 3, 16, 16)
    check_model(model, inputs, sliding_window_shapes=(3, 4, 4), strides=2)


def test_multi_output_without_target_gives_captums_shape(model):
    inputs = torch.randn(2, 3, 12, 12)
    expected, actual = check_model(model, inputs, sliding_window_shapes=(3, 4, 4), strides=4)
    assert actual.shape == (2 * 5, 3, 12, 12)


def test_dense_output_with_tuple_target():
    model = models.small_cnn(models.DenseHeadCNN)
    inputs = torch.randn(2, 3, 16, 16)
    check_model(model, inputs, sliding_window_shapes=(3, 4, 4), strides=2, target=(3, 1, 2))


def test_single_tensor_tuple_input_returns_tuple(model):
    inputs = (torch.randn(2, 3, 16, 16),)
    expected, actual = check_model(
        model, inputs, sliding_window_shapes=((3, 5, 5),), strides=(3,), target=1
    )
    assert isinstance(actual, tuple) and len(actual) == 1


def test_integer_inputs():
    model = models.small_cnn(models.IntInputCNN)
    inputs = torch.randint(0, 20, (2, 3, 14, 14))
    check_model(model, inputs, sliding_window_shapes=(3, 4, 4), strides=2, target=1, baselines=3)


def test_inputs_requiring_grad(model):
    inputs = torch.randn(2, 3, 16, 16, requires_grad=True)
    expected, actual = check_model(
        model, inputs, sliding_window_shapes=(3, 5, 5), strides=3, target=0
    )
    assert not actual.requires_grad


def test_float64_inputs_and_model():
    model = models.small_cnn().double()
    inputs = torch.randn(2, 3, 17, 15, dtype=torch.float64)
    check_model(model, inputs, sliding_window_shapes=(2, 5, 3), strides=(1, 3, 2), target=[1, 2])


@pytest.mark.parametrize("windows_per_batch", [1, 7, 10_000])
def test_batch_size_does_not_change_result(model, windows_per_batch):
    inputs = torch.randn(2, 3, 16, 16)
    reference = IncrementalOcclusion(model).attribute(inputs, (3, 5, 5), strides=3, target=1)
    actual = IncrementalOcclusion(model).attribute(
        inputs, (3, 5, 5), strides=3, target=1, windows_per_batch=windows_per_batch
    )
    torch.testing.assert_close(actual, reference, rtol=0, atol=1e-6)


def test_tiny_memory_budget_still_exact(model):
    inputs = torch.randn(2, 3, 16, 16)
    expected = Occlusion(model).attribute(inputs, (3, 5, 5), strides=3, target=1)
    actual = IncrementalOcclusion(model).attribute(
        inputs, (3, 5, 5), strides=3, target=1, max_memory=1
    )
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "window,stride,message",
    [
        ((3, 17, 5), 1, "cannot exceed input dimensions"),
        ((3, 4, 4), 5, "cannot be larger than sliding window"),
        ((4, 4), 1, "should be a tuple with"),
        ((3, 4, 4), (1, 1), "It must be either an int or a tuple"),
    ],
)
def test_bad_windows_raise_captums_assertion(model, window, stride, message):
    inputs = torch.randn(1, 3, 16, 16)
    with pytest.raises(AssertionError, match=message):
        Occlusion(model).attribute(inputs, window, strides=stride, target=0)
    with pytest.raises(AssertionError, match=message):
        IncrementalOcclusion(model).attribute(inputs, window, strides=stride, target=0)


@pytest.mark.parametrize("ppe", [0, -2, 1.5])
def test_bad_perturbations_per_eval(model, ppe):
    with pytest.raises(AssertionError, match="Perturbations per evaluation"):
        IncrementalOcclusion(model).attribute(
            torch.randn(1, 3, 8, 8), (3, 2, 2), target=0, perturbations_per_eval=ppe
        )


def test_progress_bar_counts_windows(model, monkeypatch):
    stream = io.StringIO()
    import captum._utils.progress as progress_module

    original = progress_module.progress

    def to_stream(*args, **kwargs):
        kwargs["file"] = stream
        kwargs["mininterval"] = 0
        return original(*args, **kwargs)

    monkeypatch.setattr("captum_krypton.reports.progress", to_stream)
    IncrementalOcclusion(model).attribute(
        torch.randn(1, 3, 16, 16),
        (3, 4, 4),
        strides=3,
        target=0,
        show_progress=True,
        windows_per_batch=7,
    )
    text = stream.getvalue()
    assert "25/25" in text and "100%" in text  # 5 x 5 windows


@pytest.mark.parametrize("engine", ["captum", "fallback"])
def test_captums_path_shows_one_bar_counting_windows(model, monkeypatch, capsys, engine):
    """Captum 0.9's own bar counts features per batch and stops short; on its path
    we show one bar of windows that reaches 100%."""
    forward = model
    if engine == "fallback":
        forward = lambda inputs: model(inputs)  # noqa: E731  (not a module: Captum's path)
    occlusion = IncrementalOcclusion(forward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        result = occlusion.attribute(
            torch.randn(2, 3, 16, 16),
            (3, 4, 4),
            strides=3,
            target=0,
            show_progress=True,
            perturbations_per_eval=4,
            engine="captum" if engine == "captum" else "auto",
        )
    assert occlusion.last_run.engine == "captum" and result.shape == (2, 3, 16, 16)
    lines = capsys.readouterr().err.replace("\r", "\n").split("\n")
    totals = {match[1] for line in lines for match in re.findall(r"(\d+)/(\d+) \[", line)}
    assert totals == {"25"}  # one bar, of the 5 x 5 windows
    assert any("25/25" in line and "100%" in line for line in lines)


def test_noise_tunnel_accepts_incremental_occlusion(model):
    from captum.attr import NoiseTunnel

    inputs = torch.randn(1, 3, 12, 12)
    torch.manual_seed(3)
    expected = NoiseTunnel(Occlusion(model)).attribute(
        inputs, nt_samples=3, stdevs=0.1, sliding_window_shapes=(3, 4, 4), strides=4, target=0
    )
    torch.manual_seed(3)
    actual = NoiseTunnel(IncrementalOcclusion(model)).attribute(
        inputs, nt_samples=3, stdevs=0.1, sliding_window_shapes=(3, 4, 4), strides=4, target=0
    )
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_out_of_memory_halves_the_batch_and_keeps_finished_windows(model, monkeypatch):
    """A CUDA out-of-memory error in a batch retries it at half size; still exact."""
    from captum_krypton.engine import occlusion as occlusion_module

    original = occlusion_module.PreparedOcclusion.run_window_ids
    sizes = []

    def run_window_ids(self, ids):
        sizes.append(len(ids))
        if len(ids) > 3:
            raise torch.cuda.OutOfMemoryError("simulated")
        return original(self, ids)

    monkeypatch.setattr(occlusion_module.PreparedOcclusion, "run_window_ids", run_window_ids)
    inputs = torch.randn(2, 3, 16, 16)
    expected = Occlusion(model).attribute(inputs, (3, 5, 5), strides=3, target=1)
    actual = IncrementalOcclusion(model).attribute(
        inputs, (3, 5, 5), strides=3, target=1, windows_per_batch=12
    )
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    assert sizes[:3] == [12, 6, 3] and max(sizes[3:]) <= 3
