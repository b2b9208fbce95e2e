"""The windows of one call shared over several devices (`devices=`), stage by
stage: the run (engine/progressive.py) hands each stage's window ids to
`ShardedCall.compute`, which splits them into one shard per device.

On several GPUs this process computes the first device's shard and a worker
process each other's (parallel/workers.py); otherwise (CPU devices, or workers
unavailable) one thread per device in this process (parallel/devices.py).
"""

from __future__ import annotations

import dataclasses
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
from captum_krypton.parallel.workers import DeviceWorker, ShardJob, WorkerPool, WorkerUnavailable
from captum_krypton.plan import EXACT, PlanApproximation


def uses_workers(devices: Sequence[torch.device]) -> bool:
    """Worker processes for `devices=`: when it names several different GPUs."""
    cuda = [d for d in devices if d.type == "cuda"]
    return len(cuda) == len(devices) > 1 and len(set(cuda)) == len(cuda)


@dataclass
class ShardedCall:
    """One call prepared on the devices of this process, with the workers (one
    per device after the first, or none) that compute the other shards; its
    `compute` shares the windows of any stage over every device."""

    arguments: CaptumArguments
    settings: EngineSettings
    #: Every device of the call, this process's first.
    devices: tuple[torch.device, ...]
    #: One per device computed in this process: the first, or all without workers;
    #: prepared with `first_pass`, as a one-device call prepares its first pass.
    prepared: list[PreparedOcclusion]
    workers: list[DeviceWorker]
    pool: WorkerPool
    #: Numbers the call for the workers, which prepare it once for all its stages.
    number: int = 0
    first_pass: PlanApproximation = EXACT

    @property
    def first(self) -> PreparedOcclusion:
        """The call prepared on the first device, where the run's table lives."""
        return self.prepared[0]

    def compute(
        self,
        approximation: PlanApproximation,
        ids: np.ndarray,
        table: torch.Tensor,
        on_batch: Callable[[int], None] | None,
        should_stop: Callable[[], bool],
    ) -> np.ndarray:
        """Windows `ids` with the plan approximations `approximation` (tau, frozen
        global context), in one contiguous shard per device,
        into their rows of `table`; returns the ids computed (all, unless
        `should_stop()` stopped the shards). `on_batch` gets each batch's window
        count, from several threads. Where the windows are exact (an exact plan), each
        shard checks itself against the forward function on its own device."""
        shards = np.array_split(np.asarray(ids, dtype=np.int64), len(self.devices))
        prepared = [
            self.settings.choose_kernels(ready.with_approximation(approximation))
            for ready in self.prepared
        ]
        checked = prepared[0].plan.exact
        if self.workers:
            results = self._compute_with_workers(
                prepared[0], approximation, shards, on_batch, should_stop, checked
            )
        else:
            targets = [to_device(self.arguments.target, d) for d in self.devices]
            behaviours = [ready.batch_behaviour if checked else None for ready in prepared]
            results = run_sharded(
                prepared,
                targets,
                shards,
                self.settings.batch_size,
                on_batch,
                should_stop,
                behaviours,
            )
        return gather_shards(table, shards, results)

    def close(self) -> None:
        """The call is over: the workers let its preparation go."""
        self.pool.end_call(self.workers)

    def _compute_with_workers(
        self,
        ready: PreparedOcclusion,
        approximation: PlanApproximation,
        shards: list[np.ndarray],
        on_batch: Callable[[int], None] | None,
        should_stop: Callable[[], bool],
        checked: bool,
    ) -> list[tuple[torch.Tensor, int]]:
        """The first shard here, the others on the workers (those with no window
        in this stage stay idle); the results in the order of `shards`."""
        target = to_device(self.arguments.target, self.devices[0])
        busy = [i for i, shard in enumerate(shards[1:]) if len(shard)]

        def local(poll: Callable[[], None], stop: Callable[[], bool]) -> Any:
            def on_local_batch(count: int) -> None:
                if on_batch is not None:
                    on_batch(count)
                poll()

            batch = self.settings.batch_size(ready)
            behaviour = ready.batch_behaviour if checked else None
            return compute_shard(ready, shards[0], target, batch, on_local_batch, stop, behaviour)

        job = ShardJob(
            self.number,
            arguments_on(self.arguments, torch.device("cpu")),
            self.settings,
            first_pass=self.first_pass,
            approximation=approximation,
        )
        local_result, remote_results = self.pool.run(
            [self.workers[i] for i in busy],
            job,
            [shards[1 + i] for i in busy],
            local,
            on_batch,
            should_stop,
        )
        results = [local_result] + [(torch.zeros(0), 0)] * len(self.workers)
        for i, result in zip(busy, remote_results):
            results[1 + i] = result
        return results


class ShardedOcclusion:
    """What calls with `devices=` keep between them: the model's replicas, their
    traces and the worker processes."""

    def __init__(self) -> None:
        self._replicas = Replicas()
        self._preparers: dict[nn.Module, Preparer] = {}
        self.pool = WorkerPool()
        self._calls = 0

    def prepare(
        self,
        forward_func: Callable[..., Any],
        arguments: CaptumArguments,
        settings: EngineSettings,
        devices: tuple[torch.device, ...],
        warn: Callable[[str], None],
        first_pass: PlanApproximation = EXACT,
    ) -> ShardedCall:
        """`arguments` prepared on `devices`, with the first pass's plan
        approximations `first_pass`; `warn` hears why workers are not used where they would be.
        Raises Captum's assertions for bad windows, and UnsupportedForIncremental
        or SelfCheckFailed where the engine does not apply."""
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
            ready = preparer.prepare(replica, arguments_on(arguments, device), settings, first_pass)
            prepared.append(settings.choose_kernels(ready))
        self._calls += 1
        return ShardedCall(
            arguments, settings, devices, prepared, workers, self.pool, self._calls, first_pass
        )

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
