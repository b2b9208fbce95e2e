"""The on-disk cache of kernel choices: a later process on the same kind of GPU
takes the stored choice instead of measuring, and processes writing at once
keep each other's choices."""

from __future__ import annotations

import json

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
