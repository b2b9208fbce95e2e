"""The measured choice between the incremental plan and plain re-inference.

The measurement itself needs CUDA events; here, on the CPU, the choice's effect
is tested: a plan set to run plain re-inference in a given layout and batch
size gives Captum's numbers, and the summary reports what was measured.
"""

from __future__ import annotations

import torch
from torch import nn

from captum_krypton import IncrementalOcclusion
from captum_krypton.engine.path_choice import PathChoice, needs_measurement
from tests.conftest import check_model


def _model():
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).double().eval()  # fmt: skip


def test_no_measurement_on_the_cpu():
    model, x = _model(), torch.randn(2, 3, 16, 16, dtype=torch.float64)
    occlusion = IncrementalOcclusion(model)
    prepared = occlusion._preparer.prepare(
        model,
        *_call_and_settings(x),
    )
    assert not needs_measurement(prepared)
    assert prepared.plan.path_choice is None


def _call_and_settings(x):
    from captum_krypton.engine.call import CaptumArguments
    from captum_krypton.engine.settings import EngineSettings
    from captum_krypton.plan.approximation import EXACT

    call = CaptumArguments(x, (3, 4, 4), 2, None, 0, None)
    return call, EngineSettings(self_check=False), EXACT


def test_a_plain_choice_runs_plain_reinference_and_equals_captum():
    model, x = _model(), torch.randn(2, 3, 16, 16, dtype=torch.float64)
    occlusion = IncrementalOcclusion(model)
    plan = occlusion.plan(x, (3, 4, 4), strides=2)
    assert not plan.rerun_whole_model
    choice = PathChoice("plain", torch.contiguous_format, 256, reason="contiguous, 256 rows")
    choice.seconds_per_window = {"incremental": 2e-5, "contiguous, 256 rows": 1e-5}
    plan.path_choice, plan.rerun_whole_model = choice, True
    expected = check_model(
        model, x, sliding_window_shapes=(3, 4, 4), strides=2, target=1,
        options={"self_check": False},
    )[0]  # fmt: skip
    rows = []  # the plain path runs the user's module on batches of windows
    handle = model[0].register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    try:
        ours = occlusion.attribute(
            x, sliding_window_shapes=(3, 4, 4), strides=2, target=1, self_check=False
        )
    finally:
        handle.remove()
    assert rows and max(rows) > x.shape[0]
    torch.testing.assert_close(ours, expected, rtol=3e-7, atol=1e-12)
    assert "runs plain (contiguous, 256 rows)" in plan.summary()
