"""One attribution run that can report heatmaps while it computes, be cancelled,
and follow the approximations (tau, frozen global context, drill-down, target
SSIM).

The run yields an `OcclusionProgress` after every window batch when asked to
(after every stage where its windows are computed elsewhere, on several
devices), and always a last one whose attribution is the run's result. Every
window's output difference lands in one (windows, outputs) table; a heatmap at
any point is Captum's average over covering windows of what the table holds
(windows not computed yet: left out, or interpolated from drill-down's coarse
pass).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from captum._utils.typing import TargetType

from captum_krypton.approx import drilldown as dd
from captum_krypton.approx.calibrate import (
    Calibration,
    calibrate,
    first_windows,
    tau_probes_for,
)
from captum_krypton.approx.settings import Approximation
from captum_krypton.engine.occlusion import PreparedOcclusion
from captum_krypton.engine.self_check import SelfCheckReport, WindowCheck
from captum_krypton.engine.windows import WindowGrid
from captum_krypton.plan import EXACT, PlanApproximation

Stage = Literal["exact", "approximate", "coarse", "refine"]

#: compute(approximation, ids, table, on_batch, should_stop): windows `ids`
#: computed elsewhere (shared over several devices) with the plan approximations
#: `approximation` (tau, frozen global context), each into its row of `table`
#: (windows x outputs); `on_batch` (when given) hears each finished batch's
#: window count, from any thread, and the work stops between batches once
#: `should_stop()`. Returns the ids computed: all of them unless stopped.
ComputeWindows = Callable[
    [
        PlanApproximation,
        np.ndarray,
        torch.Tensor,
        Callable[[int], None] | None,
        Callable[[], bool],
    ],
    np.ndarray,
]


@dataclass(frozen=True)
class OcclusionProgress:
    """A heatmap while `attribute` runs, and the final one.

    attribution: shaped like Captum's result. Before every window has run, each
        position averages the windows computed so far that cover it (NaN where
        none does); with drill-down, windows not computed (yet) are interpolated
        from the coarse pass.
    stage: "exact" or "approximate" (one pass over every window), "coarse"
        (drill-down's first pass) or "refine" (its second).
    windows_done / windows_planned: windows computed so far / that this run will
        compute (known once the coarse pass has chosen where to refine).
    windows_total: windows of the requested grid, what exact occlusion computes.
    complete: the last report of a run that was not cancelled.
    """

    attribution: torch.Tensor | tuple[torch.Tensor, ...]
    stage: Stage
    windows_done: int
    windows_planned: int
    windows_total: int
    elapsed: float
    complete: bool
    approximation: Approximation


@dataclass
class OcclusionReport:
    """What the last `attribute` call did (`IncrementalOcclusion.last_run`).

    windows_computed / windows_total: windows run / those of the requested grid,
    summed over the runs where a call of more examples than one run takes
    (chunks.py) is split; the other fields are those of its last run."""

    engine: Literal["incremental", "captum"]
    approximation: Approximation
    windows_computed: int
    windows_total: int
    seconds: float
    cancelled: bool = False
    #: What this call's calibration (`target_ssim`) measured and chose; None where
    #: none ran (also where an earlier calibration was reused).
    calibration: Calibration | None = None
    #: The global statistics that kept the clean run's values (frozen global
    #: context), by node name; empty where nothing was frozen.
    frozen_context: tuple[str, ...] = ()
    #: The call's self-check (None where it did not run: turned off, Captum's path,
    #: or no window computed).
    self_check: SelfCheckReport | None = None
    #: Under `target_ssim`: whether this call calibrated or ran exactly, and why
    #: (engine/target_race.py); None without a target SSIM.
    target_ssim_choice: str | None = None


def first_pass_windows(
    grid: WindowGrid,
    approximation: Approximation,
    target_ssim: float | None = None,
    window_ids: np.ndarray | None = None,
) -> np.ndarray:
    """The windows a run computes first, exactly where it drills down: drill-down's
    lattice, with the calibration's sample under a target SSIM; else the
    requested windows (`window_ids`; None: every one). The self-check picks its
    windows among them, so that it checks windows the run computes anyway."""
    if target_ssim is not None:
        return first_windows(grid.counts, approximation.drilldown_factor)
    if approximation.drilldown is not None:
        return dd.window_ids(
            grid.counts, dd.coarse_lattice(grid.counts, approximation.drilldown_factor)
        )
    return np.arange(grid.num_windows) if window_ids is None else window_ids


class ProgressiveRun:
    """Computes one attribution, stage by stage; iterate `steps()` to drive it.

    `prepare(approximation)` gives the call prepared with those plan
    approximations (a PlanApproximation: tau, frozen context); its windows run
    here, or with `compute` wherever that puts them (every stage's: the coarse
    pass, calibration's samples, the refinement, the self-check's exact windows),
    while the stages, the table and the heatmaps stay here."""

    def __init__(
        self,
        prepare: Callable[[PlanApproximation], PreparedOcclusion],
        target: TargetType,
        batch_size: Callable[[PreparedOcclusion], int],
        approximation: Approximation,
        target_ssim: float | None = None,
        cancel: threading.Event | None = None,
        report_batches: bool = False,
        on_batch: Callable[[int], None] | None = None,
        on_planned: Callable[[int], None] | None = None,
        format_result: Callable[[torch.Tensor], torch.Tensor | tuple] = lambda t: t,
        window_ids: np.ndarray | None = None,
        verify: Callable[[np.ndarray], WindowCheck] | None = None,
        compute: ComputeWindows | None = None,
    ):
        self._prepare = prepare
        self._target = target
        self._batch_size = batch_size
        self.approximation = approximation
        self._target_ssim = target_ssim
        self._cancel = cancel
        self._report_batches = report_batches
        self._on_batch = on_batch
        self._on_planned = on_planned
        self._format = format_result
        self._window_ids = window_ids  # only these windows (None: every one)
        # verify(candidate window ids) -> the started self-check
        self._verify = verify
        # Every stage's windows, where they are not computed here by `prepare`.
        self._compute_elsewhere = compute
        self.report: OcclusionReport | None = None
        self.result: torch.Tensor | None = None

    def steps(self) -> Iterator[OcclusionProgress]:
        self._start = time.perf_counter()
        drilling = self.approximation.drilldown is not None or self._target_ssim is not None
        first = self._prepare(EXACT if drilling else self.approximation.plan)
        self._first = first
        self._grid = grid = first.grid
        self._initial = first.initial_outputs(self._target)
        self._dtype = self._initial.dtype
        self._diffs = torch.empty(
            (grid.num_windows, self._initial.shape[1]),
            dtype=self._dtype,
            device=self._initial.device,
        )
        self._computed = np.zeros(grid.num_windows, dtype=bool)
        self._exact = np.zeros(grid.num_windows, dtype=bool)  # computed by exact plans
        # Frozen statistics of the plans that ran, in graph order (a dict as a set).
        self._frozen: dict[str, None] = {}
        self._lattice: tuple[np.ndarray, ...] | None = None
        self._lattice_ids = np.zeros(0, dtype=np.int64)
        self._lattice_diffs: torch.Tensor | None = None
        ids = first_pass_windows(grid, self.approximation, self._target_ssim, self._window_ids)
        self._planned = len(ids)
        self._stage: Stage = "exact" if self.approximation.exact else "approximate"
        if drilling:
            self._set_lattice(self.approximation.drilldown_factor)
        check = None
        if self._verify is not None and first.plan.exact:  # exact first pass
            check = self._verify(ids)
        calibration = None
        cancelled = False
        try:
            if not drilling:
                yield from self._compute(first.plan.approximation, ids, self._stage, True)
            else:
                self._set_planned(len(ids))
                yield from self._compute(EXACT, ids, "coarse", False)
                if self._target_ssim is not None:
                    calibration = self._calibrate(first, ids)
                    self.approximation = calibration.approximation
                    self._set_lattice(self.approximation.drilldown_factor)
                    order = calibration.refine
                else:
                    scores = dd.refinement_scores(grid.counts, self._lattice, self._coarse_diffs())
                    order = dd.refinement_order(
                        scores, self.approximation.drilldown or 1.0, self._computed
                    )
                self._set_planned(int(self._computed.sum()) + len(order))
                yield from self._compute(self.approximation.plan, order, "refine", True)
        except _Cancelled:
            cancelled = True
        self_check = self._self_check(check)
        self.result = self._format(self._heatmap())
        done = int(self._computed.sum())
        elapsed = time.perf_counter() - self._start
        self.report = OcclusionReport(
            "incremental",
            self.approximation,
            done,
            grid.num_windows,
            elapsed,
            cancelled,
            calibration,
            tuple(self._frozen),
            self_check,
        )
        yield OcclusionProgress(
            self.result,
            self._stage,
            done,
            self._planned,
            grid.num_windows,
            elapsed,
            not cancelled,
            self.approximation,
        )

    # ------------------------------------------------------------ internals
    def _set_lattice(self, factor: int) -> None:
        """Drill-down's coarse lattice at spacing `factor` (the calibration may make
        it finer than the call's)."""
        self._lattice = dd.coarse_lattice(self._grid.counts, factor)
        self._lattice_ids = dd.window_ids(self._grid.counts, self._lattice)
        self._lattice_diffs = None

    def _set_planned(self, planned: int) -> None:
        self._planned = planned
        if self._on_planned is not None:
            self._on_planned(planned)

    def _compute(
        self, approximation: PlanApproximation, ids: np.ndarray, stage: Stage, last: bool
    ) -> Iterator[OcclusionProgress]:
        """Windows `ids` into the table; a report after each batch when asked, except
        after the run's last batch (the final report follows)."""
        self._stage = stage
        self._check_cancel()
        position = 0
        plan = self._prepare(approximation).plan
        if len(ids):
            self._frozen.update(dict.fromkeys(plan.frozen_statistics))
        batches = self._batches(approximation, ids, self._diffs, self._on_batch)
        try:
            for done in batches:
                self._computed[done] = True
                if plan.exact:
                    self._exact[done] = True
                position += len(done)
                if last and position == len(ids):
                    break  # every planned window is done: complete, cancelled or not
                self._check_cancel()
                if self._report_batches:
                    yield self._progress()
                    self._check_cancel()  # set while the report was being handled
        finally:
            batches.close()

    def _batches(
        self,
        approximation: PlanApproximation,
        ids: np.ndarray,
        table: torch.Tensor,
        on_batch: Callable[[int], None] | None = None,
    ) -> Iterator[np.ndarray]:
        """Windows `ids` with `approximation` into their rows of `table`; yields the
        ids of each finished part: a batch here, or, computed elsewhere, all that
        were computed (fewer once the run is cancelled). Closing it between parts
        leaves the finished rows in place."""
        if not len(ids):
            return
        if self._compute_elsewhere is not None:
            yield self._compute_elsewhere(approximation, ids, table, on_batch, self._cancelled)
            return
        prepared = self._prepare(approximation)
        batches = prepared.fill_diffs(
            ids, self._target, self._batch_size(prepared), self._initial, table
        )
        position = 0
        try:
            for count in batches:
                if on_batch is not None:
                    on_batch(count)
                yield ids[position : position + count]
                position += count
        finally:
            batches.close()

    def _self_check(self, check: WindowCheck | None) -> SelfCheckReport | None:
        """Finish the self-check started before the run on its exact windows; where
        the run computed none exactly (approximate plans throughout), the checked windows
        are computed exactly now."""
        if self._verify is None:
            return None
        if check is not None:
            diffs = self._diffs

            def engine_diffs(ids: np.ndarray) -> torch.Tensor:
                return diffs[torch.from_numpy(ids).to(diffs.device)]

            return check.finish(engine_diffs, self._exact)

        def exact_diffs(ids: np.ndarray) -> torch.Tensor:
            table = torch.empty_like(self._diffs)
            for _ in self._batches(EXACT, ids, table):
                pass
            return table[torch.from_numpy(ids).to(table.device)]

        return self._verify(np.flatnonzero(self._computed)).finish(exact_diffs)

    def _cancelled(self) -> bool:
        return self._cancel is not None and self._cancel.is_set()

    def _check_cancel(self) -> None:
        if self._cancelled():
            raise _Cancelled

    def _progress(self) -> OcclusionProgress:
        return OcclusionProgress(
            self._format(self._heatmap()),
            self._stage,
            int(self._computed.sum()),
            self._planned,
            self._grid.num_windows,
            time.perf_counter() - self._start,
            False,
            self.approximation,
        )

    def _coarse_diffs(self) -> torch.Tensor:
        """The coarse pass's differences, (lattice windows, outputs), float64 on the CPU."""
        if self._lattice_diffs is None:
            rows = torch.from_numpy(self._lattice_ids).to(self._diffs.device)
            self._lattice_diffs = self._diffs[rows].to(torch.float64).cpu()
        return self._lattice_diffs

    def _heatmap(self) -> torch.Tensor:
        """The attribution from what the table holds now."""
        first = self._first
        if self._computed.all():
            return first.attribution_from(self._diffs, self._dtype)
        if self._lattice is not None and self._computed[self._lattice_ids].all():
            composed = dd.compose(
                self._grid.counts,
                self._lattice,
                self._coarse_diffs(),
                self._diffs,
                self._computed,
            )
            # the windows' sums run where the table is (on a GPU: there)
            return first.attribution_from(composed.to(self._diffs.device), self._dtype)
        return first.partial_attribution(self._diffs, self._computed, self._dtype)

    def _calibrate(self, exact: PreparedOcclusion, first: np.ndarray) -> Calibration:
        """The target SSIM's calibration after the first pass computed windows
        `first`; the exact windows it asks for are computed into the table."""
        assert self._target_ssim is not None

        computing = [0.0]  # seconds spent on windows of the map

        def exact_diffs(ids: np.ndarray) -> torch.Tensor:
            new = ids[~self._computed[ids]]
            if len(new):
                started = time.perf_counter()
                self._set_planned(self._planned + len(new))
                for done in self._batches(EXACT, new, self._diffs, self._on_batch):
                    self._computed[done] = True
                    self._exact[done] = True
                    self._check_cancel()
                computing[0] += time.perf_counter() - started
            rows = torch.from_numpy(ids).to(self._diffs.device)
            return self._diffs[rows].to(torch.float64).cpu()

        def run_with(approximation: PlanApproximation, ids: np.ndarray) -> torch.Tensor:
            scratch = torch.empty_like(self._diffs)
            for _ in self._batches(approximation, ids, scratch):
                self._check_cancel()
            return scratch[torch.from_numpy(ids).to(scratch.device)].to(torch.float64).cpu()

        costs: dict[PlanApproximation, float] = {}

        def seconds_per_window(approximation: PlanApproximation) -> float:
            if approximation not in costs:
                costs[approximation] = self._prepare(approximation).plan.cost_per_row
            return costs[approximation]

        device = self._diffs.device

        def heatmap(diffs: torch.Tensor) -> torch.Tensor:
            # On a GPU the calibration's maps and their SSIMs are made there.
            return exact.attribution_float64(diffs.to(device), one_channel=True)

        frozen = PlanApproximation(freeze_global_context=True)
        started = time.perf_counter()
        # The frozen plan is made only where the model has global statistics at all.
        offers_frozen_context = bool(exact.plan.global_context.statistics) and bool(
            self._prepare(frozen).plan.frozen.statistics
        )
        calibration = calibrate(
            self._target_ssim,
            self._grid.counts,
            self.approximation.drilldown_factor,
            first,
            exact_diffs,
            heatmap,
            run_with,
            seconds_per_window,
            offers_frozen_context,
            tau_probes_for(self._diffs.device),
        )
        calibration.seconds = time.perf_counter() - started - computing[0]
        grid = self._grid
        calibration.grid = (grid.shape, grid.window, grid.strides)
        return calibration


class _Cancelled(Exception):
    """The caller's cancel event was set: stop after the batch that just finished."""
