"""CUDA graphs kept with the plan, fuzzed across calls (engine/graphs.py).

Graphs replayed by a later call read the plan's private copy of the clean run,
loaded with that call's clean values, input and baseline. Here, on the CPU in
float64, graphs are stood in for by `_GraphOnCpu`, stricter than
test_graph_state's eager stand-in: what a capture fixes (the additional
arguments' values, the batch's layout choice) is fixed at capture, and every
replay writes one static output buffer. Each test runs several calls in a row on
one IncrementalOcclusion with inputs, baselines, targets, shapes and arguments
changing, and compares every call with Captum's Occlusion (approximate modes:
with the same calls on a twin instance that never uses graphs); each asserts
that graphs were replayed, and that later calls loaded their values into a
state an earlier call made.
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from captum.attr import Occlusion
from torch import nn

from captum_krypton import FallbackWarning, IncrementalOcclusion
from captum_krypton.engine import graphs
from captum_krypton.engine.executor import BatchRun
from captum_krypton.engine.occlusion import PreparedOcclusion
from captum_krypton.kernels import triton_importable
from tests.conftest import FP64_TOLERANCE, assert_close_to_captum, emulate_cuda_graphs

#: Approximate calls with graphs against the same calls without: equal to this
#: (relative to the map's scale).
APPROXIMATE_TOLERANCE = 1e-12


# ------------------------------------------------------------------ stand-ins
class _GraphOnCpu:
    """A captured window batch on the CPU: a replay evaluates the plan's private
    state afresh (copies of clean values made anew, as a graph makes them), with
    what a capture fixes taken at capture, into one static output buffer."""

    replays: list[int] = []
    plans: list = []

    def __init__(self, state: PreparedOcclusion, size: int):
        self.state, self.size = state, size
        # A graph bakes the additional arguments' values (Python scalars as kernel
        # arguments, tensors by address) and the layout chosen at capture.
        self.extra = dict(state.captured.placeholder_values)
        self.full_channels_last = bool(state.plan.full_channels_last)
        self.output: torch.Tensor | None = None

    def run(self, ids: torch.Tensor) -> torch.Tensor:
        assert len(ids) == self.size
        _GraphOnCpu.replays.append(self.size)
        _GraphOnCpu.plans.append(self.state.plan)
        state = self.state
        state.views.forget_copies()
        with torch.no_grad():
            out = BatchRun(
                state.plan,
                state.views,
                ids.clone(),
                state.input_tiles,
                self.extra,
                state.use_triton,
                self.full_channels_last,
            ).run()
        if self.output is None:
            self.output = torch.empty_like(out)
        self.output.copy_(out)  # every replay overwrites the same buffer
        return self.output


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    """CUDA graphs as on CUDA, with `_GraphOnCpu` for capture and replay; returns
    the record: replays (batch sizes), their plans, and loads (whether a call's
    values went into a state made by an earlier call)."""
    _GraphOnCpu.replays, _GraphOnCpu.plans = [], []
    loads: list[bool] = []
    emulate_cuda_graphs(monkeypatch, _GraphOnCpu)
    load = graphs.GraphState.load

    def recorded_load(self, prepared):
        loaded = load(self, prepared)
        loads.append(loaded)
        return loaded

    monkeypatch.setattr(graphs.GraphState, "load", recorded_load)
    return {"replays": _GraphOnCpu.replays, "plans": _GraphOnCpu.plans, "loads": loads}


# ------------------------------------------------------------------ models
def _randomized(model: nn.Module, seed: int = 1) -> nn.Module:
    """Float64, eval mode, BatchNorm's running stats and affine parameters random."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.2)
    return model.double().eval()


class UNetish(nn.Module):
    """Conv-BN-ReLU, max-pool, conv-BN, bilinear upsample, concatenation with the
    skip, a channels-last LayerNorm (ConvNeXt's), a strided branch upsampled
    (nearest) and added, global pool, linear."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.norm = nn.LayerNorm(12)
        self.conv3 = nn.Conv2d(12, 8, 3, padding=1)
        self.down = nn.Conv2d(12, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(self.pool(skip))))
        y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        y = torch.cat([skip, y], 1)
        y = self.norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        z = F.interpolate(torch.relu(self.down(y)), scale_factor=2, mode="nearest")
        y = torch.relu(self.conv3(y)) + z
        return self.fc(y.mean((2, 3)))


class NetNd(nn.Module):
    """Conv-BN-ReLU, max-pool, conv, (an upsample added back), pool, linear, over
    `dims` spatial dimensions."""

    def __init__(self, dims: int, channels: int, width: int, upsample: str | None = None):
        super().__init__()
        conv, norm, pool = {
            1: (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d),
            3: (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d),
        }[dims]
        self.upsample = upsample
        self.conv1 = conv(channels, width, 5 if upsample else 3, padding=2 if upsample else 1)
        self.bn1 = norm(width)
        self.pool = pool(2)
        self.conv2 = conv(width, width, 3, padding=1)
        self.fc = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.conv2(self.pool(x)))
        if self.upsample is None:
            x = y
        else:
            x = x + F.interpolate(y, scale_factor=2, mode=self.upsample, align_corners=False)
        return self.fc(x.flatten(2).mean(2))


def Net1d() -> nn.Module:
    """Conv1d-BN-ReLU, max-pool, conv, linear upsample, residual add, pool, linear."""
    return NetNd(1, 4, 8, upsample="linear")


def Net3d() -> nn.Module:
    """Conv3d-BN-ReLU, max-pool, conv, pool, linear."""
    return NetNd(3, 2, 4)


class SENet(nn.Module):
    """Conv-BN, squeeze-excitation, strided conv, squeeze-excitation, conv, pool,
    linear: global statistics that freeze_global_context takes from the clean run."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.se1a, self.se1b = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.se2a, self.se2b = nn.Conv2d(12, 4, 1), nn.Conv2d(4, 12, 1)
        self.conv3 = nn.Conv2d(12, 12, 3, padding=1)
        self.fc = nn.Linear(12, classes)

    @staticmethod
    def _se(x: torch.Tensor, a: nn.Module, b: nn.Module) -> torch.Tensor:
        return x * torch.sigmoid(b(torch.relu(a(x.mean((2, 3), keepdim=True)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._se(torch.relu(self.bn1(self.conv1(x))), self.se1a, self.se1b)
        x = self._se(torch.relu(self.conv2(x)), self.se2a, self.se2b)
        return self.fc(torch.relu(self.conv3(x)).mean((2, 3)))


class ExtraArgsNet(UNetish):
    """UNetish with additional forward arguments: a scale (a float, or a tensor
    with one value per example) and a float added to the input."""

    def forward(self, x, scale, shift=0.0):
        out = super().forward(x + shift)
        if isinstance(scale, torch.Tensor):
            return out * scale[:, None]
        return out * scale


class SignOfZeroNet(nn.Module):
    """Tells the zeros apart: sigmoid(1 / x) is 1 at +0.0 and 0 at -0.0."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.sigmoid(x.reciprocal())
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


# ------------------------------------------------------------------ helpers
def _captum(model, x, **kwargs):
    return Occlusion(model).attribute(x, perturbations_per_eval=64, **kwargs)


def _ours(occlusion: IncrementalOcclusion, x, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        return occlusion.attribute(x, **kwargs)


def _scale(model, x, extra=()) -> float:
    with torch.no_grad():
        return model(x, *extra).abs().max().item()


#: Keyword extras of IncrementalOcclusion.attribute that Captum's does not take.
OURS_ONLY = ("cuda_graphs", "windows_per_batch", "kernels", "self_check")


def _check_against_captum(model, occlusion, x, record, **kwargs) -> int:
    """One call against Captum's; returns how many batches it replayed."""
    before = len(record["replays"])
    extra = kwargs.get("additional_forward_args") or ()
    expected = _captum(
        model,
        x,
        **{k: v for k, v in kwargs.items() if k not in OURS_ONLY},
    )
    actual = _ours(occlusion, x, **kwargs)
    assert occlusion.last_run.engine == "incremental"
    assert_close_to_captum(expected, actual, _scale(model, x, extra), FP64_TOLERANCE)
    return len(record["replays"]) - before


def _graphs_setting(mode, step: int) -> bool | None:
    """cuda_graphs for call `step`: the mode's, or None and True by turns."""
    if mode == "by turns":
        return None if step % 2 == 0 else True
    return mode


# ------------------------------------------------------------------ exact calls
# (model, input shape without batch, another one, window, strides, windows per batch):
# at least two full batches per call, so that cuda_graphs=None replays on a new plan
EXACT_CASES = {
    "2d": (UNetish, (3, 24, 24), (3, 24, 16), (3, 4, 4), (3, 4, 4), 12),
    "1d": (Net1d, (4, 48), (4, 44), (4, 6), (4, 3), 4),
    "3d": (Net3d, (2, 8, 8, 8), (2, 8, 8, 4), (2, 2, 2, 2), (2, 2, 2, 2), 16),
}


@pytest.mark.parametrize(
    "name, mode", [("2d", None), ("2d", True), ("1d", None), ("1d", True), ("3d", "by turns")]
)
def test_calls_in_a_row_replaying_kept_graphs_equal_captum(
    name, mode, graphs_on_cpu, prepared_calls
):
    cls, shape, other, window, strides, per_batch = EXACT_CASES[name]
    model = _randomized(cls())
    occlusion = IncrementalOcclusion(model)
    g = torch.Generator().manual_seed(7)

    def rand(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64)

    n = 3
    x = rand(n, *shape)
    per_example = rand(n, *shape)
    calls = [
        (None, 0.0, 1),
        ("in place", 0.0, [2, 0, 1]),  # the same tensor objects, new values
        (None, per_example, 0),
        ("in place", per_example, [1, 1, 0]),
        ("other shape", 0.0, 1),  # another plan in between
        ("half batches", 0.0, 2),  # new graphs on a state this call loaded
        (None, rand(1, *shape), 2),  # broadcast over the examples
        (None, rand(1, *shape), [0, 1, 2]),
        (None, 1, [0, 2, 2]),  # an int scalar
        (None, 0.0, 1),  # 0.0's graphs were dropped (two baselines kept): made anew
    ]
    replays = []
    for step, (what, baseline, target) in enumerate(calls):
        inputs = x
        if what == "other shape":
            inputs = rand(n, *other)
        elif what == "in place":
            with torch.no_grad():
                x.copy_(rand(n, *shape))
                per_example.copy_(rand(n, *shape))
        elif step:
            inputs = x = rand(n, *shape)
        replays.append(
            _check_against_captum(
                model,
                occlusion,
                inputs,
                graphs_on_cpu,
                sliding_window_shapes=window,
                strides=strides,
                baselines=baseline,
                target=target,
                cuda_graphs=_graphs_setting(mode, step),
                windows_per_batch=per_batch // 2 if what == "half batches" else per_batch,
                self_check=step % 3 != 1,  # without it, a stale read is silent
            )
        )
    # boxes read the clean run
    assert not any(p.plan.rerun_whole_model for p in prepared_calls)
    # every call replayed graphs; four of them into a state another call had made
    assert all(replays), replays
    assert graphs_on_cpu["loads"] == [True] * 4


def test_whole_model_plans_with_a_float_argument_and_inputs_that_require_grad(
    graphs_on_cpu, prepared_calls
):
    """Plain re-inference batches (the plan saves too little) run the module itself
    on the private copy; inputs requiring grad come and go."""
    model = _randomized(ExtraArgsNet())
    occlusion = IncrementalOcclusion(model)
    args = dict(sliding_window_shapes=(3, 4, 4), strides=3, windows_per_batch=6)
    replays = []
    for step, (requires_grad, scale, baseline) in enumerate(
        [(True, 2.0, 0.0), (False, 2.0, 0.0), (True, 2.0, 0.5), (False, 3.0, 0.5), (True, 2.0, 0.5)]
    ):
        x = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=requires_grad)
        replays.append(
            _check_against_captum(
                model,
                occlusion,
                x,
                graphs_on_cpu,
                additional_forward_args=(scale,),
                baselines=baseline,
                target=[0, 3],
                cuda_graphs=_graphs_setting("by turns", step),
                **args,
            )
        )
    assert all(p.plan.rerun_whole_model for p in prepared_calls)
    assert all(replays) and graphs_on_cpu["loads"] == [True] * 2


@pytest.mark.skipif(not triton_importable(), reason="needs triton")
def test_calls_with_the_triton_kernels_that_graphs_run_on_cuda(graphs_on_cpu, prepared_calls):
    """On CUDA graphs come only with the Triton kernels, whose batches read the
    clean values differently (unpadded channels-last copies, implicit-GEMM convs);
    here under Triton's interpreter."""
    model = _randomized(UNetish())
    occlusion = IncrementalOcclusion(model)
    args = dict(sliding_window_shapes=(3, 4, 4), strides=4, windows_per_batch=18, kernels="triton")
    replays = []
    for step, target in enumerate([[1, 2], 0]):
        x = torch.randn(2, 3, 24, 24, dtype=torch.float64)
        baseline = torch.rand(2, 3, 24, 24, dtype=torch.float64)
        replays.append(
            _check_against_captum(
                model,
                occlusion,
                x,
                graphs_on_cpu,
                baselines=baseline,
                target=target,
                cuda_graphs=_graphs_setting("by turns", step + 1),
                **args,
            )
        )
    assert all(p.use_triton and not p.plan.rerun_whole_model for p in prepared_calls)
    assert all(replays) and graphs_on_cpu["loads"] == [True]


# ------------------------------------------------------------------ additional arguments
def test_float_arguments_changing_between_calls(graphs_on_cpu, prepared_calls):
    """Python scalar arguments are part of the trace (a new value: a new capture and
    plan); calls coming back to earlier values replay that plan's graphs."""
    model = _randomized(ExtraArgsNet())
    occlusion = IncrementalOcclusion(model)
    args = dict(sliding_window_shapes=(3, 4, 4), strides=4, windows_per_batch=12)
    replays = []
    arguments = [(2.0, 0.0), (3.0, 0.0), (2.0, 0.0), (2.0, 0.25), (3.0, 0.0), (2.0, 0.25)]
    for step, extra in enumerate(arguments):
        x = torch.randn(3, 3, 24, 24, dtype=torch.float64)
        replays.append(
            _check_against_captum(
                model,
                occlusion,
                x,
                graphs_on_cpu,
                additional_forward_args=extra,
                target=[0, 1, 3],
                baselines=0.25,
                cuda_graphs=_graphs_setting("by turns", step),
                **args,
            )
        )
    assert not any(p.plan.rerun_whole_model for p in prepared_calls)
    assert all(replays) and graphs_on_cpu["loads"] == [True] * 3


def test_tensor_arguments_get_graphs_of_one_call(graphs_on_cpu, prepared_calls):
    """A graph would read a tensor argument's address: graphs last the call
    (cuda_graphs=True) or are not made (None), whatever the tensor."""
    model = _randomized(ExtraArgsNet())
    occlusion = IncrementalOcclusion(model)
    args = dict(sliding_window_shapes=(3, 4, 4), strides=4, windows_per_batch=12)
    scale = torch.rand(3, dtype=torch.float64) + 0.5
    replays = []
    for step, cuda_graphs in enumerate([True, True, True, None, True, True]):
        if step == 1:  # the same tensor, new values in place
            with torch.no_grad():
                scale.copy_(torch.rand(3, dtype=torch.float64) + 0.5)
        elif step == 4:  # a new tensor with the same values
            scale = scale.clone()
        elif step == 5:
            scale = torch.rand(3, dtype=torch.float64) + 0.5
        x = torch.randn(3, 3, 24, 24, dtype=torch.float64)
        replays.append(
            _check_against_captum(
                model,
                occlusion,
                x,
                graphs_on_cpu,
                additional_forward_args=(scale, 0.5),
                target=[3, 1, 0],
                cuda_graphs=cuda_graphs,
                **args,
            )
        )
    assert replays[3] == 0 and all(r for step, r in enumerate(replays) if step != 3)
    assert not graphs_on_cpu["loads"]  # each call's graphs read its own state
    assert not any(p.plan.cuda_graphs for p in prepared_calls)  # none kept


# ------------------------------------------------------------------ approximate calls
# (model, input shape without batch, window, strides, options, windows per batch)
APPROXIMATE_CASES = {
    "frozen context": (SENet, (3, 16, 16), (3, 4, 4), 3, dict(freeze_global_context=True), 4),
    "tau": (UNetish, (3, 24, 24), (3, 4, 4), 4, dict(tau=0.5), 6),
    "drilldown": (UNetish, (3, 24, 24), (3, 4, 4), 4, dict(drilldown=0.25, drilldown_factor=2), 4),
    "target_ssim": (SENet, (3, 20, 20), (3, 4, 4), 2, dict(target_ssim=0.9), 4),
}


@pytest.mark.usefixtures("always_calibrate")  # the same arm in both
@pytest.mark.parametrize("name", list(APPROXIMATE_CASES))
def test_approximate_calls_in_a_row_equal_the_same_calls_without_graphs(
    name, graphs_on_cpu, prepared_calls
):
    """Against a twin instance that never uses graphs, given the same calls (the
    same plans and calibrations, computed eagerly)."""
    cls, shape, window, strides, options, per_batch = APPROXIMATE_CASES[name]
    model = _randomized(cls())
    occlusion, without_graphs = IncrementalOcclusion(model), IncrementalOcclusion(model)
    args = dict(sliding_window_shapes=window, strides=strides, windows_per_batch=per_batch)
    g = torch.Generator().manual_seed(3)
    calls = [
        (0.0, 1),
        (0.0, [0, 2, 3]),
        (torch.rand(3, *shape, generator=g, dtype=torch.float64), 2),
        (0.0, 3),
    ]
    replays = []
    for step, (baseline, target) in enumerate(calls):
        x = torch.randn(3, *shape, generator=g, dtype=torch.float64)
        before = len(graphs_on_cpu["replays"])
        actual = _ours(
            occlusion,
            x,
            baselines=baseline,
            target=target,
            cuda_graphs=_graphs_setting("by turns", step),
            **args,
            **options,
        )
        replays.append(len(graphs_on_cpu["replays"]) - before)
        report = occlusion.last_run
        assert report.engine == "incremental"
        # target_ssim may settle on exact occlusion; its calibration runs approximate plans
        assert (
            report.calibration is not None
            if "target_ssim" in options
            else not report.approximation.exact
        )
        expected = _ours(
            without_graphs, x, baselines=baseline, target=target, cuda_graphs=False, **args,
            **options,
        )  # fmt: skip
        assert without_graphs.last_run.approximation == report.approximation
        scale = max(expected.abs().max().item(), _scale(model, x))
        torch.testing.assert_close(actual, expected, rtol=0, atol=APPROXIMATE_TOLERANCE * scale)
    assert not any(p.plan.rerun_whole_model for p in prepared_calls)
    assert all(replays[1:]), replays
    assert graphs_on_cpu["loads"] and all(graphs_on_cpu["loads"])
    if name == "drilldown":
        assert report.windows_computed < report.windows_total
    else:  # graphs of approximate plans replayed
        assert any(not plan.exact for plan in graphs_on_cpu["plans"])


# ------------------------------------------------------------------ streams
STREAM_ARGS = dict(sliding_window_shapes=(3, 4, 4), strides=4, windows_per_batch=6)


def _stream_input() -> torch.Tensor:
    return torch.randn(2, 3, 24, 24, dtype=torch.float64)


def test_a_stream_cancelled_or_closed_midway_leaves_the_graphs_to_the_next_call(
    graphs_on_cpu,
):
    model = _randomized(UNetish())
    occlusion = IncrementalOcclusion(model)
    args = dict(target=1, cuda_graphs=True, **STREAM_ARGS)
    assert _check_against_captum(model, occlusion, _stream_input(), graphs_on_cpu, **args)
    cancel = threading.Event()
    reports = []
    for report in occlusion.attribute_stream(_stream_input(), cancel=cancel, **args):
        reports.append(report)
        if len(reports) == 2:
            cancel.set()
    assert not reports[-1].complete and occlusion.last_run.cancelled
    before = len(graphs_on_cpu["loads"])
    assert _check_against_captum(model, occlusion, _stream_input(), graphs_on_cpu, **args)
    assert graphs_on_cpu["loads"][before:] == [True]  # its own values went in

    stream = occlusion.attribute_stream(_stream_input(), **args)
    next(stream)
    stream.close()
    before = len(graphs_on_cpu["loads"])
    assert _check_against_captum(model, occlusion, _stream_input(), graphs_on_cpu, **args)
    assert graphs_on_cpu["loads"][before:] == [True]


def test_calls_while_a_stream_is_paused_midway_then_the_stream(graphs_on_cpu):
    """A paused stream holds its plan's graphs: a call with the same plan and
    baseline runs eagerly meanwhile; calls with other baselines replay graphs of
    their own, and push the stream's out of the plan's table (two baselines
    kept), so that a call with its baseline makes new ones; the stream then
    finishes with its own values."""
    model = _randomized(UNetish())
    occlusion = IncrementalOcclusion(model)
    args = dict(cuda_graphs=True, **STREAM_ARGS)
    _check_against_captum(model, occlusion, _stream_input(), graphs_on_cpu, target=0, **args)
    paused = _stream_input()
    stream = occlusion.attribute_stream(paused, target=[1, 2], **args)
    before = len(graphs_on_cpu["replays"])
    next(stream), next(stream)
    assert len(graphs_on_cpu["replays"]) > before
    assert not _check_against_captum(model, occlusion, _stream_input(), graphs_on_cpu, **args)
    # (baselines=None is the int 0, the stream's; 0 makes new graphs for it)
    for baseline in (torch.rand(2, 3, 24, 24, dtype=torch.float64), 1, 0):
        assert _check_against_captum(
            model, occlusion, _stream_input(), graphs_on_cpu, target=1, baselines=baseline, **args
        )
    *_, final = stream
    assert final.complete
    expected = _captum(model, paused, sliding_window_shapes=(3, 4, 4), strides=4, target=[1, 2])
    assert_close_to_captum(expected, final.attribution, _scale(model, paused), FP64_TOLERANCE)
    assert _check_against_captum(model, occlusion, _stream_input(), graphs_on_cpu, target=2, **args)
    assert graphs_on_cpu["loads"] == [True] * 2  # the stream's, the last call's


# ------------------------------------------------------------------ scalar baselines
def test_a_negative_zero_baseline_does_not_replay_graphs_made_for_zero(graphs_on_cpu):
    """0.0 and -0.0 are equal Python floats, but a graph bakes the scalar in:
    Captum's input * 0 + baseline is -0.0 at negative inputs for the one and +0.0
    for the other, which a model reading the sign of zero tells apart. So the
    graphs are keyed by the scalar's repr, and -0.0 gets graphs of its own."""
    torch.manual_seed(0)
    model = SignOfZeroNet().double().eval()
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64) + 0.5
    x[:, :, 6:10, 2:6] *= -1  # negative away from the windows the self-check runs
    occlusion = IncrementalOcclusion(model)
    args = dict(sliding_window_shapes=(3, 4, 4), strides=2, target=0, windows_per_batch=8)
    for baseline in (0.0, -0.0):
        assert _check_against_captum(
            model, occlusion, x, graphs_on_cpu, baselines=baseline, cuda_graphs=True, **args
        )
