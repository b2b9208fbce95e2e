"""How far one plan may depart from exact occlusion (the defaults are exact)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PlanApproximation:
    """The approximations that change a region plan; one per pass of a run.

    tau: projective-field threshold in (0, 1]: every changed box is capped at tau x
        its feature map's side (1: no cap).
    freeze_global_context: global statistics whose result is multiplied or added
        back onto a spatial map (squeeze-excitation's pooled vector, a pooling
        branch) keep the clean run's value, so a changed box stays a box through
        them (plan/context.py).
    """

    tau: float = 1.0
    freeze_global_context: bool = False

    @property
    def exact(self) -> bool:
        """Whether plans made with these settings compute exact occlusion."""
        return self.tau == 1.0 and not self.freeze_global_context


EXACT = PlanApproximation()
