"""Shared helpers: every exactness test compares with captum.attr.Occlusion itself."""

from __future__ import annotations

import functools
import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through Triton's interpreter (set before import).
    os.environ.setdefault("TRITON_INTERPRET", "1")
from captum.attr import Occlusion

from captum_krypton import FallbackWarning, IncrementalOcclusion

#: Tolerance of fp32 comparisons, relative to the larger of the attribution map's
#: and the model output's scale: an attribution is a difference of two outputs,
#: so rounding noise scales with the outputs. Captum's own results move by about
#: 1e-5 of the map between perturbations_per_eval=1 and 64.
FP32_TOLERANCE = 1e-5
#: Same in float64 models, where any real mismatch would stand far above it; the
#: result itself is float32 (as Captum's), so values may also differ by float32
#: rounding (FP32_ULPS relative to each value).
FP64_TOLERANCE = 1e-10
FP32_ULPS = 3e-7


def captum_and_ours(model, inputs, *, ppe=16, engine="incremental", options=None, **kwargs):
    """Captum's Occlusion and IncrementalOcclusion (with engine `options`) on one call."""
    expected = Occlusion(model).attribute(inputs, perturbations_per_eval=ppe, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        actual = IncrementalOcclusion(model).attribute(
            inputs, engine=engine, **(options or {}), **kwargs
        )
    return expected, actual


def assert_close_to_captum(expected, actual, output_scale, tolerance=None):
    expected_t = expected if isinstance(expected, tuple) else (expected,)
    actual_t = actual if isinstance(actual, tuple) else (actual,)
    assert isinstance(actual, tuple) == isinstance(expected, tuple)
    for e, a in zip(expected_t, actual_t):
        assert a.shape == e.shape
        assert a.dtype == e.dtype == torch.float32
        if tolerance is None:
            tolerance = FP32_TOLERANCE
        scale = max(e.abs().max().item(), float(output_scale), 1e-12)
        rtol = FP32_ULPS if tolerance < FP32_TOLERANCE else 0.0
        torch.testing.assert_close(a, e, rtol=rtol, atol=tolerance * scale)


def check_model(model, inputs, additional_forward_args=None, tolerance=None, **kwargs):
    """Run both and compare; returns (expected, actual). `options=` go to ours only."""
    with torch.no_grad():
        extra = (
            ()
            if additional_forward_args is None
            else (
                additional_forward_args
                if isinstance(additional_forward_args, tuple)
                else (additional_forward_args,)
            )
        )
        x = inputs[0] if isinstance(inputs, tuple) else inputs
        output_scale = model(x, *extra).abs().max().item()
    expected, actual = captum_and_ours(
        model, inputs, additional_forward_args=additional_forward_args, **kwargs
    )
    if tolerance is None and x.dtype == torch.float64:
        tolerance = FP64_TOLERANCE
    assert_close_to_captum(expected, actual, output_scale, tolerance)
    return expected, actual


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def always_calibrate(monkeypatch):
    """Every target_ssim call calibrates, for tests of the calibration itself
    (by default later calls of a kind race calibrating against exact mode,
    engine/target_race.py)."""
    from captum_krypton import attr
    from captum_krypton.engine.target_race import TargetRace

    monkeypatch.setattr(attr, "TargetRace", functools.partial(TargetRace, enabled=False))


@pytest.fixture
def exact_cuda_math():
    """fp32 convolutions and matmuls without TF32, for tight comparisons on CUDA."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def emulate_cuda_graphs(monkeypatch, stand_in) -> None:
    """CUDA graphs on the CPU (engine/graphs.py): `stand_in(state, size)` takes
    the place of a capture, and its `run(ids)` of a replay; `cuda_graphs` is
    honoured as on CUDA."""
    from captum_krypton.engine import graphs
    from captum_krypton.engine.occlusion import PreparedOcclusion

    monkeypatch.setattr(graphs, "memory_pool", lambda: None)
    monkeypatch.setattr(
        graphs.GraphedBatch,
        "capture",
        classmethod(lambda cls, state, size, pool=None, announce=True: stand_in(state, size)),
    )
    choose = PreparedOcclusion.choose_kernels

    def on_cpu_too(self, kernels, cuda_graphs):
        choose(self, kernels, cuda_graphs)
        self.cuda_graphs = cuda_graphs
        return self

    monkeypatch.setattr(PreparedOcclusion, "choose_kernels", on_cpu_too)


@pytest.fixture
def prepared_calls(monkeypatch):
    """Every PreparedOcclusion whose windows ran, in order."""
    from captum_krypton.engine.occlusion import PreparedOcclusion

    calls = []
    fill = PreparedOcclusion.fill_diffs

    def recording(self, *args, **kwargs):
        calls.append(self)
        return fill(self, *args, **kwargs)

    monkeypatch.setattr(PreparedOcclusion, "fill_diffs", recording)
    return calls
