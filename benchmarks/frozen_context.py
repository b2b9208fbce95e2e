"""Frozen global context on squeeze-excitation networks: FLOP-ratio limit, CPU time
and SSIM against the exact map.

    python benchmarks/frozen_context.py [--out benchmarks/results/frozen_context.json]

For each model (torchvision, weights=None, BatchNorm running statistics
randomized, eval mode, float32, one 224 px image), window (3, 16, 16), stride 8:
- the FLOP-ratio limit of the plan (`full_threshold=1.01`, every box a rule
  allows) and the cost model's plan, exact and with `freeze_global_context=True`;
- the wall time of `attribute` in exact mode and with frozen global context, on
  the same IncrementalOcclusion after its plans were made (`plan(...)`: capture
  and planning, timed apart), self-check on as by default;
- SSIM (`attribution_ssim`) of the frozen map against the exact one.
Models in PLAN_ONLY get the FLOP-ratio limits only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import torchvision
from torch import nn

from captum_krypton import IncrementalOcclusion, attribution_ssim

MODELS = ("efficientnet_b0", "mobilenet_v3_large", "regnet_y_400mf")
WINDOW, STRIDE = (3, 16, 16), 8


class RegionLogits(nn.Module):
    """A segmentation model's class-1 logits summed over the image's centre: (N, 1)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)["out"]
        return out[:, 1, 80:144, 80:144].sum(dim=(1, 2)).unsqueeze(1)


def _deeplab() -> nn.Module:
    builder = torchvision.models.segmentation.deeplabv3_resnet50
    return RegionLogits(builder(weights=None, weights_backbone=None, aux_loss=False, num_classes=4))


PLAN_ONLY = {"deeplabv3_resnet50 (region)": _deeplab}


def randomized(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def limits(occlusion: IncrementalOcclusion, image: torch.Tensor) -> dict:
    row = {}
    for label, freeze in (("exact", False), ("frozen", True)):
        start = time.perf_counter()
        limit = occlusion.plan(
            image, WINDOW, strides=STRIDE, full_threshold=1.01, freeze_global_context=freeze
        )
        planned = occlusion.plan(image, WINDOW, strides=STRIDE, freeze_global_context=freeze)
        row[f"{label}_plan_seconds"] = round(time.perf_counter() - start, 2)
        row[f"{label}_flop_limit"] = round(limit.theoretical_speedup, 3)
        row[f"{label}_cost_model_flop_ratio"] = round(planned.theoretical_speedup, 3)
        row[f"{label}_runs_plain_reinference"] = planned.rerun_whole_model
        if freeze:
            row["global_statistics"] = len(limit.global_context.statistics)
            row["frozen_statistics"] = list(planned.frozen_statistics)
    return row


def measure(name: str, model: nn.Module, run: bool) -> dict:
    torch.manual_seed(1)
    image = torch.randn(1, 3, 224, 224)
    occlusion = IncrementalOcclusion(randomized(model))
    row = {"model": name, **limits(occlusion, image)}
    if not run:
        return row
    with torch.no_grad():
        target = int(model(image).argmax())
    args = dict(sliding_window_shapes=WINDOW, strides=STRIDE, target=target)
    start = time.perf_counter()
    exact = occlusion.attribute(image, **args)
    row["exact_seconds"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    frozen = occlusion.attribute(image, freeze_global_context=True, **args)
    row["frozen_seconds"] = round(time.perf_counter() - start, 2)
    report = occlusion.last_run
    row["frozen_engine"] = report.engine
    row["frozen_report"] = list(report.frozen_context)
    row["speedup"] = round(row["exact_seconds"] / row["frozen_seconds"], 2)
    row["ssim"] = round(float(attribution_ssim(frozen, exact).min()), 4)
    row["windows"] = report.windows_total
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/frozen_context.json")
    parser.add_argument("--models", nargs="*", default=list(MODELS) + list(PLAN_ONLY))
    args = parser.parse_args()
    rows = []
    for name in args.models:
        if name in PLAN_ONLY:
            model, run = PLAN_ONLY[name](), False
        else:
            model, run = getattr(torchvision.models, name)(weights=None), True
        rows.append(measure(name, model, run))
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "device": f"CPU ({platform.processor() or platform.machine()}), "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "window": WINDOW,
        "stride": STRIDE,
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
