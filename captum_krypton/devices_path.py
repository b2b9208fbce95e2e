"""Calls with `devices=`: the windows shared over several devices
(parallel/sharded.py), Captum's path where the engine does not apply."""

from __future__ import annotations

import time
from functools import partial

from captum.attr import Occlusion

from captum_krypton.captum_path import as_check_failure, fall_back
from captum_krypton.capture import UnsupportedForIncremental
from captum_krypton.engine.call import CaptumArguments
from captum_krypton.engine.self_check import SelfCheckFailed
from captum_krypton.errors import OnceWarnings
from captum_krypton.options import OcclusionOptions
from captum_krypton.parallel.sharded import ShardedOcclusion
from captum_krypton.reports import FinishedRun, WindowBar


def run_on_devices(
    occlusion: Occlusion,
    sharded: ShardedOcclusion,
    call: CaptumArguments,
    options: OcclusionOptions,
    warnings: OnceWarnings,
) -> FinishedRun:
    """`call` of `occlusion` with its windows shared over `options.devices`."""
    assert options.devices is not None
    started = time.perf_counter()
    settings = options.settings
    warn = partial(warnings.warn, category=RuntimeWarning)
    try:
        ready = sharded.prepare(occlusion.forward_func, call, settings, options.devices, warn)
    except (UnsupportedForIncremental, SelfCheckFailed) as exc:
        return fall_back(occlusion, exc, options.engine, call, warnings)
    bar = WindowBar(occlusion.get_name(), call.show_progress).start(ready.total)
    try:
        attribution, computed = ready.run(bar.update, options.cancel)
    except Exception as exc:  # with the self-check on, an engine error means Captum's path
        if not settings.self_check:
            raise
        return fall_back(occlusion, as_check_failure(exc), options.engine, call, warnings)
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    result = call.format_output(attribution)
    return FinishedRun.exact("incremental", result, computed, ready.total, seconds)
