"""target_ssim on small models trained on real data, with real inputs, and the
reuse of a calibration.

Models trained on generated shapes have smooth heatmaps that flatter the
approximations; these have detail finer than drill-down's coarse lattice. The
exact maps are captum.attr.Occlusion's, computed here. The trained weights ship
in wheels installed without their dependencies (benchmarks/real_models.py); the
tests skip without them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from captum.attr import Occlusion

from captum_krypton import IncrementalOcclusion, attribution_ssim
from captum_krypton.approx import calibrate
from captum_krypton.engine import progressive
from tests import models
from tests.conftest import assert_close_to_captum

#: These tests are about the calibration: every call calibrates (the race against
#: exact mode has its own tests, tests/test_target_race.py).
pytestmark = pytest.mark.usefixtures("always_calibrate")

TARGET = 0.9
#: Share of the inputs whose map must reach the target.
SHARE = 0.9
FACES = dict(sliding_window_shapes=(3, 8, 8), strides=2)
CROPS = dict(sliding_window_shapes=(3, 4, 4), strides=1)


def reached(model, inputs, targets, **args) -> tuple[np.ndarray, float]:
    """Per input, SSIM of target_ssim's map against Captum's exact map; and the
    mean share of the windows computed."""
    occlusion, captum = IncrementalOcclusion(model), Occlusion(model)
    scores, computed = [], []
    for x, target in zip(inputs, targets):
        x = x[None]
        exact = captum.attribute(x, target=target, perturbations_per_eval=256, **args)
        ours = occlusion.attribute(x, target=target, target_ssim=TARGET, **args)
        report = occlusion.last_run
        assert report.engine == "incremental" and report.calibration is not None
        scores.append(float(attribution_ssim(ours, exact)[0]))
        computed.append(report.windows_computed / report.windows_total)
    return np.asarray(scores), float(np.mean(computed))


def face_detector_case(count: int):
    pytest.importorskip("facenet_pytorch")
    pytest.importorskip("skimage")
    from benchmarks import real_models as rm

    inputs = torch.cat([rm.astronaut_face(), rm.lfw_faces(count - 1)])
    return rm.face_detector(), inputs, [1] * count


def cifar10_case(per_photo: int):
    pytest.importorskip("cifar_10_model")
    pytest.importorskip("h5py")
    pytest.importorskip("skimage")
    from benchmarks import real_models as rm

    model = rm.cifar10_cnn()
    inputs = rm.photo_crops(per_photo=per_photo)
    with torch.no_grad():
        targets = [int(t) for t in model(inputs).argmax(1)]
    return model, inputs, targets


def test_face_detector_on_real_faces():
    scores, computed = reached(*face_detector_case(10), **FACES)
    assert (scores >= TARGET).mean() >= SHARE, scores
    assert computed < 0.8


def test_cifar10_cnn_on_photo_crops():
    scores, computed = reached(*cifar10_case(per_photo=3), **CROPS)
    assert (scores >= TARGET).mean() >= SHARE, scores
    assert computed < 0.8


@pytest.mark.slow
def test_face_detector_on_more_faces():
    scores, _ = reached(*face_detector_case(24), **FACES)
    assert (scores >= TARGET).mean() >= SHARE, scores


@pytest.mark.slow
def test_cifar10_cnn_on_more_crops():
    scores, _ = reached(*cifar10_case(per_photo=6), **CROPS)
    assert (scores >= TARGET).mean() >= SHARE, scores


def small_call():
    model = models.small_cnn()
    torch.manual_seed(0)
    inputs = torch.randn(3, 3, 32, 32)
    return model, inputs, dict(sliding_window_shapes=(3, 4, 4), strides=1, target=1)


def test_a_reused_calibration_runs_its_choice_without_calibrating(monkeypatch):
    model, inputs, args = small_call()
    occlusion = IncrementalOcclusion(model)
    occlusion.attribute(inputs[:1], target_ssim=TARGET, **args)
    first = occlusion.last_run
    calibration = first.calibration
    chosen = calibration.approximation
    assert chosen.drilldown is not None  # an approximation, so reuse is not trivially exact

    def no_calibration(*_, **__):
        raise AssertionError("a reused calibration must not calibrate again")

    monkeypatch.setattr(progressive, "calibrate", no_calibration)
    for x in (inputs[:1], inputs[1:]):  # the calibrated input, and others of its shape
        reused = occlusion.attribute(x, calibration=calibration, **args)
        report = occlusion.last_run
        assert report.calibration is None
        assert report.approximation == dataclasses.replace(chosen, estimated_ssim=None)
        given = occlusion.attribute(
            x,
            tau=chosen.tau,
            freeze_global_context=chosen.freeze_global_context,
            drilldown=chosen.drilldown,
            drilldown_factor=chosen.drilldown_factor,
            **args,
        )
        torch.testing.assert_close(reused, given, rtol=0, atol=0)
        assert report.windows_computed == occlusion.last_run.windows_computed
    # On the calibrated input it computes as many windows, without the sample.
    occlusion.attribute(inputs[:1], calibration=calibration, **args)
    assert occlusion.last_run.windows_computed == first.windows_computed


def test_a_calibration_is_reused_only_where_it_was_made():
    model, inputs, args = small_call()
    occlusion = IncrementalOcclusion(model)
    occlusion.attribute(inputs[:1], target_ssim=TARGET, **args)
    calibration = occlusion.last_run.calibration
    other_strides = dict(args, strides=2)
    with pytest.raises(ValueError, match="calibration was made for"):
        occlusion.attribute(inputs[:1], calibration=calibration, **other_strides)
    with pytest.raises(ValueError, match="calibration was made for"):
        occlusion.attribute(inputs[:1, :, :28, :28], calibration=calibration, **args)
    for extra in (dict(target_ssim=TARGET), dict(tau=0.5), dict(drilldown=0.2)):
        with pytest.raises(ValueError, match="leave target_ssim"):
            occlusion.attribute(inputs[:1], calibration=calibration, **extra, **args)
    with pytest.raises(TypeError, match="Calibration"):
        occlusion.attribute(inputs[:1], calibration=calibration.approximation, **args)


def test_exact_mode_wins_where_the_choice_saves_under_the_threshold(monkeypatch):
    """The choice saves the windows it leaves out; just above that saving's share
    as the threshold, target_ssim runs exactly, and the map is exact."""
    model, inputs, args = small_call()
    occlusion = IncrementalOcclusion(model)
    occlusion.attribute(inputs[:1], target_ssim=TARGET, **args)
    report = occlusion.last_run
    saved = 1.0 - report.windows_computed / report.windows_total
    assert saved > calibrate.MIN_SAVING  # the approximation was chosen at the default

    monkeypatch.setattr(calibrate, "MIN_SAVING", saved - 0.01)
    occlusion.attribute(inputs[:1], target_ssim=TARGET, **args)
    assert occlusion.last_run.windows_computed == report.windows_computed

    monkeypatch.setattr(calibrate, "MIN_SAVING", saved + 0.01)
    result = occlusion.attribute(inputs[:1], target_ssim=TARGET, **args)
    report = occlusion.last_run
    assert report.approximation.exact and report.calibration.fraction_errors
    assert report.windows_computed == report.windows_total
    exact = Occlusion(model).attribute(inputs[:1], perturbations_per_eval=64, **args)
    with torch.no_grad():
        output_scale = model(inputs[:1]).abs().max()
    assert_close_to_captum(exact, result, output_scale)
