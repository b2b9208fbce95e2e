"""Each registry rule on its own: the box it computes equals the same region of a
plain forward of the occluded input, for every window (odd sizes, borders)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from captum_krypton.capture import capture, evaluate
from captum_krypton.engine.executor import BatchRun
from captum_krypton.engine.occlusion import PreparedOcclusion
from captum_krypton.kernels import choice, triton_importable
from captum_krypton.ops import registered_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class _Recording(dict):
    """Keeps every value the batch run stores (the run frees them as it goes)."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def __setitem__(self, key, value):
        # A copy: in-place ops may later write into a value its only user owns.
        self.seen[key] = value.clone() if isinstance(value, torch.Tensor) else value
        super().__setitem__(key, value)


def check_every_box(
    model, inputs, window, strides, baseline=0.0, full_threshold=1.01, use_triton=False
):
    """Box values vs the plain forward of each occluded input, node by node."""
    model = model.eval()
    if isinstance(strides, int):
        strides = (strides,) * len(window)
    captured = capture(model, inputs)
    prepared = PreparedOcclusion.prepare(
        captured, inputs, baseline, window, strides, full_threshold=full_threshold
    )
    windows = np.arange(prepared.grid.num_windows)
    run = BatchRun(
        prepared.plan,
        prepared.views,
        torch.from_numpy(windows).to(inputs.device),
        prepared.input_tiles,
        {},
        use_triton=use_triton,
    )
    run.values = _Recording()
    output = run.run()
    # Plain forward of every occluded input, laid out row = window * N + example.
    lo, hi = prepared.grid.bounds(windows)
    occluded = []
    for w in windows:
        mask = torch.zeros(inputs.shape[1:], device=inputs.device)
        mask[tuple(slice(a, b) for a, b in zip(lo[w], hi[w]))] = 1
        occluded.append(inputs * (1 - mask) + baseline * mask)
    reference = evaluate(captured, torch.cat(occluded))
    # A producer whose consumers were folded into it (conv + BatchNorm + ReLU)
    # holds the last consumer's values.
    holds = {n: n for n in prepared.plan.nodes}
    for node, plan in prepared.plan.nodes.items():
        if plan.rule.name == "fused":
            for producer, held in holds.items():
                if held is node.args[0]:
                    holds[producer] = node
    checked = 0
    for node, plan in prepared.plan.nodes.items():
        if plan.mode != "box" or node not in run.values.seen:
            continue
        box = run.values.seen[node]
        starts = np.repeat(plan.geometry.starts, inputs.shape[0], axis=0)
        for row in range(box.shape[0]):
            region = tuple(slice(s, s + z) for s, z in zip(starts[row], plan.geometry.size))
            expected = reference[holds[node]][row][(slice(None), *region)]
            torch.testing.assert_close(box[row], expected, rtol=1e-5, atol=1e-5)
        checked += 1
    torch.testing.assert_close(output, reference[captured.output_node], rtol=1e-5, atol=1e-5)
    return prepared.plan, checked


class Single(nn.Module):
    def __init__(self, *layers):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


def _bn(c, dims=2):
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](c)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    return bn.eval()


CONV_CASES = {
    "plain": nn.Conv2d(3, 5, 3),
    "padded": nn.Conv2d(3, 5, 3, padding=1),
    "stride2": nn.Conv2d(3, 5, 3, stride=2, padding=1),
    "stride3_k2": nn.Conv2d(3, 4, 2, stride=3),
    "stride2_k1": nn.Conv2d(3, 4, 1, stride=2),
    "dilated": nn.Conv2d(3, 4, 3, dilation=2, padding=2),
    "asymmetric": nn.Conv2d(3, 4, (3, 5), stride=(1, 2), padding=(2, 1)),
    "groups": nn.Conv2d(4, 6, 3, groups=2, padding=1, bias=False),
    "depthwise": nn.Conv2d(4, 4, 3, groups=4, padding=1, stride=2),
    "same_even_kernel": nn.Conv2d(3, 4, 4, padding="same"),
    "valid": nn.Conv2d(3, 4, 3, padding="valid"),
    "large_pad": nn.Conv2d(3, 4, 3, padding=3),
}


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv_rule(name):
    conv = CONV_CASES[name]
    x = torch.randn(2, conv.in_channels, 13, 11)
    plan, checked = check_every_box(Single(conv), x, (conv.in_channels, 4, 3), (1, 3, 2))
    assert checked == 2  # input and conv both boxed


def test_conv1d_and_conv3d_rules():
    check_every_box(
        Single(nn.Conv1d(2, 3, 5, stride=2, padding=2)), torch.randn(2, 2, 23), (2, 4), (1, 3)
    )
    check_every_box(
        Single(nn.Conv3d(2, 3, 3, stride=(1, 2, 1), padding=1)),
        torch.randn(1, 2, 7, 9, 8),
        (2, 3, 3, 2),
        (2, 2, 3, 3),
    )


class FunctionalConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.bias = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, stride=2, padding=1)


def test_functional_conv_rule():
    plan, checked = check_every_box(FunctionalConv(), torch.randn(2, 3, 12, 12), (3, 3, 3), 2)
    assert checked == 2


POOL_CASES = {
    "max": nn.MaxPool2d(2),
    "max_overlap_pad": nn.MaxPool2d(3, stride=2, padding=1),
    "max_dilated": nn.MaxPool2d(2, stride=1, dilation=2),
    "max_ceil": nn.MaxPool2d(3, stride=2, ceil_mode=True),
    "avg": nn.AvgPool2d(2),
    "avg_pad": nn.AvgPool2d(3, stride=1, padding=1),
    "avg_no_pad_count": nn.AvgPool2d(3, stride=2, count_include_pad=False),
    "avg_divisor": nn.AvgPool2d(3, stride=2, padding=1, divisor_override=5),
}


@pytest.mark.parametrize("name", list(POOL_CASES))
def test_pool_rule(name):
    plan, checked = check_every_box(
        Single(POOL_CASES[name]), torch.randn(2, 3, 13, 12), (3, 3, 4), 2
    )
    assert checked == 2


class FunctionalPools(nn.Module):
    def forward(self, x):
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        return F.avg_pool2d(x, 3, stride=1, padding=1)


def test_functional_pool_rules():
    plan, checked = check_every_box(FunctionalPools(), torch.randn(2, 3, 14, 14), (3, 3, 3), 3)
    assert checked == 3


def test_avg_pool_ceil_mode_that_changes_size_runs_full():
    plan, checked = check_every_box(
        Single(nn.AvgPool2d(3, stride=2, ceil_mode=True)), torch.randn(1, 2, 12, 12), (2, 3, 3), 3
    )
    assert [row["mode"] for row in plan.table()] == ["box", "full"]


POINTWISE = [
    nn.ReLU(),
    nn.ReLU(inplace=True),
    nn.ReLU6(),
    nn.LeakyReLU(0.1),
    nn.PReLU(3),
    nn.ELU(),
    nn.SELU(),
    nn.GELU(),
    nn.SiLU(),
    nn.Mish(),
    nn.Sigmoid(),
    nn.Tanh(),
    nn.Hardswish(),
    nn.Hardsigmoid(),
    nn.Softplus(),
    nn.Identity(),
    nn.Dropout(0.3),
    nn.Dropout2d(0.5),
]


@pytest.mark.parametrize("layer", POINTWISE, ids=lambda m: type(m).__name__)
def test_pointwise_rules_keep_the_box(layer):
    model = Single(nn.Conv2d(3, 3, 3, padding=1), layer)
    plan, checked = check_every_box(model, torch.randn(2, 3, 11, 10), (3, 3, 3), 2)
    boxes = [row["box"] for row in plan.table()]
    if isinstance(layer, nn.Identity):  # no op at all in the captured graph
        assert len(boxes) == 2
        return
    assert boxes[-1] == boxes[-2]  # same box as its input
    assert checked == 3


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_batchnorm_rule_and_folding_into_conv(dims):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](2, 3, 3, padding=1)
    x = torch.randn((2, 2) + (7,) * dims)
    plan, _ = check_every_box(Single(conv, _bn(3, dims)), x, (2,) + (3,) * dims, 2)
    assert [p.rule.name for p in plan.nodes.values() if p.mode == "box"][-1] == "fused"
    # A BatchNorm after a pool is not folded; it runs as its own (per-channel) rule.
    pool = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[dims](2)
    plan, _ = check_every_box(Single(pool, _bn(2, dims)), x, (2,) + (3,) * dims, 2)
    assert [p.rule.name for p in plan.nodes.values() if p.mode == "box"][-1] == "batch_norm"


class Functions(nn.Module):
    """Functional and method forms of pointwise and binary ops."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("offset", torch.randn(4, 1, 1))
        self.register_buffer("plane", torch.randn(1, 4, 10, 9))
        self.bn = _bn(4)

    def forward(self, x):
        y = self.conv(x)
        y = F.leaky_relu(y, 0.2) + self.offset  # per-channel constant
        y = y * self.plane  # constant with spatial extent
        y = torch.sigmoid(y).mul(2.0).clamp(min=0.1)
        y = F.batch_norm(y, self.bn.running_mean, self.bn.running_var, training=False)
        z = y.relu() - torch.tanh(y)
        return torch.cat([z, y, F.dropout(y, 0.5, training=False)], dim=1)


def test_functional_and_method_rules():
    plan, checked = check_every_box(Functions(), torch.randn(2, 3, 10, 9), (3, 3, 2), (1, 2, 3))
    modes = [row["mode"] for row in plan.table()]
    assert modes.count("full") == 0


class Branches(nn.Module):
    """Boxes of different sizes meeting in add and cat; a strided skip path."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 5, padding=2)
        self.b = nn.Conv2d(3, 4, 1)
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.skip = nn.Conv2d(4, 4, 1, stride=2)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        s = torch.relu(a + b)
        c = torch.cat([a, b, s], 1)
        return torch.cat([(self.down(s) + self.skip(b)).flatten(1), c.flatten(1)], 1)


def test_merging_rules_with_different_boxes():
    plan, checked = check_every_box(Branches(), torch.randn(2, 3, 15, 13), (3, 3, 3), 3)
    assert checked >= 7


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        scale = torch.sigmoid(self.fc(F.adaptive_avg_pool2d(y, 1)))
        return y * scale


def test_broadcast_operand_that_is_full_makes_result_full():
    plan, _ = check_every_box(SqueezeExcite(), torch.randn(2, 3, 9, 9), (3, 3, 3), 3)
    modes = {row["node"]: row["mode"] for row in plan.table()}
    assert modes["conv2d"] == "box" and modes["mul"] == "full"


class ShapeUse(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y.view(y.size(0), -1)[:, : y.shape[1] * y.dim()]


def test_shape_queries_answer_without_recomputing():
    plan, _ = check_every_box(ShapeUse(), torch.randn(2, 3, 8, 8), (3, 3, 3), 3)
    modes = {row["node"]: row["mode"] for row in plan.table()}
    assert modes["conv2d"] == "box"


def test_full_threshold_switches_large_boxes_to_full():
    model = Single(nn.Conv2d(3, 4, 7, padding=3), nn.ReLU())
    x = torch.randn(1, 3, 10, 10)
    plan, _ = check_every_box(model, x, (3, 4, 4), 3, full_threshold=0.5)
    assert [row["mode"] for row in plan.table()] == ["box", "full", "full"]
    assert "covers" in plan.table()[1]["reason"]


def test_registry_lists_rules():
    ops = {op for names in registered_ops().values() for op in names}
    for expected in ("conv2d.default", "max_pool2d.default", "batch_norm.default", "relu.default"):
        assert f"aten.{expected}" in ops
    assert "aten.cat.default" in ops and "aten.add.Tensor" in ops


@pytest.mark.skipif(not triton_importable(), reason="needs triton")
@pytest.mark.parametrize("name", ["stride2", "dilated", "groups", "large_pad", "stride2_k1"])
def test_conv_rules_with_triton_read_in(name, exact_cuda_math):
    """The same per-box checks with the Triton read-in and projection kernels
    (under TRITON_INTERPRET=1 on the CPU)."""
    conv = CONV_CASES[name]
    x = torch.randn(2, conv.in_channels, 13, 11, device=DEVICE)
    model = Single(conv).to(DEVICE)
    check_every_box(model, x, (conv.in_channels, 4, 3), (1, 3, 2), use_triton=True)


@pytest.mark.skipif(not triton_importable(), reason="needs triton")
@pytest.mark.parametrize("name", ["max_overlap_pad", "max_ceil", "avg_pad"])
def test_pool_rules_with_triton_read_in(name, exact_cuda_math):
    x = torch.randn(2, 3, 13, 12, device=DEVICE)
    check_every_box(Single(POOL_CASES[name]), x, (3, 3, 4), (1, 2, 2), use_triton=True)


@pytest.mark.skipif(not triton_importable(), reason="needs triton")
def test_merging_rules_with_triton_read_in(exact_cuda_math):
    x = torch.randn(2, 3, 15, 13, device=DEVICE)
    check_every_box(Branches().to(DEVICE), x, (3, 3, 3), (1, 3, 3), use_triton=True)


IMPLICIT_GEMM_CASES = ["plain", "padded", "stride2", "stride3_k2", "dilated", "asymmetric"]


@pytest.mark.skipif(not triton_importable(), reason="needs triton")
@pytest.mark.parametrize("name", IMPLICIT_GEMM_CASES)
def test_conv_rules_with_implicit_gemm(name, exact_cuda_math):
    """The conv computed straight from (box | view | zero) by the Triton
    implicit-GEMM kernel, with BatchNorm and ReLU in its epilogue."""
    conv = CONV_CASES[name]
    model = Single(conv, _bn(conv.out_channels), nn.ReLU(inplace=True)).to(DEVICE)
    x = torch.randn(2, conv.in_channels, 13, 11, device=DEVICE)
    with choice.forced("implicit_gemm"):
        plan, checked = check_every_box(
            model, x, (conv.in_channels, 4, 3), (1, 3, 2), use_triton=True
        )
    assert checked == 4


def test_conv_absorbs_batchnorm_then_relu():
    model = Single(nn.Conv2d(3, 4, 3, padding=1), _bn(4), nn.ReLU())
    x = torch.randn(2, 3, 9, 9)
    plan, _ = check_every_box(model, x, (3, 3, 3), 2)
    rules = [p.rule.name for p in plan.nodes.values() if p.mode == "box"]
    assert rules == ["full", "conv", "fused", "fused"]  # input, conv, bn, relu
    conv_plan = next(p for p in plan.nodes.values() if p.rule.name == "conv")
    assert conv_plan.spec.activation == "relu"


class ConvWithTwoReaders(nn.Module):
    """The conv's output feeds the ReLU and the sum: the ReLU cannot be folded."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return F.relu(y) + y


def test_relu_with_a_shared_input_is_not_folded():
    plan, _ = check_every_box(ConvWithTwoReaders().eval(), torch.randn(1, 3, 9, 9), (3, 3, 3), 2)
    conv_plan = next(p for p in plan.nodes.values() if p.rule.name == "conv")
    assert conv_plan.spec.activation is None
    assert "fused" not in [p.rule.name for p in plan.nodes.values()]


def test_relu_before_batchnorm_is_folded_but_the_batchnorm_is_not():
    model = Single(nn.Conv2d(3, 4, 3), nn.ReLU(), _bn(4))
    plan, _ = check_every_box(model, torch.randn(2, 3, 9, 9), (3, 3, 3), 2)
    rules = [p.rule.name for p in plan.nodes.values() if p.mode == "box"]
    assert rules == ["full", "conv", "fused", "batch_norm"]


def _random_layer(draw, family: str, channels: int) -> nn.Module:
    """One op of the family with random parameters (the op the rule stands for)."""
    integers = lambda lo, hi: draw(st.integers(lo, hi))  # noqa: E731
    if family == "convolution":
        kernel = integers(1, 4)
        groups = draw(st.sampled_from([1, channels]))
        return nn.Conv2d(
            channels,
            groups * integers(1, 3),
            kernel,
            stride=integers(1, 3),
            padding=integers(0, kernel - 1),
            dilation=integers(1, 2),
            groups=groups,
        )
    if family == "pooling":
        kernel = integers(2, 3)
        if draw(st.booleans()):
            return nn.MaxPool2d(
                kernel,
                stride=integers(1, 3),
                padding=integers(0, kernel // 2),
                dilation=integers(1, 2),
                ceil_mode=draw(st.booleans()),
            )
        return nn.AvgPool2d(kernel, stride=integers(1, 3), padding=integers(0, kernel // 2))
    if family == "normalization":
        return _bn(channels)
    if family == "padding":
        mode = draw(st.sampled_from(["zero", "constant", "reflect", "replicate", "circular"]))
        if mode in ("zero", "constant"):  # negative padding crops
            pads = tuple(integers(-2, 3) for _ in range(4))
            return nn.ZeroPad2d(pads) if mode == "zero" else nn.ConstantPad2d(pads, 0.5)
        pads = tuple(integers(0, 3) for _ in range(4))
        return {"reflect": nn.ReflectionPad2d, "replicate": nn.ReplicationPad2d}.get(
            mode, nn.CircularPad2d
        )(pads)
    if family == "interpolation":
        mode = draw(st.sampled_from(["nearest", "nearest-exact", "bilinear", "bicubic"]))
        corners = draw(st.booleans()) if mode in ("bilinear", "bicubic") else None
        if draw(st.booleans()):
            return nn.Upsample(size=(integers(4, 20), integers(4, 20)), mode=mode,
                               align_corners=corners)  # fmt: skip
        scale = draw(st.sampled_from([0.5, 0.7, 1.5, 2.0, 2.5, 3.0]))
        return nn.Upsample(scale_factor=scale, mode=mode, align_corners=corners)
    if family == "transposed":
        stride, dilation = integers(1, 3), integers(1, 2)
        groups = draw(st.sampled_from([1, channels]))
        kernel = integers(1, 4)
        return nn.ConvTranspose2d(
            channels,
            groups * integers(1, 2),
            kernel,
            stride=stride,
            padding=integers(0, dilation * (kernel - 1)),
            output_padding=integers(0, max(stride, dilation) - 1),
            dilation=dilation,
            groups=groups,
        )
    return draw(st.sampled_from([nn.ReLU(), nn.GELU(), nn.Hardswish(), nn.Dropout(0.3).eval()]))


FAMILIES = ["convolution", "pooling", "normalization", "pointwise"]
#: Families whose op keeps its box for any parameters (the test asserts it).
ALWAYS_BOXED = ["padding", "interpolation", "transposed"]


@st.composite
def single_op_cases(draw, families=FAMILIES):
    family = draw(st.sampled_from(families))
    channels = draw(st.integers(1, 3))
    height, width = draw(st.integers(7, 14)), draw(st.integers(7, 14))
    window = (channels, draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    strides = (1, draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    layer = _random_layer(draw, family, channels)
    return family, layer, (draw(st.integers(1, 2)), channels, height, width), window, strides


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=single_op_cases(), seed=st.integers(0, 2**16))
def test_each_rule_on_random_boxes(case, seed):
    """Each op family's rule on its own, random op parameters and random windows:
    every box equals the same region of the op's output on the occluded input."""
    family, layer, shape, window, strides = case
    torch.manual_seed(seed)
    x = torch.randn(*shape, dtype=torch.float64)
    model = Single(layer).double().eval()
    try:
        model(x)
    except (RuntimeError, ValueError):  # parameters too large for the map (e.g. padding)
        return
    plan, _ = check_every_box(model, x, window, strides)
    if family in ALWAYS_BOXED:
        assert [row["mode"] for row in plan.table()][-1] == "box", plan.summary()


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=single_op_cases(ALWAYS_BOXED), seed=st.integers(0, 2**16))
def test_padding_and_resampling_rules_on_random_boxes(case, seed):
    """Padding, interpolation and transposed conv with random parameters (odd sizes,
    scales, sizes, strides, output padding): every box equals the op's output on
    the occluded input, and the op keeps its box."""
    test_each_rule_on_random_boxes.hypothesis.inner_test(case=case, seed=seed)
