"""Boxes through permutes, reshapes, splits, LayerNorm and Linear over channels.

Each model is compared with Captum's Occlusion in float64, and the plan is
checked: the ops that should keep their box do (a rule that silently went
`full` would pass the comparison but lose the speed), and the ops that must not
(position-dependent operands, norms over the box's dims) are `full`.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from captum_krypton import IncrementalOcclusion
from tests.conftest import check_model


def boxed_ops(model, x, window, strides) -> dict[str, str]:
    """Per op name, the modes of its nodes in plan order ('b' box, 'f' full)."""
    plan = IncrementalOcclusion(model).plan(x, window, strides=strides, full_threshold=1.01)
    modes: dict[str, str] = {}
    for row in plan.table():
        modes[row["op"]] = modes.get(row["op"], "") + row["mode"][0]
    return modes


def check(model, x, window, strides, **kwargs):
    model = model.double().eval()
    check_model(model, x.double(), sliding_window_shapes=window, strides=strides, **kwargs)
    return boxed_ops(model, x.double(), window, strides)


class ConvNeXtBlock(nn.Module):
    """torchvision's CNBlock spelling: permute, LayerNorm, Linear, GELU, Linear,
    permute back, layer scale, residual."""

    def __init__(self, channels=8):
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.fc1 = nn.Linear(channels, 4 * channels)
        self.fc2 = nn.Linear(4 * channels, channels)
        self.layer_scale = nn.Parameter(torch.rand(channels, 1, 1) + 0.5)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))).permute(0, 3, 1, 2)
        return x + self.layer_scale * y


class LayerNorm2d(nn.LayerNorm):
    """timm's spelling: LayerNorm over channels between two permutes."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Net(nn.Module):
    def __init__(self, body, channels=8, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.body = body
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.body(self.stem(x)), 1).flatten(1))


def channel_shuffle(x, groups):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's stride-1 unit: chunk, a branch, cat, channel shuffle."""

    def __init__(self, channels=8):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1), nn.ReLU(), nn.Conv2d(half, half, 3, padding=1, groups=half)
        )

    def forward(self, x):
        left, right = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((left, self.branch(right)), dim=1), 2)


@pytest.mark.parametrize("batch", [1, 2])
def test_convnext_block_keeps_box(batch):
    x = torch.randn(batch, 3, 20, 20)
    modes = check(Net(ConvNeXtBlock()), x, (3, 4, 4), (3, 3, 3), target=1)
    for op in ("permute", "layer_norm", "gelu", "mul", "add"):
        assert set(modes[op]) == {"b"}, (op, modes)
    assert modes["linear"] == "bbf"  # the two MLP layers; the classifier head is full


def test_layer_norm_2d_and_stacked_blocks():
    body = nn.Sequential(
        LayerNorm2d(8), ConvNeXtBlock(), LayerNorm2d(8), nn.Conv2d(8, 8, 2, 2), ConvNeXtBlock()
    )
    modes = check(Net(body), torch.randn(2, 3, 24, 24), (3, 5, 5), (3, 4, 4), target=0)
    assert set(modes["layer_norm"]) == {"b"}, modes
    assert set(modes["permute"]) == {"b"}, modes


def test_channel_shuffle_and_split_keep_box():
    body = nn.Sequential(ShuffleUnit(), ShuffleUnit())
    modes = check(Net(body), torch.randn(2, 3, 16, 16), (3, 3, 3), (3, 2, 2), target=2)
    for op in ("chunk", "getitem", "cat", "view", "transpose", "contiguous"):
        assert set(modes[op]) == {"b"}, (op, modes)


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


#: Ops that look per-position but are not on the box's dims: each must be
#: `full` at that op (or give Captum's numbers some other exact way).
POSITION_DEPENDENT = {
    "operand_along_width": (lambda x: x * torch.linspace(0.5, 2.0, x.shape[-1], dtype=x.dtype)),
    "layer_norm_over_spatial": (lambda x: F.layer_norm(x, x.shape[1:])),
    "linear_over_width": (lambda x: F.linear(x, torch.eye(x.shape[-1], dtype=x.dtype).flip(0))),
    "flatten_spatial": (lambda x: x.flatten(2).softmax(-1).view_as(x)),
    "split_along_height": (lambda x: torch.cat(x.split([5, x.shape[2] - 5], 2)[::-1], 2)),
    "prelu_channels_last": (
        lambda x: F.prelu(x.permute(0, 2, 3, 1), torch.linspace(0.1, 0.3, 12, dtype=x.dtype))
        .permute(0, 3, 1, 2)
    ),
    "permute_batch": (lambda x: x.permute(1, 0, 2, 3).relu().permute(1, 0, 2, 3)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(POSITION_DEPENDENT))
def test_position_dependent_ops_equal_captum(name):
    fn = POSITION_DEPENDENT[name]
    model = Net(Lambda(fn), channels=8).double().eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    # A FallbackWarning is allowed here (Captum's numbers either way); a wrong map is not.
    from captum.attr import Occlusion

    expected = Occlusion(model).attribute(x, sliding_window_shapes=(3, 3, 3), strides=2, target=0)
    actual = IncrementalOcclusion(model).attribute(
        x, sliding_window_shapes=(3, 3, 3), strides=2, target=0
    )
    torch.testing.assert_close(actual, expected, rtol=3e-7, atol=1e-10 * expected.abs().max())


def test_transpose_of_spatial_dims_keeps_box():
    body = Lambda(lambda x: F.relu(x.transpose(2, 3)).transpose(-1, -2) + x)
    modes = check(Net(body), torch.randn(1, 3, 10, 14), (3, 3, 5), (3, 2, 3), target=0)
    assert set(modes["transpose"]) == {"b"} and set(modes["relu"]) == {"b"}, modes


def test_uneven_split_on_channels():
    def body(x):
        a, b, c = x.split([2, 5, 1], dim=1)
        return torch.cat([c * 2, torch.tanh(a), b.sigmoid()], dim=1)

    modes = check(Net(Lambda(body)), torch.randn(2, 3, 9, 9), (3, 2, 2), (3, 2, 2), target=1)
    assert set(modes["split_with_sizes"]) == {"b"} and set(modes["cat"]) == {"b"}, modes


def test_torchvision_convnext_and_shufflenet_equal_captum():
    torchvision = pytest.importorskip("torchvision")
    for build in (torchvision.models.convnext_tiny, torchvision.models.shufflenet_v2_x0_5):
        model = build(weights=None, num_classes=4)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
        check(model, torch.randn(1, 3, 32, 32), (3, 16, 16), (3, 16, 16), target=3)
