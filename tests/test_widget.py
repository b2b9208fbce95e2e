"""The notebook widget's Python side, without a browser: traits, buffers, runs,
cancel and restart, errors, probes, saving, and what the colours mean (greyscale
image, colour limits, legend)."""

from __future__ import annotations

import threading

import matplotlib
import numpy as np
import pytest
import torch
import traitlets
from captum.attr import Occlusion

pytest.importorskip("anywidget")
from captum_krypton.widget import OcclusionWidget, occlusion  # noqa: E402

from tests import models  # noqa: E402

WAIT = 60


def _heatmap(widget):
    height, width = widget.image_size
    return np.frombuffer(widget.heatmap, dtype=np.float32).reshape(height, width)


@pytest.fixture
def model():
    return models.small_cnn()


@pytest.fixture
def image():
    return torch.randn(3, 20, 20)


@pytest.fixture
def escaped(monkeypatch):
    """Exceptions that end a thread unhandled during the test (there should be none)."""
    caught = []
    monkeypatch.setattr(threading, "excepthook", caught.append)
    return caught


class OneExample(torch.nn.Module):
    """A model written for a batch of one: any other batch size raises."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 8 * 8, 2)

    def forward(self, x):
        return self.fc(x.view(1, -1))


def test_a_run_sends_captums_numbers_as_a_float32_buffer(model, image):
    widget = OcclusionWidget(model, image, window=4, stride=2, target=1)
    assert widget.wait(WAIT) and not widget.running and widget.error == ""
    expected = Occlusion(model).attribute(
        image[None], (3, 4, 4), strides=(3, 2, 2), target=1, perturbations_per_eval=32
    )
    torch.testing.assert_close(widget.attribution, expected, rtol=0, atol=1e-5)
    assert isinstance(widget.heatmap, bytes) and len(widget.heatmap) == 20 * 20 * 4
    np.testing.assert_allclose(_heatmap(widget), expected[0].mean(0).numpy(), atol=1e-5)
    heat = _heatmap(widget)
    lo, hi = widget.value_range  # sign "all": symmetric, 0 in the middle of the colorbar
    assert widget.sign == "all" and -lo == hi == pytest.approx(float(np.abs(heat).max()))
    assert len(widget.image_rgba) == 20 * 20 * 4
    assert widget.progress["done"] == widget.progress["planned"] == 81
    assert widget.run_count == 1 and "81 of 81 windows" in widget.status
    assert "Captum" in widget.status


def test_colormap_lookup_table_is_matplotlibs(model, image):
    widget = OcclusionWidget(model, image, autorun=False)
    widget.colormap = "inferno"
    expected = matplotlib.colormaps["inferno"](np.linspace(0, 1, 256), bytes=True)
    assert widget.colormap_lut == expected.astype(np.uint8).tobytes()
    assert widget.run_count == 0 and not widget.running  # colours start no run


def test_top_classes_and_default_target(model, image):
    labels = ["a", "b", "c", "d", "e"]
    widget = OcclusionWidget(model, image, class_names=labels, autorun=False)
    with torch.no_grad():
        probabilities = torch.softmax(model(image[None])[0], 0)
    assert [c["index"] for c in widget.classes] == probabilities.argsort(descending=True).tolist()
    assert widget.target == widget.classes[0]["index"]
    assert widget.classes[0]["label"] == labels[widget.target]
    assert widget.classes[0]["probability"] == pytest.approx(float(probabilities.max()))


def test_cancel_keeps_the_map_so_far_and_a_new_setting_runs_again(model):
    image = torch.randn(3, 24, 24)
    widget = OcclusionWidget(model, image, window=4, stride=1, windows_per_batch=1)
    widget.cancel()
    assert widget.wait(WAIT) and not widget.running
    assert widget.run_count == 1 and widget.attribution is None
    assert widget.progress["done"] < widget.progress["planned"] == 441
    assert widget.status.startswith("cancelled after")

    widget.stride = 4
    assert widget.wait(WAIT) and widget.run_count == 2 and widget.attribution is not None
    assert widget.progress["done"] == widget.progress["planned"] == 36


def test_changing_a_setting_mid_run_cancels_it_and_runs_the_new_one(model):
    image = torch.randn(3, 40, 40)
    widget = OcclusionWidget(model, image, window=4, stride=1, windows_per_batch=4)
    widget.stride = 4  # while the first run (1369 windows in batches of 4) is going
    assert widget.wait(WAIT) and not widget.running
    assert widget.run_count == 2
    assert "cancelled" not in widget.status and widget.progress["total"] == 100
    expected = Occlusion(model).attribute(
        image[None], (3, 4, 4), strides=(3, 4, 4), target=widget.target
    )
    torch.testing.assert_close(widget.attribution, expected, rtol=0, atol=1e-5)


def test_compute_and_cancel_messages_from_the_front_end(model, image):
    widget = OcclusionWidget(model, image, window=4, stride=2, autorun=False)
    widget._handle_custom_msg({"type": "compute"}, [])
    assert widget.wait(WAIT) and widget.run_count == 1
    widget._handle_custom_msg({"type": "cancel"}, [])  # nothing running: harmless
    assert not widget.running and widget.error == ""


def test_approximate_settings_reach_the_engine(model):
    image = torch.randn(3, 32, 32)
    widget = OcclusionWidget(model, image, window=4, stride=1)
    widget.wait(WAIT)
    with widget.hold_trait_notifications():
        widget.approximate = True
        widget.drilldown = 0.2
    assert widget.wait(WAIT)
    report = widget.occlusion.last_run
    assert report.approximation.drilldown == 0.2 and report.windows_computed < 29 * 29
    assert "SSIM vs exact" in widget.status  # the exact map of these settings is known


def test_region_of_interest_computes_only_windows_inside(model):
    image = torch.randn(3, 20, 20)
    widget = OcclusionWidget(model, image, window=4, stride=2, autorun=False)
    widget.roi = [0, 0, 10, 20]
    assert widget.wait(WAIT)
    heat = _heatmap(widget)
    assert np.isfinite(heat[:10]).all() and np.isnan(heat[10:]).all()
    assert widget.occlusion.last_run.windows_computed == 4 * 9


def test_a_model_error_is_shown_and_the_widget_stays_usable(model, image):
    class Flaky(torch.nn.Module):
        broken = False

        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            if self.broken:
                raise RuntimeError("the model failed on purpose")
            return self.inner(x)

    flaky = Flaky()
    # Captum's path calls forward for every batch, so the flag takes effect at once
    # (a traced graph would keep the branch it saw when it was traced).
    widget = OcclusionWidget(flaky, image, window=4, stride=4, engine="captum")
    assert widget.wait(WAIT) and widget.error == ""
    flaky.broken = True
    widget.compute()
    assert widget.wait(WAIT)
    assert "failed on purpose" in widget.error and not widget.running
    flaky.broken = False
    widget.compute()
    assert widget.wait(WAIT) and widget.error == "" and widget.attribution is not None


def test_a_model_for_one_example_gets_its_map_without_a_speedup_estimate(escaped):
    torch.manual_seed(0)
    one = OneExample().eval()
    image = torch.randn(3, 8, 8)
    # Captum's path evaluates one occluded copy at a time, which this model takes;
    # the speedup estimate's batch of 64 copies it does not.
    widget = OcclusionWidget(one, image, window=4, stride=2, target=1, engine="captum")
    assert widget.wait(WAIT) and not widget.running
    expected = Occlusion(one).attribute(image[None], (3, 4, 4), strides=(3, 2, 2), target=1)
    torch.testing.assert_close(widget.attribution, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_heatmap(widget), expected[0].mean(0).numpy(), atol=1e-6)
    assert widget.error == "" and widget.run_count == 1
    assert "9 of 9 windows" in widget.status
    assert "speedup over Captum's Occlusion could not be estimated" in widget.status
    assert "batch of 64 copies raised RuntimeError" in widget.status
    assert "x Captum's Occlusion (estimated" not in widget.status

    widget.compute()
    assert widget.wait(WAIT) and not widget.running and widget.run_count == 2
    torch.testing.assert_close(widget.attribution, expected, rtol=0, atol=1e-6)
    assert widget.error == "" and "could not be estimated" in widget.status
    assert escaped == []


@pytest.mark.parametrize("step", ["ssim", "summary", "buffers"])
def test_an_error_after_the_model_ran_is_shown_and_the_widget_stays_usable(
    model, image, monkeypatch, escaped, step
):
    widget = OcclusionWidget(model, image, window=4, stride=2, target=1, autorun=False)
    widget.tau = 0.5  # a run, exact (approximate is off): its map is kept for the SSIM
    assert widget.wait(WAIT) and widget.error == "" and widget.run_count == 1
    exact = Occlusion(model).attribute(image[None], (3, 4, 4), strides=(3, 2, 2), target=1)

    def fail(*args, **kwargs):
        raise RuntimeError(f"the {step} step failed on purpose")

    # Each step runs in the worker thread once the engine has produced a map.
    if step == "ssim":  # the exact map of these settings is known: compared next run
        monkeypatch.setattr(occlusion, "attribution_ssim", fail)
    elif step == "summary":
        monkeypatch.setattr(OcclusionWidget, "_summary", fail)
    else:  # sending a map to the front end
        monkeypatch.setattr(OcclusionWidget, "_show", fail)
    widget.approximate = True  # one run, with tau 0.5
    assert widget.wait(WAIT) and not widget.running and widget.run_count == 2
    assert widget.error == f"RuntimeError: the {step} step failed on purpose"
    if step == "buffers":  # no map reached the screen: the previous one stays
        assert widget.status == "failed"
        torch.testing.assert_close(widget.attribution, exact, rtol=0, atol=1e-5)
    else:  # the approximate map was complete before the failure: it is kept
        assert widget.status == "map complete, then its summary failed"
        assert widget.occlusion.last_run.approximation.tau == 0.5
        assert widget.attribution.shape == exact.shape
    assert escaped == []

    monkeypatch.undo()
    widget.approximate = False
    assert widget.wait(WAIT) and not widget.running and widget.run_count == 3
    assert widget.error == "" and "Captum" in widget.status
    torch.testing.assert_close(widget.attribution, exact, rtol=0, atol=1e-5)


def test_probe_reports_the_occluded_windows_probability_drop(model, image):
    widget = OcclusionWidget(model, image, window=6, autorun=False)
    widget._handle_custom_msg({"type": "probe", "y": 1, "x": 19}, [])
    probe = widget.probe
    assert probe["window"] == [0, 14, 6, 20]  # centred, moved inside the image
    occluded = image.clone()
    occluded[:, 0:6, 14:20] = 0
    with torch.no_grad():
        before = torch.softmax(model(image[None]), 1)[0, widget.target]
        after = torch.softmax(model(occluded[None]), 1)[0, widget.target]
    assert probe["probability_before"] == pytest.approx(float(before))
    assert probe["probability_after"] == pytest.approx(float(after))
    assert len(widget.probe_rgba) == 20 * 20 * 4


def test_save_png(model, image, tmp_path):
    widget = OcclusionWidget(model, image, window=4, stride=4, autorun=False)
    with pytest.raises(RuntimeError, match="no complete attribution"):
        widget.save_png(tmp_path / "none.png")
    widget.compute()
    widget.wait(WAIT)
    widget.save_png(tmp_path / "map.png")
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_image_shape_is_refused(model):
    with pytest.raises(ValueError, match="image must be"):
        OcclusionWidget(model, torch.randn(2, 3, 8, 8))


class _TwoOutputs(torch.nn.Module):
    """Scores and features, as a detection head returns them."""

    def __init__(self):
        super().__init__()
        self.inner = models.small_cnn()

    def forward(self, x):
        scores = self.inner(x)
        return scores, scores.exp()


def test_a_model_that_fails_in_the_constructor_shows_the_error(image, escaped):
    """The widget is built and shows what went wrong (here: several outputs, with
    the fix) instead of raising; with the output selected, it runs."""
    widget = OcclusionWidget(_TwoOutputs().eval(), image)
    assert "AttributeError" in widget.error and "SelectOutput" in widget.error
    assert not widget.running
    from captum_krypton import SelectOutput

    fixed = OcclusionWidget(SelectOutput(_TwoOutputs().eval(), 0), image, autorun=False)
    assert fixed.error == "" and len(fixed.classes) > 1
    assert not escaped


def test_a_new_run_clears_the_last_status_and_error(model):
    """The status line and error of a finished run describe its map; a new run
    starts with neither (they would describe a map no longer shown)."""
    image = torch.randn(3, 24, 24)
    widget = OcclusionWidget(model, image, window=4, stride=4)
    assert widget.wait(WAIT) and "of 36 windows" in widget.status
    widget.error = "RuntimeError: from the last run"
    seen = []  # what the front end is sent, in order
    widget.observe(lambda change: seen.append((change["name"], change["new"])), ["status", "error"])
    widget.stride = 2  # starts a run
    assert widget.wait(WAIT) and "of 121 windows" in widget.status
    assert seen[:2] == [("status", "running"), ("error", "")], seen
    assert seen[-1][0] == "status" and "of 121 windows" in seen[-1][1]


# ------------------------------------------------------------ what the colours mean


class Total(torch.nn.Module):
    """Two outputs: the sum of the input and its negative. On a positive image,
    occluding (with baseline 0) lowers output 0 and raises output 1."""

    def forward(self, x):
        total = x.sum(dim=(1, 2, 3))
        return torch.stack([total, -total], dim=1)


def test_greyscale_is_captums_blended_heat_map_background(model):
    """Captum draws `np.mean(image, axis=2)` with cmap "gray": matplotlib scales the
    grey image's own min..max to black..white. The widget sends that, as RGBA."""
    rng = np.random.default_rng(0)
    rgb = rng.uniform(0.2, 0.7, size=(20, 20, 3)).astype(np.float32)
    grey = occlusion.greyscale(rgb)
    expected = matplotlib.colors.Normalize()(np.mean(rgb, axis=2))
    np.testing.assert_allclose(grey, expected, atol=1e-6)
    assert grey.min() == 0 and grey.max() == pytest.approx(1)
    np.testing.assert_array_equal(occlusion.greyscale(np.full((4, 4, 3), 0.3)), 0.3)

    widget = OcclusionWidget(model, torch.randn(3, 20, 20), display_image=rgb, autorun=False)
    sent = np.frombuffer(widget.grey_rgba, np.uint8).reshape(20, 20, 4)
    np.testing.assert_array_equal(sent[..., :3], np.round(grey * 255)[..., None].repeat(3, -1))
    assert (sent[..., 3] == 255).all()
    colour = np.frombuffer(widget.image_rgba, np.uint8).reshape(20, 20, 4)
    np.testing.assert_array_equal(colour[..., :3], np.round(rgb * 255))  # kept for the probe


@pytest.mark.parametrize(
    ("sign", "limits", "ticks"),
    [
        ("all", (-3.0, 3.0), [(-3.0, "−3"), (0.0, "0"), (3.0, "3")]),
        ("positive", (0.0, 2.0), [(0.0, "0"), (1.0, "1"), (2.0, "2")]),
        ("negative", (-3.0, 0.0), [(-3.0, "−3"), (-1.5, "−1.5"), (0.0, "0")]),
        ("absolute_value", (0.0, 3.0), [(0.0, "0"), (1.5, "1.5"), (3.0, "3")]),
    ],
)
def test_colour_limits_and_ticks_follow_captums_sign(sign, limits, ticks):
    heatmap = np.array([[2.0, -3.0], [0.5, np.nan]], dtype=np.float32)
    lo, hi = occlusion.colour_limits(heatmap, sign)
    assert (lo, hi) == limits
    assert [tuple(t) for t in occlusion.colour_ticks(lo, hi)] == ticks


def test_colour_limits_of_one_sign_maps_and_of_no_map():
    positive = np.array([1.0, 4.0])
    assert occlusion.colour_limits(positive, "all") == (-4.0, 4.0)  # still zero-centred
    assert occlusion.colour_limits(positive, "positive") == (0.0, 4.0)  # from 0, not from 1
    assert occlusion.colour_limits(positive, "negative") == (0.0, 0.0)  # nothing to show
    assert occlusion.colour_limits(-positive, "negative") == (-4.0, 0.0)
    assert occlusion.colour_limits(np.full(3, np.nan), "all") == (0.0, 0.0)
    assert occlusion.colour_ticks(0.0, 0.0) == [[0.0, "0"]]
    assert occlusion.colour_ticks(-0.0123, 0.0123)[0] == [-0.0123, "−0.0123"]
    with pytest.raises(ValueError, match="sign must be one of"):
        occlusion.colour_limits(positive, "both")


def test_the_legend_names_the_quantity_the_class_and_the_sign_convention():
    image = torch.rand(3, 12, 12) + 0.1
    widget = OcclusionWidget(
        Total(), image, window=4, stride=4, target=0, class_names=["up", "down"], engine="captum"
    )
    assert widget.wait(WAIT) and widget.error == ""
    legend = widget.legend
    assert legend["title"] == (
        "Change in the model's output for “up” (target 0) when the window is occluded: "
        "output(image) − output(occluded)"
    )
    assert "> 0: occluding lowers the output; < 0: occluding raises it." in legend["note"]
    assert "4×4 windows" in legend["note"]
    assert legend["ends"] == ["occluding raises it", "occluding lowers it"]
    lo, hi = widget.value_range
    assert [value for value, _ in legend["ticks"]] == [lo, 0.0, hi]
    # The convention holds: occluding lowers output 0, and its map is > 0 everywhere.
    assert (widget.attribution > 0).all() and (_heatmap(widget) > 0).all()

    widget.target = 1  # a new run; the legend changes with the map it describes
    assert widget.wait(WAIT)
    assert "“down” (target 1)" in widget.legend["title"]
    assert (widget.attribution < 0).all()


def test_class_names_as_a_mapping_or_unknown():
    image = torch.rand(3, 8, 8)
    named = OcclusionWidget(Total(), image, target=1, class_names={1: "down"}, autorun=False)
    assert "for “down” (target 1) when" in named.legend["title"]
    assert named.legend["ticks"] == []  # no map yet: no scale
    assert [c["label"] for c in named.classes] == ["class 0", "down"]
    unnamed = OcclusionWidget(Total(), image, target=1, autorun=False)
    assert "output for target 1 when" in unnamed.legend["title"]


def test_labels_is_a_deprecated_name_for_class_names(model, image):
    with pytest.warns(FutureWarning, match="renamed class_names"):
        widget = OcclusionWidget(model, image, labels=list("abcde"), autorun=False)
    assert widget.classes[0]["label"] in "abcde"
    with pytest.raises(TypeError, match="class_names only"):
        OcclusionWidget(model, image, labels=["a"], class_names=["a"], autorun=False)


def test_sign_changes_the_colours_and_legend_without_a_run(model, image):
    widget = OcclusionWidget(model, image, window=4, stride=2)
    assert widget.wait(WAIT) and widget.run_count == 1
    heat = _heatmap(widget)
    luts = {}
    for sign in occlusion.SIGNS:
        widget.sign = sign
        assert widget.value_range == list(occlusion.colour_limits(heat, sign))
        lo, hi = widget.value_range
        assert widget.legend["ticks"] == occlusion.colour_ticks(lo, hi)
        luts[sign] = np.frombuffer(widget.colormap_lut, np.uint8).reshape(256, 4)
    assert widget.run_count == 1 and not widget.running  # colours start no run

    def table(name):
        return matplotlib.colormaps[name](np.linspace(0, 1, 256), bytes=True)

    np.testing.assert_array_equal(luts["all"], table("RdBu_r"))  # diverging, 0 white
    np.testing.assert_array_equal(luts["positive"], table("Reds"))  # sequential from 0
    np.testing.assert_array_equal(luts["absolute_value"], table("Purples"))
    # "negative": the most negative value (the left end) gets the far end, as in Captum.
    np.testing.assert_array_equal(luts["negative"], table("Blues")[::-1])
    widget.sign = "negative"
    assert "Values < 0 only" in widget.legend["note"]
    widget.colormap = "viridis"
    expected = table("viridis")[::-1]
    assert widget.colormap_lut == expected.astype(np.uint8).tobytes()
    with pytest.raises(traitlets.TraitError):
        widget.sign = "both"


@pytest.mark.parametrize("sign", ["all", "negative"])
def test_save_png_uses_the_widgets_sign(tmp_path, monkeypatch, sign):
    from captum.attr import visualization

    seen = {}
    real = visualization.visualize_image_attr

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(visualization, "visualize_image_attr", spy)
    # Target 1 of Total on a positive image: a map < 0 everywhere.
    widget = OcclusionWidget(Total(), torch.rand(3, 8, 8) + 0.1, window=4, stride=4, target=1)
    widget.sign = sign
    assert widget.wait(WAIT)
    widget.save_png(tmp_path / "map.png")
    assert seen["method"] == "blended_heat_map" and seen["sign"] == sign
    assert seen["cmap"] == occlusion.AUTO_COLORMAPS[sign]
    assert seen["alpha_overlay"] == widget.opacity
    widget.sign = "positive"  # no value > 0: Captum cannot scale it
    with pytest.raises(ValueError, match="the map has no values > 0"):
        widget.save_png(tmp_path / "none.png")
