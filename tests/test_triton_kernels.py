"""Triton kernels against their torch references (on the CPU under TRITON_INTERPRET=1)."""

from __future__ import annotations

import math

import pytest
import torch

from captum_krypton import IncrementalOcclusion
from captum_krypton.kernels import choice, torch_ops, triton_importable, wait_for_compilation
from tests import models
from tests.conftest import check_model

pytestmark = pytest.mark.skipif(not triton_importable(), reason="needs triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_ops():
    from captum_krypton.kernels import triton_ops

    return triton_ops


CASES = [
    # ndim, map, tile size, box size, channels
    (1, (17,), (6,), (4,), 5),
    (2, (9, 11), (5, 4), (3, 6), 3),
    (2, (7, 7), (9, 9), (7, 7), 8),  # tile larger than the map: padding on all sides
    (3, (5, 6, 4), (3, 4, 5), (2, 3, 2), 2),
]


@pytest.mark.parametrize("ndim,map_size,size,box_size,channels", CASES)
@pytest.mark.parametrize("with_box", [False, True])
@pytest.mark.parametrize("pad_value", [0.0, -math.inf])
def test_compose_region_matches_reference(
    ndim, map_size, size, box_size, channels, with_box, pad_value
):
    generator = torch.Generator().manual_seed(ndim * 10 + channels)
    rows, examples = 7, 3
    view = torch.randn((examples, channels, *map_size), generator=generator).to(DEVICE)
    view = view.movedim(1, -1).contiguous().movedim(-1, 1)  # channels-last, as the engine
    example = (torch.arange(rows) % examples).to(DEVICE)
    starts = torch.stack(
        [
            torch.randint(-3, m + 2 - s // 2, (rows,), generator=generator)
            for m, s in zip(map_size, size)
        ],
        1,
    ).to(DEVICE)
    box = box_starts = None
    if with_box:
        box = torch.randn((rows, channels, *box_size), generator=generator).to(DEVICE)
        box_starts = torch.stack(
            [
                torch.randint(0, m - b + 1, (rows,), generator=generator)
                for m, b in zip(map_size, box_size)
            ],
            1,
        ).to(DEVICE)
    expected = torch_ops.compose_region(view, example, starts, size, pad_value, box, box_starts)
    actual = _triton_ops().compose_region(view, example, starts, size, pad_value, box, box_starts)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_compose_region_projects_into_nchw():
    """Projection: whole map, written into a contiguous NCHW tensor."""
    generator = torch.Generator().manual_seed(5)
    clean = torch.randn(2, 4, 6, 5, generator=generator).to(DEVICE)
    rows = 6
    example = (torch.arange(rows) % 2).to(DEVICE)
    box = torch.randn(rows, 4, 3, 2, generator=generator).to(DEVICE)
    box_starts = torch.tensor([[0, 0], [3, 3], [1, 2], [2, 0], [0, 3], [3, 1]]).to(DEVICE)
    zero = torch.zeros_like(box_starts)
    out = torch.full((rows, 4, 6, 5), float("nan"), device=DEVICE)  # every element must be written
    _triton_ops().compose_region(clean, example, zero, (6, 5), 0.0, box, box_starts, out=out)
    expected = torch_ops.compose_region(clean, example, zero, (6, 5), 0.0, box, box_starts)
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("conv", ["tile+conv", "implicit_gemm"])
def test_engine_with_triton_kernels_matches_captum(conv, exact_cuda_math):
    model = models.small_cnn().to(DEVICE)
    inputs = torch.randn(2, 3, 12, 12, device=DEVICE)
    with choice.forced(conv):
        check_model(
            model,
            inputs,
            sliding_window_shapes=(3, 4, 4),
            strides=4,
            target=[1, 3],
            options={"kernels": "triton"},
        )


def test_triton_and_torch_kernels_agree_on_resnet_block():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None).eval().to(DEVICE)
    inputs = torch.randn(1, 3, 32, 32, device=DEVICE)
    occlusion = IncrementalOcclusion(model)
    args = dict(sliding_window_shapes=(3, 8, 8), strides=8, target=0)
    with_torch = occlusion.attribute(inputs, kernels="torch", **args)
    with_triton = occlusion.attribute(inputs, kernels="triton", **args)
    torch.testing.assert_close(with_triton, with_torch, rtol=0, atol=1e-6)


CONV_CASES = [
    # ndim, map, out box, box, C_in, C_out, kernel, stride, dilation
    (2, (9, 11), (3, 4), (3, 6), 3, 5, (3, 3), (1, 1), (1, 1)),
    (2, (10, 9), (4, 3), (2, 2), 7, 33, (3, 3), (2, 2), (1, 1)),  # stride 2
    (2, (8, 8), (3, 3), (4, 3), 4, 6, (3, 2), (1, 1), (2, 2)),  # dilation, odd kernel
    (2, (7, 7), (7, 7), (7, 7), 17, 20, (1, 1), (1, 1), (1, 1)),  # 1x1 over the whole map
    (1, (17,), (5,), (4,), 6, 4, (5,), (3,), (1,)),
    (3, (5, 6, 4), (2, 3, 2), (2, 3, 2), 3, 4, (3, 3, 3), (1, 2, 1), (1, 1, 1)),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("with_box", [False, True])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_conv_region_matches_reference(case, with_box, activation, exact_cuda_math):
    ndim, map_size, out_size, box_size, c_in, c_out, kernel, stride, dilation = case
    generator = torch.Generator().manual_seed(sum(map_size) + c_out)
    rows, examples = 5, 2
    view = torch.randn((examples, c_in, *map_size), generator=generator).to(DEVICE)
    view = view.movedim(1, -1).contiguous().movedim(-1, 1)
    example = (torch.arange(rows) % examples).to(DEVICE)
    # Read-in origins may start before the map (padding) or run past its end.
    starts = torch.stack(
        [torch.randint(-2, m - 1, (rows,), generator=generator) for m in map_size], 1
    ).to(DEVICE)
    box = box_starts = None
    if with_box:
        box = torch.randn((rows, c_in, *box_size), generator=generator).to(DEVICE)
        box_starts = torch.stack(
            [
                torch.randint(0, m - b + 1, (rows,), generator=generator)
                for m, b in zip(map_size, box_size)
            ],
            1,
        ).to(DEVICE)
    weight = torch.randn((c_out, c_in, *kernel), generator=generator).to(DEVICE)
    bias = torch.randn(c_out, generator=generator).to(DEVICE)
    args = (view, example, starts, out_size, weight, bias, stride, dilation, box, box_starts)
    expected = torch_ops.conv_region(*args, activation=activation)
    actual = _conv_ops().conv_region(*args, activation=activation)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_conv_region_without_bias_in_half_precision():
    if DEVICE == "cpu":
        pytest.skip("the interpreter has no half-precision dot")
    generator = torch.Generator().manual_seed(3)
    view = torch.randn((1, 16, 9, 9), generator=generator).to(DEVICE, torch.float16)
    example = torch.zeros(4, dtype=torch.long, device=DEVICE)
    starts = torch.tensor([[-1, -1], [0, 2], [5, 5], [3, -1]], device=DEVICE)
    weight = torch.randn((8, 16, 3, 3), generator=generator).to(DEVICE, torch.float16)
    args = (view, example, starts, (4, 4), weight, None, (1, 1), (1, 1))
    expected = torch_ops.conv_region(*args)
    actual = _conv_ops().conv_region(*args)
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2)


def _conv_ops():
    from captum_krypton.kernels import triton_conv

    return triton_conv


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="background compilation is CUDA's")
def test_conv_region_compiled_in_the_background_equals_the_reference(exact_cuda_math):
    """The first call with `background` starts the compilation and runs nothing;
    once it is done, every tile shape gives the reference's numbers."""
    generator = torch.Generator().manual_seed(11)
    view = torch.randn((2, 48, 13, 13), generator=generator).to(DEVICE)
    view = view.movedim(1, -1).contiguous().movedim(-1, 1)  # a width the other cases lack
    example = torch.tensor([0, 1, 1], device=DEVICE)
    starts = torch.tensor([[-1, -1], [2, 3], [9, 0]], device=DEVICE)
    weight = torch.randn((40, 48, 3, 3), generator=generator).to(DEVICE)
    args = (view, example, starts, (5, 5), weight, None, (1, 1), (1, 1))
    expected = torch_ops.conv_region(*args)  # outputs ~20 (432-term sums): atol 1e-3
    try:
        actual = _conv_ops().conv_region(*args, background=True)
    except choice.CandidatePending:
        wait_for_compilation()
        actual = _conv_ops().conv_region(*args, background=True)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-3)
    for tile in _conv_ops().CUDA_TILES:
        with choice.forced("x".join(map(str, tile))):
            torch.testing.assert_close(
                _conv_ops().conv_region(*args), expected, rtol=1e-4, atol=1e-3
            )
