"""The settings of an approximate occlusion run, checked once."""

from __future__ import annotations

import math
from dataclasses import dataclass

from captum_krypton.plan import PlanApproximation


@dataclass(frozen=True)
class Approximation:
    """How far a run may depart from exact occlusion; the defaults are exact.

    tau: projective-field threshold in (0, 1]: every changed box is capped at tau x
        its feature map's side at each layer (1: no cap).
    freeze_global_context: global statistics that return onto a spatial map
        (squeeze-excitation's pooled vector, a global-average-pool branch) keep
        the clean run's values, so a changed box stays a box through them; the
        network's final pooling into the output is never frozen.
    drilldown: fraction in (0, 1] of the windows computed at the requested stride,
        those where a coarse pass found the largest attributions; None: all windows.
        Where a target SSIM chose it, its own call computed as many windows, some
        of them at random positions (the calibration's sample).
    drilldown_factor: the coarse pass computes every `drilldown_factor`-th window
        along each spatial dim.
    estimated_ssim: when a target SSIM chose these settings, the SSIM vs exact
        that the calibration predicts for its own call.
    """

    tau: float = 1.0
    freeze_global_context: bool = False
    drilldown: float | None = None
    drilldown_factor: int = 4
    estimated_ssim: float | None = None

    def __post_init__(self) -> None:
        check_fraction("tau", self.tau)
        if not isinstance(self.freeze_global_context, bool):
            raise ValueError(
                f"freeze_global_context must be True or False, not {self.freeze_global_context!r}"
            )
        if self.drilldown is not None:
            check_fraction("drilldown", self.drilldown)
        if not isinstance(self.drilldown_factor, int) or self.drilldown_factor < 2:
            raise ValueError(
                f"drilldown_factor must be an integer of at least 2, not {self.drilldown_factor!r}"
            )

    @property
    def exact(self) -> bool:
        """Whether results equal exact occlusion (up to float rounding)."""
        return self.plan.exact and (self.drilldown is None or self.drilldown == 1.0)

    @property
    def plan(self) -> PlanApproximation:
        """The approximations that change the plan of the windows computed."""
        return PlanApproximation(self.tau, self.freeze_global_context)


def check_fraction(name: str, value: object) -> None:
    """`value` must be a real number in (0, 1]."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 < value <= 1
    ):
        raise ValueError(f"{name} must be in (0, 1], not {value!r}")


def check_target_ssim(value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 < value < 1
    ):
        raise ValueError(f"target_ssim must be in (0, 1), not {value!r}")
