"""Data-set runs: attributions of every item of a data set, sharded over the
ranks of torch.distributed (launched with torchrun), one .npy file per item.

Item i goes to rank i % world_size. The window spans every channel, so all
channels of a map are equal: one map over the spatial dims is saved per item,
named after the item's file for a directory of .npy images (`cat.npy` ->
`OUT/cat.npy`), else `OUT/NNNNNN.npy` by index. Each result is written to a
temporary file and renamed into place, so a file under its final name is always complete; a
rerun skips items whose file exists, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


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


def start_rank() -> Rank:
    """Join torch.distributed when launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    index = dist.get_rank() if dist.is_initialized() else 0
    return Rank(index, world, device)


def item_path(out: Path, index: int, images: Any = None) -> Path:
    """Where item `index`'s map goes: named after its input file where it has one."""
    files = getattr(images, "files", None)
    if files is not None:
        return out / f"{Path(files[index]).stem}.npy"
    return out / f"{index:06d}.npy"


def save_atomically(path: Path, array: np.ndarray, rank: int) -> None:
    """Write to a temporary name in the same directory, then rename into place."""
    temporary = path.with_name(f".{path.name}.rank{rank}.tmp")
    with open(temporary, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def run(
    model_spec: str,
    data_spec: str,
    out: str,
    window: int,
    stride: int,
    target: str = "label",
    log: Callable[[str], None] = print,
    baseline: float = 0.0,
    *,
    make_occlusion: Callable[[nn.Module], Any],
) -> int:
    """Attribute this rank's share of the data set; returns items written now.
    `make_occlusion(model)` gives what attributes: an object with Captum's
    `Occlusion.attribute` (the command line passes IncrementalOcclusion).
    `baseline`: the value occluded positions take (Captum's `baselines`).
    Ctrl-C stops between items with one line per rank; the same call resumes."""
    rank = start_rank()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f".*.rank{rank.index}.tmp"):  # left by a killed run
        stale.unlink()
    model = load_object(model_spec).to(rank.device).eval()
    images, labels = load_data(data_spec)
    if target == "label" and labels is None:
        raise ValueError("the data has no labels: pass --target top or a class index")
    occlusion = make_occlusion(model)
    mine = [i for i in range(len(images)) if i % rank.world == rank.index]
    todo = [i for i in mine if not item_path(out_dir, i, images).exists()]
    log(f"rank {rank.index}/{rank.world}: {len(mine)} items, {len(mine) - len(todo)} done before")
    started = time.perf_counter()
    try:
        for done, i in enumerate(todo, 1):
            inputs = images[i][None].to(rank.device)
            if target == "label":
                item_target = int(labels[i])
            elif target == "top":
                with torch.no_grad():
                    item_target = int(model(inputs).argmax(1)[0])
            else:
                item_target = int(target)
            channels = inputs.shape[1]
            attribution = occlusion.attribute(
                inputs,
                sliding_window_shapes=(channels, window, window),
                strides=(channels, stride, stride),
                target=item_target,
                baselines=baseline,
            )
            spatial = attribution[0, 0].cpu().numpy()  # every channel holds the same map
            save_atomically(item_path(out_dir, i, images), spatial, rank.index)
            elapsed = time.perf_counter() - started
            log(f"rank {rank.index}: {done}/{len(todo)} items, {elapsed:.1f} s")
    except KeyboardInterrupt:
        finished = sum(item_path(out_dir, i, images).exists() for i in mine)
        log(
            f"rank {rank.index}: interrupted, {finished}/{len(mine)} items written; "
            "the same command resumes"
        )
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return len(todo)
