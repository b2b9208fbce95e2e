"""The settings of an approximate occlusion run, checked once."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Approximation:
    """How far a run may depart from exact occlusion; the defaults are exact.

    tau: projective-field threshold in (0, 1]: every changed box is capped at tau x
        its feature map's side at each layer (1: no cap).
    drilldown: fraction in (0, 1] of the windows computed at the requested stride,
        those where a coarse pass found the largest attributions; None: all windows.
    drilldown_factor: the coarse pass computes every `drilldown_factor`-th window
        along each spatial dim.
    estimated_ssim: when a target SSIM chose these settings, the SSIM vs exact
        that the calibration predicts.
    """

    tau: float = 1.0
    drilldown: float | None = None
    drilldown_factor: int = 4
    estimated_ssim: float | None = None

    def __post_init__(self) -> None:
        check_fraction("tau", self.tau)
        if self.drilldown is not None:
            check_fraction("drilldown", self.drilldown)
        if not isinstance(self.drilldown_factor, int) or self.drilldown_factor < 2:
            raise ValueError(
                f"drilldown_factor must be an integer of at least 2, not {self.drilldown_factor!r}"
            )

    @property
    def exact(self) -> bool:
        """Whether results equal exact occlusion (up to float rounding)."""
        return self.tau == 1.0 and (self.drilldown is None or self.drilldown == 1.0)


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
