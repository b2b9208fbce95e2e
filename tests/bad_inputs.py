"""Bad inputs and faults, each run through Captum's Occlusion and IncrementalOcclusion.

`CASES` is the list the tests check (tests/test_bad_input.py) and the table in
docs/bad_input.md is printed from (`python -m tests.bad_inputs`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from captum.attr import Occlusion
from torch import nn

from captum_krypton import FallbackWarning, IncrementalOcclusion
from tests import models


@dataclass
class Case:
    name: str
    make: Callable[[], tuple[nn.Module, Any, dict]]  # model, inputs, attribute kwargs
    note: str = ""
    tolerance: float = 1e-5
    extra: dict = field(default_factory=dict)  # options for ours only
    #: Where we deliberately differ from Captum: the error we raise instead.
    ours_error: type | None = None


def _small(x=None, **kwargs):
    model = models.small_cnn()
    return (
        model,
        (torch.randn(2, 3, 12, 12) if x is None else x),
        {
            "sliding_window_shapes": (3, 4, 4),
            "strides": 2,
            "target": 1,
            **kwargs,
        },
    )


class FailingLayer:
    """Replaces a layer's forward: passes `calls_before` calls, then raises `error`
    (a layer the traced graph calls, so both paths meet it)."""

    def __init__(self, layer: nn.Module, calls_before: int, error: BaseException):
        self.forward, self.calls_before, self.error, self.calls = (
            layer.forward,
            calls_before,
            error,
            0,
        )

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.calls_before:
            raise self.error
        return self.forward(*args, **kwargs)


def _failing_midway(error: BaseException):
    def make():
        model = models.small_cnn()
        model.conv2.forward = FailingLayer(model.conv2, 2, error)  # clean run, one batch
        return (
            model,
            torch.randn(2, 3, 12, 12),
            {
                "sliding_window_shapes": (3, 4, 4),
                "strides": 2,
                "target": 1,
                "perturbations_per_eval": 4,
            },
        )

    return make


class ReturnsDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = models.small_cnn()

    def forward(self, x):
        return {"logits": self.inner(x)}


def _half(dtype):
    def make():
        model = models.small_cnn().to(dtype)
        return (
            model,
            torch.randn(2, 3, 12, 12, dtype=dtype),
            {
                "sliding_window_shapes": (3, 4, 4),
                "strides": 2,
                "target": 1,
            },
        )

    return make


CASES = [
    Case("window of the wrong rank", lambda: _small(sliding_window_shapes=(4, 4))),
    Case("window larger than the input", lambda: _small(sliding_window_shapes=(3, 13, 4))),
    Case("stride 0", lambda: _small(strides=0), "Captum: all NaN", ours_error=ValueError),
    Case("negative stride", lambda: _small(strides=-1), ours_error=ValueError),
    Case("stride larger than the window", lambda: _small(strides=5)),
    Case("baseline of a mismatched shape", lambda: _small(baselines=torch.zeros(2, 3, 5, 5))),
    Case("target out of range", lambda: _small(target=7)),
    Case("negative target", lambda: _small(target=-1), "Python indexing, as Captum"),
    Case(
        "NaN in the input",
        lambda: _small(torch.randn(2, 3, 12, 12).index_fill_(2, torch.tensor([3]), float("nan"))),
    ),
    Case(
        "inf in the input",
        lambda: _small(torch.randn(2, 3, 12, 12).index_fill_(3, torch.tensor([5]), float("inf"))),
    ),
    Case("empty batch", lambda: _small(torch.randn(0, 3, 12, 12))),
    Case("non-contiguous input", lambda: _small(torch.randn(2, 3, 12, 24)[..., ::2])),
    Case(
        "channels_last input",
        lambda: _small(torch.randn(2, 3, 12, 12).contiguous(memory_format=torch.channels_last)),
    ),
    Case(
        "float16 model and input",
        _half(torch.float16),
        "compared within 2e-2 of the map's scale",
        tolerance=2e-2,
    ),
    Case(
        "bfloat16 model and input",
        _half(torch.bfloat16),
        "compared within 1.5e-1 of the map's scale",
        tolerance=1.5e-1,
    ),
    Case(
        "a layer raises midway",
        _failing_midway(RuntimeError("layer failed midway")),
        "its forward replaced on the instance: Captum's path",
        extra={"windows_per_batch": 4},
    ),
    Case(
        "forward returns a dict",
        lambda: (
            ReturnsDict(),
            torch.randn(2, 3, 12, 12),
            {
                "sliding_window_shapes": (3, 4, 4),
                "strides": 2,
                "target": 1,
            },
        ),
    ),
    Case(
        "KeyboardInterrupt during the run",
        _failing_midway(KeyboardInterrupt()),
        "raised by a layer as above",
        extra={"windows_per_batch": 4},
    ),
]


@dataclass
class Outcome:
    error: BaseException | None
    result: Any = None
    warnings: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.error is not None:
            message = str(self.error).strip().splitlines()[0] if str(self.error) else ""
            return f"{type(self.error).__name__}" + (f": {message}" if message else "")
        return "result"


def run(explainer: type, case: Case, ours: bool) -> tuple[Outcome, nn.Module, nn.Module]:
    """Run one case; returns the outcome, the model after the run and a copy from before."""
    torch.manual_seed(0)
    model, inputs, kwargs = case.make()
    model.eval()
    before = copy.deepcopy(model)
    options = dict(kwargs)
    if ours:
        options.update(case.extra)
        options.pop("perturbations_per_eval", None) if "windows_per_batch" in options else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = explainer(model).attribute(inputs, **options)
        except (Exception, KeyboardInterrupt) as exc:  # noqa: B036 - the point of the table
            return Outcome(exc), model, before
    fallbacks = tuple(str(w.message) for w in caught if issubclass(w.category, FallbackWarning))
    return Outcome(None, result, fallbacks), model, before


def main() -> None:
    print("| input | Captum's Occlusion | IncrementalOcclusion |")
    print("|---|---|---|")
    for case in CASES:
        theirs, _, _ = run(Occlusion, case, ours=False)
        ours, _, _ = run(IncrementalOcclusion, case, ours=True)
        ours_text = ours.describe()
        if ours.error is None:
            ours_text = "same result" if theirs.error is None else "result"
            if ours.warnings:
                ours_text += f" (Captum's path: {ours.warnings[0].split(': ', 1)[-1]})"
        note = f" ({case.note})" if case.note else ""
        print(f"| {case.name}{note} | {theirs.describe()} | {ours_text} |")


if __name__ == "__main__":
    main()
