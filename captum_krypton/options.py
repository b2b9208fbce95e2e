"""The keyword extras of `IncrementalOcclusion.attribute`, checked once at the door
and passed on as one object."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from captum.attr._utils.common import _format_and_verify_strides

from captum_krypton.approx.calibrate import Calibration
from captum_krypton.approx.settings import Approximation, check_target_ssim
from captum_krypton.engine.call import CaptumArguments
from captum_krypton.engine.progressive import OcclusionProgress
from captum_krypton.engine.settings import EngineSettings, Kernels
from captum_krypton.engine.windows import WindowGrid
from captum_krypton.plan import EXACT, PlanApproximation

Engine = Literal["auto", "incremental", "captum"]


@dataclass(frozen=True)
class OcclusionOptions:
    """Every keyword extra of one call, checked (the arguments are documented at
    `IncrementalOcclusion.attribute`; `from_keywords` takes them by those names).

    engine: "auto", "incremental" or "captum".
    settings: how the engine runs (plan, kernels, batches, self-check).
    approximation: tau, frozen global context and drill-down, as asked (exact by
        default).
    target_ssim: the SSIM vs exact that chooses them (None: off).
    calibration: an earlier call's calibration whose choice `approximation` is
        (None: not reused).
    region: (*starts, *ends) over the spatial dims: only windows inside it run.
    devices: the devices sharing the windows; None on Captum's path or when not given.
    on_progress: called with every `OcclusionProgress` of `attribute`.
    cancel: once set, the run stops after the batch in flight.
    """

    engine: Engine = "auto"
    settings: EngineSettings = field(default_factory=EngineSettings)
    approximation: Approximation = field(default_factory=Approximation)
    target_ssim: float | None = None
    calibration: Calibration | None = None
    region: tuple[int, ...] | None = None
    devices: tuple[torch.device, ...] | None = None
    on_progress: Callable[[OcclusionProgress], object] | None = None
    cancel: threading.Event | None = None

    def __post_init__(self) -> None:
        """The checks of `attribute`'s keywords, with its messages (tau, drilldown
        and drilldown_factor are checked by Approximation, windows_per_batch by
        EngineSettings)."""
        asked = self.approximation
        approximation_set = (
            asked.tau != 1.0 or asked.freeze_global_context or asked.drilldown is not None
        )
        if self.devices is not None and not self.devices:
            raise ValueError("devices must name at least one device")
        if self.target_ssim is not None:
            check_target_ssim(self.target_ssim)
            if approximation_set:
                raise ValueError(
                    "target_ssim chooses tau, freeze_global_context and drilldown: leave them unset"
                )
        if self.calibration is not None and (
            self.target_ssim is not None or self.approximation != _reused(self.calibration)
        ):
            raise ValueError(
                "calibration reuses an earlier choice: leave target_ssim, tau, "
                "freeze_global_context and drilldown unset"
            )
        if self.region is not None and (self.drilling or self.target_ssim is not None):
            raise ValueError("region computes the windows inside it: not with drill-down")
        if self.engine not in ("auto", "incremental", "captum"):
            raise ValueError(
                f"engine must be 'auto', 'incremental' or 'captum', not {self.engine!r}"
            )

    @classmethod
    def from_keywords(
        cls,
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
    ) -> OcclusionOptions:
        """The options of `attribute`'s keyword extras (same names and defaults);
        raises ValueError (TypeError for a `calibration` that is not one) with
        `attribute`'s messages. `devices` is ignored on Captum's path
        (engine="captum")."""
        approximation = Approximation(
            tau=tau,
            freeze_global_context=freeze_global_context,
            drilldown=drilldown,
            drilldown_factor=drilldown_factor,
        )
        if calibration is not None:
            if not isinstance(calibration, Calibration):
                raise TypeError(
                    "calibration must be the Calibration of an earlier call "
                    f"(last_run.calibration), not {type(calibration).__name__}"
                )
            if target_ssim is not None or approximation.plan != EXACT or drilldown is not None:
                raise ValueError(
                    "calibration reuses an earlier choice: leave target_ssim, tau, "
                    "freeze_global_context and drilldown unset"
                )
            approximation = _reused(calibration)
        return cls(
            engine=engine,
            settings=EngineSettings(
                full_threshold=full_threshold,
                kernels=kernels,
                cuda_graphs=cuda_graphs,
                max_memory=max_memory,
                windows_per_batch=windows_per_batch,
                self_check=self_check,
            ),
            approximation=approximation,
            target_ssim=target_ssim,
            calibration=calibration,
            region=region,
            devices=None
            if devices is None or engine == "captum"
            else tuple(torch.device(d) for d in devices),
            on_progress=on_progress,
            cancel=cancel,
        )

    @property
    def drilling(self) -> bool:
        """Whether a coarse pass comes first (drill-down, or a target SSIM)."""
        return self.approximation.drilldown is not None or self.target_ssim is not None

    @property
    def first_pass(self) -> PlanApproximation:
        """The plan approximations of the first pass: drill-down's coarse pass is exact."""
        return EXACT if self.drilling else self.approximation.plan

    def window_ids(self, grid: WindowGrid) -> np.ndarray | None:
        """Ids of the windows of `grid` that run: those lying inside `region`
        ((*starts, *ends) over the spatial dims, half-open); None: every one."""
        region = self.region
        if region is None:
            return None
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


def check_calibration(call: CaptumArguments, options: OcclusionOptions) -> None:
    """A reused calibration must come from a call on inputs of the same shape
    (without the batch dim), with the same window and strides."""
    calibration = options.calibration
    if calibration is None:
        return
    windows, strides = call.window_shapes()
    inputs = call.formatted_inputs
    this_call = (tuple(inputs[0].shape[1:]), tuple(windows[0]), tuple(strides[0]))
    if calibration.grid != this_call:
        raise ValueError(
            "calibration was made for inputs of shape, window and strides "
            f"{calibration.grid}, not {this_call}"
        )


def _reused(calibration: Calibration) -> Approximation:
    """A calibration's choice, for other inputs: without its predicted SSIM."""
    return dataclasses.replace(calibration.approximation, estimated_ssim=None)


def check_strides(call: CaptumArguments) -> None:
    """Strides must be positive: Captum 0.9 turns 0 into an all-NaN result and a
    negative stride into a shape error deep inside."""
    for stride in _format_and_verify_strides(call.strides, call.formatted_inputs):
        values = (stride,) if isinstance(stride, int) else tuple(stride)
        if any(not isinstance(v, (int, np.integer)) or v < 1 for v in values):
            raise ValueError(f"strides must be positive integers, not {call.strides!r}")
