"""The occlusion widget in real front ends: JupyterLab and Notebook 7 in headless
Chromium, each running the example notebook against a real kernel."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.browser.conftest import CHROMIUM, wait_for

pytest.importorskip("playwright.sync_api")
pytest.importorskip("jupyterlab")
pytest.importorskip("notebook")
pytest.importorskip("jupyter_client")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing", allow_module_level=True)

from playwright.sync_api import expect  # noqa: E402

pytestmark = pytest.mark.browser

#: Seconds for a run of the demo model on a small CPU, with browser and server busy.
RUN_TIMEOUT = 60
#: Seconds a cancelled run may take to stop.
CANCEL_TIMEOUT = 5
#: Fraction of pixels the heatmap overlay must change.
OVERLAY_FRACTION = 0.5

OPEN_NOTEBOOK_JS = """(path) => {
    const panel = window.jupyterapp?.shell?.currentWidget;
    return !!(panel && panel.sessionContext && panel.context && panel.context.path === path);
}"""
RUN_ALL_JS = """async () => {
    const app = window.jupyterapp;
    const panel = app.shell.currentWidget;
    await panel.context.ready;
    await panel.sessionContext.ready;
    void app.commands.execute("notebook:run-all-cells");
}"""
CANVAS_PIXELS_JS = """(index) => {
    const canvas = document.querySelectorAll("canvas.ckw-heatmap")[index];
    if (!canvas || !canvas.width || !canvas.height) return null;
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    let text = "";
    for (let i = 0; i < data.length; i += 8192) {
        text += String.fromCharCode.apply(null, data.subarray(i, i + 8192));
    }
    return { height: canvas.height, width: canvas.width, rgba: btoa(text) };
}"""
DRAWN_STATE = """{{
    "grey": __import__("base64").b64encode({w}.grey_rgba).decode(),
    "heatmap": __import__("base64").b64encode({w}.heatmap).decode(),
    "lut": __import__("base64").b64encode({w}.colormap_lut).decode(),
    "size": {w}.image_size,
    "range": {w}.value_range,
    "sign": {w}.sign,
    "opacity": {w}.opacity,
    "legend": {w}.legend,
}}"""
LEGEND_JS = """(index) => {
    const root = document.querySelectorAll(".ckw-root")[index];
    const bar = root.querySelector("canvas.ckw-legend");
    const data = bar.getContext("2d").getImageData(0, 0, bar.width, bar.height).data;
    const row = Math.floor(bar.height / 2) * bar.width * 4;
    const colour = (x) => Array.from(data.subarray(row + 4 * x, row + 4 * x + 3));
    const box = bar.getBoundingClientRect();
    const left = box.left + bar.clientLeft;
    const text = (selector) => root.querySelector(selector).textContent;
    return {
        title: text(".ckw-legend-title"),
        note: text(".ckw-legend-note"),
        ends: [...root.querySelectorAll(".ckw-end")].map((e) => e.textContent),
        ticks: [...root.querySelectorAll(".ckw-tick")].map((tick) => {
            const r = tick.getBoundingClientRect();
            return [tick.textContent, (r.left + r.width / 2 - left) / bar.clientWidth];
        }),
        width: bar.width,
        colours: [colour(0), colour(Math.floor((bar.width - 1) / 2)), colour(bar.width - 1)],
    };
}"""


def decode(text: str, dtype=np.uint8) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype)


def open_and_run_all(page, jupyter, app_path: str):
    """Open the example notebook in a front end, run all cells; the kernel's client."""
    path = jupyter.copy_notebook()
    page.goto(jupyter.page_url(f"{app_path}/{path}"))
    page.wait_for_function(OPEN_NOTEBOOK_JS, arg=path, timeout=60_000)
    page.evaluate(RUN_ALL_JS)
    kernel = jupyter.kernel_for(path)
    try:
        kernel.wait_until("'flaky_widget' in globals()", RUN_TIMEOUT)  # the last cell ran
    except BaseException:
        kernel.close()
        raise
    return kernel


def canvas_pixels(page, index: int) -> np.ndarray | None:
    """The heatmap canvas of the `index`-th widget on the page, (H, W, 4) uint8."""
    shown = page.evaluate(CANVAS_PIXELS_JS, index)
    if shown is None:
        return None
    return decode(shown["rgba"]).reshape(shown["height"], shown["width"], 4)


def expected_pixels(state: dict) -> np.ndarray:
    """The heatmap blended over the greyscale image (Captum's blended heat map), as
    the front end should draw it: alpha `opacity`, the value (|value| for sign
    "absolute_value") placed between the colour limits and clamped to them."""
    height, width = state["size"]
    image = decode(state["grey"]).reshape(height, width, 4).astype(np.float64)
    heat = decode(state["heatmap"], np.float32).reshape(height, width)
    lut = decode(state["lut"]).reshape(256, 4).astype(np.float64)
    lo, hi = state["range"]
    value = np.nan_to_num(heat)
    if state["sign"] == "absolute_value":
        value = np.abs(value)
    if hi > lo:
        position = (value - lo) / (hi - lo)
    else:
        position = np.full_like(value, 0.5 if state["sign"] == "all" else 0.0)
    index = np.clip(np.round(position * 255), 0, 255)
    colour = lut[index.astype(int), :3]
    alpha = state["opacity"]
    blended = np.where(
        np.isfinite(heat)[..., None], (1 - alpha) * image[..., :3] + alpha * colour, image[..., :3]
    )
    image[..., :3] = np.round(blended)
    return image.astype(np.uint8)


def grey_image(kernel, widget: str) -> np.ndarray:
    """The greyscale image the widget draws under its heatmap, (H, W, 4) uint8."""
    height, width = kernel.eval(f"{widget}.image_size")
    grey = decode(kernel.eval(f"__import__('base64').b64encode({widget}.grey_rgba).decode()"))
    return grey.reshape(height, width, 4)


def overlay_fraction(page, kernel, index: int, widget: str) -> float:
    """Fraction of canvas pixels that differ from the greyscale image (0 until drawn)."""
    pixels = canvas_pixels(page, index)
    if pixels is None or pixels[..., 3].max() == 0:
        return 0.0
    plain = grey_image(kernel, widget)
    changed = np.abs(pixels[..., :3].astype(int) - plain[..., :3]).max(axis=-1) > 8
    return float(changed.mean())


def assert_heatmap_drawn(page, kernel, index: int = 0, widget: str = "widget") -> dict:
    """Wait until the canvas shows an overlay and then until it is the widget's
    heatmap as it is now (colours follow trait changes); the state drawn."""
    wait_for(
        lambda: overlay_fraction(page, kernel, index, widget) > OVERLAY_FRACTION,
        RUN_TIMEOUT,
        0.25,
        "a heatmap overlay on the canvas",
    )
    seen = {}

    def matches():
        seen["state"] = kernel.eval(DRAWN_STATE.format(w=widget))
        expected = expected_pixels(seen["state"])
        pixels = canvas_pixels(page, index)
        assert pixels.shape == expected.shape
        seen["off"] = int(np.abs(pixels.astype(int) - expected).max())
        return seen["off"] <= 2

    try:
        wait_for(matches, 10, 0.25, "the canvas to match the blended heatmap")
    except TimeoutError:
        pytest.fail(f"canvas differs from the blended heatmap by up to {seen['off']}")
    return seen["state"]


def assert_legend_drawn(page, state: dict, index: int = 0) -> dict:
    """The colorbar and legend on the page are the widget's: its words, its ticks at
    their values' places on the bar, and the bar's colours from the lookup table."""
    lo, hi = state["range"]
    legend = state["legend"]
    expected_ticks = [label for _, label in legend["ticks"]]
    wait_for(
        lambda: [t for t, _ in page.evaluate(LEGEND_JS, index)["ticks"]] == expected_ticks,
        10,
        0.25,
        f"the colorbar ticks {expected_ticks}",
    )
    shown = page.evaluate(LEGEND_JS, index)
    assert shown["title"] == legend["title"] and shown["note"] == legend["note"], shown
    assert shown["ends"] == legend["ends"], shown
    for (label, centre), (value, _) in zip(shown["ticks"], legend["ticks"]):
        assert centre == pytest.approx((value - lo) / (hi - lo), abs=0.02), (label, shown)
    lut = decode(state["lut"]).reshape(256, 4)
    middle = round((shown["width"] - 1) // 2 / (shown["width"] - 1) * 255)
    for colour, entry in zip(shown["colours"], (0, middle, 255)):
        assert np.abs(np.array(colour) - lut[entry, :3]).max() <= 1, (shown["colours"], entry)
    return shown


def finished_run(kernel, widget: str, after: int) -> dict:
    """Wait for a run that ended after `after` runs, with nothing running; its state."""
    kernel.wait_until(f"{widget}.run_count > {after} and not {widget}.running", RUN_TIMEOUT)
    return kernel.eval(
        f"dict(run_count={widget}.run_count, status={widget}.status, error={widget}.error, "
        f"progress={widget}.progress, tau={widget}.tau, approximate={widget}.approximate, "
        f"checksum=None if {widget}.attribution is None else float({widget}.attribution.sum()))"
    )


def wait_for_partial_map(kernel, widget: str) -> None:
    """Wait until the running run has sent a map with some but not all windows."""
    expression = (
        f"({widget}.running, {widget}.progress.get('done', 0), {widget}.progress.get('planned'))"
    )

    def partial():
        running, done, planned = kernel.eval(expression)
        if not running:
            raise AssertionError(
                f"the run ended before sending a partial map (done {done} of {planned}): "
                "no live heatmap, nothing left to cancel"
            )
        return 0 < done < planned

    wait_for(partial, RUN_TIMEOUT, 0.05, "a partial map")


def test_widget_in_jupyterlab(page, jupyter, screenshot):
    kernel = open_and_run_all(page, jupyter, "lab/tree")
    try:
        run_widget_in_jupyterlab(page, kernel, screenshot)
    finally:
        kernel.close()


def run_widget_in_jupyterlab(page, kernel, screenshot):
    first = page.locator(".ckw-root").nth(0)
    second = page.locator(".ckw-root").nth(1)

    # The first run: heatmap drawn, attribution ready on the Python side.
    initial = finished_run(kernel, "widget", 0)
    assert initial["checksum"] is not None, initial
    assert initial["error"] == "", initial
    state = assert_heatmap_drawn(page, kernel)
    expect(first.locator(".ckw-status")).not_to_be_empty()
    first.scroll_into_view_if_needed()
    screenshot("first-run")

    # Under the heatmap: the image in greyscale (opacity 0 shows it alone).
    grey = grey_image(kernel, "widget")
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert grey[..., 0].min() == 0 and grey[..., 0].max() == 255  # stretched, as Captum's
    kernel.run("widget.opacity = 0.0")
    wait_for(lambda: np.array_equal(canvas_pixels(page, 0), grey), 10, 0.25, "the greyscale image")
    kernel.run("widget.opacity = 0.6")

    # The legend: what the values are, for the class shown, with Captum's sign
    # convention; a zero-centred colorbar (0 in the middle, white in RdBu_r).
    name = kernel.eval("widget.classes[0]['label']")
    target = kernel.eval("widget.target")
    assert f"for “{name}” (target {target}) when the window is occluded" in state["legend"]["title"]
    assert "output(image) − output(occluded)" in state["legend"]["title"]
    lo, hi = state["range"]
    assert state["sign"] == "all" and hi == -lo > 0, state["range"]
    legend = assert_legend_drawn(page, state)
    assert [label for label, _ in legend["ticks"]][1] == "0"
    assert legend["ticks"][1][1] == pytest.approx(0.5, abs=0.02)
    assert min(legend["colours"][1]) > 230, legend["colours"]  # near white at 0
    assert legend["ends"] == ["occluding raises it", "occluding lowers it"]
    expect(first.locator(".ckw-legend-note")).to_contain_text("> 0: occluding lowers the output")

    # One-signed views from the browser's sign menu: a sequential colorbar from 0,
    # colours only (no new run).
    runs = kernel.eval("widget.run_count")
    for sign in ("absolute_value", "negative", "all"):
        first.locator("select.ckw-sign").select_option(sign)
        kernel.wait_until(f"widget.sign == {sign!r}")
        state = assert_heatmap_drawn(page, kernel)
        assert_legend_drawn(page, state)
        lo, hi = state["range"]
        if sign == "absolute_value":
            assert lo == 0 < hi, state["range"]
            screenshot("absolute-value")
        elif sign == "negative":
            assert lo <= 0 == hi, state["range"]
    assert kernel.eval("widget.run_count") == runs and not kernel.eval("widget.running")

    # Tau from the browser: tick "approximate", then move the slider with the keyboard
    # (on the demo model, tau above 0.3 caps no changed box: the map stays exact).
    first.locator("input.ckw-approximate").check()
    kernel.wait_until("widget.approximate")
    tau = first.locator("input.ckw-tau")
    expect(tau).to_be_enabled()
    tau.focus()
    for key in ("Home", "ArrowRight", "ArrowRight"):
        tau.press(key)
    expect(tau).to_have_value("0.2")
    kernel.wait_until("abs(widget.tau - 0.2) < 1e-9")
    approximate = finished_run(kernel, "widget", initial["run_count"])
    assert approximate["approximate"], approximate
    assert approximate["error"] == "" and "cancelled" not in approximate["status"], approximate
    assert approximate["checksum"] is not None, approximate
    assert approximate["checksum"] != initial["checksum"], (initial, approximate)
    assert_heatmap_drawn(page, kernel)
    screenshot("tau")

    # Cancel from the browser while a slow run (stride 1) is part-way through.
    expect(first.locator(".ckw-status")).not_to_have_text("running")  # the last summary
    kernel.run("widget.stride = 1")
    wait_for_partial_map(kernel, "widget")
    # The last run's summary is gone as soon as this one starts.
    expect(first.locator(".ckw-status")).to_have_text("running")
    first.locator("button.ckw-cancel").click()
    kernel.wait_until("not widget.running", CANCEL_TIMEOUT)
    cancelled = finished_run(kernel, "widget", approximate["run_count"])
    progress = cancelled["progress"]
    assert "cancelled" in cancelled["status"], cancelled
    assert progress["done"] < progress["planned"], f"the run was not stopped early: {cancelled}"
    expect(first.locator("button.ckw-cancel")).to_be_disabled()
    screenshot("cancelled")

    # A model that raises: the error is shown, and the widget still works afterwards.
    runs = kernel.eval("flaky_widget.run_count")
    kernel.run("flaky.broken = True; flaky_widget.compute()")
    expect(second.locator(".ckw-error")).to_contain_text("failed on purpose", timeout=30_000)
    failed = finished_run(kernel, "flaky_widget", runs)
    assert "failed on purpose" in failed["error"], failed
    screenshot("model-error")

    kernel.run("flaky.broken = False; flaky_widget.compute()")
    recovered = finished_run(kernel, "flaky_widget", failed["run_count"])
    assert recovered["error"] == "" and recovered["checksum"] is not None, recovered
    expect(second.locator(".ckw-error")).to_have_text("")
    assert_heatmap_drawn(page, kernel, 1, "flaky_widget")
    screenshot("recovered")


def test_widget_in_notebook7(page, jupyter, screenshot):
    kernel = open_and_run_all(page, jupyter, "notebooks")
    try:
        state = finished_run(kernel, "widget", 0)
        assert state["checksum"] is not None and state["error"] == "", state
        drawn = assert_heatmap_drawn(page, kernel)
        assert_legend_drawn(page, drawn)
        expect(page.locator(".ckw-root").first.locator(".ckw-status")).not_to_be_empty()
        screenshot("first-run")
    finally:
        kernel.close()
