"""Architectures of the model-zoo sweep (tests/test_zoo.py): how each is built and run.

Every model is built with random weights, its normalization statistics are drawn at
random, it is put in eval mode and converted to float64, and it is run on one
float64 example. Both attribution maps come back as float32 (as Captum's does).
Run one case by hand: `run_case(case, with_plan=True)` also returns the plan's
summary.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

#: Default input side, window side and stride: 5 x 5 = 25 windows that overlap and
#: do not line up with the power-of-two strides of the networks.
SIZE, WINDOW, STRIDE = 64, 16, 12
TARGET = 3


@dataclass(frozen=True)
class ZooCase:
    library: str  # "torchvision" or "timm"
    name: str
    size: int = SIZE
    window: int = WINDOW
    stride: int = STRIDE
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    #: Part of the default (quick) test run.
    quick: bool = False
    #: BatchNorm statistics drawn around measured ones (measure_statistics), for
    #: the architectures where the plain uniform statistics leave a map below
    #: 1e-4 of the output (a weak test; down to exact zeros for repvgg) or make
    #: the model amplify rounding ~1e8-fold (timm's efficientnetv2_rw_t).
    measured: bool = False

    @property
    def id(self) -> str:
        return f"{self.library}:{self.name}"

    @property
    def num_windows(self) -> int:
        return ((self.size - self.window) // self.stride + 1) ** 2


def _tv(name: str, **options: Any) -> ZooCase:
    return ZooCase("torchvision", name, **options)


def _timm(name: str, **options: Any) -> ZooCase:
    return ZooCase("timm", name, **options)


_NO_AUX = {"aux_logits": False, "init_weights": False}

TORCHVISION_CASES = [
    _tv("alexnet"),
    *(_tv(f"convnext_{v}") for v in ("tiny", "small", "base", "large")),
    *(_tv(f"densenet{v}") for v in (121, 161, 169, 201)),
    *(_tv(f"efficientnet_b{i}", measured=True) for i in range(8)),
    *(_tv(f"efficientnet_v2_{v}", measured=True) for v in ("s", "m", "l")),
    _tv("googlenet", measured=True, kwargs=_NO_AUX),
    # Valid (unpadded) stem convolutions: at least 75 pixels.
    _tv("inception_v3", measured=True, size=96, window=24, stride=24, kwargs=_NO_AUX),
    # Its 7 x 7 attention partitions need a side that is a multiple of 224.
    _tv("maxvit_t", measured=True, size=224, window=64, stride=48),
    *(_tv(f"mnasnet{v}", measured=True) for v in ("0_5", "0_75", "1_0", "1_3")),
    _tv("mobilenet_v2", measured=True),
    _tv("mobilenet_v3_large", measured=True),
    _tv("mobilenet_v3_small", measured=True, quick=True),
    *(_tv(f"regnet_x_{v}") for v in ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf")),
    *(
        _tv(f"regnet_y_{v}")
        for v in ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf", "128gf")
    ),
    *(_tv(f"resnet{d}") for d in (18, 34, 50, 101, 152)),
    _tv("resnext50_32x4d"),
    _tv("resnext101_32x8d"),
    _tv("resnext101_64x4d"),
    _tv("wide_resnet50_2"),
    _tv("wide_resnet101_2"),
    _tv("shufflenet_v2_x0_5", quick=True, measured=True),
    *(_tv(f"shufflenet_v2_{v}", measured=True) for v in ("x1_0", "x1_5", "x2_0")),
    _tv("squeezenet1_0"),
    _tv("squeezenet1_1"),
    *(_tv(f"swin_{v}") for v in ("t", "s", "b")),
    *(_tv(f"swin_v2_{v}") for v in ("t", "s", "b")),
    *(_tv(v) for v in ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn")),
    _tv("vgg19"),
    _tv("vgg19_bn"),
    *(_tv(f"vit_{v}", kwargs={"image_size": 64}) for v in ("b_16", "b_32", "l_16", "l_32")),
    # Side a multiple of the 14-pixel patch.
    _tv("vit_h_14", size=56, window=14, stride=14, kwargs={"image_size": 56}),
]

#: timm models built for a 64-pixel input (absolute position tables, fixed token grids).
_IMG64 = {"img_size": 64}

TIMM_CASES = [
    # ResNet family, ResNet-D stems, anti-aliasing, blur pools, attention blocks.
    _timm("resnet18"),
    _timm("resnet50"),
    _timm("resnet18d"),
    _timm("resnet26d", quick=True),
    _timm("resnet50d"),
    _timm("resnetaa50d"),
    _timm("resnetblur50"),
    _timm("seresnext26d_32x4d"),
    _timm("ecaresnet26t"),
    _timm("skresnet18"),
    _timm("resnetrs50"),
    _timm("res2net50_14w_8s"),
    _timm("res2next50"),
    _timm("resnest14d"),
    _timm("gcresnet33ts"),
    _timm("seresnext26ts"),
    _timm("eca_resnext26ts"),
    _timm("lambda_resnet26t"),
    _timm("botnet26t_256", kwargs=_IMG64),
    _timm("sebotnet33ts_256", kwargs=_IMG64),
    # Halo attention needs feature maps divisible by its 8-pixel blocks.
    _timm("halonet26t", size=256, window=64, stride=64),
    _timm("bat_resnext26ts", size=256, window=64, stride=64),
    # RegNet.
    _timm("regnetx_002"),
    _timm("regnety_002"),
    _timm("regnetz_005"),
    _timm("regnetz_b16"),
    # EfficientNet / MobileNet / NAS families ('same' padding in the tf_ ports).
    _timm("efficientnet_b0", measured=True),
    _timm("efficientnet_b0_gn"),
    _timm("tf_efficientnet_b0", measured=True),
    _timm("tf_efficientnetv2_b0"),
    _timm("efficientnetv2_rw_t", measured=True),
    _timm("mixnet_s"),
    _timm("tf_mixnet_s"),
    _timm("tinynet_e", measured=True),
    _timm("fbnetc_100"),
    _timm("fbnetv3_b"),
    _timm("mnasnet_100"),
    _timm("semnasnet_075"),
    _timm("spnasnet_100"),
    _timm("lcnet_050", measured=True),
    _timm("mobilenetv3_small_050"),
    _timm("mobilenetv3_large_100"),
    _timm("tf_mobilenetv3_small_minimal_100"),
    _timm("mobilenetv4_conv_small"),
    _timm("mobilenetv4_conv_aa_medium"),
    _timm("mobilenetv4_hybrid_medium"),
    _timm("ghostnet_100", measured=True),
    _timm("ghostnetv2_100", measured=True),
    _timm("ghostnetv3_050"),
    _timm("repghostnet_050"),
    _timm("rexnet_100", quick=True),
    _timm("rexnetr_100"),
    _timm("hgnetv2_b0", measured=True),
    _timm("hgnet_tiny", measured=True),
    _timm("mobileone_s0"),
    _timm("repvit_m0_9"),
    _timm("fasternet_t0"),
    _timm("starnet_s1", measured=True),
    # ConvNeXt and other modern conv nets.
    _timm("convnext_atto", quick=True),
    _timm("convnext_atto_ols"),
    _timm("convnext_atto_rms"),
    _timm("convnextv2_atto"),
    _timm("inception_next_atto"),
    _timm("mambaout_femto"),
    _timm("rdnet_tiny"),
    _timm("convmixer_768_32", measured=True),
    _timm("edgenext_xx_small"),
    _timm("fastvit_t8"),
    _timm("poolformer_s12"),
    _timm("poolformerv2_s12"),
    # Multi-branch and aggregation nets.
    _timm("dla34"),
    _timm("dla46_c"),
    _timm("dla60x_c"),
    _timm("dla60_res2net"),
    _timm("dpn48b"),
    _timm("dpn68"),
    _timm("hrnet_w18_small", quick=True),
    _timm("hrnet_w18_small_v2"),
    _timm("cspresnet50"),
    _timm("cspresnext50", measured=True),
    _timm("cspdarknet53"),
    _timm("cs3darknet_s"),
    _timm("cs3darknet_focus_s"),
    _timm("darknet17"),
    _timm("densenet121"),
    _timm("densenetblur121d"),
    _timm("ese_vovnet19b_dw", measured=True),
    _timm("selecsls42b"),
    _timm("gernet_s"),
    _timm("tresnet_m"),
    _timm("vgg11_bn"),
    _timm("repvgg_a0", measured=True),
    _timm("repvgg_d2se", measured=True),
    # Inception and Xception (valid stem convolutions: at least 75 pixels).
    _timm("inception_v3", size=96, window=24, stride=24),
    _timm("tf_inception_v3", size=96, window=24, stride=24),
    _timm("inception_v4", measured=True, size=96, window=24, stride=24),
    _timm("inception_resnet_v2", measured=True, size=96, window=24, stride=24),
    _timm("xception41", measured=True),
    _timm("legacy_xception", measured=True),
    # Normalizer-free nets and BiT (ResNetV2).
    _timm("nfnet_f0"),
    _timm("dm_nfnet_f0"),
    _timm("eca_nfnet_l0"),
    _timm("nf_resnet26"),
    _timm("nf_regnet_b0"),
    _timm("resnetv2_18"),
    _timm("resnetv2_50x1_bit"),
    _timm("resnetv2_50d_gn"),
    _timm("resnetv2_50d_evos"),
    # Hybrids and vision transformers.
    _timm("efficientvit_b0", measured=True),
    _timm("efficientvit_m0", measured=True),
    _timm("levit_128s", measured=True, kwargs=_IMG64),
    _timm("levit_conv_128s", measured=True, kwargs=_IMG64),
    # Its attention bias tables are fixed to a 224-pixel input.
    _timm("efficientformer_l1", size=224, window=64, stride=48),
    _timm("efficientformerv2_s0", kwargs=_IMG64),
    _timm("mobilevit_xxs"),
    _timm("mobilevitv2_050"),
    _timm("pvt_v2_b0"),
    _timm("coatnet_nano_rw_224", kwargs=_IMG64),
    _timm("coatnet_0_rw_224", kwargs=_IMG64),
    _timm("maxvit_pico_rw_256", kwargs=_IMG64),
    _timm("tiny_vit_5m_224", measured=True),
    _timm("swin_tiny_patch4_window7_224", kwargs=_IMG64),
    _timm("gcvit_xxtiny", kwargs=_IMG64),
    _timm("davit_tiny"),
    _timm("focalnet_tiny_srf"),
    _timm("nest_tiny", kwargs=_IMG64),
    _timm("vit_small_patch16_224", kwargs=_IMG64),
    _timm("deit_small_patch16_224", kwargs=_IMG64),
    _timm("deit_tiny_distilled_patch16_224", kwargs=_IMG64),
    _timm("cait_xxs24_224", kwargs=_IMG64),
    _timm("pit_ti_224", kwargs=_IMG64),
    _timm("xcit_nano_12_p16_224"),
    _timm("visformer_tiny", kwargs=_IMG64),
    _timm("crossvit_tiny_240"),
    _timm("hiera_tiny_224", kwargs=_IMG64),
    _timm("sequencer2d_s"),
]


def build_model(case: ZooCase) -> nn.Module:
    """Random weights, random normalization statistics, eval mode, float64."""
    if case.library == "torchvision":
        import torchvision

        model = getattr(torchvision.models, case.name)(weights=None, **case.kwargs)
    else:
        import timm

        model = timm.create_model(case.name, pretrained=False, **case.kwargs)
    randomize_statistics(model, torch.Generator().manual_seed(0))
    model = model.eval().double()
    if case.measured:
        measure_statistics(model, case.size, torch.Generator().manual_seed(0))
    return model


@torch.no_grad()
def randomize_statistics(model: nn.Module, generator: torch.Generator) -> None:
    """Draws normalization statistics, and revives branches the initializers switch off.

    running_mean ~ U(-0.5, 0.5) and running_var ~ U(0.5, 1.5) wherever a module
    keeps them (BatchNorm and its subclasses, EvoNorm, ...). Initializers also
    zero the last norm weight of residual blocks, skip-init gains, or start layer
    scales at 1e-6..1e-5; those branches would then contribute (almost) nothing and
    an error inside them would go unseen, so every non-bias parameter whose
    values all lie below 1e-3 is drawn again from U(0.5, 1.5).
    """

    def uniform(tensor: torch.Tensor, low: float, high: float) -> None:
        values = torch.rand(tensor.shape, generator=generator, dtype=torch.float64)
        tensor.copy_(values * (high - low) + low)

    for module in model.modules():
        mean = getattr(module, "running_mean", None)
        var = getattr(module, "running_var", None)
        if isinstance(mean, torch.Tensor) and mean.is_floating_point():
            uniform(mean, -0.5, 0.5)
        if isinstance(var, torch.Tensor) and var.is_floating_point():
            uniform(var, 0.5, 1.5)
    for name, param in model.named_parameters():
        if name.split(".")[-1] == "bias" or not param.is_floating_point() or not param.numel():
            continue
        if param.abs().max().item() < 1e-3:
            uniform(param, 0.5, 1.5)


@torch.no_grad()
def measure_statistics(model: nn.Module, size: int, generator: torch.Generator) -> None:
    """BatchNorm statistics drawn around the ones each layer really sees.

    With statistics unrelated to the activations, BatchNorm does not normalize:
    behind depthwise convolutions (whose default initialization scales weights by
    all output channels) the input's influence shrinks ~10x per block. Here one
    forward of 8 random inputs runs in eval mode, and just before each BatchNorm
    runs, its statistics are set from the batch mean m and variance v of its input
    (so every later layer sees the statistics already drawn): running_mean =
    m + U(-0.5, 0.5) sqrt(v), running_var = v U(0.5, 1.5). Still random, but on
    the activations' scale.
    """

    def draw(module: nn.Module, args: tuple) -> None:
        x = args[0]
        dims = [0, *range(2, x.dim())]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        shift = torch.rand(mean.shape, generator=generator, dtype=mean.dtype) - 0.5
        factor = torch.rand(var.shape, generator=generator, dtype=var.dtype) + 0.5
        module.running_mean.copy_(mean + shift * var.sqrt())
        module.running_var.copy_(var * factor)

    handles = [
        m.register_forward_pre_hook(draw)
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    try:
        model(torch.randn(8, 3, size, size, dtype=torch.float64, generator=generator))
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class ZooRun:
    """What one case gave: both maps (or the reason the engine did not apply)."""

    expected: torch.Tensor | None = None
    actual: torch.Tensor | None = None
    output_scale: float = 0.0
    #: Largest change of any output when each input value moves by at most one
    #: unit in the last place (3 random draws), relative to the output's scale.
    sensitivity: float = 0.0
    not_applicable: str | None = None
    seconds_ours: float = 0.0
    seconds_captum: float = 0.0
    plan_summary: str = ""


def rounding_sensitivity(model: nn.Module, inputs: torch.Tensor, output: torch.Tensor) -> float:
    """How far rounding-sized input changes move the outputs, relative to their
    scale: an estimate of how much two exact implementations that round
    differently (other summation orders on boxes) may disagree."""
    generator = torch.Generator().manual_seed(2)
    change = 0.0
    for _ in range(3):
        steps = torch.randint(-1, 2, inputs.shape, generator=generator).to(inputs.dtype)
        moved = model(inputs + steps * inputs.abs() * torch.finfo(inputs.dtype).eps)
        change = max(change, (moved - output).abs().max().item())
    return change / max(output.abs().max().item(), 1e-300)


def run_case(case: ZooCase, *, with_plan: bool = False) -> ZooRun:
    """Runs IncrementalOcclusion (engine="incremental") and Captum's Occlusion on the
    case; the model is freed before returning, so a failing assertion on the maps
    keeps no model alive."""
    from captum.attr import Occlusion

    from captum_krypton import IncrementalNotApplicable, IncrementalOcclusion

    model = build_model(case)
    inputs = torch.randn(
        1, 3, case.size, case.size, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    window = (3, case.window, case.window)
    run = ZooRun()
    occlusion = IncrementalOcclusion(model)
    try:
        with torch.no_grad():
            output = model(inputs)
            run.output_scale = output.abs().max().item()
            run.sensitivity = rounding_sensitivity(model, inputs, output)
        start = time.perf_counter()
        try:
            if with_plan:
                run.plan_summary = occlusion.plan(inputs, window, strides=case.stride).summary()
            run.actual = occlusion.attribute(
                inputs,
                window,
                strides=case.stride,
                target=TARGET,
                engine="incremental",
                self_check=False,
            )
        except IncrementalNotApplicable as exc:
            run.not_applicable = str(exc)
            return run
        run.seconds_ours = time.perf_counter() - start
        start = time.perf_counter()
        run.expected = Occlusion(model).attribute(
            inputs, window, strides=case.stride, target=TARGET
        )
        run.seconds_captum = time.perf_counter() - start
        return run
    finally:
        occlusion.close()
        del occlusion, model
        gc.collect()
