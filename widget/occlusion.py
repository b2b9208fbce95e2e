"""OcclusionWidget: an anywidget that shows IncrementalOcclusion's heatmap live.

Python owns the computation and the colours: runs go to a worker thread (so the
controls answer while a run is going), every progress report is sent to the
front end as a float32 buffer, and colormaps come from matplotlib as 256-entry
lookup tables; the colour limits, the colorbar's ticks and the legend's words are
computed here too. The heatmap is drawn as Captum's
`visualize_image_attr(..., method="blended_heat_map")` draws it: over a greyscale
version of the image, with the heatmap's colours at alpha `opacity`. The front end
(js/widget.js) draws, reads controls and mouse input, and sends three messages:
compute, cancel and probe.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anywidget
import matplotlib
import numpy as np
import torch
import traitlets

from captum_krypton import IncrementalOcclusion, OcclusionProgress, attribution_ssim
from captum_krypton.capture.graph import not_one_tensor
from captum_krypton.engine.windows import WindowGrid


def _static_dir() -> Path:
    """The front end's files: `static/` beside this module in an installed wheel,
    the repository's `js/` in a source checkout (editable install)."""
    installed = Path(__file__).with_name("static")
    return installed if installed.is_dir() else Path(__file__).resolve().parents[1] / "js"


STATIC = _static_dir()

#: Settings whose change starts a new run (cancelling one in progress).
RUN_SETTINGS = (
    "window",
    "stride",
    "approximate",
    "tau",
    "drilldown",
    "target_ssim",
    "target",
    "roi",
)
#: Classes offered in the target menu.
TOP_CLASSES = 5
#: Which values the heatmap shows, as Captum's `visualize_image_attr(sign=...)`:
#: "all" (signed, zero-centred colorbar), "positive" (values > 0, others drawn as 0),
#: "negative" (values < 0, others drawn as 0), "absolute_value" (|value|).
SIGNS = ("all", "positive", "negative", "absolute_value")
#: The colormap "auto" picks for each sign: diverging for signed maps, a sequential
#: one starting at white (value 0) for the others, red for the positive side and
#: blue for the negative side as in the diverging one.
AUTO_COLORMAPS = {
    "all": "RdBu_r",
    "positive": "Reds",
    "negative": "Blues",
    "absolute_value": "Purples",
}
#: A run is split into about this many window batches (each sends a map), unless
#: the caller sets `windows_per_batch` or `max_memory`; batches keep at least
#: MIN_BATCH windows.
UPDATES_PER_RUN = 20
MIN_BATCH = 16
#: Captum's batch for the time estimate of its own Occlusion.
CAPTUM_BATCH = 64


class OcclusionWidget(anywidget.AnyWidget):
    """The occlusion heatmap of `model` on `image`, computed live, with controls.

    Args:
        model: a CNN returning class scores, shaped (N, num_classes).
        image: its input, (C, H, W) or (1, C, H, W), already normalized.
        target: the output index to explain, as Captum's `target` (default: the
            top class).
        window, stride: the occlusion window side and stride, in pixels (the
            window spans all channels).
        display_image: the picture under the heatmap, (H, W, 3), (3, H, W) or
            (H, W), values in [0, 1]; default: the input, scaled to [0, 1]. It is
            drawn in greyscale under the heatmap, as Captum's blended heat map.
        autorun: start a run at once.
        class_names (keyword only): names of the model's outputs, for the class
            menu and the legend. Either a sequence of num_classes strings,
            `class_names[i]` naming output i (torchvision's
            `weights.meta["categories"]`, a dataset's `.classes`), or a mapping
            {index: name} that may name only some classes. Unnamed classes show
            as their index.
        labels: the former name of `class_names` (deprecated).
        attribute_options: passed on to `IncrementalOcclusion.attribute` (for
            example `baselines=` or `kernels=`).

    What the colours mean: the map is Captum's Occlusion attribution averaged over
    the channels: per pixel, output(image) - output(occluded) for the target,
    averaged over the windows covering the pixel. Positive: occluding the window
    lowers the target's output; negative: it raises it. `sign` picks which values
    are drawn, with Captum's names ("all", "positive", "negative",
    "absolute_value"); `value_range` holds the colorbar's limits (symmetric,
    +-max|value|, for "all"; from 0 for the others) and `legend` its words and
    ticks. `colormap` "auto" is diverging (RdBu_r: red > 0, blue < 0, white 0) for
    "all" and sequential from white at 0 otherwise (Reds, Blues, Purples).

    Runs go to a worker thread; an exception anywhere in it (the model, sending a
    map, the status summary) is caught and shown: `error` holds its message,
    `status` reads "failed" (or says the map was complete when only the summary
    after it failed, the map then kept), `running` goes back to False, and a later
    `compute()` runs normally. The speedup over Captum's Occlusion is estimated by
    timing the model on a batch of CAPTUM_BATCH copies of the input; where the model
    does not accept that batch, the run still succeeds (map kept, `error` empty)
    and the status says the speedup could not be estimated.
    """

    _esm = STATIC / "widget.js"
    _css = STATIC / "widget.css"

    #: The display image, H x W x 4 uint8 (RGBA, opaque).
    image_rgba = traitlets.Bytes(b"").tag(sync=True)
    #: The display image in greyscale, as under Captum's blended heat map; RGBA.
    grey_rgba = traitlets.Bytes(b"").tag(sync=True)
    image_size = traitlets.List(traitlets.Int(), default_value=[0, 0]).tag(sync=True)
    #: The map shown, H x W float32 (channel mean); NaN where not computed.
    heatmap = traitlets.Bytes(b"").tag(sync=True)
    #: The colorbar's limits [lo, hi]: values at or beyond them get its end colours.
    value_range = traitlets.List(traitlets.Float(), default_value=[0.0, 0.0]).tag(sync=True)
    #: Which values are drawn (Captum's `sign`): one of SIGNS.
    sign = traitlets.Enum(SIGNS, "all").tag(sync=True)
    colormap = traitlets.Unicode("auto").tag(sync=True)
    #: 256 x 4 uint8, the colours from value_range[0] to value_range[1].
    colormap_lut = traitlets.Bytes(b"").tag(sync=True)
    #: The heatmap's alpha over the greyscale image (Captum's `alpha_overlay`).
    opacity = traitlets.Float(0.6, min=0.0, max=1.0).tag(sync=True)
    #: What the colours mean: {"title", "note", "ticks": [[value, label], ...],
    #: "ends": [left caption, right caption]} for the colorbar.
    legend = traitlets.Dict().tag(sync=True)

    window = traitlets.Int(12, min=1).tag(sync=True)
    stride = traitlets.Int(6, min=1).tag(sync=True)
    approximate = traitlets.Bool(False).tag(sync=True)
    tau = traitlets.Float(1.0).tag(sync=True)
    drilldown = traitlets.Float(0.0).tag(sync=True)
    target_ssim = traitlets.Float(0.0).tag(sync=True)
    target = traitlets.Int(0).tag(sync=True)
    classes = traitlets.List(traitlets.Dict()).tag(sync=True)
    roi = traitlets.List(traitlets.Int()).tag(sync=True)

    running = traitlets.Bool(False).tag(sync=True)
    progress = traitlets.Dict().tag(sync=True)
    status = traitlets.Unicode("").tag(sync=True)
    error = traitlets.Unicode("").tag(sync=True)
    run_count = traitlets.Int(0).tag(sync=True)
    probe = traitlets.Dict().tag(sync=True)
    probe_rgba = traitlets.Bytes(b"").tag(sync=True)

    def __init__(
        self,
        model: torch.nn.Module,
        image: torch.Tensor,
        target: int | None = None,
        labels: Sequence[str] | Mapping[int, str] | None = None,
        window: int = 12,
        stride: int = 6,
        display_image: Any = None,
        autorun: bool = True,
        *,
        class_names: Sequence[str] | Mapping[int, str] | None = None,
        **attribute_options: Any,
    ) -> None:
        inputs = image if image.dim() == 4 else image.unsqueeze(0)
        if inputs.dim() != 4 or inputs.shape[0] != 1:
            raise ValueError(f"image must be (C, H, W) or (1, C, H, W), not {tuple(image.shape)}")
        if labels is not None:
            if class_names is not None:
                raise TypeError("give class_names only (labels is its former name)")
            warnings.warn(
                "OcclusionWidget(labels=...) is renamed class_names=...",
                FutureWarning,
                stacklevel=2,
            )
            class_names = labels
        self.model = model
        self.inputs = inputs
        self.attribute_options = attribute_options
        self.occlusion = IncrementalOcclusion(model)
        #: The last complete run's attribution, shaped like Captum's (or None).
        self.attribution: torch.Tensor | None = None
        self._class_names = class_names
        #: The map on screen (channel mean) and the (target, window) it was run with.
        self._heat: np.ndarray | None = None
        self._heat_run: tuple[int, tuple[int, int]] | None = None
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._cancel = threading.Event()
        self._generation = 0
        self._exact: dict[tuple, torch.Tensor] = {}
        self._captum_seconds_per_batch: float | None = None
        self._captum_estimate_failure: str | None = None
        self._display = _display_rgb(display_image, inputs[0])
        failure = None
        try:
            classes = self._top_classes()
        except Exception as exc:  # shown in the widget, as errors of a run are
            classes = [{"index": 0, "label": "output 0", "probability": float("nan")}]
            failure = f"{type(exc).__name__}: {exc}"
        super().__init__(
            image_rgba=_rgba_bytes(self._display),
            grey_rgba=_rgba_bytes(np.repeat(greyscale(self._display)[..., None], 3, axis=-1)),
            image_size=list(self._display.shape[:2]),
            classes=classes,
            target=classes[0]["index"] if target is None else int(target),
            window=window,
            stride=stride,
        )
        self._set_colours()
        self.on_msg(self._on_message)
        self.observe(self._restart, names=list(RUN_SETTINGS))
        if failure is not None:
            self.error = failure  # the model fails on the image: nothing to run
        elif autorun:
            self.compute()

    # ------------------------------------------------------------ public
    def compute(self) -> None:
        """Start a run with the current settings (cancelling one in progress)."""
        with self._lock:
            self._cancel.set()
            previous = self._worker
            self._generation += 1
            self._cancel = threading.Event()
            self._worker = threading.Thread(
                target=self._run,
                args=(self._generation, self._cancel, previous, self._options()),
                daemon=True,
            )
            self.running = True
            # The last run's summary or error would describe a map no longer shown.
            self.status, self.error = "running", ""
            self._worker.start()

    def cancel(self) -> None:
        """Stop the run in progress after the batch in flight; its map so far stays."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the current run to end; False if it is still going after `timeout`."""
        worker = self._worker
        if worker is not None:
            worker.join(timeout)
            return not worker.is_alive()
        return True

    def save_png(self, path: str | Path) -> None:
        """The image with the last heatmap blended over it, with a colour bar:
        Captum's `visualize_image_attr(method="blended_heat_map")`, with the
        widget's `sign`, colormap and opacity (Captum scales the values to [-1, 1]
        or [0, 1] itself). Raises RuntimeError before a run is complete, and
        ValueError when `sign` leaves nothing to draw (Captum cannot scale it)."""
        from captum.attr import visualization

        if self.attribution is None:
            raise RuntimeError("no complete attribution yet: wait for a run to finish")
        attribution = self.attribution[0].detach().cpu().permute(1, 2, 0).numpy()
        attribution = np.nan_to_num(attribution)  # a region's map: nothing outside it
        below, above = attribution < 0, attribution > 0
        drawn = {"positive": above, "negative": below}.get(self.sign, below | above)
        if not drawn.any():  # Captum's scaling would divide by zero
            what = {"positive": "values > 0", "negative": "values < 0"}.get(
                self.sign, "values other than 0"
            )
            raise ValueError(f"nothing to draw with sign {self.sign!r}: the map has no {what}")
        figure, _ = visualization.visualize_image_attr(
            attribution,
            self._display,
            method="blended_heat_map",
            sign=self.sign,
            cmap=self._colormap_name(),
            alpha_overlay=self.opacity,
            show_colorbar=True,
            use_pyplot=False,
        )
        figure.savefig(path)

    # ------------------------------------------------------------ runs
    def _options(self) -> dict[str, Any]:
        window = min(self.window, *self.inputs.shape[2:])
        options: dict[str, Any] = dict(
            sliding_window_shapes=(self.inputs.shape[1], window, window),
            strides=(
                self.inputs.shape[1],
                max(1, min(self.stride, window)),
                max(1, min(self.stride, window)),
            ),
            target=self.target,
            **self.attribute_options,
        )
        if "windows_per_batch" not in options and "max_memory" not in options:
            # Batches small enough for a live map and a prompt cancel.
            grid = WindowGrid(
                tuple(self.inputs.shape[1:]),
                options["sliding_window_shapes"],
                options["strides"],
            )
            options["windows_per_batch"] = max(
                MIN_BATCH, math.ceil(grid.num_windows / UPDATES_PER_RUN)
            )
        if self.approximate:
            if self.target_ssim > 0:
                options["target_ssim"] = self.target_ssim
            else:
                options["tau"] = self.tau
                if self.drilldown > 0 and not self.roi:
                    options["drilldown"] = self.drilldown
        if self.roi:
            options["region"] = tuple(int(v) for v in self.roi)
            options.pop("target_ssim", None)
        return options

    def _restart(self, change: dict) -> None:
        self.compute()

    @traitlets.observe("colormap", "sign")
    def _colours_changed(self, change: dict) -> None:
        self._set_colours()

    def _run(
        self,
        generation: int,
        cancel: threading.Event,
        previous: threading.Thread | None,
        options: dict[str, Any],
    ) -> None:
        """A run, in the worker thread. Whatever raises in it (the model, sending
        maps, the status summary) is caught: `error` and `status` say what failed,
        `running` goes back to False and the next `compute()` starts afresh. A map
        that was complete before the failure stays in `attribution` and on screen.
        The speedup estimate does not fail a run (see `_speedup`)."""
        if previous is not None:
            previous.join()  # one run at a time uses the engine
        if cancel.is_set():
            return  # superseded before it began: the newer run reports
        complete = False
        try:
            started = time.perf_counter()
            self.error = ""
            report: OcclusionProgress | None = None
            for report in self.occlusion.attribute_stream(self.inputs, cancel=cancel, **options):
                if generation != self._generation:
                    break
                self._show(report, options)
            if report is not None and report.complete and generation == self._generation:
                self.attribution = report.attribution
                complete = True
                self.status = self._summary(report, options, time.perf_counter() - started)
            elif report is not None:
                self.status = (
                    f"cancelled after {report.windows_done} of {report.windows_planned} windows"
                )
        except Exception as exc:  # shown in the widget; the thread ends normally
            self.error = f"{type(exc).__name__}: {exc}"
            self.status = "map complete, then its summary failed" if complete else "failed"
        finally:
            if generation == self._generation:
                self.running = False
            self.run_count += 1

    def _show(self, report: OcclusionProgress, options: dict[str, Any]) -> None:
        """Send a progress report's heatmap (channel mean, float32), its colour
        limits and legend, and the counters."""
        heatmap = report.attribution[0].detach().float().mean(0).cpu().numpy()
        self._heat = heatmap
        self._heat_run = (int(options["target"]), tuple(options["sliding_window_shapes"][1:]))
        self._set_colours()
        done, planned = report.windows_done, report.windows_planned
        eta = report.elapsed / done * (planned - done) if done else None
        self.heatmap = np.ascontiguousarray(heatmap, dtype=np.float32).tobytes()
        self.progress = {
            "done": done,
            "planned": planned,
            "total": report.windows_total,
            "elapsed": report.elapsed,
            "eta": eta,
            "stage": report.stage,
        }

    def _summary(self, report: OcclusionProgress, options: dict, seconds: float) -> str:
        parts = [
            f"{seconds:.2f} s, {report.windows_done} of {report.windows_total} windows",
            self._speedup(report.windows_total, seconds),
        ]
        key = (options["sliding_window_shapes"], options["strides"], self.target, tuple(self.roi))
        if report.approximation.exact and "region" not in options:
            self._exact[key] = report.attribution
        elif key in self._exact:
            ssim = float(attribution_ssim(report.attribution, self._exact[key])[0])
            parts.append(f"SSIM vs exact {ssim:.3f}")
        settings = report.approximation
        if not settings.exact:
            chosen = f"tau {settings.tau:g}"
            if settings.drilldown is not None:
                chosen += f", drill-down {settings.drilldown:g}"
            parts.append(chosen)
        return "; ".join(parts)

    def _speedup(self, windows: int, seconds: float) -> str:
        """The status's speedup over Captum's Occlusion, its time from one timed batch.

        The estimate runs the model on a batch of CAPTUM_BATCH copies of the input,
        which not every model accepts (one written for a single example, say, or
        a batch too large for the device). Then the run is not failed: its map is
        kept and shown, `error` stays empty, and this part of the status says the
        speedup could not be estimated and why. The outcome is remembered, so later
        runs neither time the model again nor fail again."""
        if self._captum_seconds_per_batch is None and self._captum_estimate_failure is None:
            try:
                self._captum_seconds_per_batch = self._time_captum_batch()
            except Exception as exc:  # the model's limits, not the run's fault
                message = str(exc).strip().splitlines()
                self._captum_estimate_failure = type(exc).__name__ + (
                    f": {message[0]}" if message else ""
                )
        if self._captum_seconds_per_batch is None:
            return (
                "speedup over Captum's Occlusion could not be estimated (the model on "
                f"a batch of {CAPTUM_BATCH} copies raised {self._captum_estimate_failure})"
            )
        captum = math.ceil(windows / CAPTUM_BATCH) * self._captum_seconds_per_batch
        return f"{captum / seconds:.1f}x Captum's Occlusion (estimated {captum:.2f} s)"

    def _time_captum_batch(self) -> float:
        """Seconds for one of Captum's batches: CAPTUM_BATCH occluded copies of the
        input through the model, timed once after a warm-up. Raises what the model
        raises."""
        batch = self.inputs.expand(CAPTUM_BATCH, *self.inputs.shape[1:]).contiguous()
        with torch.no_grad():
            self.model(batch)  # warm-up
            if batch.is_cuda:
                torch.cuda.synchronize(batch.device)
            started = time.perf_counter()
            self.model(batch)
            if batch.is_cuda:
                torch.cuda.synchronize(batch.device)
        return time.perf_counter() - started

    # ------------------------------------------------------------ messages
    def _on_message(self, widget: Any, content: dict, buffers: list) -> None:
        kind = content.get("type") if isinstance(content, dict) else None
        if kind == "compute":
            self.compute()
        elif kind == "cancel":
            self.cancel()
        elif kind == "probe":
            self._probe(int(content["y"]), int(content["x"]))

    def _probe(self, y: int, x: int) -> None:
        """The occluded image for the window at (y, x) and the target's probability
        before and after (softmax of the model's output)."""
        height, width = self.inputs.shape[2:]
        window = min(self.window, height, width)
        top = int(np.clip(y - window // 2, 0, height - window))
        left = int(np.clip(x - window // 2, 0, width - window))
        occluded = self.inputs.clone()
        baseline = self.attribute_options.get("baselines", 0.0)
        occluded[..., top : top + window, left : left + window] = (
            baseline[..., top : top + window, left : left + window]
            if isinstance(baseline, torch.Tensor)
            else baseline
        )
        with torch.no_grad():
            before = torch.softmax(self.model(self.inputs).float(), dim=1)[0, self.target]
            after = torch.softmax(self.model(occluded).float(), dim=1)[0, self.target]
        shown = self._display.copy()
        shown[top : top + window, left : left + window] = 0.5
        self.probe_rgba = _rgba_bytes(shown)
        self.probe = {
            "y": y,
            "x": x,
            "window": [top, left, top + window, left + window],
            "probability_before": float(before),
            "probability_after": float(after),
            "drop": float(before - after),
        }

    # ------------------------------------------------------------ helpers
    def _top_classes(self) -> list[dict]:
        with torch.no_grad():
            output = self.model(self.inputs)
        if not isinstance(output, torch.Tensor):
            raise not_one_tensor(output)
        scores = output.float()
        if scores.dim() != 2:
            return [{"index": 0, "label": "output 0", "probability": float("nan")}]
        probabilities = torch.softmax(scores[0], dim=0)
        top = torch.topk(probabilities, min(TOP_CLASSES, probabilities.numel()))
        return [
            {"index": int(i), "label": self._label(int(i)), "probability": float(p)}
            for p, i in zip(top.values, top.indices)
        ]

    def _label(self, index: int) -> str:
        return self._class_name(index) or f"class {index}"

    def _class_name(self, index: int) -> str | None:
        """The name `class_names` gives output `index`, or None."""
        names = self._class_names
        if isinstance(names, Mapping):
            return str(names[index]) if index in names else None
        if names is not None and 0 <= index < len(names):
            return str(names[index])
        return None

    def _colormap_name(self) -> str:
        return AUTO_COLORMAPS[self.sign] if self.colormap == "auto" else self.colormap

    def _set_colours(self) -> None:
        """Colour limits, lookup table and legend for the map on screen and `sign`.
        Values run from value_range[0] to value_range[1] through the table; for
        "negative" the table is reversed, so that as in Captum the strongest
        (most negative) values get the colormap's far end."""
        heatmap = self._heat if self._heat is not None else np.zeros((0, 0), np.float32)
        lo, hi = colour_limits(heatmap, self.sign)
        target, window = self._heat_run or (self.target, (self.window, self.window))
        lut = matplotlib.colormaps[self._colormap_name()](np.linspace(0.0, 1.0, 256), bytes=True)
        if self.sign == "negative":
            lut = lut[::-1]
        self.colormap_lut = np.ascontiguousarray(lut, dtype=np.uint8).tobytes()
        self.value_range = [lo, hi]
        self.legend = legend_for(
            self.sign, lo, hi, target, self._class_name(target), window, self._heat is not None
        )


def greyscale(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) in [0, 1] -> (H, W) in [0, 1], as Captum's blended heat map draws
    the image under it: the mean of the channels (`np.mean(image, axis=2)`), shown
    through matplotlib's "gray" colormap, which stretches its own min..max to
    black..white. A flat image keeps its level."""
    grey = np.asarray(rgb, dtype=np.float64).mean(axis=-1)
    if not grey.size:
        return grey
    lo, hi = grey.min(), grey.max()
    return (grey - lo) / (hi - lo) if hi > lo else grey


def colour_limits(heatmap: np.ndarray, sign: str) -> tuple[float, float]:
    """The colorbar's limits for a map (NaN: not computed, ignored) shown with
    Captum's `sign`: "all": symmetric, (-m, m) with m = max|value|, so that 0 is
    in the middle of a diverging colormap; "positive": (0, max(max, 0));
    "negative": (min(min, 0), 0); "absolute_value": (0, m). (0, 0) when nothing
    is computed yet."""
    if sign not in SIGNS:
        raise ValueError(f"sign must be one of {SIGNS}, not {sign!r}")
    finite = heatmap[np.isfinite(heatmap)]
    if not finite.size:
        return 0.0, 0.0
    lo, hi = float(finite.min()), float(finite.max())
    largest = max(-lo, hi, 0.0)
    if sign == "all":
        return -largest, largest
    if sign == "positive":
        return 0.0, max(hi, 0.0)
    if sign == "negative":
        return min(lo, 0.0), 0.0
    return 0.0, largest


def colour_ticks(lo: float, hi: float) -> list[list]:
    """[[value, label], ...] for the colorbar: both ends and the middle (0 for a
    symmetric range), or 0 alone when the range is empty."""
    if not hi > lo:
        return [[float(lo), _number(lo)]]
    middle = 0.0 if lo == -hi else (lo + hi) / 2
    return [[float(value), _number(value)] for value in (lo, middle, hi)]


def _number(value: float) -> str:
    """Three significant digits, a true minus sign, and 0 as "0"."""
    return "0" if value == 0 else f"{value:.3g}".replace("-", "−")


def legend_for(
    sign: str,
    lo: float,
    hi: float,
    target: int,
    name: str | None,
    window: tuple[int, int],
    drawn: bool = True,
) -> dict[str, Any]:
    """What the colours mean, for the front end: a title (the quantity, with
    Captum's sign convention, and the class), a note (what the signs mean, what
    `sign` shows, how a pixel's value is made), the colorbar's ticks and captions
    under its two ends. `drawn`: whether a map is shown (no ticks before one)."""
    who = f"target {target}" if name is None else f"“{name}” (target {target})"
    title = (
        f"Change in the model's output for {who} when the window is occluded: "
        "output(image) − output(occluded)"
    )
    lowers, raises = "occluding lowers it", "occluding raises it"
    if sign == "all":
        note = "> 0: occluding lowers the output; < 0: occluding raises it."
        ends = [raises, lowers]
    elif sign == "positive":
        note = "Values > 0 only (occluding lowers the output); the rest drawn as 0."
        ends = ["", lowers]
    elif sign == "negative":
        note = "Values < 0 only (occluding raises the output); the rest drawn as 0."
        ends = [raises, ""]
    else:
        note = "|value|: how much the output changes, whichever way."
        ends = ["", "larger change"]
    note += f" Each pixel: the mean over the {window[0]}×{window[1]} windows covering it."
    return {
        "title": title,
        "note": note,
        "ticks": colour_ticks(lo, hi) if drawn else [],
        "ends": ends,
    }


def _display_rgb(display_image: Any, image: torch.Tensor) -> np.ndarray:
    """(H, W, 3) float array in [0, 1]: the given display image, or the input scaled."""
    if display_image is None:
        shown = image.detach().float().cpu()
        if shown.shape[0] == 1:
            shown = shown.expand(3, -1, -1)
        shown = shown[:3].permute(1, 2, 0).numpy()
        lo, hi = shown.min(), shown.max()
        return (shown - lo) / (hi - lo) if hi > lo else np.zeros_like(shown)
    shown = np.asarray(
        display_image.detach().cpu() if isinstance(display_image, torch.Tensor) else display_image,
        dtype=np.float32,
    )
    if shown.ndim == 3 and shown.shape[0] in (1, 3) and shown.shape[-1] not in (1, 3):
        shown = shown.transpose(1, 2, 0)
    if shown.ndim == 2:
        shown = shown[..., None]
    if shown.shape[-1] == 1:
        shown = np.repeat(shown, 3, axis=-1)
    return np.clip(shown, 0.0, 1.0)


def _rgba_bytes(rgb: np.ndarray) -> bytes:
    """(H, W, 3) floats in [0, 1] -> H x W x 4 uint8 bytes, opaque."""
    rgba = np.empty((*rgb.shape[:2], 4), dtype=np.uint8)
    rgba[..., :3] = np.round(rgb * 255)
    rgba[..., 3] = 255
    return rgba.tobytes()
