"""The windows of one call shared over several devices (`devices=`).

On several GPUs this process computes the first device's shard and a worker
process each other's (parallel/workers.py); otherwise (CPU devices, or workers
unavailable) one thread per device in this process (parallel/devices.py).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from captum_krypton.capture import resolve_module
from captum_krypton.engine.call import CaptumArguments
from captum_krypton.engine.occlusion import PreparedOcclusion
from captum_krypton.engine.preparer import Preparer
from captum_krypton.engine.settings import EngineSettings
from captum_krypton.parallel.devices import (
    Replicas,
    arguments_on,
    compute_shard,
    gather_shards,
    run_sharded,
    state_key,
    to_device,
)
from captum_krypton.parallel.workers import DeviceWorker, WorkerPool, WorkerUnavailable


def uses_workers(devices: Sequence[torch.device]) -> bool:
    """Worker processes for `devices=`: when it names several different GPUs."""
    cuda = [d for d in devices if d.type == "cuda"]
    return len(cuda) == len(devices) > 1 and len(set(cuda)) == len(cuda)


@dataclass
class ShardedCall:
    """One call prepared on the devices of this process, with the workers (one
    per device after the first, or none) that compute the other shards."""

    arguments: CaptumArguments
    settings: EngineSettings
    #: Every device of the call, this process's first.
    devices: tuple[torch.device, ...]
    #: One per device computed in this process: the first, or all without workers.
    prepared: list[PreparedOcclusion]
    workers: list[DeviceWorker]
    pool: WorkerPool

    @property
    def total(self) -> int:
        return self.prepared[0].grid.num_windows

    def run(
        self, on_batch: Callable[[int], None], cancel: threading.Event | None
    ) -> tuple[torch.Tensor, int]:
        """The attribution, on the input's device, and how many windows were
        computed: all, unless `cancel` was set (then positions that no computed
        window covers are NaN). `on_batch` gets each batch's window count, from
        several threads."""
        if self.workers:
            diffs, dtype, done = self._run_with_workers(on_batch, cancel)
        else:
            targets = [to_device(self.arguments.target, d) for d in self.devices]
            behaviours = [ready.batch_behaviour for ready in self.prepared]
            diffs, dtype, done = run_sharded(
                self.prepared, targets, self.settings.batch_size, on_batch, cancel, behaviours
            )
        first = self.prepared[0]
        if done.all():
            result = first.attribution_from(diffs, dtype)
        else:
            result = first.partial_attribution(diffs, done, dtype)
        return result.to(self.arguments.formatted_inputs[0].device), int(done.sum())

    def _run_with_workers(
        self, on_batch: Callable[[int], None], cancel: threading.Event | None
    ) -> tuple[torch.Tensor, torch.dtype, np.ndarray]:
        shards = np.array_split(np.arange(self.total), len(self.devices))
        ready = self.prepared[0]
        target = to_device(self.arguments.target, self.devices[0])

        def local(poll: Callable[[], None], should_stop: Callable[[], bool]) -> Any:
            def on_local_batch(count: int) -> None:
                on_batch(count)
                poll()

            batch = self.settings.batch_size(ready)
            behaviour = ready.batch_behaviour
            return compute_shard(
                ready, shards[0], target, batch, on_local_batch, should_stop, behaviour
            )

        local_result, remote_results = self.pool.run(
            self.workers,
            arguments_on(self.arguments, torch.device("cpu")),
            self.settings,
            shards[1:],
            local,
            on_batch,
            lambda: cancel is not None and cancel.is_set(),
        )
        return gather_shards(self.total, shards, [local_result, *remote_results])


class ShardedOcclusion:
    """What calls with `devices=` keep between them: the model's replicas, their
    traces and the worker processes."""

    def __init__(self) -> None:
        self._replicas = Replicas()
        self._preparers: dict[nn.Module, Preparer] = {}
        self.pool = WorkerPool()

    def prepare(
        self,
        forward_func: Callable[..., Any],
        arguments: CaptumArguments,
        settings: EngineSettings,
        devices: tuple[torch.device, ...],
        warn: Callable[[str], None],
    ) -> ShardedCall:
        """`arguments` prepared on `devices`; `warn` hears why workers are not used
        where they would be. Raises Captum's assertions for bad windows, and
        UnsupportedForIncremental or SelfCheckFailed where the engine does not apply."""
        module = resolve_module(forward_func)
        workers = self._workers(module, devices, warn)
        local_devices = devices[:1] if workers else devices
        if settings.cuda_graphs is None:  # threads of one process feeding several GPUs
            cuda = sum(d.type == "cuda" for d in local_devices)
            settings = dataclasses.replace(settings, cuda_graphs=not workers and cuda > 1)
        prepared = []
        for device in local_devices:
            replica = self._replicas.on(module, device)
            preparer = self._preparers.setdefault(replica, Preparer())
            ready = preparer.prepare(replica, arguments_on(arguments, device), settings)
            prepared.append(settings.choose_kernels(ready))
        return ShardedCall(arguments, settings, devices, prepared, workers, self.pool)

    def _workers(
        self, module: nn.Module, devices: tuple[torch.device, ...], warn: Callable[[str], None]
    ) -> list[DeviceWorker]:
        """Workers for every device after the first, holding this model's version;
        none where `devices` does not call for them or they cannot serve it."""
        if not uses_workers(devices):
            return []
        key = state_key(module)
        try:
            if self.pool.unavailable_for == key:
                raise WorkerUnavailable(self.pool.unavailable)
            return self.pool.workers(devices[1:], module, key)
        except WorkerUnavailable as exc:
            warn(f"devices= runs in threads of this process: {exc}")
            return []

    def close(self) -> None:
        self.pool.close()
