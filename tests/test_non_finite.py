"""Non-finite outputs and half-precision ranges: Captum's maps where some windows
give inf or NaN, and convolutions whose BatchNorm is not folded where folding
would change what overflows or mix dtypes."""

from __future__ import annotations

import pytest
import torch
from captum.attr import Occlusion
from torch import nn

from captum_krypton import IncrementalOcclusion

ARGS = dict(sliding_window_shapes=(1, 2, 2), strides=1, target=0)


class OneBadPixel(nn.Module):
    """mean(f(conv(x) + p)) over the map, with p = 0 at one pixel and 1 elsewhere:
    f = 1/x gives inf and f = sqrt(x - 0.5) NaN for the windows occluding it."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(1, 1, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
        p = torch.ones(1, 1, 12, 12)
        p[0, 0, 3, 8] = 0.0
        self.register_buffer("p", p)

    def forward(self, x):
        y = self.conv(x) + self.p
        y = 1.0 / y if self.kind == "inf" else torch.sqrt(y - 0.5)
        return y.mean((1, 2, 3)).unsqueeze(1)


@pytest.mark.parametrize("kind", ["inf", "nan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_windows_with_non_finite_outputs_give_captums_map(kind, dtype):
    """Captum's sum of difference x 0/1 mask makes the positions outside a
    non-finite window NaN (inf x 0); inside it, the covering windows' sum."""
    model = OneBadPixel(kind).eval().to(dtype)
    x = torch.ones(2, 1, 12, 12, dtype=dtype)
    baselines = torch.zeros_like(x)
    baselines[1] = 5.0  # the second example's windows stay finite
    expected = Occlusion(model).attribute(x, baselines=baselines, **ARGS)
    occlusion = IncrementalOcclusion(model)
    actual = occlusion.attribute(x, baselines=baselines, engine="incremental", **ARGS)
    assert (~torch.isfinite(expected[0])).all() and torch.isfinite(expected[1]).all()
    torch.testing.assert_close(actual, expected, equal_nan=True, rtol=0, atol=1e-6)


def fp16_conv_batch_norm() -> nn.Module:
    """1x1 conv (weight 2) -> BatchNorm scaling by 1e-2 -> linear head."""
    conv = nn.Conv2d(2, 1, 1, bias=False)
    bn = nn.BatchNorm2d(1)
    head = nn.Linear(144, 2)
    with torch.no_grad():
        conv.weight.fill_(2.0)
        bn.running_var.fill_(1e4)
        head.weight.fill_(0.01)
        head.bias.zero_()
    return nn.Sequential(conv, bn, nn.Flatten(), head).eval().half()


@pytest.mark.parametrize("self_check", [True, False])
def test_fp16_conv_that_overflows_before_its_batch_norm_gives_captums_map(self_check):
    """Occluding one pixel's second channel takes the conv past fp16's range
    before the BatchNorm scales it back: inf, as in the model itself. A
    BatchNorm folded into the conv's weights would have kept it finite."""
    model = fp16_conv_batch_norm()
    x = torch.zeros(1, 2, 12, 12)
    x[0, 0, 3, 8], x[0, 1, 3, 8] = 40000.0, -20000.0
    x = x.half()
    expected = Occlusion(model).attribute(x, **ARGS)
    actual = IncrementalOcclusion(model).attribute(
        x, engine="incremental", self_check=self_check, **ARGS
    )
    assert (~torch.isfinite(expected)).all()
    torch.testing.assert_close(actual, expected, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_batch_norm_kept_in_float32_after_a_low_precision_conv(dtype):
    """torch runs a float32 BatchNorm on a bf16/fp16 conv's output; folding it
    would give the conv float32 weights: it runs after the conv instead."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(4, 2),
    ).eval().to(dtype)  # fmt: skip
    model[1].float()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.3, 0.3)
        model[1].running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 12, 12).to(dtype)
    args = dict(sliding_window_shapes=(3, 4, 4), strides=2, target=0)
    expected = Occlusion(model).attribute(x, **args)
    for self_check in (True, False):
        actual = IncrementalOcclusion(model).attribute(
            x, engine="incremental", self_check=self_check, full_threshold=1.01, **args
        )
        with torch.no_grad():
            scale = float(model(x).abs().max())
        tolerance = 4 * torch.finfo(dtype).eps * scale
        torch.testing.assert_close(actual, expected, rtol=0, atol=tolerance)
