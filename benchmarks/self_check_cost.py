"""What the self-check costs: default calls with `self_check=True` against `False`.

    python benchmarks/self_check_cost.py --device cuda [--models vgg16 resnet50] [--repeats 5]
    python benchmarks/self_check_cost.py --device cpu

Per model (torchvision architecture, weights=None, seed 0, one image, target 0):
the GPU cases are benchmarks/gpu.py's (window (3, 16, 16), stride 4), the CPU
cases benchmarks/cpu_speed.py's. One IncrementalOcclusion per setting; a first
call each (tracing, planning, kernel choices, and with the check its once-per-plan
batch checks), then `repeats` calls alternating between the two settings; the
best time of each. Also reports the first calls' times (after a
warm-up call that fills cuDNN's and Triton's caches). Results are bit-identical between the settings
(asserted). Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import torchvision

from captum_krypton import IncrementalOcclusion

GPU_CASES = {
    "vgg16": (224, 4),
    "resnet18": (224, 4),
    "resnet50": (224, 4),
    "inception_v3": (299, 4),
    "mobilenet_v2": (224, 4),
    "efficientnet_b0": (224, 4),
}
CPU_CASES = {"resnet18": (224, 8), "vgg16": (224, 16), "mobilenet_v2": (224, 8)}


def load(name: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"init_weights": False, "aux_logits": False} if name == "inception_v3" else {}
    return getattr(torchvision.models, name)(weights=None, **extra).eval().to(device)


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def run_case(name: str, device: torch.device, repeats: int) -> dict:
    size, stride = (GPU_CASES if device.type == "cuda" else CPU_CASES)[name]
    model = load(name, device)
    torch.manual_seed(1)
    image = torch.randn(1, 3, size, size, device=device)
    kwargs = dict(sliding_window_shapes=(3, 16, 16), strides=stride, target=0)
    IncrementalOcclusion(model).attribute(image, self_check=False, **kwargs)  # caches, kernels
    checked, unchecked = IncrementalOcclusion(model), IncrementalOcclusion(model)
    first_on, reference_on = timed(lambda: checked.attribute(image, **kwargs), device)
    first_off, reference_off = timed(
        lambda: unchecked.attribute(image, self_check=False, **kwargs), device
    )
    assert checked.last_run.engine == "incremental", "the checked call fell back"
    assert torch.equal(reference_on, reference_off), "the check changed the result"
    on, off = [], []
    for _ in range(repeats):
        seconds, _ = timed(lambda: checked.attribute(image, **kwargs), device)
        on.append(seconds)
        seconds, _ = timed(lambda: unchecked.attribute(image, self_check=False, **kwargs), device)
        off.append(seconds)
    report = checked.last_run.self_check
    return {
        "model": name,
        "input": [1, 3, size, size],
        "window": [3, 16, 16],
        "stride": stride,
        "windows": checked.last_run.windows_total,
        "checked_windows": len(report.windows),
        "best_seconds_check_on": min(on),
        "best_seconds_check_off": min(off),
        "overhead": min(on) / min(off) - 1.0,
        "first_call_seconds_check_on": first_on,
        "first_call_seconds_check_off": first_off,
        "rounding_spread": report.rounding_spread,
        "max_error_over_tolerance": report.max_error / max(report.tolerance, 1e-300),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device(args.device)
    names = args.models or list(GPU_CASES if device.type == "cuda" else CPU_CASES)
    results = []
    print(
        "| model | windows | checked | call, check off | call, check on | overhead "
        "| first call off / on |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in names:
        r = run_case(name, device, args.repeats)
        results.append(r)
        print(
            f"| {name} {r['input'][2]}, stride {r['stride']} | {r['windows']} "
            f"| {r['checked_windows']} | {r['best_seconds_check_off']:.3f} s "
            f"| {r['best_seconds_check_on']:.3f} s | {100 * r['overhead']:+.1f}% "
            f"| {r['first_call_seconds_check_off']:.2f} "
            f"/ {r['first_call_seconds_check_on']:.2f} s |",
            flush=True,
        )
    machine = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (platform.processor() or platform.machine()),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    out = args.out or os.path.join("benchmarks", "results", f"self_check_{device.type}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": machine, "results": results}, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
