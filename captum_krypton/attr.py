"""IncrementalOcclusion: Captum's Occlusion, computed by incremental inference."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import torch
from captum._utils.typing import BaselineType, TargetType, TensorOrTupleOfTensorsGeneric
from captum.attr import Occlusion
from captum.log import log_usage
from torch import Tensor

from captum_krypton import chunks
from captum_krypton.approx.calibrate import Calibration
from captum_krypton.approx.settings import Approximation
from captum_krypton.captum_path import as_check_failure, fall_back, run_captum
from captum_krypton.capture import UnsupportedForIncremental
from captum_krypton.devices_path import path_on_devices
from captum_krypton.engine.call import CaptumArguments
from captum_krypton.engine.preparer import Preparer
from captum_krypton.engine.progressive import (
    OcclusionProgress,
    OcclusionReport,
    first_pass_windows,
)
from captum_krypton.engine.self_check import SelfCheckFailed
from captum_krypton.engine.settings import EngineSettings, Kernels
from captum_krypton.engine.target_race import EXACT as EXACT_ARM
from captum_krypton.engine.target_race import RaceChoice, TargetRace
from captum_krypton.engine.windows import WindowGrid
from captum_krypton.errors import FallbackWarning, IncrementalNotApplicable, OnceWarnings
from captum_krypton.options import (
    Engine,
    OcclusionOptions,
    check_calibration,
    check_strides,
)
from captum_krypton.parallel.sharded import ShardedOcclusion
from captum_krypton.plan import RegionPlan
from captum_krypton.progressive_path import ProgressivePath
from captum_krypton.reports import FinishedRun

__all__ = ["IncrementalOcclusion", "FallbackWarning", "IncrementalNotApplicable"]


class IncrementalOcclusion(Occlusion):
    """Drop-in for `captum.attr.Occlusion` with the same results, computed incrementally.

    The clean input runs once and every layer's output is kept; each occlusion
    window then recomputes, layer by layer, only the box of each feature map that
    the window changes (Krypton, SIGMOD 2019), switching to whole maps where the
    box grows too large. Models the engine cannot handle run on Captum's own path,
    with a `FallbackWarning` saying why.
    """

    def __init__(self, forward_func: Callable[..., Tensor]) -> None:
        super().__init__(forward_func)
        self._preparer = Preparer()
        self._sharded = ShardedOcclusion()
        self._warnings = OnceWarnings()
        # target_ssim's choice between calibrating and exact mode, by measured time
        self._target_race = TargetRace()
        # One call at a time per instance: calls from several threads share the
        # traces, plans, race and `last_run`, and a first call's capture must
        # not run beside another call's forwards of the same model.
        self._calls = threading.RLock()
        #: What the last `attribute` call did (None before the first).
        self.last_run: OcclusionReport | None = None

    @log_usage(part_of_slo=True)
    def attribute(  # type: ignore[override]
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        sliding_window_shapes: tuple[int, ...] | tuple[tuple[int, ...], ...],
        strides: None | int | tuple[int, ...] | tuple[int | tuple[int, ...], ...] = None,
        baselines: BaselineType = None,
        target: TargetType = None,
        additional_forward_args: Any = None,
        perturbations_per_eval: int = 1,
        show_progress: bool = False,
        *,
        engine: Engine = "auto",
        max_memory: int | None = None,
        windows_per_batch: int | None = None,
        full_threshold: float | None = None,
        kernels: Kernels = "auto",
        cuda_graphs: bool | None = None,
        tau: float = 1.0,
        freeze_global_context: bool = False,
        drilldown: float | None = None,
        drilldown_factor: int = 4,
        target_ssim: float | None = None,
        calibration: Calibration | None = None,
        on_progress: Callable[[OcclusionProgress], object] | None = None,
        cancel: threading.Event | None = None,
        region: tuple[int, ...] | None = None,
        devices: Sequence[str | torch.device] | None = None,
        self_check: bool = True,
    ) -> TensorOrTupleOfTensorsGeneric:
        """Occlusion attributions, as `captum.attr.Occlusion.attribute` computes them.

        Captum's arguments keep their meaning and defaults (its documentation has
        them in full). The keyword-only extras choose how the result is computed.

        Args:

            inputs (Tensor or tuple[Tensor, ...]): Input for which occlusion
                attributions are computed; dim 0 is the examples.
            sliding_window_shapes (tuple or tuple[tuple]): Shape of the occluded
                patch, per input tensor (its dims after the first).
            strides (int, tuple, tuple[int], or tuple[tuple], optional): Step of the
                patch per dim (positive integers). Default: None (1 in every dim)
            baselines (scalar, Tensor, tuple of scalar, or Tensor, optional): Value
                that replaces the occluded features. Default: None (zero)
            target (int, tuple, Tensor, or list, optional): Output indices whose
                difference is attributed, one for all examples or one per example.
                Default: None
            additional_forward_args (Any, optional): Further arguments of the
                forward function, not attributed. Default: None
            perturbations_per_eval (int, optional): Windows per forward batch where
                Captum's path runs; the engine sizes its own batches (see
                `max_memory`, `windows_per_batch`). Default: 1
            show_progress (bool, optional): A progress bar counting windows.
                Default: False
            engine (str, optional): "auto" (incremental when it applies, else
                Captum's path with a FallbackWarning), "incremental" (raise
                IncrementalNotApplicable instead of falling back) or "captum"
                (always Captum's path). Default: "auto"
            max_memory (int, optional): Bytes one window batch may use. Default:
                None (1 GiB on the CPU; on CUDA half the free memory and at most
                1024 rows of windows x examples, rounded down to a power of two)
            windows_per_batch (int, optional): Windows per batch, instead of
                `max_memory`'s choice. Default: None
            full_threshold (float, optional): None: a cost model (FLOPs, bytes and
                launches, with rates measured once per CUDA device) picks, over the
                whole graph, which nodes run on boxes and which on whole maps. A
                number replaces it: a box covering that share of its map or more is
                computed whole. Default: None
            kernels (str, optional): "auto" (Triton kernels on CUDA when triton is
                installed, torch ops otherwise), "torch" or "triton". Default: "auto"
            cuda_graphs (bool, optional): On CUDA with the Triton kernels, replay
                window batches as CUDA graphs (engine/graphs.py); eager launches
                where capture fails. None: a batch size is captured the second
                time a plan runs it, and kept with the plan for later calls on
                inputs of the same shape (each call's clean run is copied into
                the graphs' private copy first). With `devices`: True where
                threads of this process drive several GPUs, False otherwise.
                True: captured at the first batch. False: never. Default: None
            tau (float, optional): Projective-field threshold in (0, 1]; below 1
                every changed box is capped at tau x its feature map's side
                (centred) at each layer and changes beyond it are dropped: faster,
                approximate (Krypton). Where Captum's path runs, results are exact.
                Default: 1.0 (exact)
            freeze_global_context (bool, optional): True: global statistics
                whose result is multiplied or added back onto a spatial map
                (squeeze-excitation's pooled vector in EfficientNet, MobileNetV3,
                RegNetY; a global-average-pool branch such as DeepLab's ASPP) keep
                the clean input's values, so a window's changed box stays a box
                through them: faster, approximate (each window is computed as if
                those statistics had not changed). The network's final pooling
                into its output is never frozen. `last_run.frozen_context` and
                `plan(...).summary()` name the frozen nodes; with none to freeze,
                results are exact. Default: False (exact)
            drilldown (float, optional): Fraction r in (0, 1]. A coarse pass
                computes every `drilldown_factor`-th window along each spatial dim
                (exactly); then only the fraction r of all windows where the coarse
                attributions are largest or change most run at the requested
                stride, with `tau`. Windows left out are interpolated from the
                coarse pass; the result keeps Captum's shape. Never computes more
                windows than exact mode. Default: None (off)
            drilldown_factor (int, optional): The coarse pass's spacing in windows,
                at least 2; 4 suits 224-pixel inputs with 16-pixel windows, maps
                with finer detail than the coarse spacing want 2; with
                `target_ssim`, the first spacing tried. Default: 4
            target_ssim (float, optional): In (0, 1): choose `tau` (on the
                CPU: on CUDA it was measured not to pay),
                `freeze_global_context` (where the model has global context to
                freeze), `drilldown` and `drilldown_factor` (this one or 2) by a
                calibration on these inputs so that the heatmap's SSIM vs exact
                is expected to reach it: drill-down's coarse pass and a seeded
                random sample of the other windows run exactly (they stay in
                the map), and the sample's interpolation errors predict the
                SSIM. Where no choice is predicted to reach the target, or the
                best saves under a tenth of the windows' cost, the remaining
                windows run exactly. The choice is in
                `self.last_run.approximation`, the measurements in
                `self.last_run.calibration`. Leave `tau`,
                `freeze_global_context` and `drilldown` unset. Default: None
            calibration (Calibration, optional): Reuse an earlier choice:
                `last_run.calibration` of a `target_ssim` call on inputs of the
                same shape (without the batch dim), window and strides, such as
                the first image of a data set. Its `tau`,
                `freeze_global_context`, `drilldown` and `drilldown_factor` run
                as if given as keywords (its `drilldown` computes as many
                windows as the calibrated call did, the top-scored ones): no
                calibration windows, no SSIM estimates, and no check that these
                inputs reach the target. Leave `target_ssim`, `tau`,
                `freeze_global_context` and `drilldown` unset. Raises TypeError
                for anything but a Calibration and ValueError for another
                shape, window or strides. Default: None
            on_progress (callable, optional): Called with an `OcclusionProgress` (a
                heatmap so far, windows done and planned) after every window batch,
                and with the final result last (`complete=True`, the returned
                tensor). Default: None
            cancel (threading.Event, optional): Once set, the run stops after the
                batch in flight and returns the heatmap so far (NaN where no
                computed window covers; `last_run.cancelled` is True). Plans and
                caches stay valid for the next call. Default: None
            region (tuple[int, ...], optional): (top, left, bottom, right) in input
                positions (half-open): only the windows inside it run (Krypton's
                interactive mode); positions no computed window covers are NaN. Not
                with drill-down or a target SSIM. Default: None (every window)
            devices (list of str or torch.device, optional): Several devices (e.g.
                ["cuda:0", "cuda:1"]) sharing the windows; the result is on the
                input's device and equals a one-device run with the same options:
                with `tau`, `drilldown`, `target_ssim` or `region`, every stage's
                windows (coarse pass, calibration's samples, refinement) are
                shared, and `on_progress` reports after each stage rather than
                each batch. Several GPUs: a worker process per GPU after the first
                (kept until `close()`; the model's class must be importable by
                module name, else threads with a RuntimeWarning); CPU devices:
                threads (docs/scaling.md). Default: None (the input's device)
            self_check (bool, optional): True: the call checks itself against the
                forward function: once per plan two windows run one at a time, as
                Captum runs them, against the same windows in one batch; every call
                a few windows (first, last, other borders, centre) run through the
                forward and must match the engine within 16 times the model's
                measured rounding (docs/compatibility.md). A mismatch, or an engine
                error, gives a FallbackWarning and Captum's result;
                `last_run.self_check` reports what was compared. False: neither
                runs, and engine errors propagate. Default: True

        Returns:
            *Tensor* or *tuple[Tensor, ...]*: the attributions, shaped as the
            inputs (as Captum returns them). `self.last_run` describes the call:
            engine, approximation, windows computed, seconds, whether it was
            cancelled, the self-check. Calls with more than 1024 examples run in
            chunks of 1024 examples.

        Examples::

            >>> occlusion = IncrementalOcclusion(model)
            >>> attributions = occlusion.attribute(images, (3, 16, 16), strides=8, target=0)
        """
        call = CaptumArguments(
            inputs,
            sliding_window_shapes,
            strides,
            baselines,
            target,
            additional_forward_args,
            perturbations_per_eval,
            show_progress,
        )
        options = OcclusionOptions.from_keywords(
            engine=engine,
            max_memory=max_memory,
            windows_per_batch=windows_per_batch,
            full_threshold=full_threshold,
            kernels=kernels,
            cuda_graphs=cuda_graphs,
            tau=tau,
            freeze_global_context=freeze_global_context,
            drilldown=drilldown,
            drilldown_factor=drilldown_factor,
            target_ssim=target_ssim,
            calibration=calibration,
            on_progress=on_progress,
            cancel=cancel,
            region=region,
            devices=devices,
            self_check=self_check,
        )
        _check(call, options)
        with self._calls:
            finished = self._run(call, options)
            self.last_run = finished.report
        return finished.progress.attribution

    def attribute_stream(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        sliding_window_shapes: tuple[int, ...] | tuple[tuple[int, ...], ...],
        strides: None | int | tuple[int, ...] | tuple[int | tuple[int, ...], ...] = None,
        baselines: BaselineType = None,
        target: TargetType = None,
        additional_forward_args: Any = None,
        perturbations_per_eval: int = 1,
        show_progress: bool = False,
        *,
        report_batches: bool = True,
        **extras: Any,
    ) -> Iterator[OcclusionProgress]:
        """`attribute` as an iterator of `OcclusionProgress`: a heatmap after every
        window batch (with `report_batches`), then the final one, whose
        `attribution` is what `attribute` returns. Closing the iterator early stops
        the run after the batch in flight; the engine stays reusable.

        Takes `attribute`'s arguments and keyword extras, except `on_progress`
        (the iterator reports instead) and `devices`."""
        for name in ("on_progress", "devices"):
            if name in extras:
                raise TypeError(f"attribute_stream() got an unexpected keyword argument {name!r}")
        options = OcclusionOptions.from_keywords(**extras)
        call = CaptumArguments(
            inputs,
            sliding_window_shapes,
            strides,
            baselines,
            target,
            additional_forward_args,
            perturbations_per_eval,
            show_progress,
        )
        _check(call, options)
        with self._calls:  # held until the stream ends or is closed
            options, entry = self._start_race(call, options, race=True)
            try:
                yield from self._stream(call, options, report_batches)
            finally:  # also where the stream is closed at its final report
                self._end_race(entry)

    def calibrate(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        sliding_window_shapes: tuple[int, ...] | tuple[tuple[int, ...], ...],
        strides: None | int | tuple[int, ...] | tuple[int | tuple[int, ...], ...] = None,
        baselines: BaselineType = None,
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        target_ssim: float,
        **extras: Any,
    ) -> Calibration:
        """Calibrate `target_ssim`'s approximation on `inputs`, for
        `attribute(..., calibration=...)` on other inputs of the same shape,
        window and strides (e.g. the rest of a data set), which then run that
        choice without calibrating and without checking it against the target.

        A `target_ssim` call to `attribute` may run exact mode instead, where
        that was faster on earlier calls of its kind (engine/target_race.py),
        and then has no calibration in `last_run`; this always calibrates. It
        computes the map as `attribute(..., target_ssim=...)` does; `last_run`
        describes it.

        Takes `attribute`'s arguments and keyword extras (not `tau`,
        `freeze_global_context`, `drilldown`, `calibration`, `region`: the
        calibration chooses). Returns the Calibration (`last_run.calibration`).
        Raises ValueError for a `target_ssim` outside (0, 1), and
        IncrementalNotApplicable where the engine does not apply (Captum's path
        has no approximations to calibrate)."""
        options = OcclusionOptions.from_keywords(target_ssim=target_ssim, **extras)
        call = CaptumArguments(
            inputs, sliding_window_shapes, strides, baselines, target, additional_forward_args
        )
        _check(call, options)
        with self._calls:
            finished = self._run(call, options, race=False)
            self.last_run = finished.report
        if finished.report.calibration is None:
            raise IncrementalNotApplicable(
                "no calibration: the call ran on Captum's path (its FallbackWarning says why)"
            )
        return finished.report.calibration

    def plan(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        sliding_window_shapes: tuple[int, ...] | tuple[tuple[int, ...], ...],
        strides: None | int | tuple[int, ...] | tuple[int | tuple[int, ...], ...] = None,
        baselines: BaselineType = None,
        additional_forward_args: Any = None,
        *,
        full_threshold: float | None = None,
        tau: float = 1.0,
        freeze_global_context: bool = False,
    ) -> RegionPlan:
        """The region plan `attribute` would use: per layer the box, incremental or
        full, and FLOPs; `plan.summary()` prints it, `plan.theoretical_speedup` is the
        FLOP ratio against full re-inference, `plan.frozen_statistics` names the
        global statistics frozen (`freeze_global_context`). Raises
        IncrementalNotApplicable when the engine does not apply."""
        approximation = Approximation(tau=tau, freeze_global_context=freeze_global_context)
        call = CaptumArguments(
            inputs, sliding_window_shapes, strides, baselines, None, additional_forward_args
        )
        settings = EngineSettings(full_threshold=full_threshold, self_check=False)
        try:
            with self._calls:
                return self._preparer.prepare(
                    self.forward_func, call, settings, approximation.plan
                ).plan
        except UnsupportedForIncremental as exc:
            raise IncrementalNotApplicable(str(exc)) from exc

    def close(self) -> None:
        """Stop the worker processes that `devices=` started (one per GPU after the
        first; they are kept between calls and start again when needed). They also
        stop when this object is garbage-collected or the program exits."""
        self._sharded.close()

    # ------------------------------------------------------------ internals
    def _run(
        self, call: CaptumArguments, options: OcclusionOptions, race: bool = True
    ) -> FinishedRun:
        """The call on its path: in chunks of examples, or as one progressive run,
        on the input's device or shared over devices (with Captum's path where the
        engine does not apply). Under `target_ssim` (with `race`) the whole call
        runs one arm of the race against exact mode (engine/target_race.py)."""
        options, entry = self._start_race(call, options, race)
        if options.devices is None and options.engine != "captum" and chunks.needs_chunks(call):
            quiet = dataclasses.replace(options, on_progress=None)
            finished = chunks.attribute_in_chunks(
                call,
                partial(self._run, options=quiet, race=False),
                options.on_progress,
                options.cancel,
            )
            self.last_run = finished.report
        else:
            report_batches = options.on_progress is not None
            for progress in self._stream(call, options, report_batches):
                if options.on_progress is not None:
                    options.on_progress(progress)
            assert self.last_run is not None
            finished = FinishedRun(progress, self.last_run)
        self._end_race(entry)
        assert self.last_run is not None
        return FinishedRun(finished.progress, self.last_run)

    def _start_race(
        self, call: CaptumArguments, options: OcclusionOptions, race: bool
    ) -> tuple[OcclusionOptions, _RaceEntry | None]:
        """The options of the arm this target_ssim call runs (exact mode: without
        the target), and what `_end_race` needs to time it; no race without a
        target, on Captum's path, or with `race` False."""
        if not race or options.target_ssim is None or options.engine == "captum":
            return options, None
        kind = _race_kind(call, options)
        choice = self._target_race.choose(kind)
        if choice.arm == EXACT_ARM:
            options = dataclasses.replace(options, target_ssim=None)
        device = call.formatted_inputs[0].device
        entry = _RaceEntry(kind, choice, device, self.last_run, self._target_race.clock())
        return options, entry

    def _end_race(self, entry: _RaceEntry | None) -> None:
        """Time the call that `entry` started, if it ran to its end on the engine,
        and say in `last_run` which arm it ran. A call that fell back to Captum's
        path, was cancelled or stopped early is not timed."""
        report = self.last_run
        if entry is None or report is None or report is entry.previous_report:
            return
        if report.engine != "incremental":
            return
        if entry.choice.timed and not report.cancelled:
            if entry.device.type == "cuda":
                torch.cuda.synchronize(entry.device)  # the call's time includes the device's
            seconds = self._target_race.clock() - entry.started
            self._target_race.record(entry.kind, entry.choice.arm, seconds)
        self.last_run = dataclasses.replace(report, target_ssim_choice=entry.choice.describe())

    def _stream(
        self, call: CaptumArguments, options: OcclusionOptions, report_batches: bool
    ) -> Iterator[OcclusionProgress]:
        """One progressive run; `last_run` is set by its end."""
        if options.engine == "captum":
            yield self._finish(run_captum(self, call))
            return
        try:
            run = self._progressive_path(call, options, report_batches)
        except (UnsupportedForIncremental, SelfCheckFailed) as exc:
            yield self._finish(self._fall_back(exc, call, options))
            return
        failure: Exception | None = None
        try:
            yield from run.steps()
        except Exception as exc:  # with the self-check on, an engine error means Captum's path
            if not options.settings.self_check:
                raise
            failure = exc
        finally:
            if run.report is not None:
                self.last_run = run.report
        if failure is not None:
            yield self._finish(self._fall_back(as_check_failure(failure), call, options))

    def _progressive_path(
        self, call: CaptumArguments, options: OcclusionOptions, report_batches: bool
    ) -> ProgressivePath:
        """The call's run on the input's device, or shared over `options.devices`.
        Raises UnsupportedForIncremental or SelfCheckFailed where the engine does
        not apply."""
        if options.devices is not None:
            return path_on_devices(
                self, self._sharded, call, options, report_batches, self._warnings
            )

        def first_windows(grid: WindowGrid) -> np.ndarray:
            return first_pass_windows(
                grid, options.approximation, options.target_ssim, options.window_ids(grid)
            )

        prepared = self._preparer.prepare(
            self.forward_func, call, options.settings, options.first_pass, first_windows
        )
        return ProgressivePath(prepared, call, options, report_batches, self.get_name())

    def _fall_back(
        self, reason: Exception, call: CaptumArguments, options: OcclusionOptions
    ) -> FinishedRun:
        return fall_back(self, reason, options.engine, call, self._warnings)

    def _finish(self, finished: FinishedRun) -> OcclusionProgress:
        self.last_run = finished.report
        return finished.progress


def _check(call: CaptumArguments, options: OcclusionOptions) -> None:
    """Captum's checks of the strides and ours of a reused calibration, before
    anything runs."""
    check_strides(call)
    check_calibration(call, options)


def _race_kind(call: CaptumArguments, options: OcclusionOptions) -> tuple:
    """What makes target_ssim calls comparable in time: the input's shape, dtype
    and device, the windows, strides, target and drill-down factor, the devices."""
    inputs = call.formatted_inputs
    windows, strides = call.window_shapes()
    return (
        tuple((tuple(t.shape), t.dtype, str(t.device)) for t in inputs),
        tuple(windows),
        tuple(strides),
        options.target_ssim,
        options.approximation.drilldown_factor,
        options.devices,
    )


class _RaceEntry(NamedTuple):
    """A target_ssim call in flight: its kind, arm, input device, the report
    before it, and when it started (the race's clock)."""

    kind: tuple
    choice: RaceChoice
    device: torch.device
    previous_report: OcclusionReport | None
    started: float
