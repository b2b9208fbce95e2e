"""Captum's own Occlusion for the calls the engine does not take, and the one
place that falls back to it."""

from __future__ import annotations

import logging
import time
from typing import Any

from captum._utils.typing import TensorOrTupleOfTensorsGeneric
from captum.attr import Occlusion

from captum_krypton.engine.call import CaptumArguments
from captum_krypton.engine.self_check import SelfCheckFailed
from captum_krypton.errors import FallbackWarning, IncrementalNotApplicable, OnceWarnings
from captum_krypton.options import Engine
from captum_krypton.reports import FinishedRun, WindowBar

logger = logging.getLogger(__name__)


def fall_back(
    occlusion: Occlusion,
    reason: Exception,
    engine: Engine,
    call: CaptumArguments,
    warnings: OnceWarnings,
) -> FinishedRun:
    """Captum's path for `call`, with a FallbackWarning giving `reason`; with
    engine="incremental", IncrementalNotApplicable instead."""
    if engine == "incremental":
        raise IncrementalNotApplicable(str(reason)) from reason
    logger.info("IncrementalOcclusion falls back to Captum's Occlusion: %s", reason)
    warnings.warn(
        f"IncrementalOcclusion runs Captum's Occlusion instead: {reason}", FallbackWarning
    )
    return run_captum(occlusion, call)


def as_check_failure(error: Exception) -> SelfCheckFailed:
    """An error of the engine's run, as the self-check reports it."""
    if isinstance(error, SelfCheckFailed):
        return error
    return SelfCheckFailed(
        "engine run", f"the incremental engine raised {type(error).__name__}: {error}"
    )


def run_captum(occlusion: Occlusion, call: CaptumArguments) -> FinishedRun:
    """Captum's own path, exact, reported as one final progress report.

    With show_progress, the bar is ours, counting windows (Captum 0.9's own bar
    counts features per batch and stops short of its total): Captum runs
    without one, and the forward function counts the windows of each batch."""
    start = time.perf_counter()
    total = call.num_windows()
    if not call.show_progress:
        result = _captum_attribute(occlusion, call)
    else:
        bar = WindowBar(occlusion.get_name(), show=True).start(total)
        forward = occlusion.forward_func
        occlusion.forward_func = _counting_forward(forward, bar, max(call.examples, 1))
        try:
            result = _captum_attribute(occlusion, call.replace(show_progress=False))
        finally:
            occlusion.forward_func = forward
            bar.close()
    return FinishedRun.exact("captum", result, total, total, time.perf_counter() - start)


def _captum_attribute(occlusion: Occlusion, call: CaptumArguments) -> TensorOrTupleOfTensorsGeneric:
    """Captum's `Occlusion.attribute` (without its usage log: the caller's call has it)."""
    return Occlusion.attribute.__wrapped__(occlusion, *call.positional())


def _counting_forward(forward: Any, bar: WindowBar, examples: int) -> Any:
    """`forward`, counting on `bar` the windows of each batch after the first call
    (the clean input)."""
    calls = 0

    def counting_forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        output = forward(*args, **kwargs)
        if calls:
            bar.update(args[0].shape[0] // examples)
        calls += 1
        return output

    return counting_forward
