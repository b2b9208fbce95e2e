"""Evaluation suites built on Captum call IncrementalOcclusion where Occlusion was,
and get what Occlusion gives them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import Occlusion
from captum.attr import visualization as viz
from captum.metrics import infidelity, sensitivity_max
from matplotlib.backends.backend_agg import FigureCanvasAgg

from captum_krypton import IncrementalOcclusion
from tests import models

WINDOW = dict(sliding_window_shapes=(3, 4, 4), strides=2)

# Every call must run incrementally: a silent fallback would make the checks trivial.
pytestmark = pytest.mark.filterwarnings("error::captum_krypton.FallbackWarning")


@pytest.fixture
def model():
    return models.small_cnn()


@pytest.fixture
def inputs():
    torch.manual_seed(1)
    return torch.randn(3, 3, 12, 12)


def _same_random_stream(function, *args, **kwargs):
    torch.manual_seed(123)
    return function(*args, **kwargs)


def test_sensitivity_max_is_the_same(model, inputs):
    target = torch.tensor([0, 1, 2])
    expected = _same_random_stream(
        sensitivity_max,
        Occlusion(model).attribute,
        inputs,
        target=target,
        n_perturb_samples=3,
        **WINDOW,
    )
    actual = _same_random_stream(
        sensitivity_max,
        IncrementalOcclusion(model).attribute,
        inputs,
        target=target,
        n_perturb_samples=3,
        **WINDOW,
    )
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)


def test_infidelity_is_the_same(model, inputs):
    target = torch.tensor([0, 1, 2])

    def perturb(x):
        noise = 0.05 * torch.randn_like(x)
        return noise, x - noise

    occlusion = Occlusion(model).attribute(inputs, target=target, **WINDOW)
    ours = IncrementalOcclusion(model).attribute(inputs, target=target, **WINDOW)
    torch.testing.assert_close(ours, occlusion, rtol=0, atol=1e-5)
    expected = _same_random_stream(infidelity, model, perturb, inputs, occlusion, target=target)
    actual = _same_random_stream(infidelity, model, perturb, inputs, ours, target=target)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-7)


def test_visualize_image_attr_takes_our_result(model, inputs):
    ours = IncrementalOcclusion(model).attribute(inputs[:1], target=1, **WINDOW)
    theirs = Occlusion(model).attribute(inputs[:1], target=1, **WINDOW)
    image = inputs[0].permute(1, 2, 0).numpy()
    image = (image - image.min()) / (image.max() - image.min())
    figures = []
    for attribution in (ours, theirs):
        figure, _ = viz.visualize_image_attr(
            attribution[0].permute(1, 2, 0).numpy(),
            image,
            method="blended_heat_map",
            sign="all",
            use_pyplot=False,
        )
        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        figures.append(np.asarray(canvas.buffer_rgba()))
    assert figures[0].shape == figures[1].shape
    # The same picture, up to rounding of nearly equal values.
    assert (np.abs(figures[0].astype(int) - figures[1]) > 2).mean() < 0.001


quantus = pytest.importorskip("quantus")


def _quantus_occlusion(model, inputs, targets, **kwargs):
    """A custom Quantus explain_func: numpy in, numpy out, IncrementalOcclusion inside."""
    x = torch.as_tensor(inputs, dtype=torch.float32)
    attribution = IncrementalOcclusion(model).attribute(
        x, sliding_window_shapes=(1, 4, 4), target=torch.as_tensor(targets)
    )
    return attribution.sum(1, keepdim=True).detach().numpy()


def _quantus_batch(model):
    torch.manual_seed(5)
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        y = model(x).argmax(1)
    return x.numpy(), y.numpy()


@pytest.mark.parametrize(
    "metric",
    [
        lambda: quantus.FaithfulnessCorrelation(
            nr_runs=5, subset_size=16, perturb_baseline="black", return_aggregate=False
        ),
        lambda: quantus.MaxSensitivity(nr_samples=3, lower_bound=0.1, return_aggregate=False),
    ],
    ids=["faithfulness_correlation", "max_sensitivity"],
)
def test_quantus_metrics_give_captums_numbers(model, metric, monkeypatch):
    """Quantus with its own Occlusion (Captum's), with ours put in its place, and
    with ours as a custom explain_func: the same scores."""
    x, y = _quantus_batch(model)
    common = dict(model=model, x_batch=x, y_batch=y, device="cpu")

    def scores(**kwargs):
        np.random.seed(0)
        torch.manual_seed(0)
        return np.asarray(metric()(**common, **kwargs), dtype=np.float64)

    explain = quantus.explain
    captums = scores(
        a_batch=None, explain_func=explain, explain_func_kwargs={"method": "Occlusion"}
    )
    monkeypatch.setattr(quantus.functions.explanation_func, "Occlusion", IncrementalOcclusion)
    replaced = scores(
        a_batch=None, explain_func=explain, explain_func_kwargs={"method": "Occlusion"}
    )
    custom = scores(a_batch=None, explain_func=_quantus_occlusion)
    assert np.isfinite(captums).all()
    np.testing.assert_allclose(replaced, captums, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(custom, captums, rtol=1e-4, atol=1e-6)
