"""Pick the fastest of several implementations of the same math, by measurement.

Like `cudnn.benchmark`: the first time a shape is seen on CUDA, every candidate
runs (one warm-up, then timed with CUDA events) and the fastest is remembered for
that shape for the rest of the process. On the CPU, and while a CUDA graph is
being captured, the first candidate runs without measurement.

Choices are also kept on disk (`choice_cache_path`), keyed by the GPU's name and
the torch and Triton versions, so that later processes on the same kind of GPU
(the ranks of a data-set run, the next session) skip the measurement. Set
`CAPTUM_KRYPTON_CACHE_DIR` to move the cache, or to an empty string to keep
choices in memory only. The choice changes speed only: every candidate computes
the same math.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")

#: Timed runs per candidate after its warm-up.
TIMED_RUNS = 3
_chosen: dict[Hashable, str] = {}
_timings: dict[Hashable, dict[str, float]] = {}
_forced: list[str] = []
#: Choices read from disk, by device: {repr(key): name}.
_on_disk: dict[str, dict[str, str]] = {}
_disk_lock = threading.Lock()


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
    known = _disk_choices(device).get(repr(key))
    if known in candidates:
        _chosen[key] = known
        return candidates[known]()
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
    _remember_on_disk(device, key, best)
    return results[best]
