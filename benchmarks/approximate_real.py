"""CPU benchmark of the approximations on models trained on real data, real inputs.

    python -m benchmarks.approximate_real [--models onet cifar10 vad] [--images 24]
        [--repeats 1] [--out DIR]

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
a sweep on the first input. Settings: exact IncrementalOcclusion; hand-picked
ones (tau 0.9, 0.7, 0.5; drill-down fractions at coarse factor 4 and 2);
target_ssim 0.9 and 0.95 (as a series of calls gets them: each races calibrating
against exact mode, engine/target_race.py); target_ssim 0.9 calibrated once, on
the first input, and reused for every input (`calibration=`); and target_ssim 0.9
with every call calibrating (the race off). Each setting first runs once on the
first input (plans, kernel choices; the reused calibration is made there); then
every input runs every setting, in an order rotated from input to input, so that
the machine's load falls on all settings alike; with --repeats, each input's time
is its fastest of the repeats. Per setting: the summed wall time over the inputs
against Captum's and exact IncrementalOcclusion's; SSIM
(captum_krypton.attribution_ssim) against Captum's map: worst, median, share of
inputs at or above 0.9 and 0.95; for target_ssim, the calibration's own share of
the time and, per target, the speed against the fastest hand-picked setting that
reached the target on at least 90% of the inputs (exact mode where none did).
Default settings otherwise (the self-check on). Writes
results/approximate_real_cpu.json and prints markdown tables.
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
    ("drill-down 0.15, factor 2", {"drilldown": 0.15, "drilldown_factor": 2}),
    ("drill-down 0.25, factor 2", {"drilldown": 0.25, "drilldown_factor": 2}),
    ("drill-down 0.4, factor 2", {"drilldown": 0.4, "drilldown_factor": 2}),
    ("drill-down 0.5, factor 2", {"drilldown": 0.5, "drilldown_factor": 2}),
    ("target_ssim 0.9", {"target_ssim": 0.9}),
    ("target_ssim 0.95", {"target_ssim": 0.95}),
    ("target_ssim 0.9, reused", {"target_ssim": 0.9, "reuse": True}),
    ("target_ssim 0.9, every call calibrating", {"target_ssim": 0.9, "race": False}),
)
#: The hand-picked settings (the others are exact mode and target_ssim).
HAND_PICKED = tuple(label for label, options in SETTINGS[1:] if "target_ssim" not in options)
TARGETS = (0.9, 0.95)
#: Share of the inputs that must reach a target for a setting to count as reaching it.
SHARE = 0.9
PERTURBATIONS_PER_EVAL = (16, 64, 256, 1024)


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


def run_case(name: str, case: Case, count: int, repeats: int = 1) -> dict:
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
    options_of, races = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, options in SETTINGS:  # warm-up; the reused calibration is made here
            options = dict(options)
            race = options.pop("race", True)
            occlusion._target_race.enabled = race
            if options.pop("reuse", False):  # calibrated here, the race off
                occlusion._target_race.enabled = False
                occlusion.attribute(inputs[0], target=targets[0], **kwargs, **options)
                options = {"calibration": occlusion.last_run.calibration}
                occlusion._target_race.enabled = race
            occlusion.attribute(inputs[0], target=targets[0], **kwargs, **options)
            options_of[label] = options
            races[label] = race
        labels = [label for label, _ in SETTINGS]
        runs = {label: [] for label in labels}
        for i, (x, t, e) in enumerate(zip(inputs, targets, exact)):
            order = labels[i % len(labels) :] + labels[: i % len(labels)]
            for label in order:
                options = options_of[label]
                occlusion._target_race.enabled = races[label]
                times = []
                for _ in range(repeats):
                    seconds, result = timed(
                        lambda x=x, t=t, o=options: occlusion.attribute(x, target=t, **kwargs, **o)
                    )
                    times.append(seconds)
                run = occlusion.last_run
                chosen = run.approximation
                calibration = run.calibration
                runs[label].append(
                    {
                        "seconds": min(times),
                        "ssim": float(attribution_ssim(result, e)[0]),
                        "engine": run.engine,
                        "windows_computed": run.windows_computed,
                        "windows_total": run.windows_total,
                        "tau": chosen.tau,
                        "drilldown": chosen.drilldown,
                        "drilldown_factor": chosen.drilldown_factor,
                        "estimated_ssim": chosen.estimated_ssim,
                        "calibration_seconds": calibration.seconds if calibration else None,
                        "sample_windows": calibration.sample_windows if calibration else None,
                        "probe_windows": calibration.windows_run if calibration else None,
                    }
                )
        print(f"{name}: {len(inputs)} inputs done", flush=True)
    rows = []
    for label, options in SETTINGS:
        per_input = runs[label]
        values = np.asarray([p["ssim"] for p in per_input])
        total = float(sum(p["seconds"] for p in per_input))
        calibrating = [p["calibration_seconds"] for p in per_input]
        rows.append(
            {
                "setting": label,
                "options": {k: v for k, v in options.items() if k not in ("reuse", "race")},
                "seconds": total,
                "windows_computed_mean": float(np.mean([p["windows_computed"] for p in per_input])),
                "windows_total": per_input[0]["windows_total"],
                "ssim": values.tolist(),
                "ssim_worst": float(values.min()),
                "ssim_median": float(np.median(values)),
                "share_at": {str(t): float((values >= t).mean()) for t in TARGETS},
                "calibration_share": (
                    None
                    if all(c is None for c in calibrating)
                    else float(sum(c or 0.0 for c in calibrating)) / total
                ),
                "per_input": per_input,
            }
        )
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "per_input"}), flush=True)
    exact_s = rows[0]["seconds"]
    for row in rows:
        row["speedup_vs_captum"] = captum_s / row["seconds"]
        row["speedup_vs_exact"] = exact_s / row["seconds"]
    best = {}
    by_label = {row["setting"]: row for row in rows}
    for target in TARGETS:
        reaching = [
            by_label[label]
            for label in HAND_PICKED
            if by_label[label]["share_at"][str(target)] >= SHARE
        ]
        fastest = min(reaching, key=lambda row: row["seconds"], default=rows[0])
        chosen = by_label[f"target_ssim {target}"]
        best[str(target)] = {
            "fastest_hand_picked": fastest["setting"],
            "seconds": fastest["seconds"],
            "target_ssim_speed_share": fastest["seconds"] / chosen["seconds"],
        }
    return {
        "model": name,
        "inputs": len(inputs),
        "window": case.window,
        "strides": case.strides,
        "captum_sweep_seconds": sweep,
        "captum_perturbations_per_eval": best_ppe,
        "captum_seconds": captum_s,
        "rows": rows,
        "best_hand_picked": best,
    }


def table(results: list[dict]) -> str:
    lines = [
        "| model | setting | windows | time | vs Captum | vs exact | SSIM worst | median "
        "| >= 0.9 | >= 0.95 | calibration |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for row in result["rows"]:
            share = row["calibration_share"]
            lines.append(
                f"| {result['model']} | {row['setting']} | "
                f"{row['windows_computed_mean']:.0f} / {row['windows_total']} | "
                f"{row['seconds']:.2f} s | {row['speedup_vs_captum']:.2f}x | "
                f"{row['speedup_vs_exact']:.2f}x | {row['ssim_worst']:.3f} | "
                f"{row['ssim_median']:.3f} | {row['share_at']['0.9']:.0%} | "
                f"{row['share_at']['0.95']:.0%} | "
                f"{'-' if share is None else f'{share:.1%}'} |"
            )
    lines += [
        "",
        "| model | target | fastest hand-picked reaching it on >= 90% | its time "
        "| target_ssim's speed vs it |",
        "|---|---|---|---|---|",
    ]
    for result in results:
        for target, best in result.get("best_hand_picked", {}).items():
            lines.append(
                f"| {result['model']} | {target} | {best['fastest_hand_picked']} | "
                f"{best['seconds']:.2f} s | {best['target_ssim_speed_share']:.0%} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = parser.parse_args()
    results = []
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "approximate_real_cpu.json")
    header = {
        "device": f"CPU: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(),
    }
    for name in args.models:
        missing = rm.missing_packages(*CASES[name].needs)
        if name == "vad" and not os.path.isdir(rm.ALSA_SOUNDS):
            missing.append(rm.ALSA_SOUNDS + " (alsa-utils)")
        if missing:
            print(f"{name}: skipped, not installed: {', '.join(missing)}")
            continue
        results.append(run_case(name, CASES[name], args.images, args.repeats))
        header["load_average_at_end"] = os.getloadavg()
        with open(path, "w") as f:
            json.dump({**header, "results": results}, f, indent=2)
    start, end = header["load_average_at_start"], header.get("load_average_at_end", (0.0,))
    load = f"{start[0]:.1f} -> {end[0]:.1f}"
    print(f"\n{header['device']}, torch {header['torch']}, 1-min load average {load}\n")
    print(table(results))


if __name__ == "__main__":
    main()
