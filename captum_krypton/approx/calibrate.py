"""Target SSIM: choose drill-down's spacing and fraction, frozen global context
and tau from a calibration on the call's own inputs.

Drill-down's error is that of the windows it leaves interpolated. A coarse
lattice cannot see detail finer than its spacing (a sharp local feature between
lattice points, typical of models trained on real images), so comparing the
lattice with a coarser one says little about the fine grid. The error is
measured where it arises instead: a seeded random sample of the windows off the
lattice is computed exactly (those windows stay in the map). For a candidate
fraction r, the sampled windows outside the top r (those the refinement would
leave interpolated) give their interpolation residuals; scaled by the inverse
of their share of those windows, they estimate the map's remaining error
(Horvitz-Thompson: unbiased in the error, and its sampling noise lowers the SSIM
it predicts). The SSIM of the map before refinement against that map plus the
estimated error is the SSIM the candidate is predicted to reach; a margin per
level absorbs what noise leaves over.

The calibration runs in LEVELS, cheapest first: the call's own coarse spacing
with a small sample, where a candidate must pass by a wide margin and cost less
than the next level would; then a spacing of 2 (the lattice grows to it; its
windows are windows of the map) with a larger sample. Where no candidate passes,
or the best saves under MIN_SAVING of exact mode's window cost, the remaining
windows run exactly: exact mode always meets the target, and the windows
computed so far are all windows of the exact map.

Frozen global context and tau change the plan of the refined windows. Their
errors are measured on lattice windows (1 - SSIM of maps interpolated from
them), counted at 1 / SAFETY, and added to drill-down's. They are tried only
where the plans estimate them at least MIN_TAU_GAIN cheaper per window and the
windows they would speed up cost at least PROBE_PAYBACK times the probe.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from captum_krypton.approx import drilldown as dd
from captum_krypton.approx.quality import attribution_ssim, attribution_ssim_many
from captum_krypton.approx.settings import Approximation
from captum_krypton.plan import EXACT, PlanApproximation

#: Per level: coarse spacing (None: the call's drilldown_factor), the share of the
#: windows off the lattice computed exactly at random positions, the share of the
#: allowed error (1 - target) held back for the estimate's own noise, and the
#: fewest lattice points along some spatial dim for the level to be tried (a
#: coarser lattice rarely carries the map, and trying costs a stage).
LEVELS = ((None, 0.05, 0.5, 8), (2, 0.2, 0.1, 4))
#: Fewest windows a level samples (all of them where there are fewer).
MIN_SAMPLE = 8
#: Fractions of all windows refined at the requested stride, on top of the sample.
FRACTION_CANDIDATES = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7)
#: The thresholds calibration tries, largest first, on the CPU. On CUDA it tries
#: none (`tau_probes_for`): tau ran at 0.75-1.36x exact mode's speed on vgg16,
#: resnet18, efficientnet_b0 and inception_v3 on an H200, and where it saved
#: more than a tenth (inception_v3) its maps fell to SSIM 0.64-0.71
#: (benchmarks/results/approximate_issue16.json; the early layers, where the
#: time goes, have boxes far below any cap). A probe, a whole small batch there,
#: does not pay; drill-down and frozen global context are what pay.
TAU_PROBES = (0.6, 0.4)
#: Errors of frozen context and tau are measured on coarse maps, which hide some
#: of the fine grid's error: they count at 1 / SAFETY.
SAFETY = 0.6
#: Drill-down needs this many lattice points along some spatial dim to pay off.
MIN_LATTICE_SIDE = 4
#: Frozen context and tau are tried only where their plan is estimated at least
#: this much cheaper per window than the plan they would replace.
MIN_TAU_GAIN = 1.25
#: ... and where the windows they would speed up cost at least this many times
#: their probe: on models trained on real images the probes mostly miss (tau 0.6
#: dropped MTCNN's ONet and a CIFAR-10 CNN below SSIM 0.5), so a probe must have
#: much to win.
PROBE_PAYBACK = 4.0
#: An approximation is chosen only where it is estimated to save at least this
#: share of exact mode's window cost: the host-side work a drill-down run adds
#: (stages, heatmaps composed and compared) is not in the plans' estimates.
MIN_SAVING = 0.1
#: The random samples are drawn with this seed: a call's result depends on its
#: inputs only.
SEED = 0


@dataclass
class Calibration:
    """What the calibration measured and chose.

    approximation: the choice. Given to a later call (`attribute(...,
        calibration=...)`) or spelled out as keywords, it computes as many
        windows as this call did, the top-scored ones, without calibrating.
    tau_errors: 1 - SSIM per tau tried, with the chosen frozen context.
    fraction_errors: drill-down's predicted 1 - SSIM per fraction evaluated, at
        the chosen spacing, else the last one tried (fractions of all windows
        refined on top of the sample).
    windows_run: windows run for the probes of tau and frozen context only (not
        in the map).
    frozen_context_error: 1 - SSIM with frozen global context alone (None: not
        offered, or not estimated to pay).
    sample_windows: windows off the lattice computed exactly at random positions
        to estimate drill-down's error (in the map).
    refined_fraction: the fraction refined in this call on top of the sample
        (1.0: every remaining window).
    grid: (input shape without the batch dim, window, strides) of the call.
    seconds: wall time of the calibration's own work (estimates, probes), without
        the exact windows it adds to the map.
    refine: the windows this call computes next, with the chosen plan, best first.
    """

    approximation: Approximation
    tau_errors: dict[float, float] = field(default_factory=dict)
    fraction_errors: dict[float, float] = field(default_factory=dict)
    windows_run: int = 0
    frozen_context_error: float | None = None
    sample_windows: int = 0
    refined_fraction: float = 1.0
    grid: tuple | None = None
    seconds: float = field(default=0.0, compare=False)
    refine: np.ndarray = field(
        default_factory=lambda: np.zeros(0, dtype=np.int64), compare=False, repr=False
    )


def tau_probes_for(device: torch.device) -> tuple[float, ...]:
    """The tau thresholds a calibration on `device` tries (see TAU_PROBES)."""
    return () if device.type == "cuda" else TAU_PROBES


def first_windows(counts: tuple[int, ...], factor: int) -> np.ndarray:
    """Ids of the windows a calibrated run computes first, exactly: the lattice of
    the first level tried and its random sample (sorted); the call's lattice
    where no level is tried. The same for every call on a grid (the sample's seed
    is fixed), so it is made once per grid."""
    return _first_windows(tuple(counts), factor).copy()


@functools.lru_cache(maxsize=32)
def _first_windows(counts: tuple[int, ...], factor: int) -> np.ndarray:
    levels = _levels(counts, factor)
    if not levels:
        return dd.window_ids(counts, dd.coarse_lattice(counts, factor))
    spacing, share = levels[0][:2]
    on = _mask(counts, dd.window_ids(counts, dd.coarse_lattice(counts, spacing)))
    sample = _extend_sample(np.zeros(0, dtype=np.int64), np.flatnonzero(~on), share, 0)
    return np.union1d(np.flatnonzero(on), sample)


def calibrate(
    target_ssim: float,
    counts: tuple[int, ...],
    factor: int,
    first: np.ndarray,
    exact_diffs: Callable[[np.ndarray], torch.Tensor],
    heatmap: Callable[[torch.Tensor], torch.Tensor],
    run_with: Callable[[PlanApproximation, np.ndarray], torch.Tensor],
    seconds_per_window: Callable[[PlanApproximation], float],
    offers_frozen_context: bool = False,
    tau_probes: tuple[float, ...] = TAU_PROBES,
) -> Calibration:
    """Settings meeting `target_ssim` at the least estimated cost.

    counts: the window grid; factor: the call's coarse spacing; first: the
    windows computed exactly so far (`first_windows`); exact_diffs: window ids ->
    their exact output differences ((ids, outputs)), computing those not yet
    computed (they stay in the call's table); heatmap: every window's difference
    -> Captum-shaped map; run_with: (plan approximations, window ids) -> their
    differences with those (not kept); seconds_per_window: a plan's estimated
    cost per window with those approximations; offers_frozen_context: whether
    the model has global statistics to freeze; tau_probes: the thresholds to
    try, largest first (`tau_probes_for` the device).
    """
    known = _Known(counts, first, exact_diffs)
    num_windows = known.num_windows
    allowed = 1.0 - target_ssim
    exact_cost = seconds_per_window(EXACT)

    # Drill-down, level by level; `level` is the one accepted (None: none passed).
    # `sample` stays a uniform random sample of the windows off each level's
    # lattice that are not otherwise known (a previous lattice's windows).
    level: _DrillDown | None = None
    tried: _DrillDown | None = None  # the last level tried
    levels = _levels(counts, factor)
    sample = np.zeros(0, dtype=np.int64)
    if levels:
        on = _mask(counts, dd.window_ids(counts, dd.coarse_lattice(counts, levels[0][0])))
        sample = known.ids[~on[known.ids]]
    for index, (spacing, share, margin) in enumerate(levels):
        lattice = dd.coarse_lattice(counts, spacing)
        on = _mask(counts, dd.window_ids(counts, lattice))
        sample = sample[~on[sample]]
        population = np.union1d(np.flatnonzero(~known.mask & ~on), sample)
        sample = _extend_sample(sample, population, share, index)
        known.add(np.union1d(np.flatnonzero(on), sample))
        candidate = tried = _DrillDown(counts, spacing, sample, population, known, heatmap, margin)
        budget = None
        if index + 1 < len(levels):
            budget = _next_level_windows(counts, levels[index + 1], known, sample)
        if candidate.cheapest(allowed * (1.0 - margin), budget) is not None:
            level = candidate
            break

    calibration = Calibration(Approximation(drilldown_factor=factor))
    calibration.sample_windows = len(sample)
    remaining = num_windows - int(known.mask.sum())
    probe_points = _probe_points(counts, factor, level)
    probe_ids = dd.window_ids(counts, probe_points)
    errors: dict[PlanApproximation, float] = {EXACT: 0.0}
    references: list[torch.Tensor] = []

    def plan_error(approximation: PlanApproximation) -> float:
        if approximation not in errors:
            if not references:
                exact = known.diffs(probe_ids)
                references.append(heatmap(dd.interpolate(counts, probe_points, exact)))
            diffs = run_with(approximation, probe_ids)
            calibration.windows_run += len(probe_ids)
            ours = heatmap(dd.interpolate(counts, probe_points, diffs))
            errors[approximation] = 1.0 - float(attribution_ssim(ours, references[0]).min())
        return errors[approximation]

    def refined(approximation: PlanApproximation) -> tuple[float, int] | None:
        """The fraction refined with `approximation` and the windows that adds,
        within the allowed error; None: nothing is."""
        room = allowed - errors[approximation] / SAFETY
        if level is not None:
            return level.cheapest(room * (1.0 - level.margin))
        return (1.0, remaining) if room >= 0 else None

    def pays(current: PlanApproximation, faster: PlanApproximation) -> bool:
        """Whether a probe of `faster` could pay for itself against `current`."""
        if seconds_per_window(current) < MIN_TAU_GAIN * seconds_per_window(faster):
            return False
        choice = refined(current)
        windows = remaining if choice is None else choice[1]
        saving = windows * (seconds_per_window(current) - seconds_per_window(faster))
        return saving >= PROBE_PAYBACK * len(probe_ids) * seconds_per_window(faster)

    base = EXACT
    frozen = PlanApproximation(freeze_global_context=True)
    if offers_frozen_context and pays(EXACT, frozen):
        calibration.frozen_context_error = plan_error(frozen)
        if refined(frozen) is not None:
            base = frozen
    for tau in tau_probes:
        probe = PlanApproximation(tau, base.freeze_global_context)
        if not pays(base, probe):
            break
        plan_error(probe)
        if refined(probe) is None:
            break  # quality grows with tau: smaller ones miss too
    calibration.tau_errors = {
        a.tau: e for a, e in errors.items() if a.freeze_global_context == base.freeze_global_context
    }
    calibration.tau_errors.setdefault(1.0, 0.0)

    # The cheapest measured choice within the allowed error; ties: the larger tau,
    # then no freezing, then the larger fraction. Exact mode unless it saves enough.
    best = (remaining * exact_cost - MIN_SAVING * num_windows * exact_cost, -1.0, False, -1.0)
    for approximation in errors:
        choice = refined(approximation)
        if choice is not None:
            fraction, windows = choice
            cost = windows * seconds_per_window(approximation)
            candidate = (cost, -approximation.tau, approximation.freeze_global_context, -fraction)
            best = min(best, candidate)
    _, tau, freeze, fraction = best
    chosen = PlanApproximation(-tau, freeze)
    fraction = -fraction
    if tried is not None:
        calibration.fraction_errors = dict(sorted((level or tried).errors.items()))
    dd_error = 0.0 if level is None or fraction == 1.0 else level.errors[fraction]
    calibration.refined_fraction = fraction
    if level is not None:
        calibration.refine = level.order(fraction)
    else:
        calibration.refine = np.flatnonzero(~known.mask)
    drilldown = None
    if level is not None and fraction < 1.0:
        drilldown = level.equivalent_fraction(fraction)
    calibration.approximation = Approximation(
        tau=chosen.tau,
        freeze_global_context=chosen.freeze_global_context,
        drilldown=drilldown,
        drilldown_factor=factor if drilldown is None else level.factor,
        estimated_ssim=1.0 - dd_error - errors[chosen],
    )
    return calibration


class _Known:
    """The windows computed exactly so far and their differences (float64, numpy)."""

    def __init__(
        self,
        counts: tuple[int, ...],
        first: np.ndarray,
        exact_diffs: Callable[[np.ndarray], torch.Tensor],
    ) -> None:
        self.counts = counts
        self.num_windows = math.prod(counts)
        self._exact_diffs = exact_diffs
        self.mask = np.zeros(self.num_windows, dtype=bool)
        self.table: np.ndarray | None = None
        self.add(np.asarray(first))

    @property
    def ids(self) -> np.ndarray:
        return np.flatnonzero(self.mask)

    def add(self, ids: np.ndarray) -> None:
        """Compute windows `ids` exactly (those not known yet)."""
        new = ids[~self.mask[ids]]
        if not len(new):
            return
        diffs = self._exact_diffs(new).to(torch.float64).cpu().numpy()
        if self.table is None:
            self.table = np.zeros((self.num_windows, diffs.shape[1]))
        self.table[new] = diffs
        self.mask[new] = True

    def diffs(self, ids: np.ndarray) -> torch.Tensor:
        assert self.table is not None and self.mask[ids].all()
        return torch.from_numpy(self.table[ids])


class _DrillDown:
    """Drill-down's predicted error at one coarse spacing, per candidate fraction,
    from a random sample of the windows off the lattice (see the module's text)."""

    def __init__(
        self,
        counts: tuple[int, ...],
        factor: int,
        sample: np.ndarray,
        population: np.ndarray,
        known: _Known,
        heatmap: Callable[[torch.Tensor], torch.Tensor],
        margin: float,
    ) -> None:
        self.factor = factor
        self.margin = margin
        self._heatmap = heatmap
        lattice = dd.coarse_lattice(counts, factor)
        lattice_ids = dd.window_ids(counts, lattice)
        self._on_lattice = _mask(counts, lattice_ids)
        lattice_diffs = known.diffs(lattice_ids)
        scores = dd.refinement_scores(counts, lattice, lattice_diffs)
        self._ranked = np.argsort(-scores.numpy(), kind="stable")
        self._rank = np.empty_like(self._ranked)
        self._rank[self._ranked] = np.arange(len(self._ranked))
        interpolated = dd.interpolate(counts, lattice, lattice_diffs).numpy()
        assert known.table is not None
        self._known = known.mask.copy()
        table = known.table
        self._residual = np.where(self._known[:, None], table - interpolated, 0.0)
        self._sampled = _mask(counts, sample)
        self._in_population = _mask(counts, population)
        self._before = self._map(interpolated + self._residual)
        self.errors: dict[float, float] = {}
        self._windows: dict[float, int] = {}

    def _map(self, diffs: np.ndarray) -> torch.Tensor:
        """The map of every window's differences, where `heatmap` makes it (on a
        GPU: there, with the SSIMs that compare it)."""
        return self._heatmap(torch.from_numpy(diffs))

    def order(self, fraction: float) -> np.ndarray:
        """The windows the refinement to `fraction` computes, best first."""
        top = self._ranked[: math.ceil(fraction * len(self._ranked))]
        return top[~self._known[top]]

    def windows(self, fraction: float) -> int:
        """Windows the refinement to `fraction` adds to those known."""
        if fraction not in self._windows:
            self._windows[fraction] = len(self.order(fraction))
        return self._windows[fraction]

    def evaluate(self, fractions: list[float]) -> None:
        """Predicted 1 - SSIM of the map refined to each of `fractions` (into
        `errors`), all in one heatmap and one SSIM pass."""
        scaled = []
        for fraction in fractions:
            if fraction in self.errors:
                continue
            tail = self._in_population & (self._rank >= math.ceil(fraction * len(self._rank)))
            sampled = tail & self._sampled
            unknown = int((tail & ~self._known).sum())
            if unknown == 0:
                self.errors[fraction] = 0.0
            elif not sampled.any():
                self.errors[fraction] = 1.0  # nothing measured where it matters
            else:
                scaled.append((fraction, sampled * (unknown / int(sampled.sum()))))
        if not scaled:
            return
        weights = np.stack([w for _, w in scaled], axis=1)  # windows, K
        stacked = (self._residual[:, None, :] * weights[:, :, None]).reshape(len(weights), -1)
        before = self._before
        estimates = self._map(stacked).reshape(len(scaled), *before.shape)
        references = before[None] + estimates  # (K, examples, C, *spatial)
        ssim = np.stack(
            [attribution_ssim_many(before[i : i + 1], references[:, i]) for i in range(len(before))]
        )
        ssim = ssim.min(axis=0)
        for (fraction, _), score in zip(scaled, ssim):
            self.errors[fraction] = 1.0 - float(score)

    def cheapest(self, allowed: float, budget: int | None = None) -> tuple[float, int] | None:
        """The smallest candidate fraction predicted within `allowed` and the windows
        it adds (at most `budget` of them); None: none is. The error falls as the
        fraction grows, so candidates go coarse to fine: the largest affordable
        (alone, where a next level waits: it may settle the level), every other one
        down from it, then the one just below the smallest that passed."""
        affordable = [f for f in FRACTION_CANDIDATES if budget is None or self.windows(f) <= budget]
        if not affordable:
            return None
        if budget is not None:
            self.evaluate(affordable[-1:])
            if self.errors[affordable[-1]] > allowed:
                return None
        self.evaluate(affordable[::-2])
        passing = [f for f in affordable if f in self.errors and self.errors[f] <= allowed]
        if not passing:
            return None
        index = affordable.index(passing[0])
        if index > 0:
            self.evaluate(affordable[index - 1 : index])
            if self.errors[affordable[index - 1]] <= allowed:
                index -= 1
        return affordable[index], self.windows(affordable[index])

    def equivalent_fraction(self, fraction: float) -> float:
        """The fraction that computes as many windows, the top-scored ones, when
        given to a run without the sample: the windows it computes are those on the
        lattice and the first c of the ranking off it."""
        total = int(self._known.sum()) + self.windows(fraction)
        off = np.cumsum(~self._on_lattice[self._ranked])
        needed = total - int(self._on_lattice.sum())
        count = max(1, int(np.searchsorted(off, needed)) + 1)
        return min(1.0, count / len(self._ranked))


def _lattice_pays(lattice: tuple[np.ndarray, ...], side: int = MIN_LATTICE_SIDE) -> bool:
    return max(len(axis) for axis in lattice[1:]) >= side


def _levels(counts: tuple[int, ...], factor: int) -> list[tuple[int, float, float]]:
    """The LEVELS this grid tries: (spacing, sample share, margin), cheapest first."""
    levels = []
    for spacing, share, margin, side in LEVELS:
        spacing = factor if spacing is None else spacing
        if _lattice_pays(dd.coarse_lattice(counts, spacing), side):
            levels.append((spacing, share, margin))
    return levels


def _mask(counts: tuple[int, ...], ids: np.ndarray) -> np.ndarray:
    mask = np.zeros(math.prod(counts), dtype=bool)
    mask[ids] = True
    return mask


def _extend_sample(
    sample: np.ndarray, population: np.ndarray, share: float, level: int
) -> np.ndarray:
    """`sample` (uniform over `population`) grown by uniform draws to `share` of
    the population (at least MIN_SAMPLE windows): still uniform over it."""
    wanted = min(len(population), max(MIN_SAMPLE, math.ceil(share * len(population))))
    if wanted <= len(sample):
        return np.sort(sample)
    rest = np.setdiff1d(population, sample)
    drawn = np.random.default_rng(SEED + level).choice(rest, wanted - len(sample), replace=False)
    return np.sort(np.concatenate([sample, drawn]).astype(np.int64))


def _next_level_windows(
    counts: tuple[int, ...], level: tuple, known: _Known, sample: np.ndarray
) -> int:
    """Windows the next level computes at least: its lattice and its sample."""
    spacing, share = level[:2]
    lattice_ids = dd.window_ids(counts, dd.coarse_lattice(counts, spacing))
    on = _mask(counts, lattice_ids)
    population = int((~on & ~known.mask).sum()) + int((~on[sample]).sum())
    wanted = min(population, max(MIN_SAMPLE, math.ceil(share * population)))
    extra = max(0, wanted - int((~on[sample]).sum()))
    return int((on & ~known.mask).sum()) + extra


def _probe_points(
    counts: tuple[int, ...], factor: int, level: _DrillDown | None
) -> tuple[np.ndarray, ...]:
    """The lattice windows tau and frozen context are measured on: every other
    point of the accepted level's lattice, else the call's lattice."""
    if level is not None:
        return dd.sub_lattice(dd.coarse_lattice(counts, level.factor))
    return dd.coarse_lattice(counts, factor)
