"""Conv kernels on the real box shapes of the benchmark models (CUDA).

    python benchmarks/conv_kernels.py [--models vgg16 resnet18 ...] [--stride 4]

For every conv the engine runs on boxes, the engine measures each implementation
once per shape (kernels.choice): cuDNN on the gathered tile (+ ReLU), cuDNN's
fused conv+ReLU on the tile, and the implicit-GEMM Triton conv that reads
(box | view | zero) directly. This script runs one attribution per model and
writes those measurements (ms per batch) to benchmarks/results/conv_kernels.json.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from benchmarks.gpu import MODELS, load
from captum_krypton import IncrementalOcclusion
from captum_krypton.kernels import choice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "models": {}}
    for name in args.models:
        model = load(name)
        size = MODELS[name]
        image = torch.randn(1, 3, size, size, device="cuda")
        before = set(choice.measurements())
        IncrementalOcclusion(model).attribute(
            image, sliding_window_shapes=(3, 16, 16), strides=args.stride, target=0
        )
        torch.cuda.synchronize()
        rows = []
        for key, times in choice.measurements().items():
            if key in before or key[0] != "conv":
                continue
            _, batch_rows, in_shape, in_box, weight, window, out_size, act, *_ = key
            rows.append(
                {
                    "rows": batch_rows,
                    "input": list(in_shape),
                    "input_box": list(in_box) if in_box else None,
                    "weight": list(weight),
                    "stride": list(window.stride),
                    "out_box": list(out_size),
                    "activation": act,
                    "ms": times,
                    "fastest": min(times, key=times.__getitem__),
                }
            )
        chosen_ms = sum(min(r["ms"].values()) for r in rows)
        tile_ms = sum(r["ms"]["tile+conv"] for r in rows)
        wins: dict[str, int] = {}
        for r in rows:
            wins[r["fastest"]] = wins.get(r["fastest"], 0) + 1
        results["models"][name] = {"layers": rows, "wins": wins}
        print(
            f"{name}: {len(rows)} conv shapes, fastest counts {wins}; "
            f"sum of per-layer best {chosen_ms:.1f} ms vs tile+conv everywhere {tile_ms:.1f} ms"
        )
        for r in rows:
            cells = " ".join(f"{k}={v:.3f}" for k, v in r["ms"].items())
            print(f"  w{r['weight']} box{r['out_box']} rows {r['rows']}: {cells}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "conv_kernels.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
