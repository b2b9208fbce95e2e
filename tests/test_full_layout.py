"""Values evaluated in full go channels-last on CUDA (what cuDNN runs fastest),
unless the model's own ops refuse that layout.

The layout is tried here on the CPU (the CUDA condition replaced), in float64
against Captum's Occlusion: the numbers must not depend on the layout, and a
model whose `.view` needs the clean layout's strides must keep that layout.
"""

from __future__ import annotations

import pytest
import torch
from captum.attr import Occlusion
from torch import nn

from captum_krypton import IncrementalOcclusion
from captum_krypton.engine.occlusion import PreparedOcclusion
from tests.conftest import FP64_TOLERANCE, assert_close_to_captum

ARGS = dict(sliding_window_shapes=(3, 6, 6), strides=3, target=1)


@pytest.fixture
def channels_last_tried(monkeypatch):
    monkeypatch.setattr(PreparedOcclusion, "_tries_channels_last", lambda self: True)


class TailNet(nn.Module):
    """Early layers keep boxes, the later ones (large boxes) run in full; the
    tail flattens as torchvision does, or with `.view` of a whole map."""

    def __init__(self, view_whole_map: bool):
        super().__init__()
        self.view_whole_map = view_whole_map
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(16 * 6 * 6 if view_whole_map else 16, 4)

    def forward(self, x):
        y = self.body(self.stem(x))
        if self.view_whole_map:
            return self.head(y.view(y.shape[0], -1))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def _randomized(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model.double().eval()


def _attribute_and_plan(model, x):
    """Our map (checked against Captum's in float64) and the plan that made it."""
    occlusion = IncrementalOcclusion(model)
    with torch.no_grad():
        actual = occlusion.attribute(x, full_threshold=0.3, **ARGS)
        expected = Occlusion(model).attribute(x, perturbations_per_eval=16, **ARGS)
        scale = model(x).abs().max().item()
    assert occlusion.last_run.engine == "incremental"
    assert_close_to_captum(expected, actual, scale, FP64_TOLERANCE)
    return occlusion.plan(x, (3, 6, 6), strides=3, full_threshold=0.3)


@pytest.mark.parametrize("view_whole_map", [False, True])
def test_full_values_channels_last_equal_captum(channels_last_tried, view_whole_map):
    model = _randomized(TailNet(view_whole_map))
    x = torch.randn(2, 3, 24, 24, dtype=torch.float64)
    plan = _attribute_and_plan(model, x)
    assert any(p.mode == "full" and p.node.op == "call_function" for p in plan.nodes.values())
    # A `.view` of a whole channels-last map has no valid strides: the plan keeps
    # the clean layout, and says so.
    assert plan.full_channels_last is (not view_whole_map)


def test_full_values_keep_the_clean_layout_off_cuda():
    model = _randomized(TailNet(False))
    x = torch.randn(1, 3, 24, 24, dtype=torch.float64)
    assert _attribute_and_plan(model, x).full_channels_last is None
