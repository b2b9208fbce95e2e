"""The on-disk cache of kernel choices: a later process on the same kind of GPU
takes the stored choice instead of measuring, and processes writing at once
keep each other's choices."""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future

import pytest
import torch

from captum_krypton.kernels import choice

GPU = torch.device("cuda:0")


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "kernel_choices-test.json"
    monkeypatch.setattr(choice, "choice_cache_path", lambda device: path)
    monkeypatch.setattr(choice, "_on_disk", {})
    monkeypatch.setattr(choice, "_chosen", {})
    return path


def test_a_stored_choice_is_taken_without_measuring(cache_file, monkeypatch):
    key = ("conv", 256, (64, 56, 56))
    cache_file.write_text(json.dumps({repr(key): "implicit_gemm"}))
    # Measuring would need a GPU: the stored choice must be taken before that.
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    calls = []
    candidates = {
        "cudnn": lambda: calls.append("cudnn") or "cudnn",
        "implicit_gemm": lambda: calls.append("implicit_gemm") or "implicit_gemm",
    }
    assert choice.fastest(key, candidates, GPU) == "implicit_gemm"
    assert calls == ["implicit_gemm"]
    assert choice.chosen(key) == "implicit_gemm"


def test_a_stored_choice_that_is_not_offered_is_ignored(cache_file):
    key = ("conv", 128)
    cache_file.write_text(json.dumps({repr(key): "gone"}))
    # On the CPU no measurement happens: the first candidate runs.
    assert choice.fastest(key, {"a": lambda: 1, "b": lambda: 2}, torch.device("cpu")) == 1
    assert choice.chosen(key) is None


def test_choices_written_by_two_processes_are_both_kept(cache_file):
    choice._remember_on_disk(GPU, ("conv", 1), "cudnn")
    # Another process adds its choice to the file meanwhile.
    stored = json.loads(cache_file.read_text())
    stored[repr(("conv", 2))] = "implicit_gemm"
    cache_file.write_text(json.dumps(stored))
    choice._remember_on_disk(GPU, ("conv", 3), "tile+conv_relu")
    assert json.loads(cache_file.read_text()) == {
        repr(("conv", 1)): "cudnn",
        repr(("conv", 2)): "implicit_gemm",
        repr(("conv", 3)): "tile+conv_relu",
    }


def test_a_corrupt_or_unwritable_cache_is_skipped(cache_file):
    cache_file.write_text("{not json")
    assert choice._disk_choices(GPU) == {}
    cache_file.chmod(0o400)
    cache_file.parent.chmod(0o500)
    try:
        choice._remember_on_disk(GPU, ("conv", 1), "cudnn")  # no error
    finally:
        cache_file.parent.chmod(0o700)
        cache_file.chmod(0o600)


def test_the_cache_can_be_moved_or_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTUM_KRYPTON_CACHE_DIR", str(tmp_path))
    path = choice.choice_cache_path(torch.device("cpu"))
    assert path is not None and path.parent == tmp_path
    assert torch.__version__.replace("+", "_") in path.name
    monkeypatch.setenv("CAPTUM_KRYPTON_CACHE_DIR", "")
    assert choice.choice_cache_path(torch.device("cpu")) is None


class _Compiling:
    """A candidate whose kernel compiles until `ready` is set."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls
        self.future = Future()

    def ready(self):
        self.future.set_result(None)

    def __call__(self):
        if not self.future.done():
            raise choice.CandidatePending(self.future)
        self.calls.append(self.name)
        return self.name


@pytest.fixture
def measured(cache_file, monkeypatch):
    """Measurement without a GPU: each candidate's milliseconds from a table."""
    milliseconds = {}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(choice, "_partial", {})

    def fake_timing(run, results, name):
        results[name] = run()
        return milliseconds[name]

    monkeypatch.setattr(choice, "_milliseconds_per_run", fake_timing)
    return milliseconds


def test_a_compiling_candidate_is_measured_once_ready_and_only_then_chosen(cache_file, measured):
    key = ("conv", 1024, (32, 28, 28))
    calls = []
    gemm = _Compiling("implicit_gemm", calls)
    candidates = {"cudnn": lambda: calls.append("cudnn") or "cudnn", "implicit_gemm": gemm}
    measured.update(cudnn=2.0, implicit_gemm=1.0)
    # While it compiles, cuDNN serves (measured once), nothing is remembered or stored.
    assert choice.fastest(key, candidates, GPU) == "cudnn"
    measuring = len(calls)
    assert choice.fastest(key, candidates, GPU) == "cudnn"
    assert len(calls) == measuring + 1  # one run: no new measurement
    assert choice.chosen(key) is None and not cache_file.exists()
    gemm.ready()
    assert choice.fastest(key, candidates, GPU) == "implicit_gemm"
    assert "implicit_gemm" in calls[measuring + 1 :] and "cudnn" in calls[measuring + 1 :]
    assert choice.chosen(key) == "implicit_gemm"
    assert json.loads(cache_file.read_text()) == {repr(key): "implicit_gemm"}


def test_a_slower_compiled_candidate_leaves_the_choice_to_the_others(cache_file, measured):
    key = ("conv", 256, (64, 14, 14))
    gemm = _Compiling("implicit_gemm", [])
    candidates = {"cudnn": lambda: "cudnn", "implicit_gemm": gemm}
    measured.update(cudnn=1.0, implicit_gemm=3.0)
    assert choice.fastest(key, candidates, GPU) == "cudnn"
    gemm.ready()
    assert choice.fastest(key, candidates, GPU) == "cudnn"
    assert choice.chosen(key) == "cudnn"


def test_a_stored_choice_still_compiling_runs_the_first_candidate_meanwhile(cache_file, measured):
    key = ("conv", 512, (128, 7, 7))
    cache_file.write_text(json.dumps({repr(key): "implicit_gemm"}))
    gemm = _Compiling("implicit_gemm", [])
    candidates = {"cudnn": lambda: "cudnn", "implicit_gemm": gemm}
    assert choice.fastest(key, candidates, GPU) == "cudnn"
    assert choice.chosen(key) is None
    gemm.ready()
    assert choice.fastest(key, candidates, GPU) == "implicit_gemm"
    assert choice.chosen(key) == "implicit_gemm"


def test_a_forced_candidate_waits_for_its_compilation(cache_file):
    calls = []
    gemm = _Compiling("implicit_gemm", calls)
    threading.Timer(0.05, gemm.ready).start()
    with choice.forced("implicit_gemm"):
        result = choice.fastest(("conv",), {"cudnn": lambda: "cudnn", "implicit_gemm": gemm}, GPU)
    assert result == "implicit_gemm" and calls == ["implicit_gemm"]


def test_background_compilations_are_tracked_until_they_end(monkeypatch):
    """The conv kernel's background compilation, with its compiler replaced: jobs
    that end at once (a warm Triton cache) and jobs that wait are both tracked
    in flight until they end, and wait_for_compilation waits for them."""
    pytest.importorskip("triton")
    from captum_krypton.kernels import choices_settled, triton_conv, wait_for_compilation

    gate = threading.Event()
    compiled = []

    def fake_compile(args, flags, device):
        if flags.get("wait"):
            gate.wait(10)
        compiled.append(args[0])

    monkeypatch.setattr(triton_conv, "_compile_tiles", fake_compile)
    monkeypatch.setattr(triton_conv, "_compiles", {})
    monkeypatch.setattr(triton_conv, "_in_flight", [])
    device = torch.device("cpu")

    def start_all():
        for i in range(40):
            triton_conv._compiled(("instant", i), [i], {}, device, True)
        triton_conv._compiled(("slow",), ["slow"], {"wait": True}, device, True)

    starter = threading.Thread(target=start_all, daemon=True)
    starter.start()
    starter.join(10)
    assert not starter.is_alive()  # no deadlock on jobs that end before their callback
    assert triton_conv._in_flight  # the slow one
    assert not choices_settled()  # no CUDA graph captures meanwhile
    again = triton_conv._compiled(("slow",), ["slow"], {"wait": True}, device, True)
    assert again is triton_conv._compiles[("slow",)]  # started once
    gate.set()
    wait_for_compilation()
    assert choices_settled()  # at once, before the done-callbacks have run
    assert sorted(map(str, compiled)) == sorted(map(str, [*range(40), "slow"]))
    for _ in range(100):  # done-callbacks run just after the result is set
        if not triton_conv._in_flight:
            break
        threading.Event().wait(0.01)
    assert triton_conv._in_flight == []


def test_a_chosen_candidate_waits_for_every_compilation_it_defers_to(cache_file, measured):
    """A compiled kernel still defers to compilations in flight elsewhere: a
    candidate already chosen waits for its own compilation and then for the
    others, and never hands CandidatePending to its caller."""
    key = ("conv", 128, (16, 9, 9))
    others = [Future(), Future()]
    own = Future()
    runs = []

    def gemm():
        for future in (own, *others):
            if not future.done():
                raise choice.CandidatePending(future)
        runs.append("implicit_gemm")
        return "implicit_gemm"

    choice._chosen[key] = "implicit_gemm"
    try:
        for delay, future in zip((0.02, 0.04, 0.06), (own, *others)):
            threading.Timer(delay, future.set_result, (None,)).start()
        assert choice.fastest(key, {"cudnn": lambda: "cudnn", "implicit_gemm": gemm}, GPU) == (
            "implicit_gemm"
        )
        assert runs == ["implicit_gemm"]
    finally:
        del choice._chosen[key]


def test_a_capture_takes_the_fastest_measured_while_a_choice_is_open(cache_file, monkeypatch):
    """A CUDA graph keeps what it captured: where a choice still waits to time a
    candidate, the capture runs the fastest timed so far, not the first."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(choice, "_partial", {("conv", 1): {"cudnn": 2.0, "implicit_gemm": 0.5}})
    candidates = {
        "cudnn": lambda: "cudnn",
        "implicit_gemm": lambda: "implicit_gemm",
        "other": lambda: "other",
    }
    assert choice.fastest(("conv", 1), candidates, GPU) == "implicit_gemm"
    assert choice.fastest(("conv", 2), candidates, GPU) == "cudnn"  # none timed: the first
    assert choice.chosen(("conv", 1)) is None  # still open
