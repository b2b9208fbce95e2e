"""One call's progressive run with its progress bar, set up from the call's
options: on the input's device, or with the windows of each stage shared over
several devices."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

from captum_krypton.engine.call import CaptumArguments
from captum_krypton.engine.occlusion import PreparedOcclusion
from captum_krypton.engine.progressive import OcclusionProgress, OcclusionReport, ProgressiveRun
from captum_krypton.engine.self_check import WindowCheck
from captum_krypton.options import OcclusionOptions
from captum_krypton.parallel.devices import to_device
from captum_krypton.parallel.sharded import ShardedCall
from captum_krypton.reports import WindowBar


class ProgressivePath:
    """The run of `call` from its prepared first pass (`prepared`, made with
    `options.first_pass`); iterate `steps()` to drive it. With `shared`, the
    windows of every stage are computed on its devices, and `prepared` is its
    first device's (the result still lands on the input's device)."""

    def __init__(
        self,
        prepared: PreparedOcclusion,
        call: CaptumArguments,
        options: OcclusionOptions,
        report_batches: bool,
        name: str,
        shared: ShardedCall | None = None,
    ) -> None:
        settings = options.settings if shared is None else shared.settings
        behaviour = prepared.batch_behaviour
        target = to_device(call.target, prepared.inputs.device)
        result_device = call.formatted_inputs[0].device
        self._shared = shared
        self._bar = WindowBar(name, call.show_progress)
        self._run = ProgressiveRun(
            lambda approximation: settings.choose_kernels(
                prepared.with_approximation(approximation)
            ),
            target,
            settings.batch_size,
            options.approximation,
            options.target_ssim,
            options.cancel,
            report_batches,
            on_batch=self._bar.update,
            on_planned=self._bar.set_total,
            format_result=lambda attribution: call.format_output(attribution.to(result_device)),
            window_ids=options.window_ids(prepared.grid),
            verify=None if behaviour is None else partial(WindowCheck, prepared, target, behaviour),
            compute=None if shared is None else shared.compute,
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
            if self._shared is not None:
                self._shared.close()
