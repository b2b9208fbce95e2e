"""Half-precision models: how far IncrementalOcclusion and Captum move from fp32.

    python benchmarks/precision.py [--device cpu|cuda] [--size 64]

resnet18 (weights=None, seed 0), one image, window (3, 8, 8), stride 8, target 0.
The model and input are cast to each dtype; the engine runs in that dtype (the
result is float32, as Captum's). Deviations are the largest absolute difference
divided by the largest absolute value of the fp32 map.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torchvision
from captum.attr import Occlusion

from captum_krypton import IncrementalOcclusion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval().to(args.device)
    image = torch.randn(1, 3, args.size, args.size, device=args.device)
    kwargs = dict(sliding_window_shapes=(3, 8, 8), strides=8, target=0)
    exact = Occlusion(model).attribute(image, perturbations_per_eval=64, **kwargs)
    scale = exact.abs().max()
    print(f"device {args.device}; deviation from the fp32 map (share of its largest value)")
    print("| dtype | ours vs fp32 | Captum in that dtype vs fp32 | ours vs Captum |")
    print("|---|---|---|---|")
    for dtype in (torch.float16, torch.bfloat16):
        cast = copy.deepcopy(model).to(dtype)
        ours = IncrementalOcclusion(cast).attribute(image.to(dtype), engine="incremental", **kwargs)
        captum = Occlusion(cast).attribute(image.to(dtype), perturbations_per_eval=64, **kwargs)

        def deviation(a, b):
            return ((a.float() - b.float()).abs().max() / scale).item()

        print(
            f"| {str(dtype).replace('torch.', '')} | {deviation(ours, exact):.2e} "
            f"| {deviation(captum, exact):.2e} | {deviation(ours, captum):.2e} |"
        )


if __name__ == "__main__":
    main()
