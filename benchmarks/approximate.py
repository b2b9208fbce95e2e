"""GPU benchmark of the approximations: time and heatmap SSIM vs exact occlusion.

    python benchmarks/approximate.py [--models vgg16 resnet18 inception_v3]
        [--train-steps 400] [--images 3] [--out DIR]

Same harness as benchmarks/gpu.py (torchvision architectures, window (3, 16, 16),
stride 4, fp32 with PyTorch's default CUDA settings, "naive" = our optimized
batched re-inference at its best layout and batch). With --train-steps > 0 each
architecture is first trained (4 classes, AdamW, bf16 autocast) on generated
shape images (captum_krypton.demo.data at the model's input size), so that SSIM
is measured on heatmaps of a model that has learned something; 0 keeps weights=None.
Per model: exact IncrementalOcclusion; tau in {1.0, 0.9, ..., 0.4} with drill-down
off and on (fraction 0.2, coarse factor 4), two more drill-down points, and
target_ssim=0.9. Times are medians of repeats on the first held-out image (the
windows column is that image's); SSIM (scikit-image, vs exact) over --images
held-out images. Writes results/approximate.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torchvision

from benchmarks.gpu import MODELS, cuda_time, naive_occlusion
from captum_krypton import IncrementalOcclusion, attribution_ssim
from captum_krypton.demo.data import CLASSES, make_dataset, normalize

TAUS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
#: Drill-down "on": fraction refined, with the default coarse spacing (factor 4).
DRILLDOWN = 0.2
#: Extra drill-down points at tau 1: (fraction, factor).
EXTRA_DRILLDOWNS = ((0.1, 4), (0.25, 2))
WINDOW = (3, 16, 16)
#: VGG without batch norm learns slowly from scratch: it gets more steps.
STEP_FACTOR = {"vgg16": 3}


def build(name: str, classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"init_weights": True, "aux_logits": False} if name == "inception_v3" else {}
    return getattr(torchvision.models, name)(weights=None, num_classes=classes, **extra)


def train(model: torch.nn.Module, size: int, steps: int) -> float:
    """A short training run on generated shapes; returns held-out accuracy."""
    images, labels = make_dataset(max(steps, 1) * 8, seed=0, size=size)
    test_images, test_labels = make_dataset(128, seed=1, size=size)
    model.cuda().train()
    # VGG without batch norm diverges at the ResNets' rate.
    lr = 2e-5 if isinstance(model, torchvision.models.VGG) else 1e-3
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(0, len(images), (32,), generator=generator)
        x = normalize(images[batch]).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), labels[batch].cuda())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        predicted = torch.cat(
            [model(normalize(x).cuda()).argmax(1).cpu() for x in test_images.split(32)]
        )
    return float((predicted == test_labels).float().mean())


def run_model(name: str, train_steps: int, image_count: int, repeats: int) -> dict:
    size = MODELS[name]
    trained = train_steps > 0
    model = build(name, len(CLASSES) if trained else 1000)
    steps = train_steps * STEP_FACTOR.get(name, 1)
    accuracy = train(model, size, steps) if trained else None
    model = model.cuda().eval()
    if trained:
        images, labels = make_dataset(image_count, seed=2027, size=size)
        inputs = [normalize(x)[None].cuda() for x in images]
        targets = [int(t) for t in labels]
    else:
        torch.manual_seed(1)
        inputs = [torch.randn(1, 3, size, size, device="cuda") for _ in range(image_count)]
        targets = [0] * image_count
    occlusion = IncrementalOcclusion(model)
    kwargs = dict(sliding_window_shapes=WINDOW, strides=4)

    def attribute(index: int, **options):
        return occlusion.attribute(inputs[index], target=targets[index], **kwargs, **options)

    # The naive baseline at its best layout and batch (as benchmarks/gpu.py).
    naive_s = float("inf")
    for layout in (torch.channels_last, torch.contiguous_format):
        naive_model = model.to(memory_format=layout)
        for batch in (64, 256):
            seconds, _ = cuda_time(
                lambda m=naive_model, layout=layout, batch=batch: naive_occlusion(
                    m, inputs[0], WINDOW, 4, targets[0], batch, layout
                ),
                repeats,
            )
            naive_s = min(naive_s, seconds)
    model.to(memory_format=torch.contiguous_format)

    exact = [attribute(i) for i in range(image_count)]
    exact_s, _ = cuda_time(lambda: attribute(0), repeats)
    rows = []

    def measure(label: str, **options) -> None:
        started = time.perf_counter()
        maps, chosen = [], []
        for i in range(image_count):
            maps.append(attribute(i, **options))
            settings = occlusion.last_run.approximation
            chosen.append(
                {
                    "tau": settings.tau,
                    "drilldown": settings.drilldown,
                    "drilldown_factor": settings.drilldown_factor,
                    "estimated_ssim": settings.estimated_ssim,
                    "windows_computed": occlusion.last_run.windows_computed,
                }
            )
        torch.cuda.synchronize()
        first_s = time.perf_counter() - started
        seconds, _ = cuda_time(lambda: attribute(0, **options), repeats)
        ssim = np.concatenate([attribution_ssim(m, e) for m, e in zip(maps, exact)])
        rows.append(
            {
                "setting": label,
                "options": options,
                "per_image": chosen,
                "windows_computed": occlusion.last_run.windows_computed,
                "windows_total": occlusion.last_run.windows_total,
                "seconds": seconds,
                "first_calls_seconds": first_s,
                "speedup_vs_naive": naive_s / seconds,
                "speedup_vs_exact": exact_s / seconds,
                "ssim": ssim.tolist(),
                "ssim_mean": float(ssim.mean()),
                "ssim_min": float(ssim.min()),
            }
        )
        print(json.dumps({"model": name, **rows[-1]}), flush=True)

    for tau in TAUS:
        measure(f"tau {tau}", tau=tau)
        measure(f"tau {tau} + drill-down {DRILLDOWN}", tau=tau, drilldown=DRILLDOWN)
    for fraction, factor in EXTRA_DRILLDOWNS:
        measure(
            f"drill-down {fraction}, factor {factor}",
            drilldown=fraction,
            drilldown_factor=factor,
        )
    measure("target_ssim 0.9", target_ssim=0.9)
    return {
        "model": name,
        "size": size,
        "trained": trained,
        "train_steps": steps if trained else 0,
        "held_out_accuracy": accuracy,
        "images": image_count,
        "naive_seconds": naive_s,
        "exact_seconds": exact_s,
        "exact_speedup_vs_naive": naive_s / exact_s,
        "rows": rows,
    }


def best_at(rows: list[dict], ssim: float) -> dict | None:
    """The fastest setting whose worst SSIM reaches `ssim`."""
    meeting = [r for r in rows if r["ssim_min"] >= ssim]
    return max(meeting, key=lambda r: r["speedup_vs_naive"], default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet18", "inception_v3"])
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    results = []
    path = os.path.join(args.out, "approximate.json")
    os.makedirs(args.out, exist_ok=True)
    for name in args.models:
        results.append(run_model(name, args.train_steps, args.images, args.repeats))
        with open(path, "w") as f:
            json.dump(
                {"device": device, "torch": torch.__version__, "results": results}, f, indent=2
            )
    print(f"\n{device}, torch {torch.__version__}, window {WINDOW}, stride 4\n")
    print("| model | setting | windows | time | vs naive | vs exact | SSIM mean (min) |")
    print("|---|---|---|---|---|---|---|")
    for result in results:
        for row in result["rows"]:
            print(
                f"| {result['model']} | {row['setting']} | {row['windows_computed']} | "
                f"{row['seconds'] * 1e3:.1f} ms | {row['speedup_vs_naive']:.2f}x | "
                f"{row['speedup_vs_exact']:.2f}x | {row['ssim_mean']:.3f} ({row['ssim_min']:.3f}) |"
            )
        best = best_at(result["rows"], 0.9)
        if best is not None:
            print(
                f"\n{result['model']}: fastest with SSIM >= 0.9: {best['setting']}, "
                f"{best['speedup_vs_naive']:.2f}x vs naive\n"
            )


if __name__ == "__main__":
    main()
