"""IncrementalOcclusion: Captum's Occlusion, computed by incremental inference."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from captum._utils.common import (
    _format_additional_forward_args,
    _format_output,
    _format_tensor_into_tuples,
    _is_tuple,
)
from captum._utils.progress import NullProgress, progress
from captum._utils.typing import BaselineType, TargetType, TensorOrTupleOfTensorsGeneric
from captum.attr import Occlusion
from captum.attr._utils.common import (
    _format_and_verify_sliding_window_shapes,
    _format_and_verify_strides,
    _format_input_baseline,
)
from captum.log import log_usage
from torch import Tensor

from captum_krypton.approx.settings import Approximation, check_fraction, check_target_ssim
from captum_krypton.engine.devices import (
    Replicas,
    compute_shard,
    gather_shards,
    run_sharded,
    state_key,
    to_device,
)
from captum_krypton.engine.occlusion import PreparedOcclusion
from captum_krypton.engine.progressive import OcclusionProgress, OcclusionReport, ProgressiveRun
from captum_krypton.engine.self_check import SelfCheckFailed, WindowCheck, prepare_checks
from captum_krypton.engine.windows import WindowGrid
from captum_krypton.engine.workers import WorkerPool, WorkerUnavailable
from captum_krypton.errors import FallbackWarning, IncrementalNotApplicable, OnceWarnings
from captum_krypton.graph.capture import (
    CapturedGraph,
    UnsupportedForIncremental,
    capture_cached,
    is_per_example,
    resolve_module,
)
from captum_krypton.graph.plan import PLANNING_ROWS, RegionPlan

logger = logging.getLogger(__name__)

Engine = Literal["auto", "incremental", "captum"]


def _verify_windows(
    inputs: tuple[Tensor, ...],
    windows: tuple[tuple[int, ...], ...],
    strides: tuple[Any, ...],
) -> tuple[tuple[int, ...], ...]:
    """Captum's checks of windows and strides, with its messages; per-dim strides."""
    per_dim = []
    for i, inp in enumerate(inputs):
        remaining = np.subtract(inp.shape[1:], windows[i])
        assert (np.array(remaining) >= 0).all(), (
            f"Sliding window dimensions {windows[i]} cannot exceed input dimensions"
            f"{tuple(inp.shape[1:])}."
        )
        assert np.logical_or(np.array(remaining) == 0, np.array(strides[i]) <= windows[i]).all(), (
            f"Stride dimension {strides[i]} cannot be larger than sliding window shape "
            f"dimension {windows[i]}."
        )
        stride = strides[i]
        per_dim.append(
            tuple(stride for _ in windows[i]) if isinstance(stride, int) else tuple(stride)
        )
    return tuple(per_dim)


#: Calls with more examples than this run in chunks of this many examples.
EXAMPLES_PER_RUN = PLANNING_ROWS


def _has_tensor(inputs: Any) -> bool:
    return isinstance(inputs, torch.Tensor) or (
        isinstance(inputs, tuple) and len(inputs) > 0 and isinstance(inputs[0], torch.Tensor)
    )


def _rows_of(value: Any, rows: slice, examples: int) -> Any:
    """The examples `rows` of a per-example value (a tensor or list whose first
    dim is `examples`, or a tuple of such); anything else is shared."""
    if isinstance(value, torch.Tensor):
        return value[rows] if is_per_example(value, examples) else value
    if isinstance(value, tuple):
        return tuple(_rows_of(v, rows, examples) for v in value)
    if isinstance(value, list) and len(value) == examples:
        return value[rows]
    return value


def _concatenate(parts: list, examples: int) -> Any:
    """Chunks' results joined along examples, NaN for examples not run."""
    first = parts[0]
    pieces = list(zip(*parts)) if isinstance(first, tuple) else [parts]
    joined = []
    for piece in pieces:
        done = torch.cat(piece)
        if done.shape[0] < examples:
            missing = torch.full(
                (examples - done.shape[0], *done.shape[1:]),
                float("nan"),
                dtype=done.dtype,
                device=done.device,
            )
            done = torch.cat([done, missing])
        joined.append(done)
    return tuple(joined) if isinstance(first, tuple) else joined[0]


def _uses_workers(devices: Sequence[torch.device]) -> bool:
    """Worker processes for `devices=`: when it names several different GPUs."""
    cuda = [d for d in devices if d.type == "cuda"]
    return len(cuda) == len(devices) > 1 and len(set(cuda)) == len(cuda)


def _check_strides(inputs: Any, strides: Any) -> None:
    """Strides must be positive: Captum 0.9 turns 0 into an all-NaN result and a
    negative stride into a shape error deep inside."""
    formatted = _format_tensor_into_tuples(inputs)
    for stride in _format_and_verify_strides(strides, formatted):
        values = (stride,) if isinstance(stride, int) else tuple(stride)
        if any(not isinstance(v, (int, np.integer)) or v < 1 for v in values):
            raise ValueError(f"strides must be positive integers, not {strides!r}")


def _approximation(
    tau: float, drilldown: float | None, drilldown_factor: int, target_ssim: float | None
) -> Approximation:
    """The requested approximation, checked; with a target SSIM, tau and drilldown
    are the calibration's to choose."""
    if target_ssim is not None:
        check_target_ssim(target_ssim)
        if tau != 1.0 or drilldown is not None:
            raise ValueError("target_ssim chooses tau and drilldown: leave them unset")
    return Approximation(tau, drilldown, drilldown_factor)


def _windows_inside(grid: WindowGrid, region: tuple[int, ...]) -> np.ndarray:
    """Ids of the windows whose spatial extent lies inside `region` ((*starts,
    *ends) over the spatial dims, half-open)."""
    spatial = len(grid.shape) - 1
    if len(region) != 2 * spatial or any(not isinstance(v, (int, np.integer)) for v in region):
        raise ValueError(
            f"region must be {2 * spatial} integers (starts, then ends), not {region!r}"
        )
    starts, ends = np.asarray(region[:spatial]), np.asarray(region[spatial:])
    lo, hi = grid.all_bounds
    inside = ((lo[:, 1:] >= starts) & (hi[:, 1:] <= ends)).all(axis=1)
    if not inside.any():
        raise ValueError(f"no window of the grid lies inside region {tuple(region)}")
    return np.flatnonzero(inside)


def _captum_window_count(inputs: Any, sliding_window_shapes: Any, strides: Any) -> int:
    """How many windows Captum's Occlusion evaluates for these arguments."""
    formatted = _format_tensor_into_tuples(inputs)
    windows = _format_and_verify_sliding_window_shapes(sliding_window_shapes, formatted)
    per_dim = _verify_windows(formatted, windows, _format_and_verify_strides(strides, formatted))
    return sum(
        WindowGrid(tuple(inp.shape[1:]), window, stride).num_windows
        for inp, window, stride in zip(formatted, windows, per_dim)
    )


def _as_check_failure(error: Exception) -> SelfCheckFailed:
    """An error of the engine's run, as the self-check reports it."""
    if isinstance(error, SelfCheckFailed):
        return error
    return SelfCheckFailed(
        "engine run", f"the incremental engine raised {type(error).__name__}: {error}"
    )


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
        self._captures: dict[tuple, CapturedGraph] = {}
        self._warnings = OnceWarnings()
        #: What the last `attribute` call did (None before the first).
        self.last_run: OcclusionReport | None = None
        self._replicas = Replicas()
        self._device_occlusions: dict[Any, IncrementalOcclusion] = {}
        self._worker_pool = WorkerPool()

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
        kernels: Literal["auto", "torch", "triton"] = "auto",
        cuda_graphs: bool | None = None,
        tau: float = 1.0,
        drilldown: float | None = None,
        drilldown_factor: int = 4,
        target_ssim: float | None = None,
        on_progress: Callable[[OcclusionProgress], object] | None = None,
        cancel: threading.Event | None = None,
        region: tuple[int, ...] | None = None,
        devices: Sequence[str | torch.device] | None = None,
        self_check: bool = True,
    ) -> TensorOrTupleOfTensorsGeneric:
        """Occlusion attributions, as `captum.attr.Occlusion.attribute` computes them.

        Captum's arguments keep their meaning. `perturbations_per_eval` sets the
        batch only where Captum's path runs; the incremental engine sizes its own
        batches of windows so that one batch stays within `max_memory` bytes
        (default: 1 GiB on the CPU; on CUDA half the free memory, and at most 1024
        rows of windows x examples, rounded down to a power of two), or takes
        `windows_per_batch` windows when given.

        Keyword-only extras:
            engine: "auto" (incremental when it applies, else Captum's path with a
                FallbackWarning), "incremental" (raise IncrementalNotApplicable
                instead of falling back) or "captum" (always Captum's path).
            max_memory: bytes one window batch may use.
            windows_per_batch: fixed number of windows per batch.
            full_threshold: None (default): a cost model (FLOPs, bytes and launches,
                with rates measured once per CUDA device) picks, over the whole
                graph, which nodes run on boxes and which on whole maps. A number
                replaces it: a box covering that share of its map or more is
                computed whole.
            kernels: "auto" (Triton kernels on CUDA when triton is installed,
                torch ops otherwise), "torch" or "triton".
            cuda_graphs: on CUDA, capture one window batch as a CUDA graph and
                replay it for the others (falls back to eager launches if capture
                fails). None (default): on only where `devices=` drives several
                GPUs from threads of this process (the fallback when worker
                processes are unavailable); off otherwise, since on one GPU the
                capture (about two batches) rarely pays off.
            tau: projective-field threshold in (0, 1]; below 1 every changed box
                is capped at tau x its feature map's side (centred) at each layer
                and changes beyond it are dropped: faster, approximate (Krypton).
                1 (default) is exact. Where Captum's path runs, results are exact.
            drilldown: fraction r in (0, 1] (None: off). A coarse pass computes
                every `drilldown_factor`-th window along each spatial dim (exactly);
                then only the fraction r of all windows where the coarse attributions
                are largest or change most run at the requested stride, with `tau`.
                Windows left out are interpolated from the coarse pass; the result
                keeps Captum's shape. Never computes more windows than exact mode.
            drilldown_factor: the coarse pass's spacing, in windows (at least 2).
                4 suits heatmaps of 224-pixel inputs with 16-pixel windows; maps
                with finer detail than the coarse spacing want 2.
            target_ssim: in (0, 1): choose `tau` and `drilldown` from a calibration
                on these inputs (on drill-down's coarse pass) so that the heatmap's
                SSIM vs exact is expected to reach it; the choice is reported in
                `self.last_run.approximation`. Leave `tau` and `drilldown` unset.
            on_progress: called with an `OcclusionProgress` (a heatmap so far, the
                windows done and planned) after every window batch, and with the
                final result last (`complete=True`, same tensor as returned).
            cancel: a `threading.Event`; once set, the run stops after the batch
                in flight and returns the heatmap so far (NaN where no computed
                window covers; `last_run.cancelled` is True). Plans and caches stay
                valid for the next call.
            region: (top, left, bottom, right) in input positions (half-open): only
                the windows lying inside it run (Krypton's interactive mode);
                positions no computed window covers are NaN. Not with drill-down
                or a target SSIM.

            devices: several devices (e.g. ["cuda:0", "cuda:1"]) to share the
                windows of this call; the result is on the input's device and
                equals a one-device run. On several GPUs, this process computes
                the first one's shard and a worker process (started on first use,
                kept until `close()`) each other's; the model is sent to the
                workers once per version, so its class must be importable by
                module name (else: threads, with a RuntimeWarning). CPU devices
                use threads. Exact occlusion only (no tau, drill-down, target SSIM
                or region).

            self_check: True (default): the call checks itself against the forward
                function (engine/self_check.py, docs/compatibility.md). Once per
                plan, two windows run one at a time, exactly as Captum runs them,
                against the same windows in one batch; every call, a few windows
                (the first, the last, other borders, the centre) run through the
                forward in one batch with the clean input, and their output
                differences are compared with the engine's within 16 times the
                model's measured rounding. A mismatch, or an error of the engine,
                gives a FallbackWarning naming the check and Captum's result;
                `self.last_run.self_check` reports what was compared. False:
                neither runs, and engine errors propagate. The check of the
                batch layout (models that mix the examples of a batch, or fix its
                size, run on Captum's path) always runs.

        `self.last_run` describes the call: engine, approximation settings, windows
        computed, seconds, whether it was cancelled, the self-check. Calls with more than
        EXAMPLES_PER_RUN (1024) examples run in chunks of that many examples.
        """
        captum_args = (
            inputs,
            sliding_window_shapes,
            strides,
            baselines,
            target,
            additional_forward_args,
            perturbations_per_eval,
            show_progress,
        )
        engine_options = dict(
            engine=engine,
            max_memory=max_memory,
            windows_per_batch=windows_per_batch,
            full_threshold=full_threshold,
            kernels=kernels,
            cuda_graphs=cuda_graphs,
            cancel=cancel,
        )
        approximation_options = dict(
            tau=tau,
            drilldown=drilldown,
            drilldown_factor=drilldown_factor,
            target_ssim=target_ssim,
            region=region,
        )
        engine_options["self_check"] = self_check
        if devices is not None and engine != "captum":
            if tau != 1.0 or drilldown is not None or target_ssim is not None or region:
                raise ValueError(
                    "devices= runs exact occlusion: no tau, drilldown, target_ssim or region"
                )
            return self._attribute_on_devices(
                devices, captum_args, on_progress=on_progress, **engine_options
            )
        examples = _format_tensor_into_tuples(inputs)[0].shape[0] if _has_tensor(inputs) else 0
        if engine != "captum" and examples > EXAMPLES_PER_RUN:
            return self._attribute_in_chunks(
                examples,
                *captum_args,
                on_progress=on_progress,
                **engine_options,
                **approximation_options,
            )
        for progress_report in self.attribute_stream(
            *captum_args,
            **engine_options,
            **approximation_options,
            report_batches=on_progress is not None,
        ):
            if on_progress is not None:
                on_progress(progress_report)
        return progress_report.attribution

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
        engine: Engine = "auto",
        max_memory: int | None = None,
        windows_per_batch: int | None = None,
        full_threshold: float | None = None,
        kernels: Literal["auto", "torch", "triton"] = "auto",
        cuda_graphs: bool | None = None,
        tau: float = 1.0,
        drilldown: float | None = None,
        drilldown_factor: int = 4,
        target_ssim: float | None = None,
        cancel: threading.Event | None = None,
        region: tuple[int, ...] | None = None,
        self_check: bool = True,
        report_batches: bool = True,
    ) -> Iterator[OcclusionProgress]:
        """`attribute` as an iterator of `OcclusionProgress`: a heatmap after every
        window batch (with `report_batches`), then the final one, whose
        `attribution` is what `attribute` returns. Closing the iterator early stops
        the run after the batch in flight; the engine stays reusable."""
        approximation = _approximation(tau, drilldown, drilldown_factor, target_ssim)
        _check_strides(inputs, strides)
        if region is not None and (drilldown is not None or target_ssim is not None):
            raise ValueError("region computes the windows inside it: not with drill-down")
        if engine not in ("auto", "incremental", "captum"):
            raise ValueError(f"engine must be 'auto', 'incremental' or 'captum', not {engine!r}")
        if windows_per_batch is not None and windows_per_batch < 1:
            raise ValueError("windows_per_batch must be at least 1")
        captum_args = (
            inputs,
            sliding_window_shapes,
            strides,
            baselines,
            target,
            additional_forward_args,
            perturbations_per_eval,
            show_progress,
        )
        if engine == "captum":
            yield self._captum_run(captum_args)
            return
        try:
            prepared = self._prepare(
                inputs,
                sliding_window_shapes,
                strides,
                baselines,
                additional_forward_args,
                perturbations_per_eval,
                full_threshold,
                1.0 if approximation.drilldown or target_ssim else approximation.tau,
                self_check,
            )
        except (UnsupportedForIncremental, SelfCheckFailed) as exc:
            yield self._fall_back(exc, engine, captum_args)
            return

        def prepare(tau: float) -> PreparedOcclusion:
            return prepared.with_tau(tau).choose_kernels(kernels, cuda_graphs)

        bar = (
            progress(desc=f"{self.get_name()} attribution", total=prepared.grid.num_windows)
            if show_progress
            else NullProgress()
        )

        def set_bar_total(planned: int) -> None:
            if hasattr(bar, "total"):
                bar.total = planned
                if hasattr(bar, "refresh"):
                    bar.refresh()

        run = ProgressiveRun(
            prepare,
            target,
            lambda ready: windows_per_batch or ready.windows_per_batch(max_memory),
            approximation,
            target_ssim,
            cancel,
            report_batches,
            on_batch=bar.update,
            on_planned=set_bar_total,
            format_result=lambda result: _format_output(_is_tuple(inputs), (result,)),
            window_ids=None if region is None else _windows_inside(prepared.grid, region),
            verify=None
            if prepared.batch_behaviour is None
            else partial(WindowCheck, prepared, target, prepared.batch_behaviour),
        )
        failure: Exception | None = None
        try:
            yield from run.steps()
        except Exception as exc:  # with the self-check on, an engine error means Captum's path
            if not self_check:
                raise
            failure = exc
        finally:
            bar.close()
            if run.report is not None:
                self.last_run = run.report
        if failure is not None:
            yield self._fall_back(_as_check_failure(failure), engine, captum_args)

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
    ) -> RegionPlan:
        """The region plan `attribute` would use: per layer the box, incremental or
        full, and FLOPs; `plan.summary()` prints it, `plan.theoretical_speedup` is the
        FLOP ratio against full re-inference. Raises IncrementalNotApplicable when
        the engine does not apply."""
        check_fraction("tau", tau)
        try:
            return self._prepare(
                inputs,
                sliding_window_shapes,
                strides,
                baselines,
                additional_forward_args,
                1,
                full_threshold,
                tau,
                self_check=False,
            ).plan
        except UnsupportedForIncremental as exc:
            raise IncrementalNotApplicable(str(exc)) from exc

    # ------------------------------------------------------------ internals
    def _attribute_on_devices(
        self,
        devices: Sequence[str | torch.device],
        captum_args: tuple,
        engine: Engine,
        max_memory: int | None,
        windows_per_batch: int | None,
        full_threshold: float | None,
        kernels: Literal["auto", "torch", "triton"],
        cuda_graphs: bool | None,
        on_progress: Callable[[OcclusionProgress], object] | None,
        cancel: threading.Event | None,
        self_check: bool = True,
    ) -> TensorOrTupleOfTensorsGeneric:
        """Windows sharded over `devices`: on several GPUs this process computes
        the first device's shard and a worker process each other's
        (engine/workers.py); otherwise (CPU devices, or workers unavailable) one
        thread per device in this process (engine/devices.py)."""
        started = time.perf_counter()
        (inputs, window, strides, baselines, target, extra, ppe, show_progress) = captum_args
        _check_strides(inputs, strides)
        targets_devices = [torch.device(d) for d in devices]
        if not targets_devices:
            raise ValueError("devices must name at least one device")
        module = None
        with contextlib.suppress(UnsupportedForIncremental):
            module = resolve_module(self.forward_func)
        remote = targets_devices[1:] if _uses_workers(targets_devices) else []
        workers = []
        if remote and module is not None:
            key = state_key(module)
            try:
                if self._worker_pool.unavailable_for == key:
                    raise WorkerUnavailable(self._worker_pool.unavailable)
                workers = self._worker_pool.workers(remote, module, key)
            except WorkerUnavailable as exc:
                self._warn_once(f"devices= runs in threads of this process: {exc}", RuntimeWarning)
        local_devices = targets_devices[:1] if workers else targets_devices
        if cuda_graphs is None:  # threads of one process feeding several GPUs need graphs
            cuda_graphs = not workers and sum(d.type == "cuda" for d in local_devices) > 1
        try:
            if module is None:
                resolve_module(self.forward_func)  # raises with the reason
            prepared, targets, behaviours = [], [], []
            for device in local_devices:
                replica = self._replicas.on(module, device)
                if replica not in self._device_occlusions:
                    self._device_occlusions[replica] = IncrementalOcclusion(replica)
                ready = self._device_occlusions[replica]._prepare(
                    to_device(inputs, device),
                    window,
                    strides,
                    to_device(baselines, device),
                    to_device(extra, device),
                    ppe,
                    full_threshold,
                    self_check=self_check,
                )
                prepared.append(ready.choose_kernels(kernels, cuda_graphs))
                targets.append(to_device(target, device))
                behaviours.append(ready.batch_behaviour)
        except (UnsupportedForIncremental, SelfCheckFailed) as exc:
            return self._fall_back(exc, engine, captum_args).attribution
        total = prepared[0].grid.num_windows
        bar = (
            progress(desc=f"{self.get_name()} attribution", total=total)
            if show_progress
            else NullProgress()
        )
        lock = threading.Lock()

        def on_batch(count: int) -> None:
            with lock:
                bar.update(count)

        def batch_size(ready: PreparedOcclusion) -> int:
            return windows_per_batch or ready.windows_per_batch(max_memory)

        try:
            if workers:
                cpu = torch.device("cpu")
                shards = np.array_split(np.arange(total), len(targets_devices))
                jobs = [
                    dict(
                        inputs=to_device(inputs, cpu),
                        sliding_window_shapes=window,
                        strides=strides,
                        baselines=to_device(baselines, cpu),
                        additional_forward_args=to_device(extra, cpu),
                        perturbations_per_eval=ppe,
                        full_threshold=full_threshold,
                        target=to_device(target, cpu),
                        kernels=kernels,
                        cuda_graphs=bool(cuda_graphs),
                        windows_per_batch=windows_per_batch,
                        max_memory=max_memory,
                        window_ids=ids,
                        self_check=self_check,
                    )
                    for ids in shards[1:]
                ]
                ready = prepared[0]

                def local(poll, should_stop):
                    def on_local_batch(count: int) -> None:
                        on_batch(count)
                        poll()

                    return compute_shard(
                        ready,
                        shards[0],
                        targets[0],
                        batch_size(ready),
                        on_local_batch,
                        should_stop,
                        behaviours[0],
                    )

                local_result, remote_results = self._worker_pool.run(
                    workers,
                    jobs,
                    local,
                    on_batch,
                    lambda: cancel is not None and cancel.is_set(),
                )
                diffs, dtype, done = gather_shards(total, shards, [local_result, *remote_results])
            else:
                diffs, dtype, done = run_sharded(
                    prepared, targets, batch_size, on_batch, cancel, behaviours
                )
        except Exception as exc:  # with the self-check on, an engine error means Captum's path
            if not self_check:
                raise
            return self._fall_back(_as_check_failure(exc), engine, captum_args).attribution
        finally:
            bar.close()
        first = prepared[0]
        if done.all():
            result = first.attribution_from(diffs, dtype)
        else:
            result = first.partial_attribution(diffs, done, dtype)
        original_device = _format_tensor_into_tuples(inputs)[0].device
        result = _format_output(_is_tuple(inputs), (result.to(original_device),))
        elapsed = time.perf_counter() - started
        computed = int(done.sum())
        self.last_run = OcclusionReport(
            "incremental", Approximation(), computed, total, elapsed, not done.all()
        )
        if on_progress is not None:
            on_progress(
                OcclusionProgress(
                    result,
                    "exact",
                    computed,
                    total,
                    total,
                    elapsed,
                    bool(done.all()),
                    Approximation(),
                )
            )
        return result

    def _attribute_in_chunks(
        self,
        examples: int,
        inputs: Any,
        sliding_window_shapes: Any,
        strides: Any,
        baselines: Any,
        target: Any,
        additional_forward_args: Any,
        perturbations_per_eval: int,
        show_progress: bool,
        on_progress: Callable[[OcclusionProgress], object] | None,
        **options: Any,
    ) -> TensorOrTupleOfTensorsGeneric:
        """More than EXAMPLES_PER_RUN examples: runs of EXAMPLES_PER_RUN examples
        each (one window's rows then stay within the engine's batch bounds), their
        results concatenated. Per-example tensors (first dim = examples) among
        inputs, baselines, targets and additional arguments are sliced, as Captum
        expands them per example; `on_progress` gets a report after each run, the
        examples not run yet NaN."""
        parts: list[TensorOrTupleOfTensorsGeneric] = []
        cancel = options.get("cancel")
        reports = []
        started = time.perf_counter()
        for first in range(0, examples, EXAMPLES_PER_RUN):
            if cancel is not None and cancel.is_set() and parts:
                break
            rows = slice(first, min(first + EXAMPLES_PER_RUN, examples))
            parts.append(
                self.attribute(
                    _rows_of(inputs, rows, examples),
                    sliding_window_shapes,
                    strides,
                    _rows_of(baselines, rows, examples),
                    _rows_of(target, rows, examples),
                    _rows_of(additional_forward_args, rows, examples),
                    perturbations_per_eval,
                    show_progress,
                    **options,
                )
            )
            reports.append(self.last_run)
            result = _concatenate(parts, examples)
            if on_progress is not None:
                done = sum(r.windows_computed for r in reports)
                complete = rows.stop == examples and not reports[-1].cancelled
                on_progress(
                    OcclusionProgress(
                        result,
                        "exact" if reports[-1].approximation.exact else "approximate",
                        done,
                        done,
                        reports[-1].windows_total,
                        time.perf_counter() - started,
                        complete,
                        reports[-1].approximation,
                    )
                )
        last = self.last_run
        if last is not None:
            last.seconds = time.perf_counter() - started
            last.cancelled = (
                any(r.cancelled for r in reports) or len(parts) * EXAMPLES_PER_RUN < examples
            )
            last.windows_computed = sum(r.windows_computed for r in reports)
        return result

    def _fall_back(
        self, reason: Exception, engine: Engine, captum_args: tuple
    ) -> OcclusionProgress:
        """Captum's path for this call, with a FallbackWarning giving `reason`;
        with engine="incremental", IncrementalNotApplicable instead."""
        if engine == "incremental":
            raise IncrementalNotApplicable(str(reason)) from reason
        self._warn_fallback(str(reason))
        return self._captum_run(captum_args)

    def _captum_attribute(self, *args: Any) -> TensorOrTupleOfTensorsGeneric:
        return Occlusion.attribute.__wrapped__(self, *args)

    def _captum_run(self, captum_args: tuple) -> OcclusionProgress:
        """Captum's own path, exact, reported as one final progress report.

        With show_progress, the bar is ours, counting windows (Captum 0.9's own bar
        counts features per batch and stops short of its total): Captum runs
        without one, and the forward function counts the windows of each batch."""
        start = time.perf_counter()
        total = _captum_window_count(*captum_args[:3])
        show_progress = captum_args[7]
        if not show_progress:
            result = self._captum_attribute(*captum_args)
        else:
            examples = _format_tensor_into_tuples(captum_args[0])[0].shape[0]
            forward = self.forward_func
            bar = progress(desc=f"{self.get_name()} attribution", total=total)
            calls = 0

            def counting_forward(*args: Any, **kwargs: Any) -> Any:
                nonlocal calls
                output = forward(*args, **kwargs)
                if calls:  # the first call is the clean input
                    bar.update(args[0].shape[0] // max(examples, 1))
                calls += 1
                return output

            self.forward_func = counting_forward
            try:
                result = self._captum_attribute(*captum_args[:7], False)
            finally:
                self.forward_func = forward
                bar.close()
        elapsed = time.perf_counter() - start
        self.last_run = OcclusionReport("captum", Approximation(), total, total, elapsed)
        return OcclusionProgress(
            result, "exact", total, total, total, elapsed, True, Approximation()
        )

    def close(self) -> None:
        """Stop the worker processes that `devices=` started (one per GPU after the
        first; they are kept between calls and start again when needed). They also
        stop when this object is garbage-collected or the program exits."""
        self._worker_pool.close()

    def _warn_once(self, message: str, category: type[Warning]) -> None:
        self._warnings.warn(message, category)

    def _warn_fallback(self, reason: str) -> None:
        logger.info("IncrementalOcclusion falls back to Captum's Occlusion: %s", reason)
        self._warnings.warn(
            f"IncrementalOcclusion runs Captum's Occlusion instead: {reason}", FallbackWarning
        )

    def _prepare(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        sliding_window_shapes: Any,
        strides: Any,
        baselines: BaselineType,
        additional_forward_args: Any,
        perturbations_per_eval: int,
        full_threshold: float | None,
        tau: float = 1.0,
        self_check: bool = True,
    ) -> PreparedOcclusion:
        """The engine's state for one call, after the checks that come before any
        window (engine/self_check.py): the trace and batch layout checks always,
        the batch check with `self_check`. Raises UnsupportedForIncremental or
        SelfCheckFailed."""
        formatted = _format_tensor_into_tuples(inputs)
        formatted_strides = _format_and_verify_strides(strides, formatted)
        windows = _format_and_verify_sliding_window_shapes(sliding_window_shapes, formatted)
        per_dim_strides = _verify_windows(formatted, windows, formatted_strides)
        assert isinstance(perturbations_per_eval, int) and perturbations_per_eval >= 1, (
            "Perturbations per evaluation must be an integer and at least 1."
        )
        if len(formatted) != 1:
            raise UnsupportedForIncremental("several input tensors")
        _, formatted_baselines = _format_input_baseline(formatted, baselines)
        module = resolve_module(self.forward_func)
        extra = _format_additional_forward_args(additional_forward_args) or ()
        shared = [
            tuple(a.shape)
            for a in extra
            if isinstance(a, torch.Tensor)
            and a.dim() > 0
            and not is_per_example(a, formatted[0].shape[0])
        ]
        if perturbations_per_eval > 1 and shared:
            raise UnsupportedForIncremental(
                f"perturbations_per_eval={perturbations_per_eval} repeats every additional "
                f"tensor along its first dim (Captum's rule), also the shared one of shape "
                f"{shared[0]}; the engine keeps shared tensors as they are"
            )
        captured = capture_cached(self._captures, module, extra, formatted[0].shape[0])
        prepared = PreparedOcclusion.prepare(
            captured,
            formatted[0],
            formatted_baselines[0],
            windows[0],
            per_dim_strides[0],
            full_threshold,
            tau,
            forward=self.forward_func,
            additional_args=extra,
        )
        prepare_checks(prepared, self_check)
        return prepared
