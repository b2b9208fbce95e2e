"""One call on the input's device: the engine's progressive run with its
progress bar, set up from the call's options."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

from captum_krypton.engine.call import CaptumArguments
from captum_krypton.engine.occlusion import PreparedOcclusion
from captum_krypton.engine.progressive import OcclusionProgress, OcclusionReport, ProgressiveRun
from captum_krypton.engine.self_check import WindowCheck
from captum_krypton.options import OcclusionOptions
from captum_krypton.reports import WindowBar


class ProgressivePath:
    """The run of `call` from its prepared first pass (`prepared`, made with
    `options.first_tau`); iterate `steps()` to drive it."""

    def __init__(
        self,
        prepared: PreparedOcclusion,
        call: CaptumArguments,
        options: OcclusionOptions,
        report_batches: bool,
        name: str,
    ) -> None:
        settings = options.settings
        behaviour = prepared.batch_behaviour
        self._bar = WindowBar(name, call.show_progress)
        self._run = ProgressiveRun(
            lambda tau: settings.choose_kernels(prepared.with_tau(tau)),
            call.target,
            settings.batch_size,
            options.approximation,
            options.target_ssim,
            options.cancel,
            report_batches,
            on_batch=self._bar.update,
            on_planned=self._bar.set_total,
            format_result=call.format_output,
            window_ids=options.window_ids(prepared.grid),
            verify=None
            if behaviour is None
            else partial(WindowCheck, prepared, call.target, behaviour),
        )
        self._bar.start(prepared.grid.num_windows)

    @property
    def report(self) -> OcclusionReport | None:
        """The run's report, once its last progress report is out."""
        return self._run.report

    def steps(self) -> Iterator[OcclusionProgress]:
        try:
            yield from self._run.steps()
        finally:
            self._bar.close()
