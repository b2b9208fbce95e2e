"""One process, several devices: the windows of one attribution sharded across
GPUs (or CPU threads), one model replica and one set of views per device.

Each device computes its share of the window table (windows x outputs) exactly
as a single device would; the table is gathered on the CPU and accumulated once,
so the result equals a one-device run up to the rounding of the per-window
outputs.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from captum_krypton.engine.occlusion import PreparedOcclusion


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors (also inside tuples and lists) moved to `device`; the rest as is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    return value


def state_key(module: nn.Module) -> tuple:
    """Identity and version of every parameter and buffer: a replica made under
    the same key is still a copy of the model."""
    return tuple((id(t), t._version, t.device) for t in [*module.parameters(), *module.buffers()])


class Replicas:
    """Copies of a model, one per device, remade when the model changes."""

    def __init__(self) -> None:
        self._copies: dict[torch.device, tuple[tuple, nn.Module]] = {}

    def on(self, module: nn.Module, device: torch.device) -> nn.Module:
        key = state_key(module)
        kept = self._copies.get(device)
        if kept is None or kept[0] != key:
            if all(t.device == device for t in module.parameters()):
                replica = module  # already there: no copy
            else:
                replica = copy.deepcopy(module).to(device)
            kept = (key, replica)
            self._copies[device] = kept
        return kept[1]


def run_sharded(
    prepared: Sequence[PreparedOcclusion],
    targets: Sequence[Any],
    batch_size: Callable[[PreparedOcclusion], int],
    on_batch: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
) -> tuple[torch.Tensor, torch.dtype, np.ndarray]:
    """Every window's output difference, (windows, outputs) on the CPU, computed
    with windows split into contiguous shards, one per prepared device; also the
    outputs' dtype and which windows were computed (all, unless cancelled)."""
    num_windows = prepared[0].grid.num_windows
    shards = np.array_split(np.arange(num_windows), len(prepared))
    results: list[torch.Tensor | None] = [None] * len(prepared)
    done = np.zeros(num_windows, dtype=bool)
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(index: int) -> None:
        ready, ids, target = prepared[index], shards[index], targets[index]
        device = ready.inputs.device
        context = torch.cuda.device(device) if device.type == "cuda" else nullcontext()
        try:
            with context:
                initial = ready.initial_outputs(target)
                table = torch.empty(
                    (num_windows, initial.shape[1]), dtype=initial.dtype, device=device
                )
                position = 0
                for count in ready.fill_diffs(ids, target, batch_size(ready), initial, table):
                    with lock:
                        done[ids[position : position + count]] = True
                    position += count
                    if on_batch is not None:
                        on_batch(count)
                    if errors or (cancel is not None and cancel.is_set()):
                        break
                rows = torch.from_numpy(ids).to(device)
                results[index] = table[rows].cpu()
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(prepared))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    first = next(r for r in results if r is not None)
    diffs = torch.zeros((num_windows, first.shape[1]), dtype=first.dtype)
    for ids, rows in zip(shards, results):
        if rows is not None:
            diffs[torch.from_numpy(ids)] = rows
    return diffs, first.dtype, done
