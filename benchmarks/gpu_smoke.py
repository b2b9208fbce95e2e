"""GPU smoke timing of the torch-op engine against Captum, in one process.

    python benchmarks/gpu_smoke.py

One 224x224 image per model, window (3, 16, 16), default CUDA settings (TF32 on),
cudnn.benchmark on; Captum at perturbations_per_eval 64 and 256, best kept.
"""

import time

import torch
import torchvision
from captum.attr import Occlusion

from captum_krypton import IncrementalOcclusion


def cuda_seconds(fn):
    fn()  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, result


def time_model(name: str, stride: int) -> None:
    model = getattr(torchvision.models, name)(weights=None).eval().cuda()
    x = torch.randn(1, 3, 224, 224, device="cuda")
    kwargs = dict(sliding_window_shapes=(3, 16, 16), strides=stride, target=0)
    occlusion = IncrementalOcclusion(model)
    ours, attribution = cuda_seconds(lambda: occlusion.attribute(x, **kwargs))
    best = float("inf")
    for batch in (64, 256):
        seconds, expected = cuda_seconds(
            lambda batch=batch: Occlusion(model).attribute(
                x, perturbations_per_eval=batch, **kwargs
            )
        )
        best = min(best, seconds)
    difference = ((attribution - expected).abs().max() / expected.abs().max()).item()
    print(
        f"{name}: incremental {ours:.3f} s, Captum best {best:.3f} s, "
        f"ratio {best / ours:.2f}x, max difference / map {difference:.1e}"
    )


def main() -> None:
    torch.backends.cudnn.benchmark = True
    print(torch.cuda.get_device_name())
    for name, stride in [("resnet18", 8), ("vgg16", 16)]:
        time_model(name, stride)


if __name__ == "__main__":
    main()
