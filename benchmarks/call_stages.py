"""Where one call's time goes: exact mode, drill-down and target_ssim, by stage.

python -m benchmarks.call_stages [--models resnet18 vgg16 efficientnet_b0 inception_v3]

Each model is trained briefly on generated shapes (as benchmarks/approximate.py
does) and explains one held-out image, window (3, 16, 16), stride 4. Per
setting: six warm-up calls, then five timed calls (median), with the time
spent in each part of the run summed per call. Every part is timed between
device synchronizations, so the parts add host and device time alike, and the
call times carry those synchronizations too. Then cProfile of three calibrating
target_ssim calls.

Settings: exact mode, two drill-downs, "target0.9" (target_ssim's race against
exact mode on, engine/target_race.py: after the warm-up, the arm that was
faster) and "target0.9 calibrating" (every call calibrates). Parts (engine
internals, so this script may need updating with them):

- `ProgressiveRun._batches`: the window batches of every stage (the
  calibration's exact windows included);
- `ProgressiveRun._calibrate`: the calibration, its exact windows included
  (`calibration.seconds` leaves them out);
- `ProgressiveRun._heatmap`: the map from the table; `_self_check` and
  `WindowCheck.__init__`: the self-check's two halves;
- counts: `captures` (CUDA graph captures) and `state_copies` (a call's clean
  run copied into the graphs' private copy).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time
from collections import defaultdict

import numpy as np
import torch

from benchmarks import approximate
from captum_krypton import IncrementalOcclusion
from captum_krypton.engine import graphs, progressive, self_check

SETTINGS = {
    "exact": {},
    "dd0.25f2": {"drilldown": 0.25, "drilldown_factor": 2},
    "dd0.05f4": {"drilldown": 0.05},
    "target0.9": {"target_ssim": 0.9},
    "target0.9 calibrating": {"target_ssim": 0.9},
}
#: Settings whose every call calibrates: target_ssim's race against exact mode
#: (engine/target_race.py) is off, so that the calibration's own cost shows.
CALIBRATING = {"target0.9 calibrating"}
#: Warm-up calls: six, so that target_ssim's race has timed both arms.
WARM_UP, TIMED, PROFILED = 6, 5, 3


class StageTimer:
    """Wraps engine methods to sum, per call, the time spent in them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def clear(self) -> None:
        self.seconds.clear()
        self.counts.clear()

    def wrap(self, owner: type, name: str, generator: bool = False) -> None:
        method = getattr(owner, name)
        key = f"{owner.__name__}.{name}"
        timer = self

        def timed_generator(*args, **kwargs):
            parts = method(*args, **kwargs)
            timer.counts[key] += 1
            while True:
                timer.sync()
                started = time.perf_counter()
                try:
                    value = next(parts)
                except StopIteration:
                    timer.sync()
                    timer.seconds[key] += time.perf_counter() - started
                    return
                timer.sync()
                timer.seconds[key] += time.perf_counter() - started
                yield value

        def timed(*args, **kwargs):
            timer.sync()
            started = time.perf_counter()
            timer.counts[key] += 1
            try:
                return method(*args, **kwargs)
            finally:
                timer.sync()
                timer.seconds[key] += time.perf_counter() - started

        setattr(owner, name, timed_generator if generator else timed)

    def count_graph_work(self) -> None:
        capture = graphs.GraphedBatch.capture
        load = graphs.GraphState.load
        timer = self

        def counted_capture(cls, *args, **kwargs):
            timer.counts["captures"] += 1
            return capture(*args, **kwargs)

        def counted_load(state, prepared):
            version = state._inputs._version  # copy_ bumps it
            loaded = load(state, prepared)
            if state._inputs._version != version:
                timer.counts["state_copies"] += 1
            return loaded

        graphs.GraphedBatch.capture = classmethod(counted_capture)
        graphs.GraphState.load = counted_load


def profile_text(profile: cProfile.Profile, key: str, rows: int) -> str:
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats(key).print_stats(rows)
    return text.getvalue()


def run_model(name: str, timer: StageTimer, size: int | None, steps: int) -> dict:
    device = timer.device
    size = size or approximate.MODELS[name]
    model = approximate.build(name, len(approximate.CLASSES))
    started = time.perf_counter()
    accuracy = approximate.train(model, size, steps * approximate.STEP_FACTOR.get(name, 1))
    model = model.to(device).eval()
    images, labels = approximate.make_dataset(3, seed=2027, size=size)
    image = approximate.normalize(images[0])[None].to(device)
    kwargs = dict(sliding_window_shapes=approximate.WINDOW, strides=4, target=int(labels[0]))
    result: dict = {"held_out_accuracy": accuracy, "train_seconds": time.perf_counter() - started}
    occlusion = IncrementalOcclusion(model)
    for label, options in SETTINGS.items():
        occlusion._target_race.enabled = label not in CALIBRATING
        for _ in range(WARM_UP):
            occlusion.attribute(image, **kwargs, **options)
        timer.clear()
        times = []
        for _ in range(TIMED):
            timer.sync()
            started = time.perf_counter()
            occlusion.attribute(image, **kwargs, **options)
            timer.sync()
            times.append(time.perf_counter() - started)
        run = occlusion.last_run
        calibration = run.calibration
        result[label] = {
            "median_ms": 1e3 * float(np.median(times)),
            "target_ssim_choice": run.target_ssim_choice,
            "windows": run.windows_computed,
            "parts_ms_per_call": {k: 1e3 * v / TIMED for k, v in timer.seconds.items()},
            "counts_per_call": {k: v / TIMED for k, v in timer.counts.items()},
            "calibration": None
            if calibration is None
            else {
                "seconds": calibration.seconds,
                "sample": calibration.sample_windows,
                "fraction": calibration.refined_fraction,
                "approx": repr(calibration.approximation),
                "fraction_errors": calibration.fraction_errors,
            },
        }
        print(name, label, json.dumps(result[label]), flush=True)
    occlusion._target_race.enabled = False  # the calibration's path
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(PROFILED):
        occlusion.attribute(image, **kwargs, target_ssim=0.9)
    timer.sync()
    profile.disable()
    result["profile_tottime"] = profile_text(profile, "tottime", 35)
    result["profile_cum"] = profile_text(profile, "cumulative", 60)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "vgg16"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=None, help="replace the input size")
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "call_stages.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    approximate.DEVICE = device
    timer = StageTimer(device)
    for owner, name, generator in (
        (progressive.ProgressiveRun, "_batches", True),
        (progressive.ProgressiveRun, "_calibrate", False),
        (progressive.ProgressiveRun, "_self_check", False),
        (progressive.ProgressiveRun, "_heatmap", False),
        (self_check.WindowCheck, "__init__", False),
        (IncrementalOcclusion, "attribute", False),
    ):
        timer.wrap(owner, name, generator)
    timer.count_graph_work()
    results = {"device": str(device), "torch": torch.__version__, "models": {}}
    if device.type == "cuda":
        results["device"] = torch.cuda.get_device_name(device)
    for name in args.models:
        results["models"][name] = run_model(name, timer, args.size, args.train_steps)
        with open(args.out, "w") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
