"""Calls from several threads: one instance serializes its calls, and captures
(torch.export) run one at a time in the process, so first calls made together
give Captum's maps without falling back."""

from __future__ import annotations

import threading
import warnings
from functools import partial

import torch
from captum.attr import Occlusion

from captum_krypton import IncrementalOcclusion
from tests import models

ARGS = dict(sliding_window_shapes=(3, 3, 3), strides=1, target=1)


def run_together(calls) -> list:
    """Each of `calls` in its own thread, started together; their results (or
    exceptions) and the warnings each raised."""
    results: list = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def worker(index: int) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start.wait()
            try:
                value = calls[index]()
            except Exception as exc:  # reported to the test, not swallowed
                value = exc
        results[index] = (value, [str(w.message) for w in caught])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_first_calls_from_two_threads_on_one_instance_equal_captum():
    model = models.small_cnn().double()
    torch.manual_seed(5)
    images = [torch.randn(1, 3, 16, 16, dtype=torch.float64) for _ in range(2)]
    expected = [Occlusion(model).attribute(x, perturbations_per_eval=16, **ARGS) for x in images]
    for _ in range(3):
        occlusion = IncrementalOcclusion(model)
        calls = [partial(occlusion.attribute, x, engine="incremental", **ARGS) for x in images]
        for (result, caught), exact in zip(run_together(calls), expected):
            assert not isinstance(result, Exception), result
            assert caught == []
            torch.testing.assert_close(result, exact, rtol=0, atol=1e-10 * float(exact.abs().max()))


def test_two_instances_of_one_model_in_two_threads_after_their_first_calls():
    """Instances sharing a model run side by side once each has captured it (a
    capture traces the model in place: docs/compatibility.md)."""
    model = models.small_cnn().double()
    torch.manual_seed(6)
    images = [torch.randn(1, 3, 16, 16, dtype=torch.float64) for _ in range(2)]
    expected = [Occlusion(model).attribute(x, perturbations_per_eval=16, **ARGS) for x in images]
    instances = [IncrementalOcclusion(model), IncrementalOcclusion(model)]
    for occlusion, x in zip(instances, images):
        occlusion.attribute(x, **ARGS)
    calls = [
        lambda occlusion=occlusion, x=x: occlusion.attribute(x, engine="incremental", **ARGS)
        for occlusion, x in zip(instances, images)
    ]
    for _ in range(3):
        for (result, caught), exact in zip(run_together(calls), expected):
            assert not isinstance(result, Exception), result
            assert caught == []
            torch.testing.assert_close(result, exact, rtol=0, atol=1e-10 * float(exact.abs().max()))
