"""The example notebooks run as they are (nbclient, a fresh kernel each)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.ipynb"))
#: Notebooks that promise figures: each must render at least this many images.
FIGURES = {"quick_start": 1, "captum_workflow": 1, "real_face_detector": 1}
#: Text a notebook's outputs must show (what its markdown promises happens).
PRINTED = {
    "widget_tour": ["error:  RuntimeError: the model failed on purpose", "recovered: True"],
    "quick_start": ["SSIM vs exact:"],
    "real_face_detector": ["engine: incremental", "agree: True"],
}
#: Notebooks on real trained models need the package that ships the weights
#: (`pip install --no-deps facenet-pytorch==2.6.0`; `.ci/run` installs it).
NEEDS = {"real_face_detector": "facenet_pytorch"}


def test_there_are_examples():
    assert {p.name for p in EXAMPLES} >= {
        "quick_start.ipynb",
        "widget_tour.ipynb",
        "captum_workflow.ipynb",
        "real_face_detector.ipynb",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_notebook_runs(path, tmp_path):
    needed = NEEDS.get(path.stem)
    if needed is not None and importlib.util.find_spec(needed) is None:
        pytest.skip(f"{path.name} needs {needed}, not installed")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert len(images) >= FIGURES.get(path.stem, 0), f"{path.name} rendered {len(images)} images"
    printed = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "stream"
    )
    for expected in PRINTED.get(path.stem, []):
        assert expected in printed, (expected, printed)
