"""Incremental evaluation or plain re-inference, chosen by measurement on CUDA.

The cost model's estimate decides where it is clear (an estimated gain of
`MEASURE_BELOW_GAIN` or more keeps the incremental plan). Where it is not (the
plan saves little: squeeze-excitation, attention, ConvNeXt's large kernels),
the first call on a plan times a batch of each candidate: the incremental plan,
and plain batched re-inference of the whole model in channels-last and
contiguous layouts, each at the largest of `PLAIN_ROWS` that fits (on an H200,
1,024 rows beat 256 on every model measured, and each batch size tried costs a
cuDNN algorithm search in the first call). The fastest per window serves that plan
from then on, so the engine is never slower than the best plain re-inference
it measured. Every candidate computes the same outputs (plain re-inference is
exactly what Captum runs), so the choice changes speed only.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from captum_krypton.engine.occlusion import PreparedOcclusion

#: The incremental plan's estimated gain over plain re-inference above which it
#: is kept without measuring.
MEASURE_BELOW_GAIN = 2.0
#: Rows per batch for plain re-inference, largest first: the first that fits
#: the memory budget and the model's batch limit is measured, per layout.
PLAIN_ROWS = (1024, 256)
#: Timed runs per candidate after its warm-up (cuDNN search, compilation).
TIMED_RUNS = 2

_lock = threading.Lock()


@dataclass
class PathChoice:
    """How a plan's window batches run: `plain` re-inference (in `layout`, at
    `rows` rows per batch) or `incremental`; with what each candidate measured."""

    path: str
    layout: torch.memory_format = torch.contiguous_format
    rows: int = 0
    seconds_per_window: dict[str, float] = field(default_factory=dict)
    reason: str = ""


def _seconds_per_window(prepared: PreparedOcclusion, windows: int) -> float:
    ids = torch.arange(windows, device=prepared.inputs.device)
    prepared.run_window_ids(ids)  # warm-up: cuDNN's search, kernel choices, compilation
    best = float("inf")
    for _ in range(TIMED_RUNS):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        prepared.run_window_ids(ids)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best / windows


def needs_measurement(prepared: PreparedOcclusion) -> bool:
    plan = prepared.plan
    if plan.path_choice is not None or prepared.inputs.device.type != "cuda":
        return False
    chosen = prepared.full_threshold is not None or prepared.cuda_graphs is True
    if chosen or not plan.approximation.exact:
        return False  # settings the user chose, or an approximation: as planned
    if plan.estimated_seconds is None or plan.estimated_full_seconds is None:
        return False
    gain = plan.estimated_full_seconds / max(plan.estimated_seconds, 1e-12)
    rows = prepared.grid.num_windows * prepared.inputs.shape[0]
    return gain < MEASURE_BELOW_GAIN and rows >= 2 * min(PLAIN_ROWS)


def choose_path(prepared: PreparedOcclusion, memory_budget: int | None) -> None:
    """Measure the candidates once per plan and keep the fastest on the plan."""
    with _lock:
        if not needs_measurement(prepared):
            return
        plan = prepared.plan
        planned_plain = plan.rerun_whole_model
        examples = prepared.inputs.shape[0]
        candidates: list[PathChoice] = []
        if not planned_plain:
            candidates.append(PathChoice("incremental"))
        layouts = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
        if prepared.inputs.dim() == 5:
            layouts["channels_last"] = torch.channels_last_3d
        for name, layout in layouts.items():
            for rows in PLAIN_ROWS:
                candidate = PathChoice("plain", layout, rows)
                candidate.reason = f"{name}, {rows} rows"
                candidates.append(candidate)
        timings: dict[str, float] = {}
        best: PathChoice | None = None
        best_seconds = float("inf")
        measured_layouts: set[torch.memory_format] = set()
        for candidate in candidates:
            if candidate.path == "plain" and candidate.layout in measured_layouts:
                continue  # a larger batch of this layout was measured
            plan.path_choice = candidate
            plan.rerun_whole_model = candidate.path == "plain"
            windows = min(prepared.windows_per_batch(memory_budget), prepared.grid.num_windows)
            if candidate.path == "plain" and windows * examples < candidate.rows // 2:
                continue  # memory or the model's batch limit: not this batch size
            label = "incremental" if candidate.path == "incremental" else candidate.reason
            try:
                seconds = _seconds_per_window(prepared, windows)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                continue
            if candidate.path == "plain":
                measured_layouts.add(candidate.layout)
            timings[label] = seconds
            if seconds < best_seconds:
                best, best_seconds = candidate, seconds
        if best is None:  # nothing could be measured: as planned
            plan.rerun_whole_model = planned_plain
            plan.path_choice = PathChoice("plain" if planned_plain else "incremental")
            plan.path_choice.reason = "not measured"
            return
        best.seconds_per_window = timings
        plan.path_choice = best
        plan.rerun_whole_model = best.path == "plain"
