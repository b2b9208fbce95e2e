"""target_ssim that is never slower than exact mode over a series of calls.

Exact mode always meets a target SSIM: its map is the exact one. What the
calibration may save is measured in windows, but on a GPU a drill-down run
also pays stages that wait for each other, batches too small to fill the
device and the calibration's own work, which the windows' count does not show
(resnet18 on an H200: target_ssim=0.9 computed 1644 of 2809 windows and took
0.75x exact mode's time, benchmarks/results/call_stages_after.json).

So calls with a target SSIM race two arms, per instance and per kind of call
(input shape, dtype and device, window, strides, target, drill-down factor):
`CALIBRATE` (calibrate on these inputs, then refine as chosen) and `EXACT`
(every window, no calibration). The first call of a kind calibrates and is not
timed (it carries the capture, compilation and cuDNN's search); the next calls
alternate until each arm has TIMED_FIRST timed calls, then the arm with the
smaller median time runs, and every EXPLORE_EVERY-th call the other one runs
again, so a change (other images, a warmer device) is seen within a few such
calls. Either arm meets the target, so the race changes speed and which of two
valid maps a call returns, never whether it meets the target. A call that falls
back, stops early or fails is not timed. To calibrate once and keep that choice
over a data set, pass the calibration on (`attribute(..., calibration=...)`).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Literal

Arm = Literal["calibrate", "exact"]
CALIBRATE: Arm = "calibrate"
EXACT: Arm = "exact"

#: Timed calls per arm before the faster one is kept.
TIMED_FIRST = 2
#: Once both arms are timed, every this-many-th call runs the slower one.
EXPLORE_EVERY = 16
#: The latest timed calls kept per arm; their median is the arm's time.
KEPT = 3
#: Kinds of call remembered per instance (oldest forgotten first).
MAX_KINDS = 64


@dataclass
class _Kind:
    """The timed calls of one kind of call."""

    seconds: dict[str, deque] = field(
        default_factory=lambda: {CALIBRATE: deque(maxlen=KEPT), EXACT: deque(maxlen=KEPT)}
    )
    calls: int = 0  # calls started, timed or not

    def median(self, arm: Arm) -> float:
        return statistics.median(self.seconds[arm])


@dataclass(frozen=True)
class RaceChoice:
    """The arm a call runs and why, for `OcclusionReport.target_ssim_choice`."""

    arm: Arm
    reason: str
    timed: bool = True

    def describe(self) -> str:
        return f"{self.arm}: {self.reason}"


class TargetRace:
    """Chooses, per kind of target_ssim call, between calibrating and exact mode
    by their measured call times (see the module's text). `clock` gives seconds."""

    def __init__(
        self, clock: Callable[[], float] = time.perf_counter, enabled: bool = True
    ) -> None:
        self.clock = clock
        #: False: every call calibrates (benchmarks of the calibration itself).
        self.enabled = enabled
        self._kinds: dict[Hashable, _Kind] = {}

    def choose(self, kind: Hashable) -> RaceChoice:
        """The arm the next call of `kind` runs."""
        if not self.enabled:
            return RaceChoice(CALIBRATE, "every call calibrates (race off)", timed=False)
        record = self._kinds.pop(kind, None) or _Kind()
        self._kinds[kind] = record  # most recent last
        while len(self._kinds) > MAX_KINDS:
            self._kinds.pop(next(iter(self._kinds)))
        record.calls += 1
        if record.calls == 1:
            return RaceChoice(CALIBRATE, "first call of this kind (not timed)", timed=False)
        counts = {arm: len(times) for arm, times in record.seconds.items()}
        if min(counts.values()) < TIMED_FIRST:
            arm = EXACT if counts[EXACT] <= counts[CALIBRATE] else CALIBRATE
            return RaceChoice(arm, "timing both arms")
        calibrate, exact = record.median(CALIBRATE), record.median(EXACT)
        faster, slower = (CALIBRATE, EXACT) if calibrate < exact else (EXACT, CALIBRATE)
        times = f"median {1e3 * calibrate:.1f} ms calibrating, {1e3 * exact:.1f} ms exact"
        if record.calls % EXPLORE_EVERY == 0:
            return RaceChoice(slower, f"re-timing the slower arm ({times})")
        return RaceChoice(faster, f"faster on earlier calls of this kind ({times})")

    def record(self, kind: Hashable, arm: Arm, seconds: float) -> None:
        """A finished call of `kind` on `arm` took `seconds`."""
        record = self._kinds.get(kind)
        if record is not None:
            record.seconds[arm].append(seconds)
