"""Repeated target_ssim calls on one grid keep to the faster of calibrating and
exact mode (approx.calibrate.CalibrationTimer): where windows are cheap, a
calibration's host work can cost more than the windows it saves."""

from __future__ import annotations

import pytest
import torch
from captum.attr import Occlusion

from captum_krypton import IncrementalOcclusion
from captum_krypton.approx.calibrate import RECHECK_EVERY, WARM_UP_CALLS, CalibrationTimer
from tests import models
from tests.conftest import FP64_TOLERANCE, assert_close_to_captum


def _run(timer: CalibrationTimer, calls: int, seconds: dict[bool, float]) -> list[bool]:
    """Which of `calls` calls calibrate, each taking seconds[calibrated]."""
    modes = []
    for _ in range(calls):
        calibrated = timer.calibrates_now()
        timer.record(calibrated, seconds[calibrated])
        modes.append(calibrated)
    return modes


@pytest.mark.parametrize("calibration_pays", [True, False])
def test_the_faster_way_runs_and_the_slower_is_timed_again_now_and_then(calibration_pays):
    seconds = {True: 1.0, False: 2.0} if calibration_pays else {True: 2.0, False: 1.0}
    modes = _run(CalibrationTimer(), 3 * RECHECK_EVERY, seconds)
    assert modes[:WARM_UP_CALLS] == [True, False, True, False]
    after = modes[WARM_UP_CALLS:]
    slower = [i for i, calibrated in enumerate(after) if calibrated != calibration_pays]
    # The slower way only on every RECHECK_EVERY-th call.
    assert [WARM_UP_CALLS + 1 + i for i in slower] == [
        n for n in range(WARM_UP_CALLS + 1, 3 * RECHECK_EVERY + 1) if n % RECHECK_EVERY == 0
    ]


def test_the_first_call_of_each_way_is_not_timed():
    """The first calibrated and the first exact call pay for plans, kernel choices
    and algorithm searches: their times must not decide."""
    timer = CalibrationTimer()
    # Cold first calls that would make calibrating look slow, then warm ones.
    for seconds in (100.0, 1.0, 0.5, 1.0):
        timer.record(timer.calibrates_now(), seconds)
    assert (timer.calibrated, timer.exact) == (0.5, 1.0)
    assert timer.calibrates_now()


def test_a_timed_change_of_inputs_changes_the_way():
    timer = CalibrationTimer()
    _run(timer, WARM_UP_CALLS, {True: 1.0, False: 2.0})
    assert timer.calibrates_now()
    timer.record(True, 3.0)  # inputs whose calibration no longer pays
    assert not timer.calibrates_now()


def test_exact_calls_give_the_exact_map_and_say_so():
    """The exact calls of the warm-up run exact mode: Captum's map, no calibration,
    the target counted as met."""
    torch.manual_seed(0)
    model = models.small_cnn().double().eval()
    inputs = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    args = dict(sliding_window_shapes=(3, 4, 4), strides=1, target=1)
    occlusion = IncrementalOcclusion(model)
    expected = Occlusion(model).attribute(inputs, perturbations_per_eval=64, **args)
    with torch.no_grad():
        scale = model(inputs).abs().max().item()
    for call in range(1, WARM_UP_CALLS + 1):
        result = occlusion.attribute(inputs, target_ssim=0.9, **args)
        report = occlusion.last_run
        if call % 2:
            assert report.calibration is not None
            assert report.windows_computed < report.windows_total
        else:
            assert report.calibration is None and report.approximation.exact
            assert report.approximation.estimated_ssim == 1.0
            assert report.windows_computed == report.windows_total
            assert_close_to_captum(expected, result, scale, FP64_TOLERANCE)
    # A timer per grid: other strides start their own warm-up, with a calibration.
    occlusion.attribute(inputs, target_ssim=0.9, **dict(args, strides=2))
    assert occlusion.last_run.calibration is not None
