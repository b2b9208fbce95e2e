"""Speed of two source trees of the package side by side, in one run on one device.

    python benchmarks/versions.py --trees OLD_DIR NEW_DIR [--models vgg16 ...] [--rounds 2]

Each tree is a directory holding a `captum_krypton` package (e.g. `git archive REV
captum_krypton widget js | tar -x -C DIR`; widget/ is not needed). Every (tree,
model) pair runs in its own process, the trees alternating, `--rounds` times; a
process times one warm-up call (capture, plan, kernel choices: the first call)
and then the median of three `attribute` calls. Settings are benchmarks/gpu.py's:
one image, window (3, 16, 16), stride 4, fp32 with PyTorch's default CUDA
settings, random weights (seed 0). Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu import MODELS  # noqa: E402  (the GPU benchmark's models and input sizes)


def measure(name: str, size: int, stride: int) -> dict:
    """Runs in the child process: first call and warm seconds of one model."""
    import torch
    import torchvision

    from captum_krypton import IncrementalOcclusion

    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    extra = {"init_weights": False, "aux_logits": False} if name == "inception_v3" else {}
    model = getattr(torchvision.models, name)(weights=None, **extra).eval().cuda()
    image = torch.randn(1, 3, size, size, device="cuda")
    explainer = IncrementalOcclusion(model)

    def call() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        explainer.attribute(image, sliding_window_shapes=(3, 16, 16), strides=stride, target=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    first = call()
    warm = statistics.median(call() for _ in range(3))
    return {"first_call_seconds": first, "seconds": warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", nargs=2, required=True, metavar=("OLD", "NEW"))
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/versions.json")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, size = args.child[0], int(args.child[1])
        print(json.dumps(measure(name, size, args.stride)))
        return
    runs: dict = {m: {t: [] for t in args.trees} for m in args.models}
    for _ in range(args.rounds):
        for model in args.models:
            for tree in args.trees:
                path = [os.path.abspath(tree), os.environ.get("PYTHONPATH", "")]
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
                child = [sys.executable, __file__, "--trees", *args.trees, "--child"]
                child += [model, str(MODELS[model]), "--stride", str(args.stride)]
                out = subprocess.run(child, env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    print(out.stderr[-2000:], file=sys.stderr)
                    continue
                runs[model][tree].append(json.loads(out.stdout.strip().splitlines()[-1]))
            report(args, runs)  # after every model: a run cut short keeps what it measured


def report(args: argparse.Namespace, runs: dict) -> None:
    """Best of the rounds per tree: a markdown table on stdout and the JSON file."""
    import torch

    old, new = args.trees
    rows = []
    lines = [
        f"| model | {old} s | {new} s | new/old | first call {old} | first call {new} |",
        "|---|---|---|---|---|---|",
    ]
    for model, by_tree in runs.items():
        if not all(by_tree.values()):
            continue
        best = {t: min(r["seconds"] for r in by_tree[t]) for t in (old, new)}
        first = {t: min(r["first_call_seconds"] for r in by_tree[t]) for t in (old, new)}
        rows.append({"model": model, "seconds": best, "first_call_seconds": first, "runs": by_tree})
        lines.append(
            f"| {model} | {best[old]:.4f} | {best[new]:.4f} | {best[new] / best[old]:.3f} "
            f"| {first[old]:.1f} | {first[new]:.1f} |"
        )
    print("\n".join(lines), flush=True)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "trees": args.trees,
        "stride": args.stride,
        "results": rows,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
