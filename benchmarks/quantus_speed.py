"""Quantus metrics with Captum's Occlusion vs IncrementalOcclusion put in its place.

    python benchmarks/quantus_speed.py [--size 32] [--images 4] [--device cpu|cuda]

Quantus calls Occlusion with its defaults: window (1, 4, 4), stride 1,
perturbations_per_eval 1. The demo model (trained on generated shapes; fully
convolutional up to a global pool, so any input size works) on `--images`
generated images of `--size` pixels. Times FaithfulnessCorrelation and
MaxSensitivity end to end, each way, and checks that the scores agree.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import quantus
import torch

from captum_krypton import IncrementalOcclusion
from captum_krypton.demo.data import make_dataset, normalize
from captum_krypton.demo.model import load_demo_model

METRICS = {
    "FaithfulnessCorrelation": lambda: quantus.FaithfulnessCorrelation(
        nr_runs=10, subset_size=32, perturb_baseline="black", return_aggregate=False
    ),
    "MaxSensitivity": lambda: quantus.MaxSensitivity(
        nr_samples=3, lower_bound=0.1, return_aggregate=False
    ),
}


def timed_scores(metric, model, x, y, device):
    np.random.seed(0)
    torch.manual_seed(0)
    started = time.perf_counter()
    scores = metric()(
        model=model,
        x_batch=x,
        y_batch=y,
        a_batch=None,
        explain_func=quantus.explain,
        explain_func_kwargs={"method": "Occlusion"},
        device=device,
    )
    return time.perf_counter() - started, np.asarray(scores, dtype=np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = load_demo_model().to(args.device)
    images, labels = make_dataset(args.images, seed=77, size=args.size)
    x, y = normalize(images).numpy(), labels.numpy()
    explanation = quantus.functions.explanation_func
    captums_occlusion = explanation.Occlusion
    results = {}
    for name, metric in METRICS.items():
        explanation.Occlusion = captums_occlusion
        captum_s, captum_scores = timed_scores(metric, model, x, y, args.device)
        explanation.Occlusion = IncrementalOcclusion
        ours_s, ours_scores = timed_scores(metric, model, x, y, args.device)
        explanation.Occlusion = captums_occlusion
        results[name] = {
            "captum_seconds": captum_s,
            "incremental_seconds": ours_s,
            "speedup": captum_s / ours_s,
            "max_score_difference": float(np.abs(captum_scores - ours_scores).max()),
        }
        print(name, json.dumps(results[name]), flush=True)
    print(
        json.dumps(
            {
                "size": args.size,
                "images": args.images,
                "device": args.device,
                "torch_threads": torch.get_num_threads(),
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
