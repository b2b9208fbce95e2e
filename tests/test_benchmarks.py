"""The GPU benchmarks' own CPU modes run end to end and write what their
tables read: device time is scarce, and a script that breaks there wastes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(module: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def test_profile_layers_runs_on_the_cpu(tmp_path):
    out = tmp_path / "layers.json"
    _run(
        "benchmarks.profile_layers",
        *("--device", "cpu", "--tiny", "--models", "resnet18", "--call-profile"),
        *("--drilldown", "0.2", "--rows", "2", "--top", "3", "--out", str(out)),
    )
    (model,) = json.loads(out.read_text())["models"]
    assert model["model"] == "resnet18" and model["windows"] > 0
    layers = model["layers"]
    assert {"conv2d", "linear"} <= {layer["ops"][0] for layer in layers}
    assert all(layer["engine_ms"] >= 0 and layer["naive_ms"] >= 0 for layer in layers)
    # Fused BatchNorm and ReLU are counted with their conv, not on their own.
    assert any(layer["ops"][:2] == ["conv2d", "batch_norm"] for layer in layers)
    drilled = model["calls"]["drilldown 0.2"]
    assert 0 < drilled["windows_computed"] < drilled["windows_total"]


def test_approximate_runs_on_the_cpu(tmp_path):
    _run(
        "benchmarks.approximate",
        *("--device", "cpu", "--size", "48", "--train-steps", "2", "--images", "2"),
        *("--repeats", "1", "--models", "resnet18", "--out", str(tmp_path)),
    )
    (result,) = json.loads((tmp_path / "approximate.json").read_text())["results"]
    settings = [row["setting"] for row in result["rows"]]
    assert settings[-2:] == ["target_ssim 0.9", "target_ssim 0.9, every call calibrating"]
    assert "drill-down 0.05, factor 4" in settings
    for row in result["rows"]:
        assert len(row["ssim"]) == 2 and 0.0 <= row["share_at_target"] <= 1.0
        assert row["windows_computed"] <= row["windows_total"]


def test_call_stages_runs_on_the_cpu(tmp_path):
    out = tmp_path / "stages.json"
    _run(
        "benchmarks.call_stages",
        *("--device", "cpu", "--size", "48", "--train-steps", "2", "--models", "resnet18"),
        *("--out", str(out)),
    )
    model = json.loads(out.read_text())["models"]["resnet18"]
    assert model["exact"]["windows"] == 81  # 9 x 9 windows of 16 at stride 4 over 48
    # with the race on, the arm kept depends on measured times: either is valid
    raced = model["target0.9"]
    assert raced["target_ssim_choice"].split(":")[0] in ("calibrate", "exact")
    assert raced["windows"] <= 81
    target = model["target0.9 calibrating"]
    assert target["calibration"] is not None and target["windows"] <= 81
    parts = target["parts_ms_per_call"]
    assert parts["ProgressiveRun._calibrate"] > 0 and parts["ProgressiveRun._batches"] > 0
