"""CUDA graphs kept across calls read a private copy of the clean run
(engine/graphs.py); every call copies its own clean values, input and baseline
into it. If that copy missed anything a window batch reads, a later call would
silently get an earlier call's numbers.

Here on the CPU, in float64: the private copy, loaded with another call's values,
gives that call's batch outputs bit for bit, on architectures whose batches read
clean values in different ways (halo reads, channels-last copies, concatenation,
squeeze-excitation, frozen global context); and whole calls whose "replays" run
the captured state eagerly (copies made afresh, as a graph makes them) equal
Captum's Occlusion call after call, with inputs and baselines changing.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from captum.attr import Occlusion
from torch import nn

from captum_krypton import FallbackWarning, IncrementalOcclusion
from captum_krypton.engine import graphs
from captum_krypton.engine.occlusion import PreparedOcclusion
from captum_krypton.engine.windows import WindowGrid
from tests import models
from tests.conftest import FP64_TOLERANCE, assert_close_to_captum, emulate_cuda_graphs

torchvision = pytest.importorskip("torchvision")


def _randomized(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model.double().eval()


def _model(name: str) -> nn.Module:
    if name == "small_cnn":
        return models.small_cnn(models.SmallCNN).double().eval()
    return _randomized(getattr(torchvision.models, name)(weights=None, num_classes=7))


@pytest.mark.parametrize(
    "name, options",
    [
        ("small_cnn", {}),
        ("resnet18", {}),
        ("densenet121", {}),
        ("mobilenet_v3_small", {}),
        ("mobilenet_v3_small", {"freeze_global_context": True}),
    ],
)
def test_the_private_copy_loaded_with_a_call_gives_its_batches(name, options, prepared_calls):
    model = _model(name)
    if name == "small_cnn":
        size, args = 16, dict(sliding_window_shapes=(3, 4, 4), strides=3)
    else:
        size, args = 64, dict(sliding_window_shapes=(3, 8, 8), strides=8)
    first, second = torch.randn(2, 2, 3, size, size, dtype=torch.float64)
    occlusion = IncrementalOcclusion(model)
    args.update(target=1, **options)
    occlusion.attribute(first, baselines=0.5, **args)
    in_first = len(prepared_calls)
    occlusion.attribute(second, baselines=0.5, **args)
    a = prepared_calls[0]
    # the second call's run with the same plan (approximate calls also run the
    # self-check's windows exactly)
    b = next(p for p in prepared_calls[in_first:] if p.plan is a.plan)
    assert a.plan.approximation.exact != bool(options)
    # boxes read the clean run (mobilenet_v3's exact plan re-runs the whole model:
    # after squeeze-excitation no box is left)
    assert a.plan.rerun_whole_model == (name == "mobilenet_v3_small" and not options)
    ids = torch.arange(min(12, a.grid.num_windows))
    with torch.no_grad():
        state = graphs.GraphState(a)
        torch.testing.assert_close(
            state.prepared.run_window_ids(ids), a.run_window_ids(ids), rtol=0, atol=0
        )
        before = {n: v.clone() for n, v in a.views.env.items() if isinstance(v, torch.Tensor)}
        assert state.load(b)
        state.prepared.views.forget_copies()  # a graph makes its copies on every replay
        torch.testing.assert_close(
            state.prepared.run_window_ids(ids), b.run_window_ids(ids), rtol=0, atol=0
        )
    for node, value in before.items():  # the calls' own tensors are left alone
        assert torch.equal(a.views.env[node], value)


def test_a_tensor_baseline_is_copied_in_and_a_new_shape_refused(prepared_calls):
    model = _model("small_cnn")
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    occlusion = IncrementalOcclusion(model)
    args = dict(sliding_window_shapes=(3, 4, 4), strides=3, target=0)
    occlusion.attribute(x, baselines=torch.zeros(2, 3, 16, 16, dtype=torch.float64), **args)
    occlusion.attribute(x, baselines=torch.rand(2, 3, 16, 16, dtype=torch.float64), **args)
    occlusion.attribute(x, baselines=torch.rand(1, 3, 16, 16, dtype=torch.float64), **args)
    a, b, other_shape = prepared_calls
    ids = torch.arange(10)
    with torch.no_grad():
        state = graphs.GraphState(a)
        assert state.load(b)
        state.prepared.views.forget_copies()
        torch.testing.assert_close(
            state.prepared.run_window_ids(ids), b.run_window_ids(ids), rtol=0, atol=0
        )
    assert not state.load(other_shape)


class _EagerReplay:
    """Stands in for a captured graph on the CPU: a replay evaluates the captured
    state's batch afresh, reading what a graph reads (the private copy, and copies
    of it made during the replay)."""

    replays: list[int] = []

    def __init__(self, state: PreparedOcclusion, size: int):
        self.state, self.size = state, size

    def run(self, ids: torch.Tensor) -> torch.Tensor:
        assert len(ids) == self.size
        _EagerReplay.replays.append(self.size)
        self.state.views.forget_copies()
        with torch.no_grad():
            return self.state.batch_run(ids).run()


@pytest.fixture
def replayed_on_cpu(monkeypatch):
    """Graphs as on CUDA, with `_EagerReplay` for capture and replay."""
    _EagerReplay.replays = []
    emulate_cuda_graphs(monkeypatch, _EagerReplay)
    return _EagerReplay.replays


@pytest.mark.parametrize("cuda_graphs", [None, True])
def test_calls_that_replay_kept_graphs_equal_captum(cuda_graphs, replayed_on_cpu, prepared_calls):
    model = _model("resnet18")
    occlusion = IncrementalOcclusion(model)
    args = dict(sliding_window_shapes=(3, 8, 8), strides=8)
    calls = [
        (torch.randn(2, 3, 64, 64), 0.0, [1, 2]),
        (torch.randn(2, 3, 64, 64), 0.0, [3, 1]),
        (torch.randn(2, 3, 64, 64), 0.25, [0, 0]),  # a new scalar: graphs of its own
        (torch.randn(2, 3, 64, 64), torch.rand(2, 3, 64, 64), [4, 2]),
        (torch.randn(2, 3, 64, 64), torch.rand(2, 3, 64, 64), [1, 6]),
        (torch.randn(2, 3, 64, 64), 0.0, [5, 5]),
    ]
    replays_per_call = []
    for x, baseline, target in calls:
        x = x.double()
        if isinstance(baseline, torch.Tensor):
            baseline = baseline.double()
        before = len(replayed_on_cpu)
        expected = Occlusion(model).attribute(x, baselines=baseline, target=target, **args)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FallbackWarning)
            actual = occlusion.attribute(
                x,
                baselines=baseline,
                target=target,
                cuda_graphs=cuda_graphs,
                windows_per_batch=10,
                **args,
            )
        with torch.no_grad():
            scale = model(x).abs().max().item()
        assert_close_to_captum(expected, actual, scale, FP64_TOLERANCE)
        replays_per_call.append(len(replayed_on_cpu) - before)
    assert not any(p.plan.rerun_whole_model for p in prepared_calls)  # boxes read the clean run
    windows = WindowGrid((3, 64, 64), (3, 8, 8), (8, 8, 8)).num_windows
    full, partial = divmod(windows, 10)
    batches = full + (partial > 0)
    if cuda_graphs:  # captured at the first batch of each size
        assert replays_per_call == [batches] * len(calls)
    else:
        # a size is captured the second time it runs: on a plan's first call, the
        # full batches after the first; a new baseline starts over (the plan keeps
        # graphs for two, so 0.0 is gone by the last call)
        fresh = full - 1
        assert replays_per_call == [fresh, batches, fresh, fresh, batches, fresh]


def test_numerics_settings_get_graphs_of_their_own(prepared_calls):
    """A capture fixes autocast and TF32; eager batches read them at run time."""
    model = _model("small_cnn")
    IncrementalOcclusion(model).attribute(
        torch.randn(1, 3, 16, 16, dtype=torch.float64), sliding_window_shapes=(3, 4, 4), target=0
    )
    prepared = prepared_calls[0]
    key = ("scalar", "int", 0)
    default = graphs.plan_graphs(prepared, (key, graphs.numerics_key()))
    assert graphs.plan_graphs(prepared, (key, graphs.numerics_key())) is default
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium" if precision != "medium" else "high")
        assert graphs.plan_graphs(prepared, (key, graphs.numerics_key())) is not default
    finally:
        torch.set_float32_matmul_precision(precision)


def test_a_replay_out_of_memory_drops_the_graphs_and_finishes_eagerly(
    replayed_on_cpu, prepared_calls, monkeypatch
):
    model = _model("resnet18")
    occlusion = IncrementalOcclusion(model)
    args = dict(sliding_window_shapes=(3, 8, 8), strides=8, target=2)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    occlusion.attribute(x, cuda_graphs=True, windows_per_batch=16, **args)
    plan = prepared_calls[-1].plan
    assert plan.cuda_graphs and replayed_on_cpu

    def out_of_memory(self, ids):
        raise torch.cuda.OutOfMemoryError("replay")

    monkeypatch.setattr(_EagerReplay, "run", out_of_memory)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    expected = Occlusion(model).attribute(x, **args)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        actual = occlusion.attribute(x, cuda_graphs=True, windows_per_batch=16, **args)
    with torch.no_grad():
        scale = model(x).abs().max().item()
    assert_close_to_captum(expected, actual, scale, FP64_TOLERANCE)
    assert not plan.cuda_graphs  # released; the next call captures afresh


def test_no_capture_while_a_kernel_compiles(replayed_on_cpu, monkeypatch):
    """A graph keeps the kernels it was captured with: while a Triton kernel
    compiles in the background, batches stay eager; once none does, the next
    batch is captured."""
    model = _model("small_cnn")
    occlusion = IncrementalOcclusion(model)
    args = dict(sliding_window_shapes=(3, 4, 4), strides=2, target=0, windows_per_batch=8)
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    monkeypatch.setattr(graphs, "choices_settled", lambda: False)
    for _ in range(2):
        occlusion.attribute(x, **args)
    assert replayed_on_cpu == []
    monkeypatch.setattr(graphs, "choices_settled", lambda: True)
    occlusion.attribute(x, **args)
    assert replayed_on_cpu


def test_cuda_graphs_true_warms_up_a_padded_batch_larger_than_the_grid(
    replayed_on_cpu, prepared_calls
):
    """On CUDA a partial batch is padded to a multiple of 64 windows, which can
    exceed the grid: the warm-up before the first capture must stay on the grid."""
    model = _model("small_cnn")
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    IncrementalOcclusion(model).attribute(x, sliding_window_shapes=(3, 4, 4), strides=3, target=0)
    prepared = prepared_calls[-1]
    assert prepared.grid.num_windows < 64
    with graphs.PlanGraphs().session(prepared, eager_warm_up=True) as session:
        assert session.batch(64) is not None
    assert replayed_on_cpu == []  # captured, not replayed yet


def test_only_the_last_used_plans_keep_graphs(replayed_on_cpu, prepared_calls, monkeypatch):
    """Graphs hold their batches' memory: calls on several input shapes keep them
    for the plans used last (graphs.MAX_GRAPHED_PLANS per device)."""
    monkeypatch.setattr(graphs, "MAX_GRAPHED_PLANS", 2)
    monkeypatch.setattr(graphs, "_graphed_plans", {})
    model = _model("small_cnn")
    occlusion = IncrementalOcclusion(model)
    args = dict(sliding_window_shapes=(3, 4, 4), strides=2, target=0, cuda_graphs=True)
    sizes = (12, 14, 16, 12)
    for size in sizes:
        occlusion.attribute(torch.randn(1, 3, size, size, dtype=torch.float64), **args)
    plans = {size: p.plan for size, p in zip(sizes, prepared_calls)}
    assert len({id(plan) for plan in plans.values()}) == 3
    graphed = {size for size, plan in plans.items() if plan.cuda_graphs}
    assert graphed == {12, 16}  # 14 was used before 16 and the second call on 12


@pytest.mark.parametrize("options", [{"drilldown": 0.3}, {"target_ssim": 0.9}])
def test_a_call_copies_its_clean_run_in_once_per_plan(options, replayed_on_cpu, monkeypatch):
    """A drill-down call runs several stages on one plan; the first copies the
    call's clean run into the graphs' private copy, the later ones find it there.
    The next call, with another input, copies its own: its maps equal those of a
    twin without graphs, bit for bit."""
    from captum_krypton.engine import graphs

    copies: list[int] = []
    load = graphs.GraphState.load

    def counting(self, prepared):
        version = self._inputs._version  # copy_ bumps it
        loaded = load(self, prepared)
        if self._inputs._version != version:
            copies.append(id(self))
        return loaded

    monkeypatch.setattr(graphs.GraphState, "load", counting)
    model = _model("resnet18")
    occlusion, twin = IncrementalOcclusion(model), IncrementalOcclusion(model)
    args = dict(sliding_window_shapes=(3, 8, 8), strides=4, target=1, windows_per_batch=16)
    torch.manual_seed(3)
    for call in range(4):
        x = torch.randn(1, 3, 48, 48, dtype=torch.float64)
        replays, copies[:] = len(replayed_on_cpu), []
        ours = occlusion.attribute(x, **args, **options)
        theirs = twin.attribute(x, cuda_graphs=False, **args, **options)
        assert torch.equal(ours, theirs)
        if call >= 2:  # graphs captured by now
            assert len(replayed_on_cpu) > replays
            assert len(copies) == len(set(copies))  # each private copy loaded once
