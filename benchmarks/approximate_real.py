"""CPU benchmark of the approximations on models trained on real data, real inputs.

    python -m benchmarks.approximate_real [--models onet cifar10 vad] [--images 24]
        [--out DIR]

Models and inputs from benchmarks/real_models.py (install: `pip install -e
".[benchmarks]"` and `pip install --no-deps facenet-pytorch==2.6.0
cifar-10-model==7.4.0`; `apt-get install alsa-utils` for speech):
- onet: MTCNN's ONet, P(face), on scikit-image's LFW faces (25x25 grey, resized
  to 48x48) and the astronaut's face; window (3, 8, 8), stride 2 (441 windows).
- cifar10: cifar-10-model's Keras CNN, the predicted class's score, on 32x32 crops
  of scikit-image's photos; window (3, 4, 4), stride 1 (841 windows).
- vad: Silero VAD's chunk model (1-D), speech probability, on the loudest chunks
  of alsa-utils' speech; window (1, 32), stride (1, 8) (69 windows).

Exact maps: captum.attr.Occlusion (float32) at the best perturbations_per_eval of
a sweep on the first input. Per setting (exact IncrementalOcclusion; tau 0.9,
0.7, 0.5; drill-down 0.1 / 0.25 at coarse factor 4 and 2; target_ssim 0.9 and
0.95), after one warm-up call on the first input (plans, kernel choices): the
summed wall time over the inputs against Captum's and exact
IncrementalOcclusion's, and SSIM (captum_krypton.attribution_ssim) against
Captum's map: worst, median, share of inputs at or above 0.9. Default settings
otherwise (the self-check on). Writes results/approximate_real_cpu.json and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import Occlusion

from benchmarks import real_models as rm
from captum_krypton import IncrementalOcclusion, attribution_ssim

SETTINGS: tuple[tuple[str, dict], ...] = (
    ("exact", {}),
    ("tau 0.9", {"tau": 0.9}),
    ("tau 0.7", {"tau": 0.7}),
    ("tau 0.5", {"tau": 0.5}),
    ("drill-down 0.1, factor 4", {"drilldown": 0.1, "drilldown_factor": 4}),
    ("drill-down 0.25, factor 4", {"drilldown": 0.25, "drilldown_factor": 4}),
    ("drill-down 0.1, factor 2", {"drilldown": 0.1, "drilldown_factor": 2}),
    ("drill-down 0.25, factor 2", {"drilldown": 0.25, "drilldown_factor": 2}),
    ("target_ssim 0.9", {"target_ssim": 0.9}),
    ("target_ssim 0.95", {"target_ssim": 0.95}),
)
PERTURBATIONS_PER_EVAL = (16, 64, 256, 1024)
THRESHOLD = 0.9


@dataclass
class Case:
    model: Callable[[], torch.nn.Module]
    inputs: Callable[[int], torch.Tensor]
    window: tuple[int, ...]
    strides: int | tuple[int, ...]
    #: the output explained: an index, or None for the predicted class
    target: int | None
    needs: tuple[str, ...]


CASES = {
    "onet": Case(
        rm.face_detector,
        lambda n: torch.cat([rm.astronaut_face(), rm.lfw_faces(n - 1)]),
        (3, 8, 8),
        2,
        1,
        ("facenet_pytorch", "skimage"),
    ),
    "cifar10": Case(
        rm.cifar10_cnn,
        lambda n: rm.photo_crops(per_photo=-(-n // len(rm.PHOTOS)))[:n],
        (3, 4, 4),
        1,
        None,
        ("cifar_10_model", "h5py", "skimage"),
    ),
    "vad": Case(
        rm.voice_detector,
        lambda n: rm.speech_chunks(min(n, 8)),
        (1, 32),
        (1, 8),
        0,
        ("silero_vad",),
    ),
}


def timed(call: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def run_case(name: str, case: Case, count: int) -> dict:
    model = case.model()
    batch = case.inputs(count)
    with torch.no_grad():
        outputs = model(batch)
    inputs = [x[None] for x in batch]
    targets = (
        [int(t) for t in outputs.argmax(1)] if case.target is None else [case.target] * len(inputs)
    )
    kwargs = dict(sliding_window_shapes=case.window, strides=case.strides)

    captum = Occlusion(model)
    sweep = {}
    for ppe in PERTURBATIONS_PER_EVAL:
        captum.attribute(inputs[0], target=targets[0], perturbations_per_eval=ppe, **kwargs)
        sweep[ppe] = min(
            timed(
                lambda ppe=ppe: captum.attribute(
                    inputs[0], target=targets[0], perturbations_per_eval=ppe, **kwargs
                )
            )[0]
            for _ in range(2)
        )
    best_ppe = min(sweep, key=sweep.get)
    captum_s, exact = 0.0, []
    for x, t in zip(inputs, targets):
        seconds, result = timed(
            lambda x=x, t=t: captum.attribute(
                x, target=t, perturbations_per_eval=best_ppe, **kwargs
            )
        )
        captum_s += seconds
        exact.append(result)
    print(f"{name}: Captum {captum_s:.2f} s at perturbations_per_eval={best_ppe}", flush=True)

    occlusion = IncrementalOcclusion(model)
    rows = []
    for label, options in SETTINGS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            occlusion.attribute(inputs[0], target=targets[0], **kwargs, **options)  # warm-up
            total, ssim, per_input = 0.0, [], []
            for x, t, e in zip(inputs, targets, exact):
                seconds, result = timed(
                    lambda x=x, t=t, o=options: occlusion.attribute(x, target=t, **kwargs, **o)
                )
                total += seconds
                ssim.append(float(attribution_ssim(result, e)[0]))
                run = occlusion.last_run
                chosen = run.approximation
                per_input.append(
                    {
                        "seconds": seconds,
                        "engine": run.engine,
                        "windows_computed": run.windows_computed,
                        "windows_total": run.windows_total,
                        "tau": chosen.tau,
                        "drilldown": chosen.drilldown,
                        "estimated_ssim": chosen.estimated_ssim,
                        "calibration_windows": (
                            run.calibration.windows_run if run.calibration else None
                        ),
                    }
                )
        values = np.asarray(ssim)
        rows.append(
            {
                "setting": label,
                "options": options,
                "seconds": total,
                "windows_computed_mean": float(np.mean([p["windows_computed"] for p in per_input])),
                "windows_total": per_input[0]["windows_total"],
                "ssim": ssim,
                "ssim_worst": float(values.min()),
                "ssim_median": float(np.median(values)),
                "share_at_threshold": float((values >= THRESHOLD).mean()),
                "per_input": per_input,
            }
        )
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "per_input"}), flush=True)
    exact_s = rows[0]["seconds"]
    for row in rows:
        row["speedup_vs_captum"] = captum_s / row["seconds"]
        row["speedup_vs_exact"] = exact_s / row["seconds"]
    return {
        "model": name,
        "inputs": len(inputs),
        "window": case.window,
        "strides": case.strides,
        "captum_sweep_seconds": sweep,
        "captum_perturbations_per_eval": best_ppe,
        "captum_seconds": captum_s,
        "rows": rows,
    }


def table(results: list[dict]) -> str:
    lines = [
        "| model | setting | windows | time | vs Captum | vs exact | SSIM worst | median "
        f"| >= {THRESHOLD} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for row in result["rows"]:
            lines.append(
                f"| {result['model']} | {row['setting']} | "
                f"{row['windows_computed_mean']:.0f} / {row['windows_total']} | "
                f"{row['seconds']:.2f} s | {row['speedup_vs_captum']:.2f}x | "
                f"{row['speedup_vs_exact']:.2f}x | {row['ssim_worst']:.3f} | "
                f"{row['ssim_median']:.3f} | {row['share_at_threshold']:.0%} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = parser.parse_args()
    results = []
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "approximate_real_cpu.json")
    header = {
        "device": f"CPU: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    for name in args.models:
        missing = rm.missing_packages(*CASES[name].needs)
        if name == "vad" and not os.path.isdir(rm.ALSA_SOUNDS):
            missing.append(rm.ALSA_SOUNDS + " (alsa-utils)")
        if missing:
            print(f"{name}: skipped, not installed: {', '.join(missing)}")
            continue
        results.append(run_case(name, CASES[name], args.images))
        with open(path, "w") as f:
            json.dump({**header, "results": results}, f, indent=2)
    print(f"\n{header['device']}, torch {header['torch']}\n")
    print(table(results))


if __name__ == "__main__":
    main()
