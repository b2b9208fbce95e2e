"""Never silently wrong: forward functions that break the engine's assumptions get
Captum's numbers (with a FallbackWarning where the engine cannot run them), and
every incremental call checks itself against the user's forward.

Every expected value comes from captum.attr.Occlusion.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from captum.attr import Occlusion
from torch import nn

from captum_krypton import FallbackWarning, IncrementalNotApplicable, IncrementalOcclusion
from captum_krypton.engine import self_check
from captum_krypton.engine.self_check import check_window_ids
from captum_krypton.ops import pooling
from tests import models


def _run(model, inputs, **kwargs):
    """IncrementalOcclusion's result, its FallbackWarnings and the instance."""
    occlusion = IncrementalOcclusion(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = occlusion.attribute(inputs, **kwargs)
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, FallbackWarning)]
    return result, fallbacks, occlusion


class SharedMatrix(nn.Module):
    """forward(x, adj) = (adj @ x).flatten(1): adj is one matrix for all examples."""

    def forward(self, x, adj):
        return (adj @ x).flatten(1)


class ShiftedByBatchMin(nn.Module):
    def forward(self, x):
        return (x - x.min()).sum(dim=(1, 2)).unsqueeze(1)


class StandardizedOverBatch(nn.Module):
    def forward(self, x):
        score = x.sum(dim=(1, 2)).unsqueeze(1)
        return (score - score.mean()) / score.std()


class CentredOverBatch(nn.Module):
    """Subtracts the batch mean per feature: keeps every shape, mixes every row."""

    def forward(self, x):
        return (x - x.mean(0, keepdim=True)).flatten(1)


class SoftmaxOverBatch(nn.Module):
    """Shapes say nothing here: only the numbers of a batch show the mixing."""

    def forward(self, x):
        return torch.softmax(x.flatten(1), dim=0)


class FirstOfSplit(nn.Module):
    """Picks the first example through a tuple-valued op."""

    def forward(self, x):
        return torch.split(x, 1, dim=0)[0].flatten(1)


class MaxOverBatch(nn.Module):
    def forward(self, x):
        return x.max(dim=0, keepdim=True).values.flatten(1)


class OneExample(nn.Module):
    def __init__(self, features: int = 4):
        super().__init__()
        self.fc = nn.Linear(features, 1)

    def forward(self, x):
        return self.fc(x.view(1, -1))


class FirstExampleOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x)[0:1].flatten(1)


class MaskedCNN(models.SmallCNN):
    """Takes an additional tensor multiplied into the input: per example when it has
    one row per example, else broadcast to every example."""

    def forward(self, x, mask):
        return super().forward(x * mask)


def test_shared_matrix_one_example_equals_captum_and_runs_incrementally():
    x = torch.tensor([[[1.0], [2.0]]])
    adj = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    expected = Occlusion(SharedMatrix()).attribute(
        x, (1, 1), target=1, additional_forward_args=(adj,)
    )
    actual, fallbacks, occlusion = _run(
        SharedMatrix(), x, sliding_window_shapes=(1, 1), target=1, additional_forward_args=(adj,)
    )
    assert fallbacks == [] and occlusion.last_run.engine == "incremental"
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_shared_matrix_of_another_size_than_the_batch_equals_captum():
    x = torch.randn(2, 3, 1)
    adj = torch.randn(3, 3)
    expected = Occlusion(SharedMatrix()).attribute(
        x, (1, 1), target=2, additional_forward_args=(adj,)
    )
    actual, fallbacks, _ = _run(
        SharedMatrix(), x, sliding_window_shapes=(1, 1), target=2, additional_forward_args=(adj,)
    )
    assert fallbacks == []
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_shared_matrix_as_large_as_the_batch_is_caught_and_gives_captums_numbers():
    """A (2, 2) matrix with 2 examples looks per example: the batch check sees it isn't."""
    x = torch.randn(2, 2, 1)
    adj = torch.randn(2, 2)
    expected = Occlusion(SharedMatrix()).attribute(
        x, (1, 1), target=1, additional_forward_args=(adj,)
    )
    actual, fallbacks, _ = _run(
        SharedMatrix(), x, sliding_window_shapes=(1, 1), target=1, additional_forward_args=(adj,)
    )
    assert len(fallbacks) == 1
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("ppe", [1, 4])
def test_per_example_tensor_equals_captum_at_any_perturbations_per_eval(ppe):
    model = MaskedCNN().eval()
    inputs = torch.randn(3, 3, 12, 12)
    mask = torch.rand(3, 3, 12, 12)
    kwargs = dict(strides=4, target=[0, 1, 2], additional_forward_args=(mask,))
    expected = Occlusion(model).attribute(inputs, (3, 4, 4), perturbations_per_eval=ppe, **kwargs)
    actual, fallbacks, _ = _run(
        model, inputs, sliding_window_shapes=(3, 4, 4), perturbations_per_eval=ppe, **kwargs
    )
    assert fallbacks == []
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_shared_tensor_broadcast_to_every_example_equals_captum():
    model = MaskedCNN().eval()
    inputs = torch.randn(3, 3, 12, 12)
    mask = torch.rand(1, 3, 12, 12)  # one mask for all three examples
    kwargs = dict(strides=4, target=1, additional_forward_args=(mask,))
    expected = Occlusion(model).attribute(inputs, (3, 4, 4), **kwargs)
    actual, fallbacks, _ = _run(model, inputs, sliding_window_shapes=(3, 4, 4), **kwargs)
    assert fallbacks == []
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_shared_tensor_at_perturbations_per_eval_above_one_follows_captum():
    """Captum repeats even a shared tensor per perturbation above 1: its path runs."""
    x = torch.randn(1, 3, 1)
    adj = torch.randn(3, 3)
    kwargs = dict(target=0, additional_forward_args=(adj,), perturbations_per_eval=2)
    expected = Occlusion(SharedMatrix()).attribute(x, (1, 1), **kwargs)
    actual, fallbacks, _ = _run(SharedMatrix(), x, sliding_window_shapes=(1, 1), **kwargs)
    assert len(fallbacks) == 1 and "perturbations_per_eval=2" in fallbacks[0]
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


BATCH_MIXING = [
    # model, inputs, kwargs, what the warning names
    (
        ShiftedByBatchMin(),
        torch.tensor([[[1.0, 2.0, 3.0]]]),
        dict(sliding_window_shapes=(1, 1), baselines=10.0, target=0),
        "reduces over the batch",
    ),
    (
        StandardizedOverBatch(),
        torch.randn(3, 2, 3),
        dict(sliding_window_shapes=(1, 1), target=0),
        "reduces over the batch",
    ),
    (
        CentredOverBatch(),
        torch.randn(2, 2, 5),
        dict(sliding_window_shapes=(1, 2), target=3),
        "reduces over the batch",
    ),
    (
        OneExample(),
        torch.randn(1, 1, 4),
        dict(sliding_window_shapes=(1, 1), target=0),
        "batch",
    ),
    (
        FirstExampleOnly(),
        torch.randn(1, 1, 6, 6),
        dict(sliding_window_shapes=(1, 2, 2), strides=2, target=5),
        "batch",
    ),
    (
        FirstOfSplit(),
        torch.randn(1, 2, 4),
        dict(sliding_window_shapes=(1, 2), target=5),
        "batch",
    ),
    (
        MaxOverBatch(),
        torch.randn(1, 2, 4),
        dict(sliding_window_shapes=(1, 2), target=2),
        "reduces over the batch",
    ),
    (
        SoftmaxOverBatch(),
        torch.randn(1, 2, 4),
        dict(sliding_window_shapes=(1, 2), target=3),
        "works along the batch dimension",
    ),
]


@pytest.mark.parametrize("model,inputs,kwargs,named", BATCH_MIXING)
def test_forward_that_mixes_or_fixes_the_batch_gets_captums_numbers(model, inputs, kwargs, named):
    captum_kwargs = {k: v for k, v in kwargs.items() if k != "sliding_window_shapes"}
    expected = Occlusion(model).attribute(inputs, kwargs["sliding_window_shapes"], **captum_kwargs)
    actual, fallbacks, occlusion = _run(model, inputs, **kwargs)
    assert len(fallbacks) == 1 and named in fallbacks[0]
    assert occlusion.last_run.engine == "captum"
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    with pytest.raises(IncrementalNotApplicable):
        IncrementalOcclusion(model).attribute(inputs, engine="incremental", **kwargs)


def test_the_issue_values_of_a_batch_min_model():
    """x = [1, 2, 3], baseline 10, window 1: Captum's numbers are [-6, -8, -7]."""
    actual, fallbacks, _ = _run(
        ShiftedByBatchMin(),
        torch.tensor([[[1.0, 2.0, 3.0]]]),
        sliding_window_shapes=(1, 1),
        baselines=10.0,
        target=0,
    )
    expected = Occlusion(ShiftedByBatchMin()).attribute(
        torch.tensor([[[1.0, 2.0, 3.0]]]), (1, 1), baselines=10.0, target=0
    )
    assert fallbacks
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def _broken_pool(monkeypatch):
    """A wrong rule: max pooling's boxes come out 1% of their range too high."""
    original = pooling.PoolRule.run_box

    def wrong(self, run, info, spec):
        box = original(self, run, info, spec)
        return box + 0.01 * (box.max() - box.min())

    monkeypatch.setattr(pooling.PoolRule, "run_box", wrong)


def test_a_broken_rule_is_caught_by_the_self_check(monkeypatch):
    model = models.small_cnn()
    inputs = torch.randn(2, 3, 32, 32)
    kwargs = dict(sliding_window_shapes=(3, 4, 4), strides=4, target=[1, 3], full_threshold=1.0)
    expected = Occlusion(model).attribute(inputs, (3, 4, 4), strides=4, target=[1, 3])
    _broken_pool(monkeypatch)
    unchecked, fallbacks, _ = _run(model, inputs, self_check=False, **kwargs)
    assert fallbacks == []
    assert not torch.allclose(unchecked, expected, atol=1e-4)  # the broken rule is wrong
    actual, fallbacks, occlusion = _run(model, inputs, **kwargs)
    assert len(fallbacks) == 1 and "self-check 'windows vs forward' failed" in fallbacks[0]
    assert occlusion.last_run.engine == "captum"
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_a_broken_rule_is_caught_in_a_shard_of_devices(monkeypatch):
    model = models.small_cnn()
    inputs = torch.randn(1, 3, 32, 32)
    expected = Occlusion(model).attribute(inputs, (3, 4, 4), strides=4, target=2)
    _broken_pool(monkeypatch)
    actual, fallbacks, _ = _run(
        model,
        inputs,
        sliding_window_shapes=(3, 4, 4),
        strides=4,
        target=2,
        full_threshold=1.0,
        devices=["cpu", "cpu"],
    )
    assert len(fallbacks) == 1 and "windows vs forward" in fallbacks[0]
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_a_broken_rule_is_caught_under_approximation(monkeypatch):
    """tau < 1 computes every window approximately: the checked ones run exactly."""
    model = models.small_cnn()
    inputs = torch.randn(1, 3, 32, 32)
    expected = Occlusion(model).attribute(inputs, (3, 4, 4), strides=4, target=0)
    _broken_pool(monkeypatch)
    actual, fallbacks, _ = _run(
        model,
        inputs,
        sliding_window_shapes=(3, 4, 4),
        strides=4,
        target=0,
        tau=0.5,
        full_threshold=1.0,
    )
    assert len(fallbacks) == 1 and "windows vs forward" in fallbacks[0]
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_passing_check_changes_no_bit_and_is_reported():
    model = models.small_cnn()
    inputs = torch.randn(2, 3, 16, 16)
    kwargs = dict(sliding_window_shapes=(3, 4, 4), strides=2, target=[0, 4])
    checked, fallbacks, occlusion = _run(model, inputs, **kwargs)
    unchecked, _, unchecked_occlusion = _run(model, inputs, self_check=False, **kwargs)
    assert fallbacks == []
    assert torch.equal(checked, unchecked)
    report = occlusion.last_run.self_check
    assert report is not None and unchecked_occlusion.last_run.self_check is None
    assert report.windows[:2] == (0, 48)  # the first and the last window
    assert 0 <= report.max_error <= report.tolerance
    assert not report.loose


def test_later_calls_run_no_batch_shape_the_first_call_did_not():
    """cudnn.benchmark searches algorithms per new batch shape: the check's forward
    on later calls (clean input + checked windows) must have run in the first."""
    model = models.small_cnn()
    seen: list[list[int]] = []

    def record(module, args):
        if isinstance(args[0].shape[0], int):  # not while the capture traces it
            seen[-1].append(args[0].shape[0])

    model.register_forward_pre_hook(record)
    occlusion = IncrementalOcclusion(model)
    inputs = torch.randn(2, 3, 16, 16)
    kwargs = dict(sliding_window_shapes=(3, 4, 4), strides=2, target=0)
    for _ in range(3):
        seen.append([])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            occlusion.attribute(inputs, **kwargs)
    first, second, third = (set(sizes) for sizes in seen)
    assert occlusion.last_run.self_check is not None
    assert second and second <= first and third == second


@pytest.mark.usefixtures("always_calibrate")
@pytest.mark.parametrize(
    "options",
    [{}, {"drilldown": 0.2}, {"drilldown": 0.3, "drilldown_factor": 2}, {"target_ssim": 0.9}],
)
def test_later_calls_check_windows_their_first_pass_computes(options, monkeypatch):
    """Later calls run the clean input and the checked windows, two forwards of
    the first call's shapes; the checked windows are chosen among those the
    call computes first (drill-down's lattice, the calibration's sample), so no
    third forward runs for the check. Six windows are checked, as on CUDA."""
    monkeypatch.setattr(self_check, "MIN_CHECK_WINDOWS", self_check.MAX_CHECK_WINDOWS)
    model = models.small_cnn()
    forwards: list[int] = []

    def record(module, args):
        if isinstance(args[0].shape[0], int):  # not while the capture traces it
            forwards.append(args[0].shape[0])

    model.register_forward_pre_hook(record)
    occlusion = IncrementalOcclusion(model)
    inputs = torch.randn(1, 3, 24, 24)
    kwargs = dict(sliding_window_shapes=(3, 4, 4), strides=1, target=0, **options)
    occlusion.attribute(inputs, **kwargs)
    forwards.clear()
    occlusion.attribute(inputs, **kwargs)
    report = occlusion.last_run.self_check
    assert report is not None and len(report.windows) == self_check.MAX_CHECK_WINDOWS
    assert sorted(forwards) == [1, len(report.windows)]
    assert occlusion.last_run.windows_computed < 441 or not options


class Cancelling(nn.Module):
    """Two nearly equal large outputs subtracted: float32 rounding is a few percent
    of the result, and Captum's own results move that much with
    perturbations_per_eval."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(8, 2)
        with torch.no_grad():
            self.head.weight[0] = self.head.weight[0].abs() * 1e3
            self.head.weight[1] = self.head.weight[0] * (1 + 1e-5)
            self.head.bias.fill_(0.0)

    def forward(self, x):
        y = self.head(self.features(x))
        return y[:, :1] - y[:, 1:]


def test_ill_conditioned_float32_model_does_not_fall_back():
    """A fixed tolerance would call this model's rounding a mismatch; the measured
    one does not, and the report says the check was loose."""
    torch.manual_seed(0)
    model = Cancelling().eval()
    inputs = torch.randn(1, 3, 32, 32)
    expected = Occlusion(model).attribute(inputs, (3, 4, 4), strides=4, target=0)
    batched = Occlusion(model).attribute(
        inputs, (3, 4, 4), strides=4, target=0, perturbations_per_eval=16
    )
    captum_spread = (expected - batched).abs().max().item()
    assert captum_spread > 1e-3 * expected.abs().max().item()  # Captum disagrees with itself
    actual, fallbacks, occlusion = _run(
        model, inputs, sliding_window_shapes=(3, 4, 4), strides=4, target=0
    )
    assert fallbacks == [] and occlusion.last_run.engine == "incremental"
    report = occlusion.last_run.self_check
    assert report.loose and report.max_error <= report.tolerance
    assert (actual - expected).abs().max().item() <= 2 * captum_spread + report.tolerance


def test_check_windows_take_first_last_corners_and_centre():
    counts = (1, 5, 7)
    every = np.arange(35)
    chosen = check_window_ids(counts, every, 6).tolist()
    assert chosen[:2] == [0, 34]
    assert 6 in chosen and 28 in chosen  # the other two corners
    assert 17 in chosen  # the centre
    region = np.array([8, 9, 15, 16])
    assert set(check_window_ids(counts, region, 6).tolist()) <= set(region.tolist())


class ExtraArgumentsCNN(nn.Module):
    """A small CNN taking three additional arguments, each of a kind set per
    instance: a per-example mask, a broadcast bias, a shared matrix over the last
    dim, a 0-dim tensor, a Python float or a Python flag."""

    def __init__(self, kinds: tuple[str, str, str]):
        super().__init__()
        self.kinds = kinds
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def _apply(self, kind, x, value):
        if kind == "per_example":
            return x * value
        if kind == "bias":
            return x + value
        if kind == "matrix":
            return x @ value
        if kind in ("scalar_tensor", "float"):
            return x * value
        return -x if value else x

    def forward(self, x, a, b, c):
        for kind, value in zip(self.kinds, (a, b, c)):
            x = self._apply(kind, x, value)
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


KINDS = ("per_example", "bias", "matrix", "scalar_tensor", "float", "flag")


def _argument(kind, examples, generator):
    if kind == "per_example":
        return torch.rand(examples, 2, 6, 6, generator=generator)
    if kind == "bias":
        return torch.randn(1, 2, 1, 1, generator=generator)
    if kind == "matrix":
        return torch.randn(6, 6, generator=generator)
    if kind == "scalar_tensor":
        return torch.tensor(1.5)
    if kind == "float":
        return 0.5
    return True


@pytest.mark.parametrize("seed", range(16))
def test_fuzzed_additional_argument_forms_give_captums_numbers(seed):
    """Random kinds, batch sizes and perturbations_per_eval: always Captum's numbers;
    Captum's path only where the forms call for it."""
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(KINDS), (3,), generator=generator).tolist()
    kinds = tuple(KINDS[i] for i in pick)
    examples = int(torch.randint(1, 4, (), generator=generator))
    ppe = (1, 4)[seed % 2]
    torch.manual_seed(seed)
    model = ExtraArgumentsCNN(kinds).eval()
    inputs = torch.randn(examples, 2, 6, 6, generator=generator)
    extra = tuple(_argument(kind, examples, generator) for kind in kinds)
    kwargs = dict(strides=2, target=1, additional_forward_args=extra, perturbations_per_eval=ppe)
    try:
        expected = Occlusion(model).attribute(inputs, (2, 2, 2), **kwargs)
    except RuntimeError as error:  # Captum repeats shared tensors too: some forms fail
        with pytest.raises(type(error)):
            _run(model, inputs, sliding_window_shapes=(2, 2, 2), **kwargs)
        assert ppe > 1
        return
    actual, fallbacks, _ = _run(model, inputs, sliding_window_shapes=(2, 2, 2), **kwargs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    rows = {"bias": 1, "matrix": 6}  # first dims: a tensor with `examples` rows is per example
    shared = [k for k in kinds if k in rows and rows[k] != examples]
    looks_per_example = "matrix" in kinds and examples == 6
    if fallbacks:
        assert (ppe > 1 and shared) or looks_per_example, (kinds, examples, ppe, fallbacks)
    else:
        assert not (ppe > 1 and shared), (kinds, examples, ppe)


def test_fallback_warning_points_at_the_callers_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        IncrementalOcclusion(ShiftedByBatchMin()).attribute(torch.randn(1, 1, 3), (1, 1), target=0)
        for _ in IncrementalOcclusion(ShiftedByBatchMin()).attribute_stream(
            torch.randn(1, 1, 3), (1, 1), target=0
        ):
            pass
    fallbacks = [w for w in caught if issubclass(w.category, FallbackWarning)]
    assert len(fallbacks) == 2
    assert all(w.filename == __file__ for w in fallbacks), [w.filename for w in fallbacks]


class _BatchSizeBranch(torch.nn.Module):
    """Output that depends on the batch size (a branch on x.shape[0])."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x):
        out = self.fc(torch.relu(self.conv(x)).mean((2, 3)))
        return out * (2.0 if x.shape[0] > 3 else 1.0)


@pytest.mark.parametrize("examples, perturbations_per_eval", [(1, 4), (2, 2), (3, 4), (2, 1)])
def test_a_branch_on_the_batch_size_gets_captums_numbers(examples, perturbations_per_eval):
    """Captum's clean forward and its window batches differ in size at
    perturbations_per_eval > 1; a model whose Python branches on the batch size
    then runs on Captum's path. At 1 the engine keeps its batches in the captured
    range and equals Captum."""
    model = _BatchSizeBranch().double().eval()
    x = torch.randn(examples, 3, 12, 12, dtype=torch.float64)
    args = dict(sliding_window_shapes=(3, 4, 4), strides=4, target=1)
    expected = Occlusion(model).attribute(x, perturbations_per_eval=perturbations_per_eval, **args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = IncrementalOcclusion(model).attribute(
            x, perturbations_per_eval=perturbations_per_eval, **args
        )
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    fell_back = any("branches on its batch size" in str(w.message) for w in caught)
    assert fell_back == (perturbations_per_eval > 1)


class _LargeBatchLimit(_BatchSizeBranch):
    """A limit far above any batch (as some torch versions infer for cuDNN ops)."""

    def forward(self, x):
        torch._check(x.shape[0] <= 65535)
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("perturbations_per_eval", [4, 64])
def test_a_batch_limit_no_batch_reaches_keeps_the_engine(perturbations_per_eval):
    """Only the batch sizes Captum runs matter: a capture that holds up to 65535
    rows covers every batch here, so the engine runs (no fallback) and equals Captum."""
    model = _LargeBatchLimit().double().eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    args = dict(sliding_window_shapes=(3, 4, 4), strides=2, target=1)
    expected = Occlusion(model).attribute(x, perturbations_per_eval=perturbations_per_eval, **args)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        occlusion = IncrementalOcclusion(model)
        actual = occlusion.attribute(x, perturbations_per_eval=perturbations_per_eval, **args)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    assert occlusion.last_run.engine == "incremental"


def test_an_integer_output_runs_on_captums_path():
    """A thresholded prediction (long output): Captum returns a float map."""

    class Thresholded(_BatchSizeBranch):
        def forward(self, x):
            return (self.fc(self.conv(x).mean((2, 3))) > 0).long()

    model = Thresholded().eval()
    x = torch.randn(2, 3, 12, 12)
    args = dict(sliding_window_shapes=(3, 4, 4), strides=4, target=1)
    expected = Occlusion(model).attribute(x, **args)
    with pytest.warns(FallbackWarning, match="not floating point"):
        actual = IncrementalOcclusion(model).attribute(x, **args)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
