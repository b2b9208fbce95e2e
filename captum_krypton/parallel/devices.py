"""One process, several devices: the windows of one attribution sharded across
GPUs (or CPU threads), one model replica and one set of views per device.

Each device computes its shard of a stage's windows (rows of the window
table, windows x outputs) exactly as a single device would; the rows are
gathered into the one table of the run (engine/progressive.py), which
accumulates them once, so the result equals a one-device run up to the rounding
of the per-window outputs.
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

from captum_krypton.engine.call import CaptumArguments
from captum_krypton.engine.occlusion import PreparedOcclusion
from captum_krypton.engine.self_check import BatchBehaviour, WindowCheck


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors (also inside tuples and lists) moved to `device`; the rest as is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    return value


def arguments_on(arguments: CaptumArguments, device: torch.device) -> CaptumArguments:
    """The call's tensors (inputs, baselines, target, additional arguments) on `device`."""
    return arguments.replace(
        inputs=to_device(arguments.inputs, device),
        baselines=to_device(arguments.baselines, device),
        target=to_device(arguments.target, device),
        additional_forward_args=to_device(arguments.additional_forward_args, device),
    )


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


def compute_shard(
    ready: PreparedOcclusion,
    ids: np.ndarray,
    target: Any,
    windows_per_batch: int,
    on_batch: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    behaviour: BatchBehaviour | None = None,
) -> tuple[torch.Tensor, int]:
    """Output differences of windows `ids`, (len(ids), outputs) on the CPU, and
    how many of them (a prefix) were computed before `should_stop` said stop.
    With `behaviour` (the plan's batch check), the shard checks itself against
    the forward function (engine/self_check.py) and raises SelfCheckFailed."""
    device = ready.inputs.device
    context = torch.cuda.device(device) if device.type == "cuda" else nullcontext()
    with context:
        initial = ready.initial_outputs(target)
        table = torch.empty(
            (ready.grid.num_windows, initial.shape[1]), dtype=initial.dtype, device=device
        )
        check = None if behaviour is None else WindowCheck(ready, target, behaviour, ids)
        computed = 0
        for count in ready.fill_diffs(ids, target, windows_per_batch, initial, table):
            computed += count
            if on_batch is not None:
                on_batch(count)
            if should_stop is not None and should_stop():
                break
        if check is not None:
            done = np.zeros(ready.grid.num_windows, dtype=bool)
            done[ids[:computed]] = True
            check.finish(lambda window_ids: table[torch.from_numpy(window_ids).to(device)], done)
        rows = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(device)
        return table[rows].cpu(), computed


def gather_shards(
    table: torch.Tensor,
    shards: Sequence[np.ndarray],
    results: Sequence[tuple[torch.Tensor, int]],
) -> np.ndarray:
    """Each shard's computed rows (`compute_shard`'s results, one per shard of
    window ids) into their rows of `table` (windows x outputs); the ids computed."""
    done = []
    for ids, (rows, computed) in zip(shards, results):
        if computed == 0:
            continue
        index = torch.from_numpy(np.ascontiguousarray(ids[:computed], dtype=np.int64))
        table[index.to(table.device)] = rows[:computed].to(table.device)
        done.append(ids[:computed])
    return np.concatenate(done) if done else np.zeros(0, dtype=np.int64)


def run_sharded(
    prepared: Sequence[PreparedOcclusion],
    targets: Sequence[Any],
    shards: Sequence[np.ndarray],
    batch_size: Callable[[PreparedOcclusion], int],
    on_batch: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    behaviours: Sequence[BatchBehaviour | None] | None = None,
) -> list[tuple[torch.Tensor, int]]:
    """The rows of each shard of window ids (`compute_shard`'s results), shard i
    computed on prepared device i, one thread per device; every shard stops
    between batches once `should_stop()` or another shard has failed."""
    results: list[tuple[torch.Tensor, int] | None] = [None] * len(prepared)
    errors: list[BaseException] = []

    def stop() -> bool:
        return bool(errors) or (should_stop is not None and should_stop())

    def work(index: int) -> None:
        ready = prepared[index]
        try:
            results[index] = compute_shard(
                ready,
                shards[index],
                targets[index],
                batch_size(ready),
                on_batch,
                stop,
                None if behaviours is None else behaviours[index],
            )
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(prepared))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]
