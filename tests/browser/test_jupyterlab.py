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
    "image": __import__("base64").b64encode({w}.image_rgba).decode(),
    "heatmap": __import__("base64").b64encode({w}.heatmap).decode(),
    "lut": __import__("base64").b64encode({w}.colormap_lut).decode(),
    "size": {w}.image_size,
    "range": {w}.value_range,
    "opacity": {w}.opacity,
}}"""


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
    """The image with the heatmap blended over it, as the front end should draw it."""
    height, width = state["size"]
    image = decode(state["image"]).reshape(height, width, 4).astype(np.float64)
    heat = decode(state["heatmap"], np.float32).reshape(height, width)
    lut = decode(state["lut"]).reshape(256, 4).astype(np.float64)
    lo, hi = state["range"]
    span = hi - lo if hi > lo else 1.0
    index = np.clip(np.round((np.nan_to_num(heat) - lo) / span * 255), 0, 255)
    colour = lut[index.astype(int), :3]
    alpha = state["opacity"]
    blended = np.where(
        np.isfinite(heat)[..., None], (1 - alpha) * image[..., :3] + alpha * colour, image[..., :3]
    )
    image[..., :3] = np.round(blended)
    return image.astype(np.uint8)


def overlay_fraction(page, kernel, index: int, widget: str) -> float:
    """Fraction of canvas pixels that differ from the plain image (0 until drawn)."""
    pixels = canvas_pixels(page, index)
    if pixels is None or pixels[..., 3].max() == 0:
        return 0.0
    plain = decode(kernel.eval(f"__import__('base64').b64encode({widget}.image_rgba).decode()"))
    plain = plain.reshape(pixels.shape)
    changed = np.abs(pixels[..., :3].astype(int) - plain[..., :3]).max(axis=-1) > 8
    return float(changed.mean())


def assert_heatmap_drawn(page, kernel, index: int = 0, widget: str = "widget") -> None:
    """Wait until the canvas shows an overlay, then check it is the widget's heatmap."""
    wait_for(
        lambda: overlay_fraction(page, kernel, index, widget) > OVERLAY_FRACTION,
        RUN_TIMEOUT,
        0.25,
        "a heatmap overlay on the canvas",
    )
    expected = expected_pixels(kernel.eval(DRAWN_STATE.format(w=widget)))
    pixels = canvas_pixels(page, index)
    assert pixels.shape == expected.shape
    off = np.abs(pixels.astype(int) - expected).max()
    assert off <= 2, f"canvas differs from the blended heatmap by up to {off}"


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
    assert_heatmap_drawn(page, kernel)
    expect(first.locator(".ckw-status")).not_to_be_empty()
    screenshot("first-run")

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
    kernel.run("widget.stride = 1")
    wait_for_partial_map(kernel, "widget")
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
        assert_heatmap_drawn(page, kernel)
        expect(page.locator(".ckw-root").first.locator(".ckw-status")).not_to_be_empty()
        screenshot("first-run")
    finally:
        kernel.close()
