"""Heatmap quality of the approximations on the project's trained models, and SSIM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import Occlusion
from skimage.metrics import structural_similarity

from captum_krypton import IncrementalOcclusion, attribution_ssim
from captum_krypton.approx.quality import _ssim_many_on_device, attribution_ssim_many
from captum_krypton.demo.data import make_dataset, normalize
from captum_krypton.demo.model import load_demo_model

#: Images never seen in training (seed 0) or while choosing the calibration's settings.
HELD_OUT_SEED = 2027
HELD_OUT_COUNT = 10


def test_ssim_is_scikit_images_over_channels_with_the_exact_maps_range():
    torch.manual_seed(0)
    exact = torch.randn(2, 3, 20, 20)
    noisy = exact + 0.3 * torch.randn(2, 3, 20, 20)
    scores = attribution_ssim(noisy, exact)
    for score, a, e in zip(scores, noisy.double().numpy(), exact.double().numpy()):
        expected = structural_similarity(a, e, data_range=e.max() - e.min(), channel_axis=0)
        assert score == pytest.approx(expected)
    assert attribution_ssim(exact, exact).tolist() == [1.0, 1.0]
    assert (scores < 0.9).all()


def test_ssim_fits_its_window_to_small_maps_and_handles_constant_maps():
    small = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).reshape(2, 3, 5, 4)
    assert attribution_ssim(small, small).tolist() == [1.0, 1.0]
    assert attribution_ssim(small + 1.0, small).max() < 1.0
    flat = torch.zeros(1, 3, 8, 8)
    assert attribution_ssim(flat, flat).tolist() == [1.0]
    assert attribution_ssim(flat + 1, flat).tolist() == [0.0]
    with pytest.raises(ValueError, match="shapes differ"):
        attribution_ssim(flat, small)


@pytest.mark.parametrize(
    "shape", [(4, 3, 48, 48), (3, 1, 32, 29), (2, 2, 20), (2, 3, 9, 10, 11), (2, 3, 5, 5)]
)
def test_many_maps_at_once_score_as_scikit_image_does(shape):
    torch.manual_seed(0)
    exact = torch.randn(shape)
    noisy = exact + 0.4 * torch.randn(shape)
    same_channels = (noisy[:, :1].expand(shape), exact[:, :1].expand(shape))
    for ours, reference in ((noisy, exact), same_channels):
        expected = attribution_ssim(ours, reference)
        np.testing.assert_allclose(attribution_ssim_many(ours, reference), expected, atol=1e-12)
    one = noisy[:1]  # one map against each of several
    expected = attribution_ssim(one.expand(shape), exact)
    np.testing.assert_allclose(attribution_ssim_many(one, exact), expected, atol=1e-12)
    flat = torch.zeros(2, 3, 8, 8)
    assert attribution_ssim_many(
        flat + torch.tensor([0.0, 1.0])[:, None, None, None], flat
    ).tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    "shape", [(4, 3, 48, 48), (3, 1, 32, 29), (2, 2, 20), (2, 3, 9, 10, 11), (2, 3, 5, 5)]
)
def test_many_maps_in_torch_score_as_scikit_image_does(shape):
    """The torch path (taken on a GPU, run here on the CPU) against scikit-image."""
    torch.manual_seed(1)
    exact = torch.randn(shape, dtype=torch.float64)
    noisy = exact + 0.4 * torch.randn(shape, dtype=torch.float64)
    same_channels = (noisy[:, :1].expand(shape), exact[:, :1].expand(shape))
    for ours, reference in ((noisy, exact), same_channels):
        expected = attribution_ssim(ours, reference)
        np.testing.assert_allclose(_ssim_many_on_device(ours, reference), expected, atol=1e-12)
    expected = attribution_ssim(noisy[:1].expand(shape), exact)
    np.testing.assert_allclose(_ssim_many_on_device(noisy[:1], exact), expected, atol=1e-12)
    flat = torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    shifted = flat + torch.tensor([0.0, 1.0], dtype=torch.float64)[:, None, None, None]
    assert _ssim_many_on_device(shifted, flat).tolist() == [1.0, 0.0]


@pytest.mark.usefixtures("always_calibrate")
@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_target_ssim_is_met_on_held_out_images(name):
    """At target_ssim=0.9 the heatmap's SSIM vs exact reaches 0.9 on at least 80%
    of held-out images, and the run computes fewer windows on average."""
    model = load_demo_model(name)
    images, labels = make_dataset(HELD_OUT_COUNT, seed=HELD_OUT_SEED)
    occlusion = IncrementalOcclusion(model)
    args = dict(sliding_window_shapes=(3, 12, 12), strides=3)
    scores, computed = [], []
    for image, label in zip(normalize(images), labels):
        inputs = image[None]
        exact = Occlusion(model).attribute(
            inputs, target=int(label), perturbations_per_eval=64, **args
        )
        approx = occlusion.attribute(inputs, target=int(label), target_ssim=0.9, **args)
        report = occlusion.last_run
        assert report.approximation.estimated_ssim >= 0.9
        assert report.calibration is not None
        scores.append(float(attribution_ssim(approx, exact)[0]))
        computed.append(report.windows_computed / report.windows_total)
    scores = np.asarray(scores)
    assert (scores >= 0.9).mean() >= 0.8, scores
    assert np.mean(computed) < 1.0, computed
