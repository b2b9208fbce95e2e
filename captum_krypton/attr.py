"""IncrementalOcclusion: Captum's Occlusion, computed by incremental inference."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
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

from captum_krypton.engine.occlusion import PreparedOcclusion
from captum_krypton.graph.capture import (
    CapturedGraph,
    UnsupportedForIncremental,
    capture_cached,
    resolve_module,
)
from captum_krypton.graph.plan import RegionPlan
from captum_krypton.kernels import use_triton

logger = logging.getLogger(__name__)

Engine = Literal["auto", "incremental", "captum"]


class FallbackWarning(UserWarning):
    """IncrementalOcclusion ran Captum's own Occlusion; the message says why."""


class IncrementalNotApplicable(RuntimeError):
    """engine="incremental" was asked for, but the model or arguments rule it out."""


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


def _check_tau(tau: float) -> None:
    if not isinstance(tau, (int, float)) or not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], not {tau!r}")


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
        self._warned: set[str] = set()

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
        cuda_graphs: bool = False,
        tau: float = 1.0,
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
                fails). Off by default: the capture costs about two batches, which
                pays off only when a call runs many batches.
            tau: projective-field threshold in (0, 1]; below 1 every changed box
                is capped at tau x its feature map's side (centred) at each layer
                and changes beyond it are dropped: faster, approximate (Krypton).
                1 (default) is exact. Where Captum's path runs, results are exact.
        """
        _check_tau(tau)
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
            return self._captum_attribute(*captum_args)
        try:
            prepared = self._prepare(
                inputs,
                sliding_window_shapes,
                strides,
                baselines,
                additional_forward_args,
                perturbations_per_eval,
                full_threshold,
                tau,
            )
        except UnsupportedForIncremental as exc:
            if engine == "incremental":
                raise IncrementalNotApplicable(str(exc)) from exc
            self._warn_fallback(str(exc))
            return self._captum_attribute(*captum_args)

        prepared.use_triton = use_triton(kernels, prepared.inputs.device)
        # Graphs need kernels that never wait on the host: the Triton ones.
        prepared.use_cuda_graphs = (
            cuda_graphs and prepared.use_triton and (prepared.inputs.device.type == "cuda")
        )
        batch = windows_per_batch or prepared.windows_per_batch(max_memory)
        bar = (
            progress(desc=f"{self.get_name()} attribution", total=prepared.grid.num_windows)
            if show_progress
            else NullProgress()
        )
        try:
            result = prepared.attribute(target, batch, on_batch=bar.update)
        finally:
            bar.close()
        return _format_output(_is_tuple(inputs), (result,))

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
        _check_tau(tau)
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
            ).plan
        except UnsupportedForIncremental as exc:
            raise IncrementalNotApplicable(str(exc)) from exc

    # ------------------------------------------------------------ internals
    def _captum_attribute(self, *args: Any) -> TensorOrTupleOfTensorsGeneric:
        return Occlusion.attribute.__wrapped__(self, *args)

    def _warn_fallback(self, reason: str) -> None:
        logger.info("IncrementalOcclusion falls back to Captum's Occlusion: %s", reason)
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(
                f"IncrementalOcclusion runs Captum's Occlusion instead: {reason}",
                FallbackWarning,
                stacklevel=4,
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
    ) -> PreparedOcclusion:
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
        captured = capture_cached(self._captures, module, extra)
        return PreparedOcclusion.prepare(
            captured,
            formatted[0],
            formatted_baselines[0],
            windows[0],
            per_dim_strides[0],
            full_threshold,
            tau,
        )
