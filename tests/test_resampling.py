"""Padding, interpolation and transposed convolution keep their boxes and equal
Captum's Occlusion (float64): each op inside conv -> op -> conv -> global pool ->
linear, several windows and strides, and a U-Net and an FPN built from them.

Every case also asserts that the op's node is `box` in the plan (a rule that
silently went `full` fails) and that the windows run incrementally (not as plain
re-inference), so the box values themselves are what is compared; a
FallbackWarning fails the comparison (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from captum.attr import Occlusion
from torch import nn

from captum_krypton import IncrementalOcclusion
from captum_krypton.kernels import triton_importable
from tests.conftest import check_model
from tests.test_rules import DEVICE, check_every_box

#: The coverage rule instead of the cost model: boxes stay boxes however large.
OPTIONS = {"full_threshold": 1.01}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class Fn(nn.Module):
    """A function as a module (F.pad, F.interpolate with arguments)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class OpModel(nn.Module):
    """conv -> op -> ReLU -> conv -> global mean -> linear."""

    def __init__(self, op: nn.Module, dims: int, channels: int = 3):
        super().__init__()
        self.a = CONV[dims](channels, 4, 3, padding=1)
        self.op = op
        width = op.out_channels if isinstance(op, nn.modules.conv._ConvTransposeNd) else 4
        self.b = CONV[dims](width, 5, 3, padding=1, stride=2)
        self.head = nn.Linear(5, 3)
        self.dims = dims

    def forward(self, x):
        y = self.b(torch.relu(self.op(self.a(x))))
        return self.head(y.mean(tuple(range(2, 2 + self.dims))))


def fn(f):
    return lambda: Fn(f)


#: name -> (op factory, spatial shape of the input); dims follow the shape.
PADDING = {
    "zero_pad2d": (lambda: nn.ZeroPad2d((1, 2, 3, 0)), (11, 10)),
    "constant_crop": (fn(lambda x: F.pad(x, (-1, 2, 2, -2), value=0.5)), (11, 10)),
    "constant_pad1d": (lambda: nn.ConstantPad1d((3, 1), -0.25), (13,)),
    "constant_pad3d": (lambda: nn.ConstantPad3d((1, 0, 2, 1, 0, 3), 1.5), (6, 8, 7)),
    "reflect2d": (lambda: nn.ReflectionPad2d((2, 1, 3, 2)), (11, 10)),
    "constant_last_dim": (fn(lambda x: F.pad(x, (3, -2))), (11, 10)),
    "reflect1d": (lambda: nn.ReflectionPad1d(3), (13,)),
    "reflect3d": (lambda: nn.ReflectionPad3d((1, 2, 0, 1, 2, 1)), (6, 8, 7)),
    "replicate2d": (lambda: nn.ReplicationPad2d((2, 1, 3, 2)), (11, 10)),
    "replicate1d": (lambda: nn.ReplicationPad1d((4, 1)), (13,)),
    "replicate3d": (lambda: nn.ReplicationPad3d(1), (6, 8, 7)),
    "circular2d": (fn(lambda x: F.pad(x, (2, 1, 1, 2), mode="circular")), (11, 10)),
}
INTERPOLATION = {
    "nearest_x2": (lambda: nn.Upsample(scale_factor=2), (9, 8)),
    "nearest_x3": (lambda: nn.Upsample(scale_factor=3), (7, 8)),
    "nearest_x1.5": (lambda: nn.Upsample(scale_factor=1.5), (9, 7)),
    "nearest_size": (lambda: nn.Upsample(size=(13, 17)), (9, 8)),
    "nearest_down": (fn(lambda x: F.interpolate(x, scale_factor=0.6)), (13, 11)),
    "nearest_exact_x1.5": (lambda: nn.Upsample(scale_factor=1.5, mode="nearest-exact"), (9, 7)),
    "nearest_exact_x2": (lambda: nn.Upsample(scale_factor=2, mode="nearest-exact"), (9, 8)),
    "nearest1d": (lambda: nn.Upsample(scale_factor=2.5), (11,)),
    "nearest3d": (lambda: nn.Upsample(scale_factor=(2, 1.5, 3)), (6, 8, 7)),
    "bilinear_x2": (lambda: nn.Upsample(scale_factor=2, mode="bilinear"), (9, 8)),
    "bilinear_x2_corners": (
        lambda: nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
        (9, 8),
    ),
    "bilinear_x3": (lambda: nn.Upsample(scale_factor=3, mode="bilinear"), (7, 6)),
    "bilinear_x1.5": (lambda: nn.Upsample(scale_factor=1.5, mode="bilinear"), (9, 8)),
    "bilinear_x1.5_corners": (
        lambda: nn.Upsample(scale_factor=1.5, mode="bilinear", align_corners=True),
        (9, 8),
    ),
    "bilinear_size": (fn(lambda x: F.interpolate(x, size=(17, 13), mode="bilinear")), (9, 8)),
    "bilinear_size_corners": (
        fn(lambda x: F.interpolate(x, size=(17, 13), mode="bilinear", align_corners=True)),
        (9, 8),
    ),
    "bilinear_recomputed_scale": (
        fn(
            lambda x: F.interpolate(
                x, scale_factor=1.7, mode="bilinear", recompute_scale_factor=True
            )
        ),
        (9, 8),
    ),
    "linear1d": (lambda: nn.Upsample(scale_factor=2.5, mode="linear"), (11,)),
    "linear1d_corners": (
        lambda: nn.Upsample(scale_factor=3, mode="linear", align_corners=True),
        (11,),
    ),
    "trilinear": (lambda: nn.Upsample(scale_factor=(2, 1.5, 3), mode="trilinear"), (6, 8, 7)),
    "trilinear_corners": (
        lambda: nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True),
        (6, 8, 7),
    ),
    "bicubic": (lambda: nn.Upsample(scale_factor=2.5, mode="bicubic"), (9, 8)),
    "bilinear_antialias_down": (
        fn(lambda x: F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True)),
        (14, 12),
    ),
}
TRANSPOSED = {
    "k3_s2_p1_op1": (
        lambda: nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1),
        (7, 8),
    ),
    "k2_s2": (lambda: nn.ConvTranspose2d(4, 3, 2, stride=2), (7, 8)),
    "k4_s2_p1": (lambda: nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1), (7, 6)),
    "k1_s3_p1": (lambda: nn.ConvTranspose2d(4, 3, 1, stride=3, padding=1), (7, 8)),
    "k3_s1": (lambda: nn.ConvTranspose2d(4, 3, 3, padding=1), (9, 8)),
    "groups_dilation": (
        lambda: nn.ConvTranspose2d(
            4, 6, 3, stride=3, padding=2, groups=2, dilation=2, output_padding=1
        ),
        (7, 6),
    ),
    "asymmetric": (
        lambda: nn.ConvTranspose2d(
            4, 3, (3, 2), stride=(2, 3), padding=(1, 0), output_padding=(1, 2)
        ),
        (7, 6),
    ),
    "no_bias": (lambda: nn.ConvTranspose2d(4, 3, 3, stride=2, bias=False), (7, 8)),
    "1d": (lambda: nn.ConvTranspose1d(4, 3, 4, stride=2, padding=3, output_padding=1), (11,)),
    "3d": (lambda: nn.ConvTranspose3d(4, 3, 3, stride=(1, 2, 2), padding=1), (6, 8, 7)),
}
CASES = {**PADDING, **INTERPOLATION, **TRANSPOSED}
OPS = {
    "pad",
    "upsample_nearest1d",
    "upsample_nearest2d",
    "upsample_nearest3d",
    "_upsample_nearest_exact2d",
    "upsample_linear1d",
    "upsample_bilinear2d",
    "upsample_trilinear3d",
    "upsample_bicubic2d",
    "_upsample_bilinear2d_aa",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
}


def windows(shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Window shapes and strides for an input: small windows at stride 2 (every
    border), and a larger window at a stride that does not divide the map."""
    dims = len(shape) - 2
    channels = shape[1]
    return [
        ((channels,) + (2,) * dims, (channels,) + (2,) * dims),
        ((channels,) + (3,) * dims, (channels,) + (3,) * dims),
    ]


def assert_boxed(model, x, window, strides, ops=OPS):
    """Every node of `ops` keeps its box, and the windows do not fall back to plain
    re-inference of the whole model."""
    plan = IncrementalOcclusion(model).plan(x, window, strides=strides, **OPTIONS)
    rows = [row for row in plan.table() if row["op"] in ops]
    assert rows, "the op is missing from the plan"
    assert all(row["mode"] == "box" for row in rows), plan.summary()
    assert not plan.rerun_whole_model, plan.summary()
    return plan


def run_case(make, spatial):
    torch.manual_seed(0)
    dims = len(spatial)
    model = OpModel(make(), dims).double().eval()
    x = torch.randn(2, 3, *spatial, dtype=torch.float64)
    for window, strides in windows(x.shape):
        assert_boxed(model, x, window, strides)
        check_model(
            model, x, sliding_window_shapes=window, strides=strides, target=1, options=OPTIONS
        )


@pytest.mark.parametrize("name", list(CASES))
def test_op_matches_captum_and_keeps_its_box(name):
    run_case(*CASES[name])


@pytest.mark.parametrize("name", ["reflect2d", "circular2d", "bilinear_x1.5", "k3_s2_p1_op1"])
def test_every_box_equals_the_op_on_the_occluded_input(name):
    """Node by node: each box equals the same region of a plain forward."""
    make, spatial = CASES[name]
    model = OpModel(make(), len(spatial)).double().eval()
    x = torch.randn(2, 3, *spatial, dtype=torch.float64)
    plan, checked = check_every_box(
        model, x, (3,) + (3,) * len(spatial), (1,) + (2,) * len(spatial)
    )
    assert checked >= 3


class UNet(nn.Module):
    """Two down steps, up by transposed conv and by bilinear upsampling, skip
    connections concatenated, a padded head."""

    def __init__(self):
        super().__init__()
        self.enc1 = nn.Conv2d(3, 4, 3, padding=1)
        self.enc2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.enc3 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.up3 = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.dec2 = nn.Conv2d(12, 4, 3, padding=1)
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.pad = nn.ReflectionPad2d(1)
        self.dec1 = nn.Conv2d(8, 2, 3)

    def forward(self, x):
        e1 = torch.relu(self.enc1(x))
        e2 = torch.relu(self.enc2(e1))
        e3 = torch.relu(self.enc3(e2))
        d2 = torch.relu(self.dec2(torch.cat([self.up3(e3), e2], 1)))
        d1 = self.dec1(self.pad(torch.cat([self.up2(d2), e1], 1)))
        return d1.mean((2, 3))


class FPN(nn.Module):
    """Top-down path: coarser maps upsampled (nearest, then bilinear) and added to
    lateral 1x1 convs of the finer ones."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.l1, self.l2, self.l3 = nn.Conv2d(4, 5, 1), nn.Conv2d(6, 5, 1), nn.Conv2d(8, 5, 1)
        self.smooth = nn.Conv2d(5, 5, 3, padding=1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        c1 = torch.relu(self.c1(x))
        c2 = torch.relu(self.c2(c1))
        c3 = torch.relu(self.c3(c2))
        p3 = self.l3(c3)
        p2 = self.l2(c2) + F.interpolate(p3, size=c2.shape[-2:], mode="nearest")
        p1 = self.l1(c1) + F.interpolate(p2, scale_factor=2, mode="bilinear")
        return self.head(self.smooth(p1).mean((2, 3)))


@pytest.mark.parametrize("model_class, size", [(UNet, 16), (UNet, 20), (FPN, 16), (FPN, 18)])
def test_unet_and_fpn_match_captum_and_keep_boxes(model_class, size):
    torch.manual_seed(0)
    model = model_class().double().eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    for window, strides in [((3, 3, 3), (3, 2, 2)), ((3, 4, 4), (3, 3, 3))]:
        plan = assert_boxed(model, x, window, strides)
        # Only the global mean and what follows it run whole.
        modes = [row["mode"] for row in plan.table()]
        assert "full" not in modes[: modes.index("full")] and modes.count("box") >= 10
        check_model(
            model, x, sliding_window_shapes=window, strides=strides, target=0, options=OPTIONS
        )


def test_padding_of_the_channel_dim_runs_full():
    model = OpModel(Fn(lambda x: F.pad(x, (1, 1, 1, 1, 1, -1))), 2).double().eval()
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    plan = IncrementalOcclusion(model).plan(x, (3, 2, 2), strides=2, **OPTIONS)
    assert [row["mode"] for row in plan.table() if row["op"] == "pad"] == ["full"]
    check_model(model, x, sliding_window_shapes=(3, 2, 2), strides=2, target=0, options=OPTIONS)


def test_float32_interpolation_and_transposed_conv():
    """fp32: the weights are the op's own, so results stay within fp32 rounding."""
    model = UNet().eval()
    x = torch.randn(2, 3, 16, 16)
    assert_boxed(model, x, (3, 3, 3), (3, 2, 2))
    check_model(model, x, sliding_window_shapes=(3, 3, 3), strides=(3, 2, 2), options=OPTIONS)


@pytest.mark.skipif(not triton_importable(), reason="needs triton")
@pytest.mark.parametrize("name", ["reflect2d", "constant_crop", "bilinear_x1.5", "k1_s3_p1"])
def test_rules_with_triton_read_in(name, exact_cuda_math):
    """The same per-box checks with the Triton read-in kernels (under
    TRITON_INTERPRET=1 on the CPU)."""
    make, spatial = CASES[name]
    model = OpModel(make(), len(spatial)).eval().to(DEVICE)
    x = torch.randn(2, 3, *spatial, device=DEVICE)
    window = (3,) + (3,) * len(spatial)
    _, checked = check_every_box(model, x, window, (1,) + (2,) * len(spatial), use_triton=True)
    assert checked >= 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_linear_interpolation_runs_whole(dtype):
    """In bf16 and fp16 ATen weighs an interpolation's sources in float32 and rounds
    once, which taps applied dim by dim would not reproduce: bilinear runs on the
    whole map (nearest, a copy, keeps its box), and the map is Captum's up to the
    model's bf16/fp16 rounding."""
    torch.manual_seed(0)
    model = FPN().eval().to(dtype)
    x = torch.randn(1, 3, 16, 16).to(dtype)
    args = dict(sliding_window_shapes=(3, 4, 4), strides=2, target=0)
    occlusion = IncrementalOcclusion(model)
    plan = occlusion.plan(x, (3, 4, 4), strides=2, **OPTIONS)
    modes = {row["op"]: row["mode"] for row in plan.table() if "upsample" in row["op"]}
    assert modes == {"upsample_nearest2d": "box", "upsample_bilinear2d": "full"}, modes
    ours = occlusion.attribute(x, engine="incremental", **args, **OPTIONS)
    expected = Occlusion(model).attribute(x, perturbations_per_eval=16, **args)
    assert ours.dtype == expected.dtype
    with torch.no_grad():
        scale = float(model(x).abs().max())
    tolerance = 8 * torch.finfo(dtype).eps * scale
    torch.testing.assert_close(ours.float(), expected.float(), rtol=0, atol=tolerance)
