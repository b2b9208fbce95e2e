"""Projective-field threshold tau: exact at 1, cheaper below, boxes within the cap."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision

from captum_krypton import IncrementalOcclusion
from captum_krypton.ops import Geometry
from tests import models

ARGS = dict(sliding_window_shapes=(3, 4, 4), strides=2, target=1)


def test_tau_one_is_exact_bit_for_bit():
    model = models.small_cnn()
    inputs = torch.randn(2, 3, 16, 16)
    occlusion = IncrementalOcclusion(model)
    assert torch.equal(
        occlusion.attribute(inputs, tau=1.0, **ARGS), occlusion.attribute(inputs, **ARGS)
    )


def test_a_cap_that_never_binds_changes_nothing():
    model = models.small_cnn()
    inputs = torch.randn(1, 3, 16, 16)
    occlusion = IncrementalOcclusion(model)
    plan = occlusion.plan(inputs, (3, 4, 4), strides=2, full_threshold=1.01)
    largest = max(
        max(s / m for s, m in zip(p.geometry.size, p.geometry.map_size))
        for p in plan.nodes.values()
        if p.mode == "box"
    )
    tau = (largest + 1.0) / 2 if largest < 1 else 1.0
    exact = occlusion.attribute(inputs, full_threshold=1.01, **ARGS)
    assert torch.equal(occlusion.attribute(inputs, full_threshold=1.01, tau=tau, **ARGS), exact)


def test_smaller_tau_strictly_reduces_planned_flops():
    model = torchvision.models.resnet18(weights=None).eval()
    occlusion = IncrementalOcclusion(model)
    inputs = torch.randn(1, 3, 224, 224)
    flops = [
        occlusion.plan(inputs, (3, 16, 16), strides=16, tau=tau).flops_incremental
        for tau in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
    ]
    assert all(later < earlier for earlier, later in zip(flops, flops[1:]))


@pytest.mark.parametrize("tau", [0.3, 0.5, 0.75])
def test_every_box_is_within_the_cap(tau):
    model = torchvision.models.resnet18(weights=None).eval()
    plan = IncrementalOcclusion(model).plan(
        torch.randn(1, 3, 64, 64), (3, 8, 8), strides=4, tau=tau, full_threshold=1.01
    )
    assert "tau" in plan.summary()
    for node, node_plan in plan.nodes.items():
        if node_plan.mode != "box" or node is plan.captured.input_node:
            continue
        geometry = node_plan.geometry
        for size, side in zip(geometry.size, geometry.map_size):
            assert size <= max(1, math.ceil(tau * side))
        assert (geometry.starts >= 0).all()
        assert (geometry.starts + np.asarray(geometry.size) <= np.asarray(geometry.map_size)).all()


def test_approximate_heatmaps_of_the_trained_demo_model_stay_close():
    """On a trained model the dropped far-field changes are small (Krypton's
    observation): the capped heatmap correlates with the exact one."""
    from captum_krypton.demo.data import make_dataset, normalize
    from captum_krypton.demo.model import load_demo_model

    model = load_demo_model().eval()
    images, labels = make_dataset(2, seed=123)
    occlusion = IncrementalOcclusion(model)
    for image, label in zip(normalize(images), labels):
        args = dict(sliding_window_shapes=(3, 12, 12), strides=6, target=int(label))
        exact = occlusion.attribute(image[None], **args)
        approx = occlusion.attribute(image[None], tau=0.3, **args)
        assert not torch.equal(approx, exact)
        correlation = torch.corrcoef(torch.stack([approx.flatten(), exact.flatten()]))[0, 1]
        assert correlation > 0.9


def test_capped_geometry_is_centred_and_inside_the_map():
    geometry = Geometry((9, 4), np.array([[0, 0], [5, 6], [11, 8]]), (20, 12))
    capped = geometry.capped(0.25)  # caps 9 -> 5 rows; 4 columns stay (cap 3 -> 3)
    assert capped.size == (5, 3)
    assert capped.starts.tolist() == [[2, 0], [7, 6], [13, 8]]
    assert geometry.capped(1.0) is geometry


@pytest.mark.parametrize("tau", [0, -0.5, 1.5, float("nan")])
def test_tau_outside_the_unit_interval_is_refused(tau):
    model = models.small_cnn()
    with pytest.raises(ValueError, match="tau"):
        IncrementalOcclusion(model).attribute(torch.randn(1, 3, 8, 8), tau=tau, **ARGS)
