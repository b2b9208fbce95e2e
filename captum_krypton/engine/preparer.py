"""From Captum's arguments to the engine's state for one call, with the traces
kept between calls."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from captum._utils.common import _format_additional_forward_args
from captum.attr._utils.common import _format_input_baseline

from captum_krypton.capture import (
    CapturedGraph,
    UnsupportedForIncremental,
    capture_cached,
    is_per_example,
    resolve_module,
)
from captum_krypton.engine.call import CaptumArguments
from captum_krypton.engine.occlusion import PreparedOcclusion
from captum_krypton.engine.self_check import prepare_checks
from captum_krypton.engine.settings import EngineSettings
from captum_krypton.engine.windows import WindowGrid
from captum_krypton.plan import EXACT, PlanApproximation


class Preparer:
    """Prepares calls; the traces it made (`captures`, per model) are reused by
    later calls with the same kind of additional arguments."""

    def __init__(self) -> None:
        self.captures: dict[tuple, CapturedGraph] = {}

    def prepare(
        self,
        forward_func: Callable[..., Any],
        call: CaptumArguments,
        settings: EngineSettings,
        approximation: PlanApproximation = EXACT,
        first_windows: Callable[[WindowGrid], np.ndarray] | None = None,
    ) -> PreparedOcclusion:
        """The engine's state for `call` of `forward_func`, after the checks that
        come before any window (engine/self_check.py): the trace and batch layout
        checks always, the batch check with `settings.self_check`, on windows
        among `first_windows(grid)` (the windows the call computes first; None:
        any). Raises Captum's assertions for bad windows,
        UnsupportedForIncremental or SelfCheckFailed."""
        windows, strides = call.window_shapes()
        ppe = call.perturbations_per_eval
        assert isinstance(ppe, int) and ppe >= 1, (
            "Perturbations per evaluation must be an integer and at least 1."
        )
        inputs = call.formatted_inputs
        if len(inputs) != 1:
            raise UnsupportedForIncremental("several input tensors")
        _, baselines = _format_input_baseline(inputs, call.baselines)
        module = resolve_module(forward_func)
        extra = _format_additional_forward_args(call.additional_forward_args) or ()
        _check_shared_tensors(extra, inputs[0].shape[0], ppe)
        captured = capture_cached(self.captures, module, inputs[0], extra)
        prepared = PreparedOcclusion.prepare(
            captured,
            inputs[0],
            baselines[0],
            windows[0],
            strides[0],
            settings.full_threshold,
            approximation,
            forward=forward_func,
            additional_args=extra,
        )
        _check_captum_batch_sizes(captured, prepared.grid.num_windows, inputs[0].shape[0], ppe)
        candidates = None if first_windows is None else first_windows(prepared.grid)
        prepare_checks(prepared, settings.self_check, candidates)
        return prepared


def _check_shared_tensors(extra: tuple, examples: int, perturbations_per_eval: int) -> None:
    """Captum repeats every additional tensor along its first dim for
    perturbations_per_eval > 1; the engine keeps shared tensors as they are."""
    shared = [
        tuple(a.shape)
        for a in extra
        if isinstance(a, torch.Tensor) and a.dim() > 0 and not is_per_example(a, examples)
    ]
    if perturbations_per_eval > 1 and shared:
        raise UnsupportedForIncremental(
            f"perturbations_per_eval={perturbations_per_eval} repeats every additional "
            f"tensor along its first dim (Captum's rule), also the shared one of shape "
            f"{shared[0]}; the engine keeps shared tensors as they are"
        )


def _check_captum_batch_sizes(
    captured: CapturedGraph, num_windows: int, examples: int, ppe: int
) -> None:
    """Captum runs the clean input and then batches of up to `ppe` windows; where the
    model's Python branches on its batch size, each of those sizes must take the
    branches the capture took, or Captum's numbers come from other code."""
    per_batch = min(ppe, num_windows)
    sizes = {examples, per_batch * examples, (num_windows % per_batch or per_batch) * examples}
    if ppe > 1 and not all(captured.holds_for(rows) for rows in sizes):
        raise UnsupportedForIncremental(
            f"the model's Python branches on its batch size, and with "
            f"perturbations_per_eval={ppe} Captum runs the windows in batches of "
            f"sizes {sorted(sizes)}, which take other branches than the capture"
        )
