"""One worker process per extra GPU for `devices=`.

Threads of one process do not keep several GPUs busy with this engine: a window
batch is hundreds of small launches from Python, and measured on two GPUs the
threads reached 1.2-1.3x of one GPU, CUDA graphs included, while one process
per GPU reached 1.9x. So the caller's process computes the first device's shard
and a worker process computes each other device's, all at once.

A worker is a plain `python -c` process running `serve` (no fork, no
re-import of the caller's `__main__`) that sees only its own GPU and
talks through its stdin and stdout pipes as `multiprocessing` connections (its
prints go to stderr). It gets the model once per
model version (`torch.save`, loaded straight onto its GPU), then per stage of a
call (exact occlusion has one; drill-down, calibration and the self-check add
more) the inputs, the stage's projective-field threshold and its shard of window
ids, and sends back a progress message per batch and its rows of the window
table. It prepares a call once, at its first stage, and keeps that until the
call ends. It exits when told, or when the caller's process goes away.
"""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
import traceback
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch
from torch import nn

from captum_krypton.engine.call import CaptumArguments
from captum_krypton.engine.occlusion import PreparedOcclusion
from captum_krypton.engine.preparer import Preparer
from captum_krypton.engine.settings import EngineSettings
from captum_krypton.parallel.devices import compute_shard
from captum_krypton.plan import EXACT, PlanApproximation

#: The worker's program (not `-m` of this module, which the package imports).
_WORKER_MAIN = "import sys; from captum_krypton.parallel.workers import serve; serve(sys.argv[1])"


class WorkerUnavailable(RuntimeError):
    """A worker could not be started or could not load the model (a model class
    that its process cannot import, say): the caller falls back to threads."""


@dataclass
class ShardJob:
    """What a worker needs for its shard of one stage of a call (tensors on the CPU)."""

    #: The call it belongs to: the worker prepares it once, with `first_pass` as the
    #: caller's first device did, and keeps that for the call's other stages.
    call: int
    arguments: CaptumArguments
    settings: EngineSettings
    first_pass: PlanApproximation = EXACT
    #: The stage's plan approximations (tau, frozen global context) and the
    #: worker's shard of its windows.
    approximation: PlanApproximation = EXACT
    window_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    #: The stage's number, which a stop message names (set by `WorkerPool.run`).
    run: int = 0
    math_settings: dict = field(default_factory=dict)


def math_settings() -> dict:
    """The caller's float32 math choices (TF32), which the workers copy so that
    every shard rounds as a one-device run would."""
    return {
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
    }


def _apply_math_settings(settings: dict) -> None:
    if "cudnn_allow_tf32" in settings:
        torch.backends.cudnn.allow_tf32 = settings["cudnn_allow_tf32"]
        torch.backends.cuda.matmul.allow_tf32 = settings["matmul_allow_tf32"]
        torch.backends.cudnn.deterministic = settings["cudnn_deterministic"]


def _to_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes, device: torch.device | str) -> Any:
    return torch.load(io.BytesIO(data), map_location=device, weights_only=False)


def save_model(module: nn.Module) -> bytes:
    """The model as a worker loads it: saved once per version for every worker."""
    try:
        return _to_bytes(module)
    except Exception as exc:
        raise WorkerUnavailable(f"the model cannot be saved for a worker: {exc}") from exc


def _visible_device(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry of this process's cuda:`index`."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return str(index)
    return visible.split(",")[index].strip()


class DeviceWorker:
    """A worker process computing shards on one device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.model_key: tuple | None = None
        # The caller's import path, so that the model's classes import the same way.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
        worker_device = "cpu"
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            env["CUDA_VISIBLE_DEVICES"] = _visible_device(index)
            worker_device = "cuda:0"
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_MAIN, worker_device],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                start_new_session=True,  # Ctrl-C reaches the caller, which stops the worker
            )
        except OSError as exc:
            raise WorkerUnavailable(f"the worker for {device} did not start: {exc}") from exc
        assert self.process.stdin is not None and self.process.stdout is not None
        self.sender = Connection(os.dup(self.process.stdin.fileno()), readable=False)
        self.receiver = Connection(os.dup(self.process.stdout.fileno()), writable=False)
        self.process.stdin.close()
        self.process.stdout.close()

    def receive(self) -> tuple[str, Any]:
        try:
            return self.receiver.recv()
        except (EOFError, OSError) as exc:
            raise RuntimeError(f"the worker for {self.device} stopped") from exc

    def load_model(self, payload: bytes, key: tuple) -> None:
        """Send the saved model (`save_model`) unless this version is already there."""
        if self.model_key == key:
            return
        try:
            self.sender.send_bytes(b"model" + payload)
            kind, detail = self.receive()
        except (OSError, RuntimeError) as exc:
            kind, detail = "failed", exc
        if kind != "ready":
            raise WorkerUnavailable(f"the worker for {self.device} cannot load the model: {detail}")
        self.model_key = key

    def start(self, job: ShardJob) -> None:
        self.sender.send_bytes(b"run__" + _to_bytes(job))

    def cancel(self, run: int) -> None:
        self.sender.send_bytes(b"stop_" + str(run).encode())

    def end_call(self) -> None:
        """The call is over: the worker lets its preparation go."""
        self.sender.send_bytes(b"end__")

    def close(self) -> None:
        try:
            self.sender.send_bytes(b"exit_")
            self.process.wait(timeout=10)
        except Exception:
            self.process.kill()
        finally:
            self.sender.close()
            self.receiver.close()


class WorkerPool:
    """Workers kept between calls, one per device; all are stopped after a call
    that failed midway, so that no worker is left mid-shard."""

    def __init__(self) -> None:
        self._workers: dict[tuple[int, torch.device], DeviceWorker] = {}
        # also at interpreter exit, before the subprocess machinery is torn down
        self._finalizer = weakref.finalize(self, _close_workers, self._workers)
        self._runs = 0
        #: Why workers could not serve the model version `unavailable_for`.
        self.unavailable: str | None = None
        self.unavailable_for: tuple | None = None

    def workers(
        self, devices: Sequence[torch.device], module: nn.Module, key: tuple
    ) -> list[DeviceWorker]:
        """Workers for `devices` (started when missing), holding this model version."""
        slots = list(enumerate(devices))
        payload = None
        try:
            for slot in slots:
                if slot not in self._workers:
                    self._workers[slot] = DeviceWorker(slot[1])
                if self._workers[slot].model_key != key:
                    payload = payload or save_model(module)
                    self._workers[slot].load_model(payload, key)
        except WorkerUnavailable as exc:
            self.close()
            self.unavailable, self.unavailable_for = str(exc), key
            raise
        return [self._workers[slot] for slot in slots]

    def run(
        self,
        workers: Sequence[DeviceWorker],
        job: ShardJob,
        shards: Sequence[np.ndarray],
        local: Callable[[Callable[[], None], Callable[[], bool]], tuple[torch.Tensor, int]],
        on_batch: Callable[[int], None] | None,
        should_stop: Callable[[], bool],
    ) -> tuple[tuple[torch.Tensor, int], list[tuple[torch.Tensor, int]]]:
        """Start every worker's shard of one stage (`job` with each of `shards`,
        one per worker, as its window ids), compute the local one with
        `local(poll, should_stop)` (poll forwards the workers' progress and a
        cancel), then collect the workers' rows."""
        self._runs += 1
        run = self._runs
        pending = set(range(len(workers)))
        results: list[tuple[torch.Tensor, int] | None] = [None] * len(workers)
        cancelled = False
        errors: list[BaseException] = []

        def receive(index: int, block: bool) -> None:
            worker = workers[index]
            while index in pending and (block or worker.receiver.poll()):
                kind, payload = worker.receive()
                if kind == "batch":
                    if on_batch is not None:
                        on_batch(payload)
                elif kind == "done":
                    results[index] = _from_bytes(payload, "cpu")
                    pending.discard(index)
                elif kind == "error":
                    errors.append(payload)
                    pending.discard(index)

        def poll() -> None:
            nonlocal cancelled
            for index in list(pending):
                receive(index, block=False)
            if not cancelled and (errors or should_stop()):
                cancelled = True
                for index in pending:
                    workers[index].cancel(run)

        try:
            for worker, ids in zip(workers, shards):
                shard = dataclasses.replace(
                    job, window_ids=ids, run=run, math_settings=math_settings()
                )
                worker.start(shard)
            local_result = local(poll, lambda: bool(errors) or should_stop())
            poll()
            for index in list(pending):
                receive(index, block=True)
        except BaseException:
            self.close()  # workers may be mid-shard: start afresh next call
            raise
        if errors:
            raise errors[0]
        return local_result, results  # type: ignore[return-value]

    def end_call(self, workers: Sequence[DeviceWorker]) -> None:
        """Tell `workers` that their call is over (a worker that has stopped is
        found out by the next call)."""
        for worker in workers:
            try:
                worker.end_call()
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        _close_workers(self._workers)


def _close_workers(workers: dict) -> None:
    for worker in workers.values():
        worker.close()
    workers.clear()


# ---------------------------------------------------------------- worker side
def _sendable(exc: BaseException) -> BaseException:
    """The exception itself if it pickles, else a RuntimeError with its text."""
    try:
        _from_bytes(_to_bytes(exc), "cpu")
        return exc
    except Exception:
        return RuntimeError("".join(traceback.format_exception(exc)))


def _run_job(
    sender: Connection,
    receiver: Connection,
    model: nn.Module,
    preparer: Preparer,
    job: ShardJob,
    calls: dict[int, PreparedOcclusion],
) -> None:
    """One stage's shard: the call prepared as the caller's first device has it
    (kept in `calls` for the call's later stages), at the stage's threshold; the
    shard checks itself where its windows are exact."""
    _apply_math_settings(job.math_settings)
    settings = job.settings
    first = calls.get(job.call)
    if first is None:
        calls.clear()  # an earlier call's
        first = preparer.prepare(model, job.arguments, settings, job.first_pass)
        calls[job.call] = first
    ready = settings.choose_kernels(first.with_approximation(job.approximation))
    stop = False

    def on_batch(count: int) -> None:
        nonlocal stop
        sender.send(("batch", count))
        while receiver.poll():
            message = receiver.recv_bytes()
            if message == b"stop_" + str(job.run).encode():
                stop = True

    result = compute_shard(
        ready,
        job.window_ids,
        job.arguments.target,
        settings.batch_size(ready),
        on_batch,
        lambda: stop,
        ready.batch_behaviour if ready.plan.exact else None,
    )
    sender.send(("done", _to_bytes(result)))


def serve(device_name: str) -> None:
    """The worker's loop: a model, then shards, until told to stop. Messages in
    are bytes with a 5-byte kind; messages out are (kind, payload) pickles."""
    channel = os.dup(1)  # the caller reads stdout: prints go to stderr instead
    os.dup2(2, 1)
    receiver = Connection(os.dup(0), writable=False)
    sender = Connection(channel, readable=False)
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model: nn.Module | None = None
    preparer = Preparer()
    calls: dict[int, PreparedOcclusion] = {}  # the call being served, prepared
    while True:
        try:
            message = receiver.recv_bytes()
        except (EOFError, OSError):  # the caller's process is gone
            return
        kind, payload = message[:5], message[5:]
        if kind == b"exit_":
            return
        if kind == b"stop_":  # arrived after its shard was done
            continue
        if kind == b"end__":
            calls.clear()
            continue
        try:
            if kind == b"model":
                model, preparer = _from_bytes(payload, device), Preparer()
                calls.clear()
                sender.send(("ready", None))
            elif kind == b"run__":
                if model is None:
                    raise RuntimeError("no model was sent")
                _run_job(sender, receiver, model, preparer, _from_bytes(payload, device), calls)
        except BaseException as exc:  # reported to the caller, which raises it
            sender.send(("error" if kind == b"run__" else "failed", _sendable(exc)))
            if isinstance(exc, KeyboardInterrupt):
                return
