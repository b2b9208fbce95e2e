"""What a call shows while it runs (a bar of windows) and reports when it ends."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Literal

from captum._utils.progress import NullProgress, progress
from captum._utils.typing import TensorOrTupleOfTensorsGeneric

from captum_krypton.approx.settings import Approximation
from captum_krypton.engine.progressive import OcclusionProgress, OcclusionReport


class WindowBar:
    """The progress bar of one call, counting windows (Captum's bar: tqdm when
    installed); it shows only with `show` and starts once the total is known.
    Updates may come from several threads."""

    def __init__(self, name: str, show: bool) -> None:
        self._description = f"{name} attribution"
        self._show = show
        self._bar: Any = NullProgress()
        self._lock = threading.Lock()

    def start(self, total: int) -> WindowBar:
        if self._show:
            self._bar = progress(desc=self._description, total=total)
        return self

    def update(self, count: int) -> None:
        with self._lock:
            self._bar.update(count)

    def set_total(self, planned: int) -> None:
        """A new total (drill-down plans its windows after the coarse pass)."""
        if hasattr(self._bar, "total"):
            self._bar.total = planned
            if hasattr(self._bar, "refresh"):
                self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


@dataclass(frozen=True)
class FinishedRun:
    """The last progress report of a call, and the report `last_run` keeps."""

    progress: OcclusionProgress
    report: OcclusionReport

    @classmethod
    def exact(
        cls,
        engine: Literal["incremental", "captum"],
        attribution: TensorOrTupleOfTensorsGeneric,
        computed: int,
        total: int,
        seconds: float,
    ) -> FinishedRun:
        """A run of exact occlusion in one pass; cancelled when windows are missing."""
        complete = computed == total
        return cls(
            OcclusionProgress(
                attribution, "exact", computed, total, total, seconds, complete, Approximation()
            ),
            OcclusionReport(engine, Approximation(), computed, total, seconds, not complete),
        )
