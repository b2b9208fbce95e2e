"""IncrementalOcclusion time on CUDA against the number of windows per batch.

python benchmarks/gpu_batch_sweep.py [--models vgg16 resnet18] [--stride 4]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.gpu import MODELS, cuda_time, load, peak_memory
from captum_krypton import IncrementalOcclusion


def sweep(name: str, stride: int, batches: list[int]) -> None:
    model = load(name)
    size = MODELS[name]
    image = torch.randn(1, 3, size, size, device="cuda")
    occlusion = IncrementalOcclusion(model)
    for batch in batches:

        def run(batch=batch):
            return occlusion.attribute(
                image, (3, 16, 16), strides=stride, target=0, windows_per_batch=batch
            )

        seconds, _ = cuda_time(run, 5)
        print(f"| {name} | {batch} | {seconds:.3f} | {peak_memory(run):.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet18"], choices=list(MODELS))
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 512, 1024, 2048])
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    print("| model | windows per batch | seconds | peak MiB |\n|---|---|---|---|")
    for name in args.models:
        sweep(name, args.stride, args.batches)


if __name__ == "__main__":
    main()
