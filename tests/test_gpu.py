"""CUDA tensors: the same engine on the GPU (torch ops), against Captum on the GPU."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import check_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
torchvision = pytest.importorskip("torchvision")


@pytest.mark.parametrize(
    "name", ["resnet18", "vgg11_bn", "mobilenet_v2", "densenet121", "efficientnet_b0"]
)
def test_cuda_model_matches_captum(name, exact_cuda_math):
    model = getattr(torchvision.models, name)(weights=None).eval().cuda()
    inputs = torch.randn(2, 3, 64, 64, device="cuda")
    expected, actual = check_model(
        model, inputs, sliding_window_shapes=(3, 16, 16), strides=8, target=[1, 2]
    )
    assert actual.device.type == "cuda"


def test_cuda_per_example_baseline_and_extra_args(exact_cuda_math):
    from tests import models

    model = models.small_cnn(models.ScaledCNN).cuda()
    inputs = torch.randn(2, 3, 16, 16, device="cuda")
    check_model(
        model,
        inputs,
        additional_forward_args=(torch.tensor([0.5, 2.0], device="cuda"),),
        sliding_window_shapes=(1, 5, 5),
        strides=(1, 3, 3),
        target=1,
        baselines=torch.rand(2, 3, 16, 16, device="cuda"),
    )


def test_cuda_graph_replay_equals_eager(exact_cuda_math):
    from captum_krypton import IncrementalOcclusion

    model = torchvision.models.resnet18(weights=None).eval().cuda()
    inputs = torch.randn(2, 3, 48, 48, device="cuda")
    occlusion = IncrementalOcclusion(model)
    args = dict(sliding_window_shapes=(3, 8, 8), strides=4, target=[0, 5], windows_per_batch=16)
    graphed = occlusion.attribute(inputs, cuda_graphs=True, **args)  # 121 windows: a partial batch
    eager = occlusion.attribute(inputs, cuda_graphs=False, **args)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    check_model(
        model,
        inputs,
        sliding_window_shapes=(3, 8, 8),
        strides=4,
        target=[0, 5],
        options={"windows_per_batch": 16},
    )
