"""Frozen global context: squeeze-excitation's statistics from the clean run.

Off, nothing changes; on a model without global context it is exact; on models
with squeeze-excitation the box stays a box past the first SE block, and the map
equals Captum's Occlusion of the model with every SE block's pooled vector
replaced by the clean input's (forward hooks): the approximation computes
exactly what it claims.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from captum.attr import Occlusion
from torch import nn
from torchvision.ops import SqueezeExcitation

from captum_krypton import IncrementalOcclusion
from tests import models


class SEBlock(nn.Module):
    """Squeeze-excitation: global average pool -> 1x1 MLP -> sigmoid -> scale."""

    def __init__(self, channels: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // 2, 1)
        self.fc2 = nn.Conv2d(channels // 2, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(self.pool(x)))))


class SECNN(nn.Module):
    """Conv, SE, strided conv, SE (timm's spelling: mean over dims 2, 3), conv,
    and the classifier's global pool, which must never be frozen."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.se1 = SEBlock(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.se2_fc1 = nn.Conv2d(16, 4, 1)
        self.se2_fc2 = nn.Conv2d(4, 16, 1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, classes)

    def se2(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.se2_fc2(torch.relu(self.se2_fc1(pooled))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.se1(torch.relu(self.conv1(x)))
        x = self.se2(torch.relu(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


def se_cnn() -> SECNN:
    torch.manual_seed(0)
    return SECNN().double().eval()


def torchvision_model(name: str) -> nn.Module:
    """Random weights and random BatchNorm statistics, in eval mode, float64."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.double().eval()


class CleanStatistics:
    """Forward hooks that replace each global statistic by its value on the clean
    input: `record` on the clean input first, then every forward (Captum's
    batches of windows x examples) sees the clean values."""

    def __init__(self, modules: list[nn.Module]):
        self.clean: dict[nn.Module, torch.Tensor] = {}
        self.recording = True
        self.handles = [m.register_forward_hook(self.hook) for m in modules]

    def hook(self, module, args, output):
        if self.recording:
            self.clean[module] = output.detach().clone()
            return None
        clean = self.clean[module]
        return clean.repeat(output.shape[0] // clean.shape[0], *[1] * (clean.dim() - 1))

    def record(self, forward, inputs):
        self.recording = True
        with torch.no_grad():
            forward(inputs)
        self.recording = False


class MeanOverSpace(nn.Module):
    """`x.mean((2, 3), keepdim=True)` as a module, so a hook can replace it."""

    def forward(self, x):
        return x.mean((2, 3), keepdim=True)


def se_cnn_with_hooks(model: SECNN) -> tuple[nn.Module, CleanStatistics]:
    """The same model with its two SE statistics hookable."""
    pool2 = MeanOverSpace()

    class Hooked(nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.pool2 = model, pool2

        def forward(self, x):
            m = self.model
            x = m.se1(torch.relu(m.conv1(x)))
            x = torch.relu(m.conv2(x))
            x = x * torch.sigmoid(m.se2_fc2(torch.relu(m.se2_fc1(self.pool2(x)))))
            return m.fc(torch.relu(m.conv3(x)).mean((2, 3)))

    return Hooked().eval(), CleanStatistics([model.se1.pool, pool2])


def frozen_reference(model, hooks: CleanStatistics, inputs, **args) -> torch.Tensor:
    hooks.record(model, inputs)
    return Occlusion(model).attribute(inputs, perturbations_per_eval=4, **args)


def assert_float64_rounding(actual, expected, model, inputs):
    """Equal up to float64 rounding of the model's outputs (a difference of
    outputs loses digits relative to the outputs, not to the difference)."""
    with torch.no_grad():
        scale = float(model(inputs).abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12 * scale)


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two maps differ by more than a thousandth of their scale."""
    return float((a - b).abs().max()) > 1e-3 * float(b.abs().max())


SE_ARGS = dict(sliding_window_shapes=(3, 6, 6), strides=3, target=[1, 3])


def test_off_by_default_and_exact_on_a_plain_cnn():
    """No global statistic returns onto a map in a plain CNN (its only global pool
    is the classifier's): frozen context changes no bit and equals Captum."""
    torch.manual_seed(0)
    model = models.small_cnn().double()
    inputs = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    args = dict(sliding_window_shapes=(3, 4, 4), strides=2, target=[0, 4])
    occlusion = IncrementalOcclusion(model)
    exact = occlusion.attribute(inputs, **args)
    frozen = occlusion.attribute(inputs, freeze_global_context=True, **args)
    assert occlusion.last_run.frozen_context == ()
    assert occlusion.last_run.approximation.freeze_global_context
    assert torch.equal(frozen, exact)
    assert_float64_rounding(frozen, Occlusion(model).attribute(inputs, **args), model, inputs)
    plan = occlusion.plan(inputs, (3, 4, 4), strides=2, freeze_global_context=True)
    assert plan.frozen_statistics == () and plan.exact
    assert "nothing frozen" in plan.summary()


#: Boxes everywhere; the cost model's choice; boxes full from a third of the map
#: on, so that whole-map nodes read the frozen statistics (one row per example).
@pytest.mark.parametrize("full_threshold", [1.01, None, 0.3])
def test_se_cnn_equals_captum_with_clean_statistics_hooked_in(full_threshold):
    model = se_cnn()
    torch.manual_seed(1)
    inputs = torch.randn(2, 3, 24, 24, dtype=torch.float64)
    occlusion = IncrementalOcclusion(model)
    exact = occlusion.attribute(inputs, **SE_ARGS)
    assert occlusion.last_run.frozen_context == ()
    assert_float64_rounding(exact, Occlusion(model).attribute(inputs, **SE_ARGS), model, inputs)

    frozen = occlusion.attribute(
        inputs, freeze_global_context=True, full_threshold=full_threshold, **SE_ARGS
    )
    report = occlusion.last_run
    assert report.engine == "incremental" and not report.approximation.exact
    # the two SE statistics, not the classifier's pool
    assert len(report.frozen_context) == 2
    assert (
        report.self_check is not None and report.self_check.max_error <= report.self_check.tolerance
    )

    hooked, hooks = se_cnn_with_hooks(model)
    reference = frozen_reference(hooked, hooks, inputs, **SE_ARGS)
    assert differs(reference, exact)  # the statistics do change
    assert_float64_rounding(frozen, reference, model, inputs)


def test_se_cnn_plan_keeps_boxes_through_se():
    model = se_cnn()
    inputs = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    occlusion = IncrementalOcclusion(model)
    args = dict(sliding_window_shapes=(3, 8, 8), strides=8, full_threshold=1.01)
    exact = occlusion.plan(inputs, **args)
    frozen = occlusion.plan(inputs, freeze_global_context=True, **args)
    assert [n.name for n in exact.global_context.statistics] == list(frozen.frozen_statistics)
    assert exact.frozen_statistics == () and len(frozen.frozen_statistics) == 2
    boxed = [p for p in frozen.nodes.values() if p.mode == "box"]
    muls = [p for p in boxed if p.op == "mul"]
    assert len(muls) == 2  # both SE scales are applied to boxes
    assert all(p.geometry.volume < p.geometry.map_volume for p in boxed)
    classifier_pool = [p for p in frozen.nodes.values() if p.op == "mean" and p.mode == "full"]
    assert len(classifier_pool) == 1
    assert "frozen global context" in frozen.summary()
    assert frozen.theoretical_speedup > 3 * exact.theoretical_speedup


def se_modules(model: nn.Module) -> list[nn.Module]:
    return [m.avgpool for m in model.modules() if isinstance(m, SqueezeExcitation)]


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0"])
def test_torchvision_se_networks_keep_boxes_past_the_first_se_block(name):
    model = torchvision_model(name)
    inputs = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    occlusion = IncrementalOcclusion(model)
    args = dict(sliding_window_shapes=(3, 8, 8), strides=8, full_threshold=1.01)
    exact = occlusion.plan(inputs, **args)
    frozen = occlusion.plan(inputs, freeze_global_context=True, **args)
    statistics = exact.global_context.statistics
    assert len(statistics) == len(se_modules(model))  # every SE block, not the classifier
    assert len(frozen.frozen_statistics) == len(statistics)
    # exact: full from the first SE block on; frozen: boxes past it
    nodes = frozen.captured.nodes
    after = [frozen.nodes[n] for n in nodes[nodes.index(statistics[0]) + 1 :]]
    assert all(frozen.nodes[n].mode == "none" for n in frozen.frozen.nodes)
    spatial = [
        p
        for p in after
        if p.info.value.dim() == 4 and p.info.value.shape[-1] >= 16 and p.mode != "none"
    ]
    assert spatial and all(p.mode == "box" for p in spatial)
    assert all(p.geometry.volume < p.geometry.map_volume for p in spatial)
    assert exact.theoretical_speedup < 1.1
    assert frozen.theoretical_speedup > 1.3


def test_mobilenet_v3_small_equals_captum_with_clean_statistics_hooked_in():
    model = torchvision_model("mobilenet_v3_small")
    torch.manual_seed(2)
    inputs = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    args = dict(sliding_window_shapes=(3, 16, 16), strides=16, target=3)
    occlusion = IncrementalOcclusion(model)
    frozen = occlusion.attribute(inputs, freeze_global_context=True, full_threshold=1.01, **args)
    assert len(occlusion.last_run.frozen_context) == len(se_modules(model))
    hooks = CleanStatistics(se_modules(model))
    try:
        reference = frozen_reference(model, hooks, inputs, **args)
    finally:
        for handle in hooks.handles:
            handle.remove()
    assert differs(frozen, occlusion.attribute(inputs, **args))
    assert_float64_rounding(frozen, reference, model, inputs)


def test_target_ssim_chooses_frozen_context_where_it_pays():
    model = se_cnn()
    torch.manual_seed(3)
    inputs = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    args = dict(sliding_window_shapes=(3, 8, 8), strides=4, target=2)
    occlusion = IncrementalOcclusion(model)
    occlusion.attribute(inputs, target_ssim=0.5, **args)
    report = occlusion.last_run
    calibration = report.calibration
    assert calibration.frozen_context_error is not None  # offered and measured
    assert report.approximation.freeze_global_context  # and chosen
    assert len(report.frozen_context) == 2


def test_target_ssim_does_not_offer_it_without_global_context():
    torch.manual_seed(0)
    model = models.small_cnn().double()
    inputs = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    occlusion = IncrementalOcclusion(model)
    occlusion.attribute(inputs, (3, 4, 4), strides=2, target=0, target_ssim=0.8)
    assert occlusion.last_run.calibration.frozen_context_error is None
    assert not occlusion.last_run.approximation.freeze_global_context


def test_target_ssim_refuses_an_explicit_choice():
    model = se_cnn()
    with pytest.raises(ValueError, match="freeze_global_context"):
        IncrementalOcclusion(model).attribute(
            torch.randn(1, 3, 16, 16, dtype=torch.float64),
            (3, 4, 4),
            target=0,
            target_ssim=0.9,
            freeze_global_context=True,
        )
