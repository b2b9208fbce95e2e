"""Model-zoo sweep: torchvision and timm classifiers against captum.attr.Occlusion.

One test per architecture; the list, and how each model is built and run, is in
tests/zoo.py. Every model has random weights (weights=None / pretrained=False),
random BatchNorm statistics, runs in eval mode and in float64 on one float64
example of 3 x 64 x 64 (other sizes where an architecture needs them, noted in
tests/zoo.py), window (3, 16, 16), stride 12 (25 overlapping windows), target 3.
IncrementalOcclusion runs with engine="incremental" and self_check=False, Captum's
Occlusion with perturbations_per_eval=1. Both maps are float32 and must agree
within 1e-9 x max(|Captum's map|, |model output|) plus float32 rounding (rtol 3e-7).

BatchNorm statistics: running_mean ~ U(-0.5, 0.5), running_var ~ U(0.5, 1.5). Where
that leaves the map below 1e-4 of the output (mostly nets of depthwise convolutions:
their default initialization shrinks the input's influence ~10x per block when
BatchNorm does not normalize; repvgg's maps are exact zeros) the case is marked
`measured`: the same draws relative to the mean and variance each BatchNorm
really sees (tests/zoo.py, measure_statistics). Also, every non-bias parameter
whose values all lie below 1e-3 (zero-initialized last norms of residual blocks,
skip-init gains, 1e-6 layer scales) is drawn again from U(0.5, 1.5), so that no
branch is switched off.

Conditioning: some random deep nets amplify rounding (efficientnet_v2_l, _b6:
moving each input value by one unit in the last place moves the output by up
to 1e-7 of its scale), and then two exact implementations that round
differently disagree by that much. Each test measures this sensitivity (three
such input draws) and widens the tolerance to 100 x sensitivity where that is
larger; above 1e-6 the model is too chaotic to compare, and the test fails.

The quick cases run in the default `pytest` run; the rest are marked slow and
run only when the marker expression names them:
    python -m pytest tests/test_zoo.py -m "slow or not slow" -p no:cacheprovider

Skipped: none. Every torchvision classifier of torchvision.models (80; the int8
ones of torchvision.models.quantization are not float64 models) fits 2 CPU cores
and 24 GiB at these sizes: the largest, regnet_y_128gf (644 M parameters) and
vit_h_14 (632 M, at 56 x 56), need ~6.4 GiB and 1-3 minutes each.

Documented fallbacks (engine="incremental" raises IncrementalNotApplicable; the
test checks that the reason is the documented one; DOCUMENTED_FALLBACKS below):
  - torch.fx cannot trace Python control flow on the input's shape, which timm
    uses for TensorFlow 'same' padding (tf_efficientnet_b0, tf_efficientnetv2_b0,
    tf_mixnet_s, tf_mobilenetv3_small_minimal_100, dm_nfnet_f0: padding.py's
    max(...) of the input size), for vgg's ConvMlp, efficientvit, mobilevit,
    tiny_vit, crossvit, nest and non-local attention (bat_resnext26ts);
  - window and multi-head attention written as views that fold windows or heads
    into the batch dimension (timm's swin, maxvit, gcvit, davit, hiera, halonet,
    botnet, sebotnet, levit, sequencer): the engine does not apply where a node
    merges the batch dimension with another one. (torchvision's swin passes: its
    window attention is one wrapped function, evaluated whole.)
  - fasternet's partial convolution assigns `self.forward` on the instance.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import FP64_TOLERANCE, assert_close_to_captum
from tests.zoo import TIMM_CASES, TORCHVISION_CASES, ZooCase, run_case

pytest.importorskip("torchvision")
pytest.importorskip("timm")

#: 1e-9 of max(|map|, |output|): ten times the package's float64 tolerance, for
#: networks of a hundred and more layers.
ZOO_TOLERANCE = 10 * FP64_TOLERANCE
#: Tolerance per unit of measured rounding sensitivity (see the module docstring).
NOISE_FACTOR = 100
#: Beyond this sensitivity a random model cannot be compared at all.
MAX_SENSITIVITY = 1e-6

#: Architectures not run, by case id, with the reason.
SKIPPED: dict[str, str] = {}

_MERGES = "merges the batch dimension"
_WINDOWS = "attention folds windows or heads into the batch dimension (view/reshape)"
_HEADS = "nn.MultiheadAttention folds heads into the batch dimension"

#: Architectures where the engine does not apply, by case id: a substring of the
#: IncrementalNotApplicable message, and why that is expected.
DOCUMENTED_FALLBACKS: dict[str, tuple[str, str]] = {
    "torchvision:swin_t": (_MERGES, _WINDOWS),
    "torchvision:swin_s": (_MERGES, _WINDOWS),
    "torchvision:swin_b": (_MERGES, _WINDOWS),
    "torchvision:swin_v2_t": (_MERGES, _WINDOWS),
    "torchvision:swin_v2_s": (_MERGES, _WINDOWS),
    "torchvision:swin_v2_b": (_MERGES, _WINDOWS),
    "torchvision:vit_b_16": (_MERGES, _HEADS),
    "torchvision:vit_b_32": (_MERGES, _HEADS),
    "torchvision:vit_l_16": (_MERGES, _HEADS),
    "torchvision:vit_l_32": (_MERGES, _HEADS),
    "torchvision:vit_h_14": (_MERGES, _HEADS),
    "timm:mobilevit_xxs": (_MERGES, "unfolds patches into the batch dimension"),
    "timm:tiny_vit_5m_224": (_MERGES, _WINDOWS),
    "timm:bat_resnext26ts": (_MERGES, "non-local attention folds groups into the batch"),
    "timm:botnet26t_256": (_MERGES, _WINDOWS),
    "timm:sebotnet33ts_256": (_MERGES, _WINDOWS),
    "timm:halonet26t": (_MERGES, _WINDOWS),
    "timm:maxvit_pico_rw_256": (_MERGES, _WINDOWS),
    "timm:swin_tiny_patch4_window7_224": (_MERGES, _WINDOWS),
    "timm:gcvit_xxtiny": (_MERGES, _WINDOWS),
    "timm:davit_tiny": (_MERGES, _WINDOWS),
    "timm:hiera_tiny_224": (_MERGES, _WINDOWS),
    "timm:levit_128s": (_MERGES, "attention flattens batch and tokens"),
    "timm:sequencer2d_s": (_MERGES, "its LSTMs run on rows and columns folded into the batch"),
}

ALL_CASES = [*TORCHVISION_CASES, *TIMM_CASES]


def _params(cases: list[ZooCase]):
    for case in cases:
        marks = []
        if case.id in SKIPPED:
            marks.append(pytest.mark.skip(reason=SKIPPED[case.id]))
        if not case.quick:
            marks.append(pytest.mark.slow)
        yield pytest.param(case, id=case.id, marks=marks)


def test_case_lists_are_consistent():
    ids = [case.id for case in ALL_CASES]
    assert len(ids) == len(set(ids))
    assert set(SKIPPED) <= set(ids)
    assert set(DOCUMENTED_FALLBACKS) <= set(ids)
    quick = [case for case in ALL_CASES if case.quick]
    assert quick and not any(case.id in DOCUMENTED_FALLBACKS for case in quick)


@pytest.mark.parametrize("case", list(_params(ALL_CASES)))
def test_zoo_model_matches_captum(case: ZooCase, record_property, request):
    if not case.quick and "slow" not in request.config.getoption("markexpr"):
        pytest.skip("slow zoo case: select it with -m slow (or -m 'slow or not slow')")
    torch.manual_seed(0)
    run = run_case(case)
    record_property("seconds_ours", round(run.seconds_ours, 3))
    record_property("seconds_captum", round(run.seconds_captum, 3))
    if run.not_applicable is not None:
        record_property("not_applicable", run.not_applicable)
        documented = DOCUMENTED_FALLBACKS.get(case.id)
        assert documented is not None, f"engine fell back: {run.not_applicable}"
        assert documented[0] in run.not_applicable, run.not_applicable
        return
    expected, actual = run.expected, run.actual
    map_scale = expected.abs().max().item()
    scale = max(map_scale, run.output_scale)
    tolerance = max(ZOO_TOLERANCE, NOISE_FACTOR * run.sensitivity)
    record_property("relative_error", f"{(actual - expected).abs().max().item() / scale:.3e}")
    record_property("map_to_output", f"{map_scale / run.output_scale:.3e}")
    record_property("sensitivity", f"{run.sensitivity:.3e}")
    record_property("tolerance", f"{tolerance:.3e}")
    assert run.sensitivity < MAX_SENSITIVITY, f"ill-conditioned model: {run.sensitivity:.2e}"
    assert_close_to_captum(expected, actual, run.output_scale, tolerance)
    # A map far below the output's scale would pass whatever its values.
    assert map_scale > 1e-6 * run.output_scale, f"map {map_scale:.2e} of the output"
