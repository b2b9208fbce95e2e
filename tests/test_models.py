"""Whole models against captum.attr.Occlusion: torchvision CNNs, 1-D and 3-D CNNs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captum_krypton import IncrementalOcclusion
from tests.conftest import check_model

torchvision = pytest.importorskip("torchvision")

TORCHVISION_CASES = [
    ("resnet18", 64, (3, 16, 16), 8),
    ("vgg11_bn", 64, (3, 16, 16), 8),
    ("mobilenet_v2", 64, (3, 16, 16), 8),
    ("densenet121", 64, (3, 16, 16), 12),
    ("squeezenet1_1", 64, (3, 12, 12), 8),
    ("efficientnet_b0", 64, (3, 16, 16), 12),
    ("inception_v3", 96, (3, 16, 16), 12),
]


def _torchvision_model(name: str) -> nn.Module:
    extra = {"init_weights": False, "aux_logits": False} if name == "inception_v3" else {}
    return getattr(torchvision.models, name)(weights=None, **extra).eval()


@pytest.mark.parametrize("name,size,window,stride", TORCHVISION_CASES)
def test_torchvision_model_matches_captum(name, size, window, stride):
    model = _torchvision_model(name)
    inputs = torch.randn(2, 3, size, size)
    check_model(model, inputs, sliding_window_shapes=window, strides=stride, target=[1, 7])


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
def test_torchvision_model_runs_incrementally(name):
    """These models must keep boxes through most layers, not fall back to full."""
    model = _torchvision_model(name)
    plan = IncrementalOcclusion(model).plan(torch.randn(1, 3, 64, 64), (3, 8, 8), strides=4)
    table = plan.table()
    convs = [row for row in table if row["op"] == "conv2d"]
    assert convs[0]["mode"] == "box" and convs[1]["mode"] == "box"
    assert table[-1]["mode"] == "full"  # the classifier sees the whole map
    assert plan.theoretical_speedup > 1.2


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(2, 8, 5, padding=2),
            nn.BatchNorm1d(8),
            nn.GELU(),
            nn.Conv1d(8, 8, 3, stride=2, dilation=2, padding=2),
            nn.ReLU(),
            nn.MaxPool1d(3, stride=2, padding=1),
            nn.Conv1d(8, 16, 3, groups=8, padding="same"),
            nn.SiLU(),
            nn.AvgPool1d(2),
        )
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(x).mean(-1))


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU())
        self.b = nn.Conv3d(4, 4, 3, stride=2, padding=1)
        self.skip = nn.Conv3d(4, 4, 1, stride=2)
        self.pool = nn.MaxPool3d(2)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.a(x)
        x = torch.relu(self.b(x) + self.skip(x))
        x = nn.functional.adaptive_avg_pool3d(self.pool(x), 1).flatten(1)
        return self.head(x)


def _randomize_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_conv1d_model_matches_captum():
    model = _randomize_bn(Conv1dNet())
    inputs = torch.randn(3, 2, 61)
    check_model(model, inputs, sliding_window_shapes=(2, 7), strides=(1, 3), target=2)


def test_conv3d_model_matches_captum():
    model = _randomize_bn(Conv3dNet())
    inputs = torch.randn(2, 1, 12, 14, 10)
    check_model(model, inputs, sliding_window_shapes=(1, 4, 5, 3), strides=(1, 2, 3, 2), target=0)


def test_float64_model_matches_tightly():
    model = _torchvision_model("resnet18").double()
    inputs = torch.randn(1, 3, 48, 48, dtype=torch.float64)
    check_model(model, inputs, sliding_window_shapes=(3, 8, 8), strides=4, target=5)


class StandardizedConv2d(nn.Conv2d):
    """Weight standardization as timm's StdConv2d spells it (NFNets, BiT):
    F.batch_norm in training mode on the weight, with no running statistics."""

    def forward(self, x):
        weight = nn.functional.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            training=True,
            momentum=0.0,
            eps=1e-6,
        ).reshape_as(self.weight)
        return nn.functional.conv2d(x, weight, self.bias, self.stride, self.padding)


def test_weight_standardization_runs_incrementally_and_matches_captum():
    model = nn.Sequential(
        StandardizedConv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        StandardizedConv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).eval()
    inputs = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    model = model.double()
    check_model(model, inputs, sliding_window_shapes=(3, 4, 4), strides=4, target=[0, 5])
    plan = IncrementalOcclusion(model).plan(inputs, (3, 4, 4), strides=4, full_threshold=1.0)
    assert any(row["mode"] == "box" and row["op"] == "conv2d" for row in plan.table())
