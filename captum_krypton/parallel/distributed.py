"""Data-set runs: attributions of every item of a data set, shared over the
ranks of torch.distributed (launched with torchrun), written to one store.

Items are handed out one at a time from a counter in torch.distributed's store:
a rank takes the next item when it has finished its last, so ranks stay
balanced by what items really cost them (a slower GPU, a larger image), and the
largest items (by windows times pixels) go first so the run ends evenly. The
maps go to a Zarr array (one chunk per item) or one .npy per item
(parallel/map_store.py), with a manifest of settings and versions; a rerun skips
items already written, so a killed run resumes where it stopped.

Ranks share only a key-value store (torch.distributed's TCPStore): the list of
items and the counter. No process group is formed, so no rank waits for the
others to start, and no NCCL communicator is built for a run that never sends a
tensor.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from captum_krypton.engine.windows import WindowGrid
from captum_krypton.parallel.launch import LocalRanks
from captum_krypton.parallel.map_store import (
    NpyFiles,
    ZarrArrays,
    check_or_write_manifest,
    make_store,
    versions,
)

#: How long a rank waits on the store (for rank 0's list of items, say).
STORE_TIMEOUT = timedelta(hours=1)


def load_object(spec: str) -> Any:
    """`package.module:function` -> what calling the function returns."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"expected MODULE:FUNCTION, not {spec!r}")
    function: Callable[[], Any] = getattr(importlib.import_module(module_name), name)
    return function()


class NpyFolder:
    """A directory of images saved as .npy files, (C, H, W) each, read when used;
    labels from `labels.npy` (one per image, in file-name order) when present."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.files = sorted(p for p in self.directory.glob("*.npy") if p.name != "labels.npy")
        if not self.files:
            raise ValueError(f"no .npy images in {self.directory}")
        labels = self.directory / "labels.npy"
        self.labels = np.load(labels) if labels.exists() else None
        if self.labels is not None and len(self.labels) != len(self.files):
            raise ValueError(f"{labels} has {len(self.labels)} labels for {len(self.files)} images")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.load(self.files[index])).float()

    def shape(self, index: int) -> tuple[int, ...]:
        """The item's shape, read from its file's header only."""
        return tuple(np.load(self.files[index], mmap_mode="r").shape)


def load_data(spec: str) -> tuple[Any, Any]:
    """(images, labels) from a directory of .npy files or a MODULE:FUNCTION."""
    if Path(spec).is_dir():
        folder = NpyFolder(spec)
        return folder, folder.labels
    return load_object(spec)


@dataclass
class Rank:
    index: int
    world: int
    device: torch.device
    #: The key-value store the ranks share (None for one process).
    store: Any = None
    #: Whether this process serves the store (then it waits for the others).
    serves_store: bool = False
    #: Prefix of this run's keys in the store.
    prefix: str = "captum_krypton/"


def start_rank() -> Rank:
    """This rank, from the environment torchrun (or `--nproc-per-node`) sets;
    its GPU is cuda:LOCAL_RANK where there are GPUs. Several ranks share a
    TCPStore: torchrun's agent's where it offers one, else one served by rank 0,
    which does not wait for the others to connect (no process group is formed,
    so a rank starts work as soon as it is ready)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    index = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return Rank(index, world, device)
    serves = index == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size=None,
        is_master=serves,
        timeout=STORE_TIMEOUT,
        wait_for_workers=False,
    )
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "local")
    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return Rank(index, world, device, store, serves, f"captum_krypton/{run_id}/{restarts}/")


def item_names(images: Any) -> list[str]:
    """Each item's name: its input file's stem, else its index as NNNNNN."""
    files = getattr(images, "files", None)
    if files is not None:
        return [Path(f).stem for f in files]
    return [f"{i:06d}" for i in range(len(images))]


def item_shapes(images: Any) -> list[tuple[int, ...]] | None:
    """Every item's shape where it is known without loading the items (a tensor,
    a folder of .npy files, a list of tensors); else None."""
    if isinstance(images, torch.Tensor):
        return [tuple(images.shape[1:])] * len(images)
    if isinstance(images, NpyFolder):
        return [images.shape(i) for i in range(len(images))]
    if isinstance(images, (list, tuple)) and all(hasattr(x, "shape") for x in images):
        return [tuple(x.shape) for x in images]
    return None


def estimated_costs(
    shapes: list[tuple[int, ...]] | None, window: int, stride: int
) -> list[int] | None:
    """Windows times pixels per item of `shapes` (item_shapes); None when all
    items share one shape or the shapes are not known."""
    if shapes is None or len(set(shapes)) <= 1:
        return None
    costs = []
    for shape in shapes:
        dims = len(shape) - 1
        grid = WindowGrid(shape, (shape[0],) + (window,) * dims, (shape[0],) + (stride,) * dims)
        costs.append(grid.num_windows * math.prod(shape[1:]))
    return costs


class WorkQueue:
    """The items still to do, handed out one at a time to whichever rank asks
    first, through a counter in the ranks' store (one process: in order)."""

    def __init__(self, todo: list[int], rank: Rank):
        self.todo = todo
        self._next = 0
        self._rank = rank

    def next(self) -> int | None:
        """The next item to compute, or None when all are taken."""
        if self._rank.store is not None:
            position = int(self._rank.store.add(self._rank.prefix + "next_item", 1)) - 1
        else:
            position = self._next
            self._next += 1
        return self.todo[position] if position < len(self.todo) else None


def _shared_from_first_rank(rank: Rank, compute: Callable[[], Any]) -> Any:
    """`compute()` on rank 0, its result (or its error, raised) on every rank."""
    if rank.store is None:
        return compute()
    key = rank.prefix + "plan"
    if rank.index == 0:
        try:
            value = compute()
        except Exception as exc:  # every rank stops, not only the first
            rank.store.set(key, json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
            raise
        rank.store.set(key, json.dumps({"value": value}))
        return value
    payload = json.loads(rank.store.get(key))
    if "error" in payload:
        raise RuntimeError(f"the first rank could not start the run: {payload['error']}")
    return payload["value"]


def _wait_for_other_ranks(rank: Rank) -> None:
    """Keep the store up (rank 0 serves it) until every rank has said it is done."""
    key = rank.prefix + "ranks_done"
    rank.store.add(key, 1)
    while rank.serves_store and int(rank.store.add(key, 0)) < rank.world:
        time.sleep(0.05)


def _item_target(model: nn.Module, inputs: torch.Tensor, target: str, labels: Any, i: int) -> int:
    if target == "label":
        return int(labels[i])
    if target == "top":
        with torch.no_grad():
            return int(model(inputs).argmax(1)[0])
    return int(target)


def say(line: str) -> None:
    """Print one line in one write, so that the lines of ranks sharing a terminal
    don't mix."""
    sys.stdout.write(f"{line}\n")
    sys.stdout.flush()


def _quiet_after_interrupt() -> None:
    """After the first Ctrl-C, ignore more (a launcher passing it on, a second
    keypress): the rank says its line and stops without tracebacks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class _Job:
    """A rank's part of a run, once started."""

    rank: Rank
    images: Any
    labels: Any
    names: list[str]
    store: NpyFiles | ZarrArrays
    todo: list[int]
    model: nn.Module
    occlusion: Any


def _start(
    model_spec: str,
    data_spec: str,
    out_dir: Path,
    window: int,
    stride: int,
    target: str,
    baseline: float,
    make_occlusion: Callable[[nn.Module], Any],
    output_format: str,
) -> _Job:
    rank = start_rank()
    out_dir.mkdir(parents=True, exist_ok=True)
    images, labels = load_data(data_spec)
    if len(images) == 0:
        raise ValueError(f"{data_spec} holds no items")
    if target == "label" and labels is None:
        raise ValueError("the data has no labels: pass --target top or a class index")
    names = item_names(images)
    first_shape = tuple(images[0].shape)
    if window < 1 or stride < 1 or any(window > n for n in first_shape[1:]):
        raise ValueError(
            f"window {window} and stride {stride} must be at least 1, and the window no "
            f"larger than the items (the first is {first_shape})"
        )
    store = make_store(output_format, out_dir, names)
    # The model first: a model that fails to load leaves --out as it was.
    model = load_object(model_spec).to(rank.device).eval()

    def plan_the_run() -> list[int]:
        shapes = item_shapes(images)
        if output_format == "zarr" and shapes is not None and len(set(shapes)) > 1:
            raise ValueError(
                f"the items have several shapes ({sorted(set(shapes))[:3]}...): a Zarr "
                "array holds maps of one shape; pass --format npy"
            )
        settings = {
            "model": model_spec,
            "data": str(Path(data_spec).resolve()) if Path(data_spec).is_dir() else data_spec,
            "window": window,
            "stride": stride,
            "target": target,
            "baseline": baseline,
            "format": output_format,
            "tf32": bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32),
            "sliding_window_shapes": "(C,) + (window,) * spatial dims: every channel",
            "strides": "(C,) + (stride,) * spatial dims",
        }
        manifest = {
            "settings": settings,
            "items": names,
            "attribution": "Captum's Occlusion: target output of the input minus that "
            "of the occluded input, averaged over the windows covering each position",
            "versions": versions(),
        }
        afresh = check_or_write_manifest(out_dir, manifest, store.any_done)
        store.create(tuple(first_shape[1:]), afresh)
        store.open()
        todo = [i for i in range(len(names)) if not store.done(i)]
        costs = estimated_costs(shapes, window, stride)
        if costs is not None:  # largest first: the run's last items are short
            todo.sort(key=lambda i: -costs[i])
        return todo

    todo = _shared_from_first_rank(rank, plan_the_run)
    store.open()
    store.remove_partial(rank.index)
    return _Job(rank, images, labels, names, store, todo, model, make_occlusion(model))


def run(
    model_spec: str,
    data_spec: str,
    out: str,
    window: int,
    stride: int,
    target: str = "label",
    log: Callable[[str], None] = say,
    baseline: float = 0.0,
    *,
    make_occlusion: Callable[[nn.Module], Any],
    output_format: str = "zarr",
    local_ranks: LocalRanks | None = None,
) -> int:
    """Attribute the items of a data set that this rank takes; returns how many it
    wrote. `make_occlusion(model)` gives what attributes: an object with
    Captum's `Occlusion.attribute` (the command line passes IncrementalOcclusion).
    `baseline`: the value occluded positions take (Captum's `baselines`).
    `output_format`: "zarr" or "npy" (parallel/map_store.py). The window spans
    every channel, so one map over the spatial dims is kept per item.
    `local_ranks`: the other ranks, when this process launched them
    (parallel/launch.py); it then waits for them instead of a barrier, keeping
    the shared store (which it hosts) up until they are done. Ctrl-C, also
    while starting, stops with one line per rank; the same call resumes."""
    began = time.perf_counter()
    index = int(os.environ.get("RANK", "0"))  # until torch.distributed says
    try:
        job = _start(
            model_spec,
            data_spec,
            Path(out),
            window,
            stride,
            target,
            baseline,
            make_occlusion,
            output_format,
        )
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            _quiet_after_interrupt()
            log(f"rank {index}: interrupted while starting; the same command resumes")
        if local_ranks is not None:
            local_ranks.stop()
        raise
    rank, store = job.rank, job.store
    queue = WorkQueue(job.todo, rank)
    ready = time.perf_counter() - began
    log(
        f"rank {rank.index}/{rank.world}: {len(job.todo)} of {len(job.names)} items to do; "
        f"ready in {ready:.1f} s"
    )
    written, first_item, last_log = 0, None, 0.0
    try:
        while (i := queue.next()) is not None:
            item_start = time.perf_counter()
            inputs = job.images[i][None].to(rank.device)
            item_target = _item_target(job.model, inputs, target, job.labels, i)
            channels = inputs.shape[1]
            spatial = inputs.dim() - 2
            attribution = job.occlusion.attribute(
                inputs,
                sliding_window_shapes=(channels,) + (window,) * spatial,
                strides=(channels,) + (stride,) * spatial,
                target=item_target,
                baselines=baseline,
            )
            store.write(i, attribution[0, 0].cpu().numpy(), item_target, rank.index)
            written += 1
            now = time.perf_counter()
            first_item = first_item if first_item is not None else now - item_start
            if now - last_log >= 5.0:
                log(f"rank {rank.index}: {written} items, {now - began:.1f} s")
                last_log = now
            if local_ranks is not None:
                local_ranks.check()
        elapsed = time.perf_counter() - began
        first = f"{first_item:.1f} s" if first_item is not None else "none"
        log(
            f"rank {rank.index}: wrote {written} items; {elapsed:.1f} s since start "
            f"(ready {ready:.1f} s, first item {first})"
        )
        if local_ranks is not None:
            local_ranks.wait()  # their processes: also when one dies
        elif rank.store is not None:
            _wait_for_other_ranks(rank)
    except KeyboardInterrupt:
        _quiet_after_interrupt()
        finished = sum(store.done(i) for i in range(len(job.names)))
        log(
            f"rank {rank.index}: interrupted after writing {written} items; "
            f"{finished}/{len(job.names)} are written; the same command resumes"
        )
        if local_ranks is not None:
            local_ranks.stop()
        raise
    except BaseException:
        if local_ranks is not None:
            local_ranks.stop()
        raise
    return written
