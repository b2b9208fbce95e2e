"""Pick the fastest of several implementations of the same math, by measurement.

Like `cudnn.benchmark`: the first time a shape is seen on CUDA, every candidate
runs (one warm-up, then timed with CUDA events) and the fastest is remembered for
that shape for the rest of the process. On the CPU, and while a CUDA graph is
being captured, the first candidate runs without measurement.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from typing import TypeVar

import torch

T = TypeVar("T")

#: Timed runs per candidate after its warm-up.
TIMED_RUNS = 3
_chosen: dict[Hashable, str] = {}
_timings: dict[Hashable, dict[str, float]] = {}
_forced: list[str] = []


def chosen(key: Hashable) -> str | None:
    """The implementation measured fastest for `key`, if measured."""
    return _chosen.get(key)


def measurements() -> dict[Hashable, dict[str, float]]:
    """Milliseconds per run of every candidate measured so far, by shape key."""
    return {key: dict(times) for key, times in _timings.items()}


@contextlib.contextmanager
def forced(name: str) -> Iterator[None]:
    """Within the block, candidate `name` runs wherever it is offered (for tests)."""
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def fastest(key: Hashable, candidates: dict[str, Callable[[], T]], device: torch.device) -> T:
    """Run the implementation measured fastest for `key`; measure first if needed.

    A candidate that raises RuntimeError while being measured (e.g. an op the
    library has no kernel for at this shape) drops out of the choice.
    """
    names = list(candidates)
    if _forced and _forced[-1] in candidates:
        return candidates[_forced[-1]]()
    known = _chosen.get(key)
    if known in candidates:
        return candidates[known]()
    if len(names) == 1 or device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return candidates[names[0]]()
    times: dict[str, float] = {}
    results: dict[str, T] = {}
    for name, run in candidates.items():
        try:
            run()  # warm-up: compilation, algorithm search
        except RuntimeError:
            if name == names[0]:
                raise
            continue
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(TIMED_RUNS):
            results[name] = run()
        end.record()
        end.synchronize()
        times[name] = start.elapsed_time(end) / TIMED_RUNS
    _timings[key] = times
    best = min(times, key=times.__getitem__)
    _chosen[key] = best
    return results[best]
