"""Data-set runs on one GPU and on several: `captum-krypton attribute` timed as a
user runs it, in one process and under torchrun, from start to exit.

    python benchmarks/dataset_scaling.py --model vgg16 [--images 1000] [--stride 4]
        [--window 16] [--processes 2] [--append]

Writes `--images` random 224 x 224 images as .npy files, then runs the command
on the model (torchvision, weights=None, seeded, so every process builds the
same model) with target 0: first once on two images (this fills Triton's cache
and the kernel-choice cache, as any earlier run on the machine would), then on
cuda:0 alone (one process), then with `torchrun --nproc_per_node=P` and with the
command's own `--nproc-per-node P` (this process is rank 0) for each P of
--processes; then, with TF32 off, one process and P processes on the first
--exactness-images images, whose maps should agree to float32 rounding.
Reports wall time from process start to exit (imports, model, cuDNN's search
and everything else included), each rank's own account (ready, first item,
total) and the speedup; checks that the runs wrote the same maps.
Results go to benchmarks/results/dataset_scaling.json, one entry per model
(--append keeps the other models' entries).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision


def _seeded(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None)


def seeded_vgg16() -> torch.nn.Module:
    """vgg16 with the same random weights in every process."""
    return _seeded("vgg16")


def seeded_resnet50() -> torch.nn.Module:
    """resnet50 with the same random weights in every process."""
    return _seeded("resnet50")


def write_images(directory: Path, count: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        np.save(directory / f"{i:05d}.npy", rng.standard_normal((3, 224, 224), dtype=np.float32))


def run_command(
    launcher: list[str], data: Path, out: Path, args, env: dict, extra: tuple[str, ...] = ()
) -> dict:
    command = [
        *launcher,
        "captum_krypton",
        "attribute",
        "--model",
        f"benchmarks.dataset_scaling:seeded_{args.model}",
        "--data",
        str(data),
        "--out",
        str(out),
        "--window",
        str(args.window),
        "--stride",
        str(args.stride),
        "--target",
        "0",
        *extra,
    ]
    started = time.perf_counter()
    finished = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        sys.stderr.write(finished.stdout[-5000:] + finished.stderr[-5000:])
        raise SystemExit(f"{' '.join(command)} failed")
    ranks = {}
    pattern = (
        r"rank (\d+): wrote (\d+) items; ([\d.]+) s since start "
        r"\(ready ([\d.]+) s, first item ([\d.]+|none) s?\)"
    )
    for rank, items, total, ready, first in re.findall(pattern, finished.stdout):
        ranks[rank] = {
            "items": int(items),
            "seconds_since_start": float(total),
            "ready_seconds": float(ready),
            "first_item_seconds": None if first == "none" else float(first),
        }
    return {"wall_seconds": wall, "ranks": ranks}


def read_maps(out: Path) -> np.ndarray:
    import zarr

    return zarr.open_group(str(out), mode="r")["attributions"][:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("vgg16", "resnet50"), default="vgg16")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument(
        "--processes",
        default=str(torch.cuda.device_count() or 2),
        help="comma-separated torchrun process counts (default: one per GPU)",
    )
    parser.add_argument(
        "--exactness-images",
        type=int,
        default=40,
        help="images compared between one process and several with TF32 off (0: none)",
    )
    parser.add_argument(
        "--launchers",
        default="torchrun,nproc_per_node",
        help="comma-separated: torchrun and/or nproc_per_node (the command's own)",
    )
    parser.add_argument("--append", action="store_true", help="keep other models' entries")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dataset_scaling_"))
    data, warm = root / "data", root / "warm"
    write_images(data, args.images)
    write_images(warm, 2)
    path = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    one_process = [sys.executable, "-m"]

    run_command(one_process, warm, root / "warm_out", args, env)
    single = run_command(one_process, data, root / "one", args, dict(env, CUDA_VISIBLE_DEVICES="0"))
    reference = read_maps(root / "one")
    entry = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "model": args.model,
        "images": args.images,
        "window": args.window,
        "stride": args.stride,
        "one_process": single,
        "command": " ".join(["python", *sys.argv]),
    }
    scale = np.abs(reference).max(axis=(1, 2), keepdims=True).clip(min=1e-30)
    for processes in [int(p) for p in args.processes.split(",")]:
        launches = {
            "torchrun": (
                [sys.executable, "-m", "torch.distributed.run", "--standalone"]
                + [f"--nproc_per_node={processes}", "-m"],
                (),
            ),
            "nproc_per_node": (one_process, ("--nproc-per-node", str(processes))),
        }
        for name, (launcher, extra) in launches.items():
            if name not in args.launchers.split(","):
                continue
            out = root / f"{name}{processes}"
            shared = run_command(launcher, data, out, args, env, extra)
            maps = read_maps(out)
            shared["wall_speedup"] = single["wall_seconds"] / shared["wall_seconds"]
            shared["max_difference_over_max_abs"] = float((np.abs(maps - reference) / scale).max())
            shared["all_written"] = bool(not np.isnan(maps).any())
            entry.setdefault(name, {})[str(processes)] = shared
            print(
                f"{args.model}: {name} {processes} processes {shared['wall_seconds']:.1f} s "
                f"against {single['wall_seconds']:.1f} s: {shared['wall_speedup']:.2f}x",
                flush=True,
            )
    if args.exactness_images:  # TF32 off: the runs should agree to float32 rounding
        subset = root / "subset"
        subset.mkdir()
        for path in sorted(data.glob("*.npy"))[: args.exactness_images]:
            os.symlink(path, subset / path.name)
        alone = run_command(one_process, subset, root / "exact_one", args, env, ("--no-tf32",))
        extra = ("--no-tf32", "--nproc-per-node", args.processes.split(",")[-1])
        together = run_command(one_process, subset, root / "exact_all", args, env, extra)
        one, every = read_maps(root / "exact_one"), read_maps(root / "exact_all")
        entry["tf32_off"] = {
            "images": args.exactness_images,
            "one_process_seconds": alone["wall_seconds"],
            "nproc_per_node_seconds": together["wall_seconds"],
            "max_difference_over_max_abs": float(
                (np.abs(one - every) / np.abs(one).max(axis=(1, 2), keepdims=True)).max()
            ),
        }
    print(json.dumps(entry, indent=2))
    os.makedirs(args.out, exist_ok=True)
    target = Path(args.out) / "dataset_scaling.json"
    results = {}
    if args.append and target.exists():
        results = json.loads(target.read_text())
        if "model" in results:  # the older single-entry layout
            results = {}
    results[args.model] = entry
    target.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
