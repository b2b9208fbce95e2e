"""Where IncrementalOcclusion's GPU time goes: torch.profiler over one run.

python benchmarks/profile_gpu.py [--model vgg16] [--stride 4]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.gpu import MODELS, load
from captum_krypton import IncrementalOcclusion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16", choices=list(MODELS))
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--rows", type=int, default=18)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    model = load(args.model)
    size = MODELS[args.model]
    image = torch.randn(1, 3, size, size, device="cuda")
    occlusion = IncrementalOcclusion(model)
    kwargs = dict(sliding_window_shapes=(3, 16, 16), strides=args.stride, target=0)
    occlusion.attribute(image, **kwargs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        occlusion.attribute(image, **kwargs)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
