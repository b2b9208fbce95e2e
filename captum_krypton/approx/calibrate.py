"""Target SSIM: choose tau, frozen global context and the drill-down fraction
from a quick calibration.

The coarse pass of drill-down (exact windows on a lattice) doubles as the
reference. Two errors are estimated on it, as 1 - SSIM of heatmaps:
- drill-down: one level coarser, for free: windows on every other lattice point
  stand in for the coarse pass, the rest of the lattice for the fine grid; each
  fraction r refines the top r of them and the heatmap is compared with the one
  from the whole lattice. Its spacing is twice the real one, so this errs high.
- frozen global context: where the model has global statistics to freeze
  (squeeze-excitation) and the frozen plan is estimated at least MIN_TAU_GAIN
  cheaper, the sub-lattice's windows run with it once; kept as the base of the
  search over tau when its error leaves room, else dropped.
- tau: the thresholds in TAU_PROBES run, largest first, on the sub-lattice's
  windows (with the base's frozen context) until one misses, and their heatmaps
  are compared with the exact windows' heatmap; skipped where the plans
  estimate that even the smallest tau saves little.
The errors are taken to add up; of the measured pairs whose summed error stays
within SAFETY x (1 - target), the cheapest by the plans' estimated time per
window wins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from captum_krypton.approx import drilldown as dd
from captum_krypton.approx.quality import attribution_ssim
from captum_krypton.approx.settings import Approximation
from captum_krypton.plan import EXACT, PlanApproximation

#: The thresholds calibration tries, largest first. On a GPU a probe costs about
#: a whole small batch, and tau saves less there than its FLOPs suggest, so the
#: list is short.
TAU_PROBES = (0.6, 0.4)
FRACTION_CANDIDATES = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.8)
#: Share of the allowed error (1 - target) the estimates may use: they are
#: measured on coarse heatmaps, which hide some of the fine-grid error.
SAFETY = 0.6
#: Drill-down needs this many lattice points along some spatial dim to pay off.
MIN_LATTICE_SIDE = 4
#: tau is searched only when the smallest candidate's plan is estimated at least
#: this much cheaper per window than the exact plan (otherwise the search would
#: cost more than it can save).
MIN_TAU_GAIN = 1.25


@dataclass
class Calibration:
    """What the calibration measured and chose.

    tau_errors: 1 - SSIM per tau tried, with the base's frozen context.
    frozen_context_error: 1 - SSIM with frozen global context alone (None: not
        offered, or not estimated to pay).
    """

    approximation: Approximation
    tau_errors: dict[float, float] = field(default_factory=dict)
    fraction_errors: dict[float, float] = field(default_factory=dict)
    windows_run: int = 0
    frozen_context_error: float | None = None


def calibrate(
    target_ssim: float,
    counts: tuple[int, ...],
    lattice: tuple[np.ndarray, ...],
    lattice_diffs: torch.Tensor,
    heatmap: Callable[[torch.Tensor], torch.Tensor],
    run_with: Callable[[PlanApproximation, np.ndarray], torch.Tensor],
    seconds_per_window: Callable[[PlanApproximation], float],
    factor: int,
    offers_frozen_context: bool = False,
) -> Calibration:
    """Settings meeting `target_ssim` at the least estimated cost.

    counts: the window grid; lattice: per dim, the coarse pass's indices, whose
    exact differences are `lattice_diffs` ((lattice windows, outputs), C order);
    heatmap: every window's difference -> Captum-shaped map; run_with: (plan
    approximations, window ids) -> their differences with those; seconds_per_window:
    a plan's estimated cost per window with those approximations;
    offers_frozen_context: whether the model has global statistics to freeze.
    """
    allowed = SAFETY * (1.0 - target_ssim)
    num_windows = int(np.prod(counts))
    lattice_ids = dd.window_ids(counts, lattice)

    def exact_at(points: tuple[np.ndarray, ...]) -> torch.Tensor:
        """The lattice's exact differences at a sub-lattice's windows."""
        rows = np.searchsorted(lattice_ids, dd.window_ids(counts, points))
        return lattice_diffs[torch.from_numpy(rows)]

    coarse = dd.sub_lattice(lattice)
    drilldown_pays = max(len(axis) for axis in lattice[1:]) >= MIN_LATTICE_SIDE
    calibration = Calibration(Approximation(drilldown_factor=factor))
    fraction_errors = calibration.fraction_errors
    if drilldown_pays:
        fraction_errors.update(_fraction_errors(counts, lattice, coarse, lattice_diffs, heatmap))
    fraction_errors[1.0] = 0.0

    # tau runs on the sub-lattice's windows when drill-down leaves room for it.
    tau_points = coarse if drilldown_pays else lattice
    tau_ids = dd.window_ids(counts, tau_points)
    tau_reference = heatmap(dd.interpolate(counts, tau_points, exact_at(tau_points)))
    errors: dict[PlanApproximation, float] = {EXACT: 0.0}

    def plan_error(approximation: PlanApproximation) -> float:
        if approximation not in errors:
            diffs = run_with(approximation, tau_ids)
            calibration.windows_run += len(tau_ids)
            ours = heatmap(dd.interpolate(counts, tau_points, diffs))
            errors[approximation] = 1.0 - float(attribution_ssim(ours, tau_reference).min())
        return errors[approximation]

    # Half the allowed error for drill-down, the rest for frozen context and tau.
    half = _cheapest_fraction(fraction_errors, allowed / 2)
    room = allowed - fraction_errors[half]
    base = EXACT
    frozen = PlanApproximation(freeze_global_context=True)
    if offers_frozen_context and seconds_per_window(EXACT) >= MIN_TAU_GAIN * seconds_per_window(
        frozen
    ):
        calibration.frozen_context_error = plan_error(frozen)
        if calibration.frozen_context_error <= room:
            base = frozen
    smallest = PlanApproximation(TAU_PROBES[-1], base.freeze_global_context)
    if seconds_per_window(base) >= MIN_TAU_GAIN * seconds_per_window(smallest):
        _smallest_tau(
            lambda tau: plan_error(PlanApproximation(tau, base.freeze_global_context)), room
        )
    calibration.tau_errors = {
        a.tau: e for a, e in errors.items() if a.freeze_global_context == base.freeze_global_context
    }
    calibration.tau_errors.setdefault(1.0, 0.0)

    # The cheapest measured pair within the allowed error (the lattice has run
    # already, whatever is chosen); ties: the larger tau, then no freezing, then
    # the larger fraction.
    best = (num_windows * seconds_per_window(EXACT), -1.0, False, -1.0)
    for approximation, plan_err in errors.items():
        for fraction, fraction_err in fraction_errors.items():
            if plan_err + fraction_err <= allowed:
                cost = seconds_per_window(approximation) * fraction * num_windows
                candidate = (
                    cost,
                    -approximation.tau,
                    approximation.freeze_global_context,
                    -fraction,
                )
                best = min(best, candidate)
    _, tau, freeze, fraction = best
    chosen = PlanApproximation(-tau, freeze)
    fraction = -fraction
    calibration.approximation = Approximation(
        tau=chosen.tau,
        freeze_global_context=chosen.freeze_global_context,
        drilldown=None if fraction == 1.0 else fraction,
        drilldown_factor=factor,
        estimated_ssim=1.0 - errors[chosen] - fraction_errors[fraction],
    )
    return calibration


def _fraction_errors(
    counts: tuple[int, ...],
    lattice: tuple[np.ndarray, ...],
    coarse: tuple[np.ndarray, ...],
    lattice_diffs: torch.Tensor,
    heatmap: Callable[[torch.Tensor], torch.Tensor],
) -> dict[float, float]:
    """1 - SSIM of drill-down one level up, per candidate fraction (no model runs):
    the coarse sub-lattice plays the coarse pass, the lattice the fine grid."""
    reference = heatmap(dd.interpolate(counts, lattice, lattice_diffs))
    sizes = tuple(len(axis) for axis in lattice)
    # The sub-lattice as positions within the lattice, per dim.
    within = tuple(np.searchsorted(axis, sub) for axis, sub in zip(lattice, coarse))
    on_coarse = np.zeros(int(np.prod(sizes)), dtype=bool)
    coarse_rows = dd.window_ids(sizes, within)
    on_coarse[coarse_rows] = True
    coarse_diffs = lattice_diffs[torch.from_numpy(coarse_rows)]
    estimate = dd.interpolate(sizes, within, coarse_diffs)
    scores = dd.refinement_scores(sizes, within, coarse_diffs)
    errors = {}
    for fraction in FRACTION_CANDIDATES:
        order = dd.refinement_order(scores, fraction, on_coarse)
        known = on_coarse.copy()
        known[order] = True
        composed = torch.where(
            torch.from_numpy(known)[:, None], lattice_diffs.to(torch.float64).cpu(), estimate
        )
        ours = heatmap(dd.interpolate(counts, lattice, composed))
        errors[fraction] = 1.0 - float(attribution_ssim(ours, reference).min())
    return errors


def _cheapest_fraction(errors: dict[float, float], allowed: float) -> float:
    return min((f for f, e in errors.items() if e <= allowed), default=1.0)


def _smallest_tau(tau_error: Callable[[float], float], allowed: float) -> float:
    """The smallest of TAU_PROBES, tried largest first, whose error is within
    `allowed`; stops at the first that is not (quality grows with tau). Each probe
    is a model run, so there are few of them."""
    best = 1.0
    for tau in TAU_PROBES:
        if tau_error(tau) > allowed:
            break
        best = tau
    return best
