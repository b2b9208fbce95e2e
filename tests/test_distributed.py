"""Data-set runs under torchrun (2 gloo processes on the CPU): the same maps as one
process, and a run killed midway resumes to the same, complete output; in a Zarr
array (the default) and as .npy files."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ITEMS = 12  # captum_krypton.demo.data.evaluation_set()
COMMAND = [
    "-m",
    "captum_krypton",
    "attribute",
    "--model",
    "captum_krypton.demo.model:load_demo_model",
    "--data",
    "captum_krypton.demo.data:evaluation_set",
    "--stride",
    "2",
]
# One thread per process everywhere, as torchrun sets it: the same arithmetic.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def single(out: Path) -> None:
    subprocess.run([sys.executable, *COMMAND, "--out", str(out)], check=True, env=ENV, timeout=300)


def torchrun(out: Path, **popen) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    return subprocess.Popen(
        [*launcher, *COMMAND, "--out", str(out)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def outputs(directory: Path) -> dict[str, np.ndarray]:
    """The maps written so far, by item name, read as any Zarr reader would."""
    import zarr

    maps = zarr.open_group(str(directory), mode="r")["attributions"]
    names = maps.attrs["item_names"]
    return {name: maps[i] for i, name in enumerate(names) if not np.isnan(maps[i]).all()}


def chunks_written(directory: Path) -> int:
    chunks = directory / "attributions" / "c"
    return len(list(chunks.iterdir())) if chunks.exists() else 0


def npy_outputs(directory: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p) for p in sorted(directory.glob("*.npy"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    single(out)
    files = outputs(out)
    assert len(files) == ITEMS
    # The single-process maps are Captum's (two items checked).
    from captum.attr import Occlusion

    from captum_krypton.demo.data import evaluation_set
    from captum_krypton.demo.model import load_demo_model

    images, labels = evaluation_set()
    model = load_demo_model()
    for i in (0, ITEMS - 1):
        expected = (
            Occlusion(model)
            .attribute(
                images[i : i + 1],
                (3, 12, 12),
                strides=(3, 2, 2),
                target=int(labels[i]),
                perturbations_per_eval=64,
            )[0, 0]  # the window spans all channels: one map per item
            .numpy()
        )
        np.testing.assert_allclose(
            files[f"{i:06d}"], expected, rtol=0, atol=1e-5 * np.abs(expected).max()
        )
    import zarr

    targets = zarr.open_group(str(out), mode="r")["targets"][:]
    assert targets.tolist() == labels.tolist()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["stride"] == 2 and manifest["settings"]["window"] == 12
    assert manifest["items"] == [f"{i:06d}" for i in range(ITEMS)]
    assert {"captum", "torch", "captum-krypton"} <= manifest["versions"].keys()
    return files


def test_two_ranks_write_what_one_process_writes(reference, tmp_path):
    run = torchrun(tmp_path)
    log, _ = run.communicate(timeout=300)
    assert run.returncode == 0, log
    written = [int(m) for m in re.findall(r"rank \d: wrote (\d+) items", log)]
    assert sorted(written) != [0, ITEMS] and sum(written) == ITEMS, log  # both ranks worked
    files = outputs(tmp_path)
    assert files.keys() == reference.keys()
    for name, array in files.items():
        assert np.array_equal(array, reference[name]), name


def test_a_killed_run_resumes_to_the_same_complete_output(reference, tmp_path):
    run = torchrun(tmp_path, start_new_session=True)
    deadline = time.monotonic() + 240
    while chunks_written(tmp_path) < 2 and time.monotonic() < deadline:
        if run.poll() is not None:
            break
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=60)
    partial = outputs(tmp_path)  # every file under its final name loads whole
    assert 0 < len(partial) < ITEMS, len(partial)
    for name, array in partial.items():
        assert np.array_equal(array, reference[name]), name

    resumed = torchrun(tmp_path)
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log
    # Ranks still computing an item when the launcher died may finish it: at most
    # the items of the partial output are left, and fewer than all.
    to_do = [int(n) for n in re.findall(rf"(\d+) of {ITEMS} items to do", log)]
    assert len(to_do) == 2 and to_do[0] == to_do[1] <= ITEMS - len(partial), log
    files = outputs(tmp_path)
    assert files.keys() == reference.keys()
    for name, array in files.items():
        assert np.array_equal(array, reference[name]), name


def test_a_rerun_with_other_settings_is_refused(reference, tmp_path):
    single(tmp_path)
    command = [sys.executable, *COMMAND, "--out", str(tmp_path)]
    command[command.index("--stride") + 1] = "3"
    run = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "other settings" in run.stderr, run.stderr
    assert outputs(tmp_path).keys() == reference.keys()  # the maps there are kept


def test_a_directory_of_npy_images_gives_the_same_maps(reference, tmp_path):
    from captum_krypton.demo.data import evaluation_set

    images, labels = evaluation_set()
    data = tmp_path / "data"
    data.mkdir()
    for i, image in enumerate(images):
        np.save(data / f"img{i:03d}.npy", image.numpy())
    np.save(data / "labels.npy", labels.numpy())
    out = tmp_path / "maps"
    command = [sys.executable, *COMMAND, "--out", str(out), "--format", "npy"]
    command[command.index("captum_krypton.demo.data:evaluation_set")] = str(data)
    subprocess.run(command, check=True, env=ENV, timeout=300)
    files = npy_outputs(out)  # named after their inputs
    assert sorted(files) == [f"img{i:03d}" for i in range(ITEMS)]
    assert json.loads((out / "manifest.json").read_text())["items"] == sorted(files)
    for i in range(ITEMS):
        array, expected = files[f"img{i:03d}"], reference[f"{i:06d}"]
        # The same values in differently allocated inputs: equal up to float rounding.
        np.testing.assert_allclose(array, expected, rtol=0, atol=1e-5 * np.abs(array).max())


MODEL_MODULE = """
import torch
from torch import nn


def load():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 2),
    )


def data():
    torch.manual_seed(1)
    return torch.randn(2, 3, 10, 10), torch.tensor([0, 1])
"""


def test_the_console_command_imports_from_the_current_folder_and_takes_a_baseline(tmp_path):
    """`captum-krypton attribute --model mymodels:load` run in the folder of
    mymodels.py, with a baseline: Captum's maps with that baseline."""
    import shutil

    (tmp_path / "mymodels.py").write_text(MODEL_MODULE)
    command = shutil.which("captum-krypton")
    if command is None:
        pytest.skip("the console script is not installed")
    args = ["attribute", "--model", "mymodels:load", "--data", "mymodels:data", "--out", "maps"]
    args += ["--window", "4", "--stride", "3", "--baseline", "0.5"]
    subprocess.run([command, *args], check=True, env=ENV, cwd=tmp_path, timeout=300)
    import sys as _sys

    _sys.path.insert(0, str(tmp_path))
    try:
        import mymodels
    finally:
        _sys.path.remove(str(tmp_path))
    from captum.attr import Occlusion

    model = mymodels.load().eval()
    images, labels = mymodels.data()
    for i in range(2):
        expected = Occlusion(model).attribute(
            images[i : i + 1], (3, 4, 4), strides=(3, 3, 3), target=int(labels[i]), baselines=0.5
        )[0, 0]
        actual = outputs(tmp_path / "maps")[f"{i:06d}"]
        assert actual.shape == tuple(expected.shape)
        np.testing.assert_allclose(actual, expected.numpy(), rtol=1e-5, atol=1e-7)


def test_ctrl_c_stops_with_one_line_and_resumes(tmp_path):
    run = subprocess.Popen(
        [sys.executable, *COMMAND, "--out", str(tmp_path)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not chunks_written(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGINT)
    log, _ = run.communicate(timeout=120)
    if run.returncode == 0:
        pytest.skip("the run finished before the interrupt arrived")
    assert run.returncode == 130, log
    assert "Traceback" not in log, log
    assert "interrupted" in log and "the same command resumes" in log, log
    resumed = subprocess.run(
        [sys.executable, *COMMAND, "--out", str(tmp_path)],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0 and f"of {ITEMS} items to do" in resumed.stdout
    assert len(outputs(tmp_path)) == ITEMS


class _RecordingOcclusion:
    """Captum's Occlusion, recording the spatial size of each item it is given."""

    def __init__(self, model):
        from captum.attr import Occlusion

        self.occlusion = Occlusion(model)
        self.sizes: list[int] = []

    def attribute(self, inputs, **kwargs):
        self.sizes.append(inputs.shape[-1])
        return self.occlusion.attribute(inputs, **kwargs)


def test_items_of_several_sizes_go_largest_first_as_npy_files(tmp_path, monkeypatch):
    """In one process: the largest items (by windows x pixels) first, named after
    their files; a Zarr store refuses items of several sizes with a clear error."""
    from captum_krypton.parallel import distributed

    data = tmp_path / "data"
    data.mkdir()
    sizes = [12, 20, 16, 24]
    for i, size in enumerate(sizes):
        np.save(data / f"img{i}.npy", np.random.default_rng(i).normal(size=(3, size, size)))
    (tmp_path / "sized_models.py").write_text(MODEL_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    recorded = []

    def make(model):
        recorded.append(_RecordingOcclusion(model))
        return recorded[-1]

    options = dict(window=4, stride=4, target="0", log=lambda line: None, make_occlusion=make)
    written = distributed.run(
        "sized_models:load", str(data), str(tmp_path / "npy"), output_format="npy", **options
    )
    assert written == len(sizes)
    assert recorded[0].sizes == sorted(sizes, reverse=True)
    assert sorted(npy_outputs(tmp_path / "npy")) == [f"img{i}" for i in range(len(sizes))]
    for i, size in enumerate(sizes):
        assert npy_outputs(tmp_path / "npy")[f"img{i}"].shape == (size, size)
    with pytest.raises(ValueError, match="several shapes.*pass --format npy"):
        distributed.run("sized_models:load", str(data), str(tmp_path / "zarr"), **options)
    assert len(recorded) == 1  # refused before it was set up to compute any item


def test_an_unrelated_folder_is_not_taken_for_maps(tmp_path, monkeypatch):
    """A non-empty --out without a manifest is refused: its files would count as
    finished items (--out pointed at the data, say)."""
    from captum_krypton.parallel import distributed

    (tmp_path / "sized_models.py").write_text(MODEL_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        np.save(data / f"img{i}.npy", np.zeros((3, 10, 10), dtype=np.float32))
    options = dict(window=4, stride=4, target="0", log=lambda line: None)
    for output_format in ("npy", "zarr"):
        with pytest.raises(ValueError, match="not empty and holds no manifest.json"):
            distributed.run(
                "sized_models:load",
                str(data),
                str(data),
                output_format=output_format,
                make_occlusion=_RecordingOcclusion,
                **options,
            )
    assert sorted(p.name for p in data.iterdir()) == ["img0.npy", "img1.npy"]


def test_a_run_that_failed_before_any_item_does_not_lock_the_folder(tmp_path, monkeypatch):
    """A typo in the model, then the corrected command into the same --out."""
    from captum_krypton.parallel import distributed

    (tmp_path / "sized_models.py").write_text(MODEL_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = str(tmp_path / "maps")
    options = dict(window=4, stride=3, target="label", log=lambda line: None)
    with pytest.raises(AttributeError):
        distributed.run("sized_models:laod", "sized_models:data", out,
                        make_occlusion=_RecordingOcclusion, **options)  # fmt: skip
    bad_target = dict(options, target="7")  # fails in its first item: 2 classes
    with pytest.raises((RuntimeError, IndexError, AssertionError)):
        distributed.run("sized_models:load", "sized_models:data", out,
                        make_occlusion=_RecordingOcclusion, **bad_target)  # fmt: skip
    written = distributed.run(
        "sized_models:load", "sized_models:data", out, make_occlusion=_RecordingOcclusion,
        **options,
    )  # fmt: skip
    assert written == 2
    assert json.loads((tmp_path / "maps" / "manifest.json").read_text())["settings"]["target"] == (
        "label"
    )
    assert len(outputs(tmp_path / "maps")) == 2


def test_bad_baselines_and_targets_are_refused_before_any_work(tmp_path):
    for flag, value in (("--baseline", "nan"), ("--target", "-1"), ("--target", "cat")):
        command = [sys.executable, *COMMAND, "--out", str(tmp_path / "maps"), flag, value]
        run = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
        assert run.returncode != 0 and flag in run.stderr, run.stderr
        assert not (tmp_path / "maps").exists()


def local_run(out: Path, *extra: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *COMMAND, "--out", str(out), "--nproc-per-node", "2", *extra],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def test_ranks_launched_by_the_command_write_what_one_process_writes(reference, tmp_path):
    run = local_run(tmp_path)
    log, _ = run.communicate(timeout=300)
    assert run.returncode == 0, log
    written = [int(m) for m in re.findall(r"rank \d: wrote (\d+) items", log)]
    assert len(written) == 2 and sum(written) == ITEMS, log
    files = outputs(tmp_path)
    assert files.keys() == reference.keys()
    for name, array in files.items():
        assert np.array_equal(array, reference[name]), name


FAILING_RANK = """
import os
from captum_krypton.demo.model import load_demo_model


def load():
    if os.environ["RANK"] == "1":
        raise RuntimeError("rank 1 cannot load its model")
    return load_demo_model()
"""


def test_a_rank_that_fails_stops_the_local_run(tmp_path):
    (tmp_path / "failing_rank.py").write_text(FAILING_RANK)
    command = [sys.executable, *COMMAND, "--out", str(tmp_path / "maps"), "--nproc-per-node", "2"]
    command[command.index("--model") + 1] = "failing_rank:load"
    run = subprocess.run(
        command, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode != 0
    assert "rank 1 cannot load its model" in run.stderr
    assert "rank 1 exited with status" in run.stderr


def test_ctrl_c_stops_every_local_rank_with_one_line_each_and_resumes(tmp_path):
    run = local_run(tmp_path, start_new_session=True)
    deadline = time.monotonic() + 240
    while chunks_written(tmp_path) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    log, _ = run.communicate(timeout=120)
    if run.returncode == 0:
        pytest.skip("the run finished before the interrupt arrived")
    assert run.returncode == 130, log
    assert "Traceback" not in log, log
    assert len(re.findall(r"rank \d: interrupted", log)) == 2, log
    resumed = local_run(tmp_path)
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log
    assert len(outputs(tmp_path)) == ITEMS
