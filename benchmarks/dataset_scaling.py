"""Data-set runs on one GPU and on every GPU: `captum-krypton attribute` timed
as a user runs it, in one process and under torchrun.

    python benchmarks/dataset_scaling.py [--images 48] [--stride 2] [--window 16]

Writes `--images` random 224 x 224 images as .npy files, then runs the command
on vgg16 (weights=None, seeded, so every process builds the same model) with
target 0: first once on two images to fill the Triton cache, then on cuda:0
alone (one process), then with `torchrun --nproc_per_node=<GPUs>`. Reports wall
time (process start to exit: imports, model, compilation of kernels new to the
process, cuDNN's search) and the ranks' own time over their items, and checks
that both runs wrote the same maps. Writes JSON to --out.
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


def seeded_vgg16() -> torch.nn.Module:
    """vgg16 with the same random weights in every process."""
    torch.manual_seed(0)
    return torchvision.models.vgg16(weights=None)


def write_images(directory: Path, count: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        np.save(directory / f"{i:05d}.npy", rng.standard_normal((3, 224, 224), dtype=np.float32))


def run_command(launcher: list[str], data: Path, out: Path, args, env: dict) -> dict:
    command = [
        *launcher,
        "captum_krypton",
        "attribute",
        "--model",
        "benchmarks.dataset_scaling:seeded_vgg16",
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
    ]
    started = time.perf_counter()
    finished = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        sys.stderr.write(finished.stdout + finished.stderr)
        raise SystemExit(f"{' '.join(command)} failed")
    # "rank R: k/n items, T s": each rank's time over its own items
    rank_seconds: dict[str, float] = {}
    for rank, seconds in re.findall(r"rank (\d+): \d+/\d+ items, ([\d.]+) s", finished.stdout):
        rank_seconds[rank] = float(seconds)
    return {"wall_seconds": wall, "rank_seconds": rank_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--stride", type=int, default=2)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument(
        "--processes",
        type=int,
        default=torch.cuda.device_count() or 2,
        help="torchrun processes (default: one per GPU; 2 on a CPU)",
    )
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = parser.parse_args()
    gpus = args.processes
    root = Path(tempfile.mkdtemp(prefix="dataset_scaling_"))
    data, warm = root / "data", root / "warm"
    write_images(data, args.images)
    write_images(warm, 2)
    path = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    one_process = [sys.executable, "-m"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += [f"--nproc_per_node={gpus}", "-m"]

    run_command(one_process, warm, root / "warm_out", args, env)
    single = run_command(one_process, data, root / "one", args, dict(env, CUDA_VISIBLE_DEVICES="0"))
    shared = run_command(torchrun, data, root / "all", args, env)
    largest = 0.0
    for path in sorted((root / "one").glob("*.npy")):
        one, every = np.load(path), np.load(root / "all" / path.name)
        largest = max(largest, float(np.abs(one - every).max() / max(np.abs(one).max(), 1e-30)))
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "processes": gpus,
        "torch": torch.__version__,
        "model": "vgg16",
        "images": args.images,
        "window": args.window,
        "stride": args.stride,
        "one_gpu": single,
        "all_gpus": shared,
        "wall_speedup": single["wall_seconds"] / shared["wall_seconds"],
        "items_speedup": max(single["rank_seconds"].values())
        / max(shared["rank_seconds"].values()),
        "files": len(list((root / "all").glob("*.npy"))),
        "max_difference_over_max_abs": largest,
        "command": " ".join(["python", *sys.argv]),
    }
    print(json.dumps(result, indent=2))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "dataset_scaling.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
