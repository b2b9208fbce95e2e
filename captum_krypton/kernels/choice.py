"""Pick the fastest of several implementations of the same math, by measurement.

Like `cudnn.benchmark`: the first time a shape is seen on CUDA, every candidate
runs (one warm-up, then timed with CUDA events) and the fastest is remembered for
that shape for the rest of the process. On the CPU the first candidate runs
without measurement; while a CUDA graph is being captured, the fastest measured
so far (the first candidate where none was).

Choices are also kept on disk (`choice_cache_path`), keyed by the GPU's name and
the torch and Triton versions, so that later processes on the same kind of GPU
(the ranks of a data-set run, a later script) skip the measurement. Set
`CAPTUM_KRYPTON_CACHE_DIR` to move the cache, or to an empty string to keep
choices in memory only. The choice changes speed only: every candidate computes
the same math.

A candidate whose kernel is still compiling in the background raises
`CandidatePending`: the others are measured and the fastest of them serves
until the pending one is ready; then all are measured again and the choice is
made (and stored). So the first call runs on kernels that need
no compilation while the Triton kernels compile.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")

#: Timed runs per candidate after its warm-up.
TIMED_RUNS = 3
_chosen: dict[Hashable, str] = {}
_timings: dict[Hashable, dict[str, float]] = {}
#: Milliseconds of the candidates measured while another was pending, by key.
_partial: dict[Hashable, dict[str, float]] = {}
_forced: list[str] = []
#: Choices read from disk, by device: {repr(key): name}.
_on_disk: dict[str, dict[str, str]] = {}
_disk_lock = threading.Lock()


class CandidatePending(Exception):
    """Raised by a candidate whose kernel is compiling (in `compiling`, a Future);
    it ran nothing."""

    def __init__(self, compiling: Future):
        super().__init__("the kernel is still compiling")
        self.compiling = compiling

    def wait(self) -> None:
        """Until the compilation ends; its error, if it failed."""
        self.compiling.result()


def _run_ready(run: Callable[[], T]) -> T:
    """`run`, waiting for as long as it is pending: its own compilation first,
    then any other it waits on (a compiled kernel still defers to compilations
    in flight elsewhere, see kernels.triton_conv)."""
    while True:
        try:
            return run()
        except CandidatePending as pending:
            pending.wait()


def choice_cache_path(device: torch.device) -> Path | None:
    """The file that keeps the kernel choices made on GPUs like `device`, or None
    when `CAPTUM_KRYPTON_CACHE_DIR` is set to an empty string."""
    root = os.environ.get("CAPTUM_KRYPTON_CACHE_DIR")
    if root == "":
        return None
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "captum_krypton")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    label = f"{name}-torch{torch.__version__}-triton{triton_version}"
    safe = "".join(c if c.isalnum() or c in ".-_" else "_" for c in label)
    return Path(root) / f"kernel_choices-{safe}.json"


def _disk_choices(device: torch.device) -> dict[str, str]:
    path = choice_cache_path(device)
    if path is None:
        return {}
    with _disk_lock:
        if str(path) not in _on_disk:
            try:
                _on_disk[str(path)] = dict(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                _on_disk[str(path)] = {}
        return _on_disk[str(path)]


def _remember_on_disk(device: torch.device, key: Hashable, name: str) -> None:
    """Merge this choice into the file (other processes may have added theirs) and
    replace it atomically; a cache that cannot be written is skipped."""
    path = choice_cache_path(device)
    if path is None:
        return
    with _disk_lock:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                stored = dict(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                stored = {}
            stored[repr(key)] = name
            with tempfile.NamedTemporaryFile(
                "w", dir=path.parent, prefix=f".{path.name}.", delete=False
            ) as f:
                json.dump(stored, f)
            os.replace(f.name, path)
            _on_disk[str(path)] = stored
        except OSError:
            return


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
    library has no kernel for at this shape) drops out of the choice. One that
    raises CandidatePending is tried again at the next call with this key.
    """
    names = list(candidates)
    if _forced and _forced[-1] in candidates:
        return _run_ready(candidates[_forced[-1]])
    known = _chosen.get(key)
    if known in candidates:
        return _run_ready(candidates[known])
    if len(names) == 1 or device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        # No measurement here; while capturing, the fastest measured so far where
        # a choice still waits to time a candidate that was compiling.
        earlier = _partial.get(key) or {}
        measured = [name for name in names if math.isfinite(earlier.get(name, math.inf))]
        best = min(measured, key=earlier.__getitem__) if measured else names[0]
        return _run_ready(candidates[best])
    known = _disk_choices(device).get(repr(key))
    if known in candidates:
        try:
            result = candidates[known]()
        except CandidatePending:  # stored, not compiled yet in this process
            return _run_ready(candidates[names[0]])
        _chosen[key] = known
        return result
    return _measure(key, candidates, device)


def _measure(key: Hashable, candidates: dict[str, Callable[[], T]], device: torch.device) -> T:
    """Time every candidate (warm-up, then TIMED_RUNS runs) and remember the
    fastest; while one is pending, the fastest of the others serves, and all are
    timed again once none is (timings taken while kernels compile on the side
    are not comparable)."""
    names = list(candidates)
    earlier = _partial.get(key)
    if earlier is not None:
        for name in names:
            if name in earlier:
                continue
            try:
                candidates[name]()
            except CandidatePending:
                best = min(earlier, key=earlier.__getitem__) if earlier else names[0]
                return _run_ready(candidates[best])
            except RuntimeError:
                continue
        del _partial[key]
    times: dict[str, float] = {}
    results: dict[str, T] = {}
    pending = False
    for name, run in candidates.items():
        try:
            run()  # warm-up: compilation, algorithm search
        except CandidatePending:
            pending = True
            continue
        except RuntimeError:
            if name == names[0]:
                raise
            times[name] = math.inf
            continue
        times[name] = _milliseconds_per_run(run, results, name)
    best = min(times, key=times.__getitem__) if times else names[0]
    if pending:
        _partial[key] = times
        return results[best] if best in results else _run_ready(candidates[best])
    _timings[key] = {name: ms for name, ms in times.items() if math.isfinite(ms)}
    _chosen[key] = best
    _remember_on_disk(device, key, best)
    return results[best]


def _milliseconds_per_run(run: Callable[[], T], results: dict[str, T], name: str) -> float:
    """Milliseconds per run over TIMED_RUNS runs (CUDA events); the last result
    lands in `results[name]`."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(TIMED_RUNS):
        results[name] = run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / TIMED_RUNS
