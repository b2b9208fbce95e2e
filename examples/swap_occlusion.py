"""Swap captum's Occlusion for IncrementalOcclusion in an existing script.

python examples/swap_occlusion.py
"""

import time

import torch
import torchvision
from captum.attr import Occlusion

from captum_krypton import IncrementalOcclusion

model = torchvision.models.resnet18(weights=None).eval()
image = torch.randn(1, 3, 224, 224)
args = dict(sliding_window_shapes=(3, 16, 16), strides=8, target=0)

start = time.perf_counter()
incremental = IncrementalOcclusion(model).attribute(image, **args)
middle = time.perf_counter()
reference = Occlusion(model).attribute(image, perturbations_per_eval=64, **args)
end = time.perf_counter()

print(IncrementalOcclusion(model).plan(image, (3, 16, 16), strides=8).summary(max_rows=8))
print(f"IncrementalOcclusion {middle - start:.1f} s, Occlusion {end - middle:.1f} s")
print(f"largest difference: {(incremental - reference).abs().max().item():.2e}")
