"""target_ssim's race between calibrating and exact mode (engine/target_race.py):
which arm each call runs, on measured times given by a scripted clock, and that
the exact arm's map is Captum's."""

from __future__ import annotations

import warnings

import pytest
import torch
from captum.attr import Occlusion

from captum_krypton import FallbackWarning, IncrementalNotApplicable, IncrementalOcclusion
from captum_krypton.engine import target_race
from captum_krypton.engine.target_race import CALIBRATE, EXACT, TargetRace
from tests import models

KIND = ("some", "kind")


def arms_of(race: TargetRace, seconds: dict[str, float], calls: int, kind=KIND) -> list[str]:
    """The arms of `calls` calls of `kind`, each arm's call taking `seconds[arm]`."""
    arms = []
    for _ in range(calls):
        choice = race.choose(kind)
        arms.append(choice.arm)
        if choice.timed:
            race.record(kind, choice.arm, seconds[choice.arm])
    return arms


def test_both_arms_are_timed_then_the_faster_runs():
    slow_calibration = {CALIBRATE: 0.06, EXACT: 0.05}
    arms = arms_of(TargetRace(), slow_calibration, 10)
    # untimed first call, two timed calls per arm, then the faster arm
    assert arms == [CALIBRATE, EXACT, CALIBRATE, EXACT, CALIBRATE] + [EXACT] * 5
    fast_calibration = {CALIBRATE: 0.02, EXACT: 0.05}
    assert arms_of(TargetRace(), fast_calibration, 10)[5:] == [CALIBRATE] * 5


def test_the_slower_arm_is_timed_again_now_and_then():
    race = TargetRace()
    times = {CALIBRATE: 0.06, EXACT: 0.05}
    arms = arms_of(race, times, 4 * target_race.EXPLORE_EVERY)
    explored = [i + 1 for i, arm in enumerate(arms[5:], start=5) if arm == CALIBRATE]
    assert explored == [k * target_race.EXPLORE_EVERY for k in (1, 2, 3, 4)]
    # once calibrating gets faster (e.g. other images), it takes over
    times[CALIBRATE] = 0.01
    arms = arms_of(race, times, 3 * target_race.EXPLORE_EVERY)
    assert arms[-target_race.EXPLORE_EVERY + 1 :].count(CALIBRATE) >= target_race.EXPLORE_EVERY - 2


def test_kinds_are_raced_apart_and_old_kinds_forgotten():
    race = TargetRace()
    arms_of(race, {CALIBRATE: 0.06, EXACT: 0.05}, 6)
    choice = race.choose(("another", "kind"))
    assert choice.arm == CALIBRATE and not choice.timed
    for index in range(target_race.MAX_KINDS):
        race.choose(index)
    assert not race.choose(KIND).timed  # forgotten: a first call again


class ScriptedClock:
    """Seconds that pass by the arm of the call in flight, as `costs` says."""

    def __init__(self, race: TargetRace, costs: dict[str, float]) -> None:
        self.costs, self.now, self.arm = costs, 0.0, CALIBRATE
        choose = race.choose

        def choose_and_note(kind):
            choice = choose(kind)
            self.arm = choice.arm
            return choice

        race.choose = choose_and_note
        race.clock = self

    def __call__(self) -> float:
        self.now += self.costs[self.arm]
        return self.now


@pytest.mark.parametrize("calibrating_costs", [3.0, 0.5])
def test_the_exact_arm_gives_captums_map_and_says_why(calibrating_costs):
    model = models.small_cnn().double()
    torch.manual_seed(0)
    images = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    args = dict(sliding_window_shapes=(3, 4, 4), strides=1, target=1)
    occlusion = IncrementalOcclusion(model)
    ScriptedClock(occlusion._target_race, {CALIBRATE: calibrating_costs, EXACT: 1.0})
    captum = Occlusion(model)
    arms = []
    for image in images:
        ours = occlusion.attribute(image[None], target_ssim=0.9, **args)
        report = occlusion.last_run
        arm, _, reason = report.target_ssim_choice.partition(": ")
        arms.append(arm)
        assert reason
        if arm == EXACT:
            assert report.calibration is None and report.approximation.exact
            assert report.windows_computed == report.windows_total
            exact = captum.attribute(image[None], perturbations_per_eval=64, **args)
            scale = max(float(exact.abs().max()), 1e-300)
            torch.testing.assert_close(ours, exact, rtol=0, atol=1e-10 * scale)
        else:
            assert report.calibration is not None
    faster = EXACT if calibrating_costs > 1.0 else CALIBRATE
    assert arms == [CALIBRATE, EXACT, CALIBRATE, EXACT, CALIBRATE] + [faster] * 3


def test_calls_off_the_engine_are_not_timed(monkeypatch):
    def unexpected(*_):
        raise AssertionError("a call on Captum's path was timed")

    args = dict(sliding_window_shapes=(3, 4, 4), strides=2, target=1, target_ssim=0.9)
    inputs = torch.randn(1, 3, 8, 8)
    occlusion = IncrementalOcclusion(models.small_cnn(models.DataDependentCNN))
    monkeypatch.setattr(occlusion._target_race, "record", unexpected)
    occlusion.attribute(inputs, engine="captum", **args)
    assert occlusion.last_run.engine == "captum"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        for _ in range(3):  # the first call is never timed; later ones would be
            occlusion.attribute(inputs, **args)
            assert occlusion.last_run.engine == "captum"


def test_a_call_split_into_chunks_runs_one_arm(monkeypatch):
    """A call of more examples than one run takes is one call of the race: every
    chunk runs the same arm (the exact arm's map is Captum's for every example)."""
    from captum_krypton import chunks

    monkeypatch.setattr(chunks, "EXAMPLES_PER_RUN", 2)
    model = models.small_cnn().double()
    torch.manual_seed(2)
    images = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    args = dict(sliding_window_shapes=(3, 3, 3), strides=1, target=1, target_ssim=0.9)
    occlusion = IncrementalOcclusion(model)
    occlusion.attribute(images, **args)  # first call of the kind: calibrates
    first = occlusion.last_run
    assert first.target_ssim_choice.startswith(CALIBRATE)
    assert first.windows_computed < first.windows_total == 3 * 196
    second = occlusion.attribute(images, **args)  # timing both arms: exact
    report = occlusion.last_run
    assert report.target_ssim_choice.startswith(EXACT)
    assert report.windows_computed == report.windows_total == 3 * 196
    del args["target_ssim"]
    exact = Occlusion(model).attribute(images, perturbations_per_eval=16, **args)
    torch.testing.assert_close(second, exact, rtol=0, atol=1e-10 * float(exact.abs().max()))


def test_a_stream_closed_at_its_final_report_is_timed():
    """Leaving `attribute_stream` once the final report is out (a `break` on
    `complete`) still times the call and reports its arm."""
    occlusion = IncrementalOcclusion(models.small_cnn())
    inputs = torch.randn(1, 3, 16, 16)
    args = dict(sliding_window_shapes=(3, 3, 3), strides=1, target=1, target_ssim=0.9)
    arms = []
    for _ in range(6):
        for progress in occlusion.attribute_stream(inputs, **args):
            if progress.complete:
                break
        arms.append(occlusion.last_run.target_ssim_choice.split(":")[0])
    assert arms[:5] == [CALIBRATE, EXACT, CALIBRATE, EXACT, CALIBRATE]
    assert "faster on earlier calls" in occlusion.last_run.target_ssim_choice


def test_calibrate_always_calibrates_and_its_choice_is_reusable():
    """`calibrate` gives a calibration even where the race would run exact mode
    (the README's data-set recipe after earlier target_ssim calls of the kind)."""
    model = models.small_cnn().double()
    torch.manual_seed(3)
    images = torch.randn(3, 1, 3, 16, 16, dtype=torch.float64)
    args = dict(sliding_window_shapes=(3, 3, 3), strides=1, target=1)
    occlusion = IncrementalOcclusion(model)
    occlusion.attribute(images[0], target_ssim=0.9, **args)
    occlusion.attribute(images[0], target_ssim=0.9, **args)
    assert occlusion.last_run.calibration is None  # the race's exact arm
    calibration = occlusion.calibrate(images[0], target_ssim=0.9, **args)
    assert calibration is occlusion.last_run.calibration
    assert calibration.approximation.drilldown is not None
    reused = occlusion.attribute(images[1], calibration=calibration, **args)
    chosen = calibration.approximation
    given = occlusion.attribute(
        images[1],
        tau=chosen.tau,
        freeze_global_context=chosen.freeze_global_context,
        drilldown=chosen.drilldown,
        drilldown_factor=chosen.drilldown_factor,
        **args,
    )
    torch.testing.assert_close(reused, given, rtol=0, atol=0)
    with pytest.raises(ValueError, match="leave them unset"):
        occlusion.calibrate(images[0], target_ssim=0.9, tau=0.5, **args)
    with pytest.raises(ValueError):
        occlusion.calibrate(images[0], target_ssim=1.5, **args)
    with pytest.raises(IncrementalNotApplicable, match="no calibration"):
        occlusion.calibrate(images[0], target_ssim=0.9, engine="captum", **args)
