"""GPU benchmark: IncrementalOcclusion vs optimized naive re-inference vs Captum.

    python benchmarks/gpu.py [--models vgg16 resnet18 ...] [--stride 4] [--out DIR]

One image per model (torchvision architecture, weights=None, seed 0), window
(3, 16, 16), stride 4, target 0, fp32 with PyTorch's default CUDA settings.
Columns: Captum's Occlusion at its best perturbations_per_eval from {64, 256, 1024};
"naive": our own optimized batched re-inference (cudnn.benchmark, occluded batches
built on the GPU; the best of channels_last / contiguous and 64 / 256 windows);
IncrementalOcclusion exact; speedups; the share of the plan's FLOP-ratio limit reached; peak memory.
Writes JSON under benchmarks/results/ and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torchvision
from captum.attr import Occlusion

from captum_krypton import IncrementalOcclusion
from captum_krypton.engine.windows import WindowGrid

MODELS = {
    "vgg16": 224,
    "resnet18": 224,
    "resnet50": 224,
    "inception_v3": 299,
    "mobilenet_v2": 224,
    "efficientnet_b0": 224,
}


def load(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"init_weights": False, "aux_logits": False} if name == "inception_v3" else {}
    return getattr(torchvision.models, name)(weights=None, **extra).eval().cuda()


@torch.no_grad()
def naive_occlusion(model, image, window, stride, target, batch=256, layout=torch.channels_last):
    """Batched full re-inference, written to be fast: masks built on the GPU,
    batches in `layout` (the model converted to it beforehand)."""
    grid = WindowGrid(tuple(image.shape[1:]), window, (1, stride, stride))
    initial = model(image.contiguous(memory_format=layout))[:, target]
    diffs = torch.empty(grid.num_windows, 1, device=image.device)
    h = torch.arange(image.shape[2], device=image.device)
    w = torch.arange(image.shape[3], device=image.device)
    for first in range(0, grid.num_windows, batch):
        windows = np.arange(first, min(first + batch, grid.num_windows))
        lo, hi = grid.bounds(windows)
        lo, hi = torch.from_numpy(lo).cuda(), torch.from_numpy(hi).cuda()
        inside = ((h >= lo[:, 1:2]) & (h < hi[:, 1:2]))[:, :, None] & (
            (w >= lo[:, 2:3]) & (w < hi[:, 2:3])
        )[:, None, :]
        occluded = image * (~inside[:, None]).to(image.dtype)
        occluded = occluded.contiguous(memory_format=layout)
        diffs[first : first + len(windows), 0] = initial - model(occluded)[:, target]
    total, count = grid.accumulate(diffs)
    return (total / count).float().to(image.device)


def cuda_time(fn, repeats=3):
    fn()
    torch.cuda.synchronize()
    times = []
    result = None
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


def peak_memory(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_model(
    name: str, stride: int, captum_batches, repeats: int, with_graphs: bool = False
) -> dict:
    size = MODELS[name]
    model = load(name)
    image = torch.randn(1, 3, size, size, device="cuda")
    window = (3, 16, 16)
    kwargs = dict(sliding_window_shapes=window, strides=stride, target=0)
    occlusion = IncrementalOcclusion(model)
    plan = occlusion.plan(image, window, strides=stride)
    torch.cuda.synchronize()
    started = time.perf_counter()
    occlusion.attribute(image, **kwargs)  # pays plan, kernel choices, compilation
    torch.cuda.synchronize()
    first_call_s = time.perf_counter() - started
    ours_s, ours = cuda_time(lambda: occlusion.attribute(image, **kwargs), repeats)
    ours_mb = peak_memory(lambda: occlusion.attribute(image, **kwargs))
    graphs_s = None
    if with_graphs:
        graphs_s, _ = cuda_time(
            lambda: occlusion.attribute(image, cuda_graphs=True, **kwargs), repeats
        )
    # The naive baseline at its best layout and batch size.
    naive_s, naive, naive_config = float("inf"), None, None
    for layout in (torch.channels_last, torch.contiguous_format):
        naive_model = load(name).to(memory_format=layout)
        for batch in (64, 256):

            def naive_run(model=naive_model, layout=layout, batch=batch):
                return naive_occlusion(model, image, window, stride, 0, batch, layout)

            seconds, result = cuda_time(naive_run, repeats)
            if seconds < naive_s:
                naive_s, naive, naive_config = seconds, result, (layout, batch, naive_run)
    naive_mb = peak_memory(naive_config[2])
    captum = {}
    expected = None
    for batch in captum_batches:
        try:
            seconds, result = cuda_time(
                lambda batch=batch: Occlusion(model).attribute(
                    image, perturbations_per_eval=batch, **kwargs
                ),
                1,
            )
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            captum[batch] = float("inf")  # out of memory
            continue
        captum[batch] = seconds
        expected = result
    best = min(captum, key=captum.get)
    scale = max(expected.abs().max().item(), 1e-30)
    return {
        "model": name,
        "size": size,
        "windows": int(plan.nodes[plan.captured.input_node].geometry.starts.shape[0]),
        "captum_seconds": captum,
        "captum_best_batch": best,
        "naive_seconds": naive_s,
        "naive_config": {
            "channels_last": naive_config[0] == torch.channels_last,
            "batch": naive_config[1],
        },
        "incremental_seconds": ours_s,
        "incremental_first_call_seconds": first_call_s,
        "incremental_cuda_graphs_seconds": graphs_s,
        "speedup_vs_naive": naive_s / ours_s,
        "speedup_vs_captum": captum[best] / ours_s,
        "flop_ratio_limit": plan.theoretical_speedup,
        "share_of_limit": naive_s / ours_s / plan.theoretical_speedup,
        "full_grid_tflop": plan.flops_full
        * len(plan.nodes[plan.captured.input_node].geometry.starts)
        / 1e12,
        "peak_mib_incremental": ours_mb,
        "peak_mib_naive": naive_mb,
        "max_diff_vs_captum": (ours - expected).abs().max().item() / scale,
        "max_diff_naive_vs_captum": (naive - expected).abs().max().item() / scale,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--captum-batches", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cuda-graphs", action="store_true", help="also time cuda_graphs=True")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    device = torch.cuda.get_device_name()
    results = []
    for name in args.models:
        started = time.perf_counter()
        results.append(
            run_model(name, args.stride, args.captum_batches, args.repeats, args.cuda_graphs)
        )
        results[-1]["benchmark_wall_seconds"] = time.perf_counter() - started
        print(json.dumps(results[-1]), flush=True)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu.json"), "w") as f:
            json.dump(
                {"device": device, "torch": torch.__version__, "results": results}, f, indent=2
            )
    print(f"\n{device}, torch {torch.__version__}, window (3, 16, 16), stride {args.stride}\n")
    print(
        "| model | windows | Captum best (ppe) | naive | incremental | vs naive | vs Captum "
        "| % of FLOP limit | peak MiB incr / naive |\n|---|---|---|---|---|---|---|---|---|"
    )
    for r in results:
        print(
            f"| {r['model']} {r['size']} | {r['windows']} "
            f"| {r['captum_seconds'][r['captum_best_batch']]:.3f} s ({r['captum_best_batch']}) "
            f"| {r['naive_seconds']:.3f} s | {r['incremental_seconds']:.3f} s "
            f"| {r['speedup_vs_naive']:.2f}x | {r['speedup_vs_captum']:.2f}x "
            f"| {100 * r['share_of_limit']:.0f}% ({r['flop_ratio_limit']:.2f}x) "
            f"| {r['peak_mib_incremental']:.0f} / {r['peak_mib_naive']:.0f} |"
        )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu.json")
    with open(path, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "results": results}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
