"""Calls with `devices=`: the progressive run of one device, with the windows of
each stage shared over the devices (parallel/sharded.py)."""

from __future__ import annotations

from functools import partial

from captum.attr import Occlusion

from captum_krypton.engine.call import CaptumArguments
from captum_krypton.errors import OnceWarnings
from captum_krypton.options import OcclusionOptions
from captum_krypton.parallel.sharded import ShardedOcclusion
from captum_krypton.progressive_path import ProgressivePath


def path_on_devices(
    occlusion: Occlusion,
    sharded: ShardedOcclusion,
    call: CaptumArguments,
    options: OcclusionOptions,
    report_batches: bool,
    warnings: OnceWarnings,
) -> ProgressivePath:
    """The run of `call` of `occlusion` with its windows shared over
    `options.devices`; its stages, table and heatmaps are on the first device.
    Raises Captum's assertions for bad windows, and UnsupportedForIncremental or
    SelfCheckFailed where the engine does not apply."""
    assert options.devices is not None
    shared = sharded.prepare(
        occlusion.forward_func,
        call,
        options.settings,
        options.devices,
        partial(warnings.warn, category=RuntimeWarning),
        options.first_pass,
    )
    return ProgressivePath(
        shared.first, call, options, report_batches, occlusion.get_name(), shared
    )
