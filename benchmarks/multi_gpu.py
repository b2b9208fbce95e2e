"""Several GPUs in one process: `devices=` against one GPU, same calls.

    python benchmarks/multi_gpu.py [--model vgg16] [--images 8] [--stride 2] [--calls 6]

torchvision model (weights=None), `--images` random 224 x 224 images per call,
window (3, 16, 16), target 0, fp32 default settings. After a warm-up call each
way (planning, kernel choices, cuDNN search, model copy per GPU), times `--calls`
calls on cuda:0 alone and with the windows shared across every visible GPU;
checks that the maps agree. `devices=` runs two ways: the default (cuda:0 in
this process, a worker process per other GPU) and threads of this process, one
per GPU with CUDA graphs (the fallback when workers are unavailable). Writes
JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torchvision

from captum_krypton import IncrementalOcclusion
from captum_krypton.parallel import sharded

real_uses_workers = sharded.uses_workers


def timed(fn, calls: int) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        result = fn()
    for device in range(torch.cuda.device_count()):
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--stride", type=int, default=2)
    parser.add_argument("--calls", type=int, default=6)
    parser.add_argument(
        "--windows-per-batch", type=int, nargs="*", default=[], help="also time these batch sizes"
    )
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = parser.parse_args()
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).eval().cuda()
    images = torch.randn(args.images, 3, 224, 224, device="cuda")
    occlusion = IncrementalOcclusion(model)
    kwargs = dict(sliding_window_shapes=(3, 16, 16), strides=args.stride, target=0)

    result = {
        "device": torch.cuda.get_device_name(),
        "gpus": len(gpus),
        "torch": torch.__version__,
        "model": args.model,
        "images_per_call": args.images,
        "stride": args.stride,
        "calls": args.calls,
        "runs": {},
        "command": " ".join(["python", *sys.argv]),
    }
    # default: one GPU in this process, a worker process for each other GPU;
    # threads: every GPU from threads of this process (CUDA graphs), the fallback
    settings = [("default", {}), ("threads", {})]
    settings += [
        (f"windows_per_batch={n}", {"windows_per_batch": n}) for n in args.windows_per_batch
    ]
    for label, options in settings:

        def one_gpu(options=options):
            return occlusion.attribute(images, **options, **kwargs)

        def all_gpus(options=options, label=label):
            sharded.uses_workers = (
                (lambda devices: False) if label == "threads" else real_uses_workers
            )
            return occlusion.attribute(images, devices=gpus, **options, **kwargs)

        started = time.perf_counter()
        one_gpu()
        first_one = time.perf_counter() - started
        started = time.perf_counter()
        all_gpus()
        first_all = time.perf_counter() - started
        one_s, one = timed(one_gpu, args.calls)
        all_s, shared = timed(all_gpus, args.calls)
        with torch.no_grad():
            scale = max(one.abs().max().item(), model(images).abs().max().item())
        result["windows_per_image"] = occlusion.last_run.windows_total
        result["runs"][label] = {
            "one_gpu_seconds": one_s,
            "all_gpus_seconds": all_s,
            "speedup": one_s / all_s,
            "first_call_seconds": {"one_gpu": first_one, "all_gpus": first_all},
            "max_difference_over_scale": (shared - one).abs().max().item() / scale,
        }
    print(json.dumps(result, indent=2))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "multi_gpu.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
