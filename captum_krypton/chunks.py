"""Calls with more examples than one run takes, split by examples."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from captum_krypton.capture import is_per_example
from captum_krypton.engine.call import CaptumArguments
from captum_krypton.engine.progressive import OcclusionProgress
from captum_krypton.plan import PLANNING_ROWS
from captum_krypton.reports import FinishedRun

#: Calls with more examples than this run in chunks of this many examples.
EXAMPLES_PER_RUN = PLANNING_ROWS


def needs_chunks(call: CaptumArguments) -> bool:
    return call.examples > EXAMPLES_PER_RUN


def attribute_in_chunks(
    call: CaptumArguments,
    run: Callable[[CaptumArguments], FinishedRun],
    on_progress: Callable[[OcclusionProgress], object] | None,
    cancel: threading.Event | None,
) -> FinishedRun:
    """`call` as runs of EXAMPLES_PER_RUN examples each (one window's rows then
    stay within the engine's batch bounds), their results concatenated.
    Per-example values (first dim = examples) among inputs, baselines, targets
    and additional arguments are sliced, as Captum expands them per example.
    `on_progress` gets a report after each run, the examples not run yet NaN; a
    set `cancel` stops after the run in flight."""
    examples = call.examples
    parts: list[Any] = []
    finished: list[FinishedRun] = []
    started = time.perf_counter()
    for first in range(0, examples, EXAMPLES_PER_RUN):
        if cancel is not None and cancel.is_set() and parts:
            break
        rows = slice(first, min(first + EXAMPLES_PER_RUN, examples))
        finished.append(run(_chunk(call, rows, examples)))
        parts.append(finished[-1].progress.attribution)
        last = finished[-1].report
        done = sum(f.report.windows_computed for f in finished)
        progress = OcclusionProgress(
            _concatenate(parts, examples),
            "exact" if last.approximation.exact else "approximate",
            done,
            done,
            last.windows_total,
            time.perf_counter() - started,
            rows.stop == examples and not last.cancelled,
            last.approximation,
        )
        if on_progress is not None:
            on_progress(progress)
    runs = -(-examples // EXAMPLES_PER_RUN)
    report = dataclasses.replace(
        finished[-1].report,
        seconds=time.perf_counter() - started,
        cancelled=any(f.report.cancelled for f in finished)
        or len(parts) * EXAMPLES_PER_RUN < examples,
        # summed over the runs, like the windows computed (every run has the grid)
        windows_computed=sum(f.report.windows_computed for f in finished),
        windows_total=runs * finished[-1].report.windows_total,
    )
    return FinishedRun(progress, report)


def _chunk(call: CaptumArguments, rows: slice, examples: int) -> CaptumArguments:
    return call.replace(
        inputs=_rows_of(call.inputs, rows, examples),
        baselines=_rows_of(call.baselines, rows, examples),
        target=_rows_of(call.target, rows, examples),
        additional_forward_args=_rows_of(call.additional_forward_args, rows, examples),
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
