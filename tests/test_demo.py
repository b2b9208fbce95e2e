"""The bundled demo: trained model, its heatmaps, and the CLI."""

from __future__ import annotations

import numpy as np
import torch
from captum.attr import Occlusion

from captum_krypton import IncrementalOcclusion
from captum_krypton.cli import main
from captum_krypton.demo.data import CLASSES, make_dataset, make_image, normalize
from captum_krypton.demo.model import WEIGHTS, load_demo_model
from captum_krypton.demo.train import evaluate


def test_shipped_weights_are_small_and_accurate():
    assert WEIGHTS.stat().st_size < 3 * 2**20
    images, labels = make_dataset(200, seed=12345)
    assert evaluate(load_demo_model(), images, labels) > 0.95


def test_demo_heatmaps_point_at_the_shape_and_match_captum():
    model = load_demo_model()
    rng = np.random.default_rng(7)
    for label in range(len(CLASSES)):
        image, (cy, cx) = make_image(rng, label)
        inputs = normalize(torch.from_numpy(image)[None])
        kwargs = dict(sliding_window_shapes=(3, 12, 12), strides=6, target=label)
        actual = IncrementalOcclusion(model).attribute(inputs, **kwargs)
        expected = Occlusion(model).attribute(inputs, perturbations_per_eval=32, **kwargs)
        torch.testing.assert_close(
            actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item()
        )
        heat = actual[0].sum(0)
        y, x = np.unravel_index(int(heat.argmax()), heat.shape)
        assert abs(y - cy) <= 18 and abs(x - cx) <= 18, (label, (y, x), (cy, cx))


def test_cli_demo_writes_png(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out), "--stride", "6"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "theoretical speedup" in printed and "speedup" in printed
    assert "IncrementalOcclusion" in printed
