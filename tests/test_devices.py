"""Windows of one call shared across several devices: same result as one device."""

from __future__ import annotations

import sys
import threading
import types

import pytest
import torch
from captum.attr import Occlusion

from captum_krypton import IncrementalOcclusion
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
    with pytest.raises(ValueError, match="exact occlusion"):
        occlusion.attribute(torch.randn(1, 3, 16, 16), target=0, devices=["cpu"], tau=0.5, **ARGS)


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
