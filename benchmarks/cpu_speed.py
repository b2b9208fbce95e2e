"""CPU speed of IncrementalOcclusion against Captum's Occlusion, in one process.

    python benchmarks/cpu_speed.py [--models resnet18 vgg16] [--out benchmarks/results/cpu.json]

For each model (torchvision architecture, weights=None, one 224x224 image, target
class 0), Captum's Occlusion runs at each perturbations_per_eval in {1, 16, 64,
256} and the best time is kept; IncrementalOcclusion runs with its defaults. The
table shows the ratio next to the plan's FLOP-ratio limit and checks that the
attributions agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import torchvision
from captum.attr import Occlusion

from captum_krypton import IncrementalOcclusion

CASES = {
    "resnet18": {"window": (3, 16, 16), "stride": 8},
    "vgg16": {"window": (3, 16, 16), "stride": 16},
    "mobilenet_v2": {"window": (3, 16, 16), "stride": 8},
    # Plans that save little (squeeze-excitation, large depthwise kernels, shuffles):
    "efficientnet_b0": {"window": (3, 16, 16), "stride": 16},
    "regnet_y_400mf": {"window": (3, 16, 16), "stride": 16},
    "convnext_tiny": {"window": (3, 16, 16), "stride": 16},
    "shufflenet_v2_x1_0": {"window": (3, 16, 16), "stride": 16},
}
CAPTUM_BATCHES = (1, 16, 64, 256)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run_case(name: str, repeats: int) -> dict:
    case = CASES[name]
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    inputs = torch.randn(1, 3, 224, 224)
    kwargs = dict(sliding_window_shapes=case["window"], strides=case["stride"], target=0)
    occlusion = IncrementalOcclusion(model)
    plan = occlusion.plan(inputs, case["window"], strides=case["stride"])
    ours_times = []
    for _ in range(repeats):
        seconds, ours = timed(lambda: occlusion.attribute(inputs, **kwargs))
        ours_times.append(seconds)
    captum_times = {}
    for batch in CAPTUM_BATCHES:
        seconds, expected = timed(
            lambda batch=batch: Occlusion(model).attribute(
                inputs, perturbations_per_eval=batch, **kwargs
            )
        )
        captum_times[batch] = seconds
        print(f"  {name}: captum perturbations_per_eval={batch}: {seconds:.2f} s", flush=True)
    best_batch = min(captum_times, key=captum_times.get)
    ours_time = min(ours_times)
    scale = max(expected.abs().max().item(), 1e-12)
    return {
        "model": name,
        "input": [1, 3, 224, 224],
        "window": list(case["window"]),
        "stride": case["stride"],
        "windows": int(plan.nodes[plan.captured.input_node].geometry.starts.shape[0]),
        "captum_seconds": captum_times,
        "captum_best_perturbations_per_eval": best_batch,
        "captum_best_seconds": captum_times[best_batch],
        "incremental_seconds": ours_time,
        "speedup": captum_times[best_batch] / ours_time,
        "flop_ratio_limit": plan.theoretical_speedup,
        "max_difference_relative_to_map": (ours - expected).abs().max().item() / scale,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "vgg16"], choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=2, help="IncrementalOcclusion runs (best)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "cpu.json"))
    args = parser.parse_args()
    results = [run_case(name, args.repeats) for name in args.models]
    header = (
        "| model | windows | Captum best (ppe) | IncrementalOcclusion | speedup | FLOP limit |"
        " max diff / map |\n|---|---|---|---|---|---|---|"
    )
    print(header)
    for r in results:
        print(
            f"| {r['model']} 224, win {tuple(r['window'])}, stride {r['stride']} | {r['windows']} "
            f"| {r['captum_best_seconds']:.2f} s ({r['captum_best_perturbations_per_eval']}) "
            f"| {r['incremental_seconds']:.2f} s | {r['speedup']:.2f}x "
            f"| {r['flop_ratio_limit']:.2f}x | {r['max_difference_relative_to_map']:.1e} |"
        )
    machine = {
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "results": results}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
