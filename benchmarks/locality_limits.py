"""FLOP-ratio limits of modern blocks: how much of each model's work a window changes.

    python benchmarks/locality_limits.py [--out benchmarks/results/locality_limits.json]

For each model (random weights, one 224 px image, or the shape in MODELS),
window (3, 16, 16), stride 4: the plan's FLOP ratio of full re-inference over
incremental evaluation, with every box kept wherever a rule allows
(`full_threshold=1.01`: the limit of the rules, before the cost model trades
boxes for speed). Run it on two versions of the package to compare rules.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torchvision
from torch import nn

from captum_krypton import IncrementalOcclusion


class RegionLogits(nn.Module):
    """A segmentation model's class logits summed over a fixed region, per example:
    (N, 1), the target for occlusion of a dense prediction."""

    def __init__(
        self, model: nn.Module, label: int = 1, box: tuple[int, int, int, int] = (80, 144, 80, 144)
    ):
        super().__init__()
        self.model, self.label, self.box = model, label, box

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        out = out["out"] if isinstance(out, dict) else out
        top, bottom, left, right = self.box
        return out[:, self.label, top:bottom, left:right].sum(dim=(1, 2)).unsqueeze(1)


def _segmentation(name: str) -> nn.Module:
    builder = getattr(torchvision.models.segmentation, name)
    return RegionLogits(builder(weights=None, weights_backbone=None, aux_loss=False, num_classes=4))


def _timm(name: str) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=10)


MODELS = {
    "convnext_tiny": lambda: torchvision.models.convnext_tiny(weights=None),
    "timm convnext_atto": lambda: _timm("convnext_atto"),
    "shufflenet_v2_x1_0": lambda: torchvision.models.shufflenet_v2_x1_0(weights=None),
    "fcn_resnet50 (region)": lambda: _segmentation("fcn_resnet50"),
    "deeplabv3_resnet50 (region)": lambda: _segmentation("deeplabv3_resnet50"),
    "lraspp_mobilenet_v3_large (region)": lambda: _segmentation("lraspp_mobilenet_v3_large"),
    "timm unet-like (resnet18 features + upsampling decoder)": None,  # filled below
}


class UNet(nn.Module):
    """A small U-Net: strided convs down, transposed conv and bilinear upsampling up,
    skips concatenated, explicit reflection padding; returns per-pixel logits."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(
                nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, 3), nn.BatchNorm2d(cout), nn.ReLU()
            )

        self.down1, self.down2 = block(3, width), block(width, 2 * width)
        self.down3 = block(2 * width, 4 * width)
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.dec2 = block(4 * width, 2 * width)
        self.up1 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec1 = block(3 * width, width)
        self.out = nn.Conv2d(width, 4, 1)

    def forward(self, x):
        d1 = self.down1(x)
        d2 = self.down2(self.pool(d1))
        d3 = self.down3(self.pool(d2))
        u2 = self.dec2(torch.cat([self.up2(d3), d2], 1))
        u1 = self.dec1(torch.cat([self.up1(u2), d1], 1))
        return self.out(u1)


MODELS.pop("timm unet-like (resnet18 features + upsampling decoder)")
MODELS["unet (region)"] = lambda: RegionLogits(UNet())


def limit(name: str) -> dict:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    image = torch.randn(1, 3, 224, 224)
    started = time.perf_counter()
    plan = IncrementalOcclusion(model).plan(image, (3, 16, 16), strides=4, full_threshold=1.01)
    rows = plan.table()
    boxed = sum(r["mode"] == "box" for r in rows)
    return {
        "model": name,
        "flop_limit": plan.theoretical_speedup,
        "boxed_nodes": boxed,
        "nodes": len(rows),
        "first_full": next((f"{r['node']} ({r['op']})" for r in rows if r["mode"] == "full"), None),
        "plan_seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = []
    for name in args.models:
        try:
            results.append(limit(name))
        except Exception as exc:  # noqa: BLE001 (an old version may not take a model)
            results.append({"model": name, "error": f"{type(exc).__name__}: {exc}"[:200]})
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
