"""Where a data-set run writes its maps: one Zarr array, or one .npy per item.

Zarr (the default) because a data set of maps is one (N, H, W) array that others
read lazily and in parallel (`zarr.open`, xarray, dask, any Zarr v3 reader), and
because ranks write disjoint chunks without coordination: one chunk per item,
written atomically (Zarr's local store writes a temporary file and renames it), so
a chunk that exists is complete and a rerun skips it. Items never written read
as NaN. A safetensors file cannot grow item by item from several processes, and
a folder of .npy files has no shared index or metadata; it stays available
(`--format npy`) for data sets whose items differ in size.

Both stores keep `manifest.json` beside the maps: the run's settings, the item
names and the versions that computed them. A rerun with other settings into the
same folder is refused rather than mixing maps.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

#: The manifest's file, beside the maps.
MANIFEST_NAME = "manifest.json"


def versions() -> dict[str, str]:
    """Versions of what computes the maps, for the manifest."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("captum-krypton", "captum", "torch", "triton", "numpy", "zarr"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    import torch

    if torch.cuda.is_available():
        found["cuda"] = str(torch.version.cuda)
        found["gpu"] = torch.cuda.get_device_name()
    return found


def check_or_write_manifest(
    out: Path, manifest: dict[str, Any], any_written: Callable[[], bool]
) -> bool:
    """Write `manifest` into `out`, or check that the one there has the same
    settings and items. Returns whether the store must be laid out afresh.

    Raises ValueError for a folder that holds other files but no manifest (it is
    not a data-set run's output: its files would be taken for maps), and for a
    manifest of other settings or items once any map was written under it (a
    run that failed before writing one is simply replaced). Called by one
    process only."""
    path = out / MANIFEST_NAME
    if path.exists():
        existing = json.loads(path.read_text())
        same = existing.get("settings") == manifest["settings"]
        if same and existing.get("items") == manifest["items"]:
            return False
        if any_written():
            if not same:
                raise ValueError(
                    f"{out} holds maps computed with other settings "
                    f"({existing.get('settings')}); use another --out, or the same "
                    "settings to resume"
                )
            raise ValueError(f"{out} holds maps of other items; use another --out")
    elif any(out.iterdir()):
        raise ValueError(
            f"{out} is not empty and holds no {MANIFEST_NAME} of a data-set run: "
            "use a new or empty folder for --out"
        )
    manifest = dict(manifest, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(manifest, indent=1))
    os.replace(temporary, path)
    return True


class NpyFiles:
    """One (H, W) .npy per item, named after its input file where it has one,
    else NNNNNN.npy by index; written to a temporary name and renamed into place."""

    format = "npy"

    def __init__(self, out: Path, names: list[str]):
        self.out = out
        self.names = names

    def create(self, first_shape: tuple[int, ...], afresh: bool) -> None:
        """Nothing to lay out ahead: each item is its own file."""

    def open(self) -> None:
        """Nothing to open."""

    def path(self, index: int) -> Path:
        return self.out / f"{self.names[index]}.npy"

    def done(self, index: int) -> bool:
        return self.path(index).exists()

    def any_done(self) -> bool:
        return any(self.path(i).exists() for i in range(len(self.names)))

    def write(self, index: int, attribution: np.ndarray, target: int, rank: int) -> None:
        path = self.path(index)
        temporary = path.with_name(f".{path.name}.rank{rank}.tmp")
        with open(temporary, "wb") as f:
            np.save(f, attribution)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)

    def remove_partial(self, rank: int) -> None:
        """Temporary files a killed run of this rank left."""
        for stale in self.out.glob(f".*.rank{rank}.tmp"):
            stale.unlink()


class ZarrArrays:
    """`OUT/attributions`, float32 (N, *spatial) with one chunk per item (NaN
    where not computed), and `OUT/targets`, int64 (N,) (-1 where not computed),
    in one Zarr v3 group."""

    format = "zarr"

    def __init__(self, out: Path, names: list[str]):
        self.out = out
        self.names = names
        self.maps: Any = None
        self.targets: Any = None

    @staticmethod
    def _zarr() -> Any:
        try:
            import zarr
        except ImportError as exc:
            raise ImportError(
                "writing maps as a Zarr array needs zarr>=3: pip install 'captum-krypton[dataset]'"
                ", or pass --format npy"
            ) from exc
        return zarr

    def create(self, first_shape: tuple[int, ...], afresh: bool) -> None:
        """Lay out the arrays for items of spatial shape `first_shape`: kept if
        already there, unless `afresh` (a new manifest: nothing written under
        the old one). Called by one process only."""
        zarr = self._zarr()
        group = zarr.open_group(str(self.out), mode="a")
        shape = (len(self.names), *first_shape)
        if "attributions" in group and not afresh:
            existing = tuple(group["attributions"].shape)
            if existing != shape:
                raise ValueError(f"{self.out} holds maps of shape {existing}, not {shape}")
            return
        maps = group.create_array(
            "attributions",
            shape=shape,
            chunks=(1, *first_shape),
            dtype="float32",
            fill_value=float("nan"),
            overwrite=True,
            # an all-NaN map is still a written item: its chunk marks it done
            config={"write_empty_chunks": True},
        )
        maps.attrs["item_names"] = self.names
        group.create_array(
            "targets",
            shape=(len(self.names),),
            chunks=(1,),
            dtype="int64",
            fill_value=-1,
            overwrite=True,
        )

    def open(self) -> None:
        zarr = self._zarr()
        group = zarr.open_group(str(self.out), mode="r+")
        self.maps, self.targets = group["attributions"], group["targets"]

    def _chunk_file(self, index: int) -> Path:
        key = self.maps.metadata.encode_chunk_key((index,) + (0,) * (self.maps.ndim - 1))
        return self.out / "attributions" / key

    def done(self, index: int) -> bool:
        return self._chunk_file(index).exists()

    def any_done(self) -> bool:
        chunks = self.out / "attributions" / "c"
        return chunks.is_dir() and any(chunks.iterdir())

    def write(self, index: int, attribution: np.ndarray, target: int, rank: int) -> None:
        if tuple(attribution.shape) != tuple(self.maps.shape[1:]):
            raise ValueError(
                f"item {self.names[index]} gives a map of shape {attribution.shape}, the store "
                f"holds {tuple(self.maps.shape[1:])}: items of several sizes need --format npy"
            )
        self.targets[index] = target  # before the map, whose chunk marks the item done
        self.maps[index] = attribution

    def remove_partial(self, rank: int) -> None:
        """Nothing to do: a chunk is written whole (under a temporary name first)
        or not at all."""


def make_store(kind: str, out: Path, names: list[str]) -> NpyFiles | ZarrArrays:
    if kind == "zarr":
        return ZarrArrays(out, names)
    if kind == "npy":
        return NpyFiles(out, names)
    raise ValueError(f"format must be 'zarr' or 'npy', not {kind!r}")
