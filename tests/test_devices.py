"""Windows of one call shared across several devices: same result as one device."""

from __future__ import annotations

import sys
import threading
import types
from multiprocessing import Pipe

import numpy as np
import pytest
import torch
from captum.attr import Occlusion

from captum_krypton import IncrementalOcclusion
from captum_krypton.approx import calibrate
from captum_krypton.engine.call import CaptumArguments
from captum_krypton.engine.preparer import Preparer
from captum_krypton.engine.settings import EngineSettings
from captum_krypton.parallel import devices as device_threads
from captum_krypton.parallel import workers
from captum_krypton.parallel.workers import ShardJob
from captum_krypton.plan import EXACT, PlanApproximation
from tests import models
from tests.conftest import assert_close_to_captum

ARGS = dict(sliding_window_shapes=(3, 4, 4), strides=2)


def test_two_cpu_shards_equal_one_device_and_captum():
    model = models.small_cnn(models.ScaledCNN)
    torch.manual_seed(2)
    inputs = torch.randn(3, 3, 16, 16)
    scale = torch.tensor([0.5, 1.0, 2.0])
    args = dict(target=[0, 2, 4], additional_forward_args=(scale,), baselines=0.3, **ARGS)
    occlusion = IncrementalOcclusion(model)
    single = occlusion.attribute(inputs, windows_per_batch=10, **args)
    shared = occlusion.attribute(inputs, devices=["cpu", "cpu"], windows_per_batch=10, **args)
    torch.testing.assert_close(shared, single, rtol=0, atol=1e-6)
    assert occlusion.last_run.windows_computed == 49 and not occlusion.last_run.cancelled
    expected = Occlusion(model).attribute(inputs, perturbations_per_eval=8, **args)
    with torch.no_grad():
        output_scale = model(inputs, scale).abs().max()
    assert_close_to_captum(expected, shared, output_scale)


#: Per case: the options, and the thresholds its stages run with (the self-check's
#: windows run exactly where no stage does). tau 0.3 changes this model's maps.
APPROXIMATIONS = {
    "tau": (dict(tau=0.3), {0.3, 1.0}),
    "drilldown": (dict(drilldown=0.3), {1.0}),
    "target_ssim": (dict(target_ssim=0.7), {1.0, *calibrate.TAU_PROBES}),
    "region": (dict(region=(4, 4, 20, 24)), {1.0}),
    "drilldown_and_tau": (dict(drilldown=0.3, tau=0.3, drilldown_factor=2), {1.0, 0.3}),
    "region_and_tau": (dict(region=(0, 4, 16, 32), tau=0.3), {0.3, 1.0}),
}


@pytest.fixture
def tau_probes(monkeypatch):
    """Calibration tries tau on the small model too (whose plans would save too
    little for the search, and its refinement too little to pay for a probe), so
    that its samples run."""
    monkeypatch.setattr(calibrate, "MIN_TAU_GAIN", 0.0)
    monkeypatch.setattr(calibrate, "PROBE_PAYBACK", 0.0)


def approximate_call():
    model = models.small_cnn()
    torch.manual_seed(3)
    inputs = torch.randn(2, 3, 32, 32)
    return model, inputs, dict(sliding_window_shapes=(3, 4, 4), strides=1, target=[1, 3])


def assert_same_run(shared, single, shared_report, single_report):
    """Bit for bit the same map, and the same report but for the time taken."""
    torch.testing.assert_close(shared, single, rtol=0, atol=0, equal_nan=True)
    assert shared_report.engine == single_report.engine == "incremental"
    for name in ("approximation", "windows_computed", "windows_total", "cancelled"):
        assert getattr(shared_report, name) == getattr(single_report, name), name
    if single_report.calibration is not None:
        assert shared_report.calibration == single_report.calibration
    assert shared_report.self_check.windows == single_report.self_check.windows


@pytest.mark.parametrize("case", list(APPROXIMATIONS))
def test_approximations_on_two_cpu_devices_equal_one_device(case, tau_probes, monkeypatch):
    options, thresholds = APPROXIMATIONS[case]
    model, inputs, args = approximate_call()
    occlusion = IncrementalOcclusion(model)
    single = occlusion.attribute(inputs, **options, **args)
    single_report = occlusion.last_run
    shards = []
    compute_shard = device_threads.compute_shard

    def recording(ready, ids, *rest):
        shards.append((ready.plan.tau, len(ids)))
        return compute_shard(ready, ids, *rest)

    monkeypatch.setattr(device_threads, "compute_shard", recording)
    shared = occlusion.attribute(inputs, devices=["cpu", "cpu"], **options, **args)
    assert_same_run(shared, single, occlusion.last_run, single_report)
    # every stage's windows went to both devices, at the stage's threshold
    assert {tau for tau, _ in shards} == thresholds and len(shards) % 2 == 0
    assert all(count > 0 for _, count in shards)
    assert sum(count for _, count in shards) >= single_report.windows_computed


def test_drilldown_on_devices_reports_each_stage_and_cancels_between_them():
    """One batch per stage on one device reports as the devices do: after the
    coarse pass, then the result; a cancel set at the coarse report stops both
    there, with the coarse pass's interpolated map."""
    model, inputs, args = approximate_call()
    occlusion = IncrementalOcclusion(model)
    options = dict(drilldown=0.3, windows_per_batch=1000, **args)
    runs = []
    for devices in (None, ["cpu", "cpu"]):
        reports = []
        occlusion.attribute(inputs, devices=devices, on_progress=reports.append, **options)
        cancel = threading.Event()

        def stop_after_coarse(progress, cancel=cancel):
            if progress.stage == "coarse":
                cancel.set()

        cancelled = occlusion.attribute(
            inputs, devices=devices, on_progress=stop_after_coarse, cancel=cancel, **options
        )
        runs.append((reports, cancelled, occlusion.last_run))
    (single_reports, single_cancelled, single_run), (reports, cancelled, run) = runs
    described = [
        [(p.stage, p.windows_done, p.windows_planned, p.complete) for p in r]
        for r in (reports, single_reports)
    ]
    assert described[0] == described[1] and [p[0] for p in described[0]] == ["coarse", "refine"]
    coarse, single_coarse = reports[0].attribution, single_reports[0].attribution
    torch.testing.assert_close(coarse, single_coarse, rtol=0, atol=0)
    assert run.cancelled and single_run.cancelled and run.windows_computed == 64
    torch.testing.assert_close(cancelled, single_cancelled, rtol=0, atol=0)


def test_an_error_in_a_stage_on_devices_is_raised_as_on_one_device():
    model = models.small_cnn(models.FailsMidwayCNN)
    inputs = torch.randn(1, 3, 32, 32)
    options = dict(drilldown=0.5, self_check=False, windows_per_batch=8, target=1, **ARGS)
    occlusion = IncrementalOcclusion(model)
    with pytest.raises(RuntimeError) as one_device:
        occlusion.attribute(inputs, **options)
    with pytest.raises(RuntimeError) as shared:
        occlusion.attribute(inputs, devices=["cpu", "cpu"], **options)
    assert "too large" in str(one_device.value) and str(shared.value) == str(one_device.value)


def test_a_changed_model_gets_new_replicas():
    model = models.small_cnn()
    inputs = torch.randn(1, 3, 12, 12)
    occlusion = IncrementalOcclusion(model)
    before = occlusion.attribute(inputs, target=1, devices=["cpu", "cpu"], **ARGS)
    with torch.no_grad():
        model.conv1.weight.mul_(2.0)
    after = occlusion.attribute(inputs, target=1, devices=["cpu", "cpu"], **ARGS)
    expected = Occlusion(model).attribute(inputs, target=1, **ARGS)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-5)


def test_cancel_and_errors_with_devices():
    model = models.small_cnn()
    cancel = threading.Event()
    cancel.set()
    occlusion = IncrementalOcclusion(model)
    result = occlusion.attribute(
        torch.randn(1, 3, 16, 16),
        target=0,
        devices=["cpu", "cpu"],
        cancel=cancel,
        windows_per_batch=5,
        **ARGS,
    )
    assert occlusion.last_run.cancelled and torch.isnan(result).any()


@pytest.fixture
def cpu_workers(monkeypatch):
    """Worker processes for CPU "devices" too (on GPUs they serve every GPU after
    the first): the same code path as on GPUs, run where CI runs."""
    from captum_krypton.parallel import sharded

    monkeypatch.setattr(sharded, "uses_workers", lambda devices: len(devices) > 1)


def test_worker_processes_equal_one_device_and_captum(cpu_workers):
    model = models.small_cnn(models.ScaledCNN)
    torch.manual_seed(2)
    inputs = torch.randn(3, 3, 16, 16)
    scale = torch.tensor([0.5, 1.0, 2.0])
    args = dict(target=[0, 2, 4], additional_forward_args=(scale,), baselines=0.3, **ARGS)
    occlusion = IncrementalOcclusion(model)
    devices = ["cpu", "cpu", "cpu"]  # this process and two workers
    single = occlusion.attribute(inputs, windows_per_batch=4, **args)
    shared = occlusion.attribute(inputs, devices=devices, windows_per_batch=4, **args)
    workers = list(occlusion._sharded.pool._workers.values())
    assert len(workers) == 2 and all(w.process.poll() is None for w in workers)
    torch.testing.assert_close(shared, single, rtol=0, atol=1e-6)
    expected = Occlusion(model).attribute(inputs, perturbations_per_eval=8, **args)
    with torch.no_grad():
        output_scale = model(inputs, scale).abs().max()
    assert_close_to_captum(expected, shared, output_scale)

    # progress from every shard, one report at the end
    reports = []
    occlusion.attribute(
        inputs, devices=devices, windows_per_batch=4, on_progress=reports.append, **args
    )
    assert len(reports) == 1 and reports[0].complete and reports[0].windows_done == 49

    # a changed model reaches the workers
    with torch.no_grad():
        model.conv1.weight.mul_(2.0)
    changed = occlusion.attribute(inputs, devices=devices, **args)
    assert not torch.equal(changed, shared)
    expected = Occlusion(model).attribute(inputs, perturbations_per_eval=8, **args)
    assert_close_to_captum(expected, changed, output_scale * 2)

    # cancel: the windows done so far, NaN elsewhere; then a full call again
    cancel = threading.Event()
    cancel.set()
    partial = occlusion.attribute(
        inputs, devices=devices, windows_per_batch=2, cancel=cancel, **args
    )
    assert occlusion.last_run.cancelled and torch.isnan(partial).any()
    again = occlusion.attribute(inputs, devices=devices, **args)
    torch.testing.assert_close(again, changed, rtol=0, atol=1e-6)

    # a worker's error is raised here, with the same type and message as in one process
    bad = dict(args, target=[0, 2, 4], additional_forward_args=(scale[:2],))
    with pytest.raises(RuntimeError) as one_process:
        occlusion.attribute(inputs, **bad)
    with pytest.raises(RuntimeError) as sharded:
        occlusion.attribute(inputs, devices=devices, **bad)
    assert str(sharded.value) == str(one_process.value)
    torch.testing.assert_close(
        occlusion.attribute(inputs, devices=devices, **args), changed, rtol=0, atol=1e-6
    )

    workers = list(occlusion._sharded.pool._workers.values())
    occlusion.close()
    assert all(w.process.wait(timeout=30) == 0 for w in workers)


def test_worker_processes_run_every_stage_with_its_threshold(cpu_workers, tau_probes):
    """The workers prepare each call once and compute every stage's shard with the
    stage's tau: the same maps as one device, also when cancelled between stages."""
    model, inputs, args = approximate_call()
    occlusion = IncrementalOcclusion(model)
    devices = ["cpu", "cpu", "cpu"]  # this process and two workers
    exact = occlusion.attribute(inputs, **args)
    for case in ("tau", "drilldown_and_tau", "target_ssim", "region_and_tau"):
        options = APPROXIMATIONS[case][0]
        single = occlusion.attribute(inputs, **options, **args)
        single_report = occlusion.last_run
        shared = occlusion.attribute(inputs, devices=devices, **options, **args)
        assert_same_run(shared, single, occlusion.last_run, single_report)
        if case == "tau":
            assert not torch.equal(single, exact)  # the workers' thirds ran with tau too
    workers = list(occlusion._sharded.pool._workers.values())
    assert len(workers) == 2 and all(w.process.poll() is None for w in workers)

    runs = []
    for sharing in (None, devices):
        cancel = threading.Event()

        def stop_after_coarse(progress, cancel=cancel):
            if progress.stage == "coarse":
                cancel.set()

        result = occlusion.attribute(
            inputs,
            devices=sharing,
            drilldown=0.3,
            windows_per_batch=1000,
            on_progress=stop_after_coarse,
            cancel=cancel,
            **args,
        )
        runs.append((result, occlusion.last_run))
    (single, single_report), (shared, report) = runs
    assert report.cancelled and report.windows_computed == single_report.windows_computed == 64
    torch.testing.assert_close(shared, single, rtol=0, atol=0)
    occlusion.close()
    assert all(w.process.wait(timeout=30) == 0 for w in workers)


def test_a_worker_prepares_a_call_once_and_computes_each_stage_with_its_tau(monkeypatch):
    """A worker's side of two stages of one call (`_run_job`, as `serve` runs it):
    one preparation, and each stage's rows those of a one-device preparation
    with the stage's tau."""
    model, inputs, args = approximate_call()
    call = CaptumArguments(inputs, args["sliding_window_shapes"], args["strides"], target=[1, 3])
    settings = EngineSettings(windows_per_batch=8)
    preparer = Preparer()
    prepared = []
    prepare = preparer.prepare
    monkeypatch.setattr(
        preparer, "prepare", lambda *a, **k: prepared.append(a[-1]) or prepare(*a, **k)
    )
    messages, sender = Pipe(duplex=False)
    receiver, stop_sender = Pipe(duplex=False)  # no stop is sent; kept open
    calls = {}
    ids = np.arange(100, 140)
    rows = {}
    for tau in (1.0, 0.3):
        stage = PlanApproximation(tau=tau)
        job = ShardJob(7, call, settings, approximation=stage, window_ids=ids, run=1)
        workers._run_job(sender, receiver, model, preparer, job, calls)
        kinds = []
        while messages.poll():
            kind, payload = messages.recv()
            kinds.append(kind)
        assert kinds == ["batch"] * 5 + ["done"]
        rows[tau], computed = workers._from_bytes(payload, "cpu")
        assert computed == len(ids)
    assert prepared == [EXACT]  # once, for the call's first pass
    first = preparer.prepare(model, call, settings)  # the trace is kept: no new capture
    for tau, got in rows.items():
        expected, _ = device_threads.compute_shard(first.with_tau(tau), ids, call.target, 8)
        assert torch.equal(got, expected)
    assert not torch.equal(rows[0.3], rows[1.0])


class ModelOfThisTestOnly(torch.nn.Module):
    """Moved below into a module that exists in this process only: it saves, but a
    worker cannot load it."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def test_a_model_workers_cannot_load_runs_in_threads(cpu_workers, monkeypatch):
    only_here = types.ModuleType("module_of_this_process_only")
    only_here.ModelOfThisTestOnly = ModelOfThisTestOnly
    monkeypatch.setitem(sys.modules, only_here.__name__, only_here)
    monkeypatch.setattr(ModelOfThisTestOnly, "__module__", only_here.__name__)
    model = ModelOfThisTestOnly().eval()
    inputs = torch.randn(2, 3, 12, 12)
    occlusion = IncrementalOcclusion(model)
    with pytest.warns(RuntimeWarning, match="threads of this process.*cannot load the model"):
        shared = occlusion.attribute(inputs, target=1, devices=["cpu", "cpu"], **ARGS)
    expected = Occlusion(model).attribute(inputs, target=1, **ARGS)
    torch.testing.assert_close(shared, expected, rtol=0, atol=1e-5)
    assert not occlusion._sharded.pool._workers
