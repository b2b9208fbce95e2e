"""GPU benchmark: IncrementalOcclusion vs optimized naive re-inference, fp32 and bf16.

    python benchmarks/gpu.py [--models vgg16 resnet18 ...] [--quick] [--captum]
        [--out-name gpu.json] [--append] [--missing-only] [--time-budget SECONDS]
    python benchmarks/gpu.py --device cpu --tiny --models resnet18   # smoke test, no GPU
    python benchmarks/gpu.py --report --out-name gpu.json            # table from the JSON

One input per model (torchvision architecture, weights=None, seed 0), target 0;
each model's input shape, window and stride are in `cases()` (image models:
window (3, 16, 16), stride 4). Per model:

- naive fp32 / bf16: our batched re-inference (occluded batches built on the
  device, cudnn.benchmark on), best over channels_last / contiguous and 128 ... 1024
  windows per batch; bf16: best of autocast on the fp32 model and the model in bf16;
- incremental fp32 / bf16: `IncrementalOcclusion(model).attribute` with its
  defaults (bf16: the model and input in bf16): a first call, a call once the
  background compilation has ended (`kernels.wait_for_compilation`; this call
  measures the compiled kernels), then best and median of the timed calls;
- ratios naive / incremental, the plan's FLOP-ratio limit and the share of it
  reached, peak memory;
- first calls in a fresh process: incremental with empty Triton and kernel-choice
  caches ("cold") and again with the same caches ("warm"), and naive (cuDNN
  search included);
- exactness: max |incremental - Captum| / max |Captum| in fp32 (TF32 at PyTorch's
  defaults), Captum's Occlusion at one perturbations_per_eval.

Writes JSON under benchmarks/results/ after every stage of every model (a run cut
short keeps what finished; `--append --missing-only` runs what is missing and
merges) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision
from captum.attr import Occlusion
from torch import nn

from captum_krypton import IncrementalNotApplicable, IncrementalOcclusion
from captum_krypton.engine.windows import WindowGrid
from captum_krypton.kernels import wait_for_compilation

#: The six image models of the original benchmark and their input sizes (other
#: scripts and tests take their models from here).
MODELS = {
    "vgg16": 224,
    "resnet18": 224,
    "resnet50": 224,
    "inception_v3": 299,
    "mobilenet_v2": 224,
    "efficientnet_b0": 224,
}

Stride = int | tuple[int, ...]


@dataclass(frozen=True)
class Case:
    """One benchmark model: how to build it and the occlusion it is measured on."""

    name: str
    shape: tuple[int, ...]  # one example's input shape, (C, *spatial)
    window: tuple[int, ...]
    stride: Stride
    build: Callable[[], nn.Module]

    def strides(self) -> tuple[int, ...]:
        """The stride per input dim, as Captum expands an int."""
        if isinstance(self.stride, int):
            return (self.stride,) * len(self.window)
        return tuple(self.stride)

    def layouts(self) -> tuple[torch.memory_format, ...]:
        """The channels-last format of this input's rank, then contiguous."""
        last = torch.channels_last_3d if len(self.shape) == 4 else torch.channels_last
        return (last, torch.contiguous_format)


class RegionLogit(nn.Module):
    """A segmentation model reduced to one score per example: one class's logits
    summed over a fixed centre box of the output map, shape (N, 1)."""

    def __init__(self, segmenter: nn.Module, class_index: int = 1, box: int = 64) -> None:
        super().__init__()
        self.segmenter = segmenter
        self.class_index = class_index
        self.box = box

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.segmenter(x)["out"]
        top = (logits.shape[-2] - self.box) // 2
        left = (logits.shape[-1] - self.box) // 2
        region = logits[:, self.class_index, top : top + self.box, left : left + self.box]
        return region.sum(dim=(1, 2)).unsqueeze(1)


def _classifier(name: str, **extra: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return getattr(torchvision.models, name)(weights=None, **extra)

    return build


def _fcn_region(box: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        segmenter = torchvision.models.segmentation.fcn_resnet50(
            weights=None, weights_backbone=None, aux_loss=False
        )
        return RegionLogit(segmenter, class_index=1, box=box)

    return build


def _r3d_18() -> nn.Module:
    return torchvision.models.video.r3d_18(weights=None)


def cases(tiny: bool = False, stride: int | None = None) -> dict[str, Case]:
    """The benchmark's models. `tiny`: small inputs and strides for a CPU smoke
    test; `stride` replaces the image models' stride."""
    no_aux = {"init_weights": False, "aux_logits": False}
    image = {
        "vgg16": {},
        "resnet18": {},
        "resnet50": {},
        "inception_v3": no_aux,
        "mobilenet_v2": {},
        "efficientnet_b0": {},
        "convnext_tiny": {},
        "densenet121": {},
        "regnet_y_400mf": {},
        "mobilenet_v3_large": {},
        "resnext50_32x4d": {},
        "googlenet": no_aux,
        "vit_b_16": {},
        "swin_t": {},
    }
    table = {}
    for name, extra in image.items():
        size = MODELS.get(name, 224)
        if tiny:
            size = 96 if name == "inception_v3" else 64
            if name == "vit_b_16":
                extra = {"image_size": size}
        step = stride if stride is not None else (16 if tiny else 4)
        table[name] = Case(name, (3, size, size), (3, 16, 16), step, _classifier(name, **extra))
    size, box = (64, 16) if tiny else (224, 64)
    step = stride if stride is not None else (16 if tiny else 4)
    table["fcn_resnet50_region"] = Case(
        "fcn_resnet50_region", (3, size, size), (3, 16, 16), step, _fcn_region(box)
    )
    if tiny:
        table["r3d_18"] = Case("r3d_18", (3, 4, 32, 32), (3, 2, 16, 16), (3, 2, 16, 16), _r3d_18)
    else:
        table["r3d_18"] = Case("r3d_18", (3, 16, 112, 112), (3, 4, 16, 16), (3, 2, 8, 8), _r3d_18)
    return table


def build_model(case: Case, device: str | torch.device) -> nn.Module:
    """The case's model with seed-0 weights, in eval mode, on `device`."""
    torch.manual_seed(0)
    return case.build().eval().to(device)


def make_input(case: Case, device: str | torch.device) -> torch.Tensor:
    """One example of the case's input shape, seed 0 (the same on every device)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, *case.shape, generator=generator).to(device)


def load(name: str, device: str = "cuda") -> nn.Module:
    """A benchmark model by name (seed 0, eval mode) on `device`."""
    return build_model(cases()[name], device)


# ------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    """Waits for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[list[float], Any]:
    """Seconds of `repeats` calls of `fn` (no warm-up) and the last result."""
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times, result


def cuda_time(
    fn: Callable[[], Any], repeats: int = 3, device: torch.device | None = None
) -> tuple[float, Any]:
    """Median seconds of `repeats` calls after one warm-up call, and a result; on
    CUDA unless `device` says otherwise."""
    fn()
    times, result = timed(fn, device or torch.device("cuda"), repeats)
    return float(np.median(times)), result


def peak_memory(fn: Callable[[], Any]) -> float:
    """CUDA memory (MiB) one call of `fn` allocates above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def peak_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """`peak_memory` on CUDA; None on other devices."""
    return peak_memory(fn) if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    """Returns cached blocks to the driver between stages."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` is the device running out of memory."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)


# ------------------------------------------------------------------ naive baseline
def occlusion_keep_mask(
    grid: WindowGrid, windows: np.ndarray, device: torch.device
) -> torch.Tensor:
    """(windows, C, *spatial) bool, False inside each window, built on `device`."""
    lo, hi = grid.bounds(windows)
    lo_t, hi_t = torch.from_numpy(lo).to(device), torch.from_numpy(hi).to(device)
    rows, ndim = len(windows), len(grid.shape)
    inside = torch.ones((), dtype=torch.bool, device=device)
    for d, size in enumerate(grid.shape):
        position = torch.arange(size, device=device)
        along = (position >= lo_t[:, d : d + 1]) & (position < hi_t[:, d : d + 1])
        inside = inside & along.view([rows] + [1] * d + [size] + [1] * (ndim - d - 1))
    return ~inside


@torch.no_grad()
def naive_occlusion(
    model: nn.Module,
    image: torch.Tensor,
    window: tuple[int, ...],
    stride: Stride,
    target: int,
    batch: int = 256,
    layout: torch.memory_format = torch.channels_last,
    *,
    autocast: bool = False,
    max_batches: int | None = None,
) -> torch.Tensor:
    """Batched full re-inference, written to be fast: occluded batches built on the
    device in `layout` (the model converted to it beforehand), baseline 0.

    autocast: run the forwards under torch.autocast(bfloat16). max_batches: only
    the first `max_batches` batches and the last (a warm-up that meets every batch
    shape; the result is then meaningless)."""
    strides = (stride,) * len(window) if isinstance(stride, int) else tuple(stride)
    grid = WindowGrid(tuple(image.shape[1:]), tuple(window), strides)
    device = image.device

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return model(x.contiguous(memory_format=layout))[:, target].float()

    initial = forward(image)
    diffs = torch.zeros(grid.num_windows, 1, device=device)
    firsts = list(range(0, grid.num_windows, batch))
    if max_batches is not None:
        firsts = sorted(set(firsts[:max_batches] + firsts[-1:]))
    for first in firsts:
        windows = np.arange(first, min(first + batch, grid.num_windows))
        keep = occlusion_keep_mask(grid, windows, device)
        occluded = image * keep.to(image.dtype)
        diffs[first : first + len(windows), 0] = initial - forward(occluded)
    total, count = grid.accumulate(diffs)
    return (total / count).float().to(device)


@dataclass(frozen=True)
class NaiveConfig:
    """One configuration of the naive baseline."""

    precision: str  # "fp32", "autocast" (bf16 autocast on the fp32 model) or "bf16"
    layout: torch.memory_format
    batch: int

    def describe(self) -> dict:
        return {
            "precision": self.precision,
            "channels_last": self.layout != torch.contiguous_format,
            "batch": self.batch,
        }

    def label(self) -> str:
        layout = "CL" if self.layout != torch.contiguous_format else "contig"
        prefix = "" if self.precision == "fp32" else f"{self.precision}, "
        return f"{prefix}{layout}, {self.batch}"


def naive_variant(
    model: nn.Module, image: torch.Tensor, precision: str, layout: torch.memory_format
) -> tuple[nn.Module, torch.Tensor]:
    """A copy of the model (and the input) in the precision and layout of a config."""
    model = copy.deepcopy(model)
    if precision == "bf16":
        model, image = model.to(torch.bfloat16), image.to(torch.bfloat16)
    return model.to(memory_format=layout), image


def naive_runner(
    model: nn.Module, image: torch.Tensor, case: Case, config: NaiveConfig
) -> Callable[..., torch.Tensor]:
    """A call of the naive baseline in `config` on a model and input prepared for it."""

    def run(max_batches: int | None = None) -> torch.Tensor:
        return naive_occlusion(
            model,
            image,
            case.window,
            case.stride,
            0,
            config.batch,
            config.layout,
            autocast=config.precision == "autocast",
            max_batches=max_batches,
        )

    return run


def sweep_naive(
    case: Case,
    model: nn.Module,
    image: torch.Tensor,
    precisions: Iterable[str],
    batches: Iterable[int],
    repeats: int,
) -> dict:
    """The naive baseline over precisions, layouts and batch sizes: each config
    warmed up on its batch shapes and timed once; the fastest timed `repeats` times."""
    device = image.device
    tried: list[dict] = []
    best: tuple[float, NaiveConfig] | None = None
    for precision in precisions:
        for layout in case.layouts():
            variant = naive_variant(model, image, precision, layout)
            for batch in batches:
                config = NaiveConfig(precision, layout, batch)
                entry = {**config.describe()}
                try:
                    run = naive_runner(*variant, case, config)
                    run(max_batches=1)
                    (seconds,), _ = timed(run, device, 1)
                    entry["seconds"] = seconds
                    if best is None or seconds < best[0]:
                        best = (seconds, config)
                except Exception as exc:  # out of memory, or a dtype the model refuses
                    entry["error"] = "out of memory" if is_oom(exc) else repr(exc)[:300]
                tried.append(entry)
                free_memory(device)
            del variant
    if best is None:
        return {"tried": tried, "error": "no configuration ran"}
    config = best[1]
    run = naive_runner(*naive_variant(model, image, config.precision, config.layout), case, config)
    run(max_batches=1)
    times, result = timed(run, device, repeats)
    memory = peak_mib(run, device)
    return {
        "seconds": min(times),
        "median_seconds": statistics.median(times),
        "times": times,
        "config": config.describe(),
        "label": config.label(),
        "peak_mib": memory,
        "tried": tried,
        "map": result,
    }


# ------------------------------------------------------------------ incremental
def time_incremental(
    model: nn.Module,
    image: torch.Tensor,
    case: Case,
    device: torch.device,
    repeats: int,
    ppe: int,
    eager_batches: bool = False,
) -> dict:
    """IncrementalOcclusion with its defaults: the first call in this process, then
    best and median of `repeats` calls. `ppe` only matters where it falls back to
    Captum's path (as a Captum user's call would pass it)."""
    occlusion = IncrementalOcclusion(model)
    kwargs = dict(
        sliding_window_shapes=case.window,
        strides=case.stride,
        target=0,
        perturbations_per_eval=ppe,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (first,), _ = timed(lambda: occlusion.attribute(image, **kwargs), device, 1)
        # The implicit-GEMM conv compiles in the background while cuDNN serves the
        # first calls; the next call after it is ready measures it. Then steady state.
        wait_for_compilation()
        (second,), _ = timed(lambda: occlusion.attribute(image, **kwargs), device, 1)
        times, result = timed(lambda: occlusion.attribute(image, **kwargs), device, repeats)
    report = occlusion.last_run
    fallback = [str(w.message) for w in caught if type(w.message).__name__ == "FallbackWarning"]
    out = {
        "seconds": min(times),
        "median_seconds": statistics.median(times),
        "times": times,
        "first_call_in_process_seconds": first,
        "call_after_compilation_seconds": second,
        "engine": report.engine if report is not None else None,
        "fallback_reason": fallback[0][:500] if fallback else None,
        # A fresh instance: its first call builds the plan and captures its CUDA
        # graphs, whose memory pool a warm call no longer allocates.
        "peak_mib": peak_mib(
            lambda: IncrementalOcclusion(model).attribute(image, **kwargs), device
        ),
        "map": result,
    }
    if eager_batches and device.type == "cuda":  # every batch launched from the host
        eager = dict(kwargs, cuda_graphs=False)
        occlusion.attribute(image, **eager)
        eager_times, _ = timed(lambda: occlusion.attribute(image, **eager), device, repeats)
        out["eager_batches_seconds"] = min(eager_times)
        out["eager_batches_median_seconds"] = statistics.median(eager_times)
    return out


def plan_limit(model: nn.Module, image: torch.Tensor, case: Case) -> dict:
    """The plan's FLOP-ratio limit, or why there is no plan."""
    try:
        plan = IncrementalOcclusion(model).plan(image, case.window, strides=case.stride)
    except IncrementalNotApplicable as exc:
        return {"flop_ratio_limit": None, "plan_note": str(exc)[:500]}
    windows = WindowGrid(case.shape, case.window, case.strides()).num_windows
    return {
        "flop_ratio_limit": plan.theoretical_speedup,
        "full_grid_tflop": plan.flops_full * windows / 1e12,
        "rerun_whole_model": bool(getattr(plan, "rerun_whole_model", False)),
    }


def relative_diff(result: torch.Tensor, expected: torch.Tensor) -> float:
    """max |result - expected| / max |expected| (in fp32)."""
    scale = max(expected.abs().max().item(), 1e-30)
    return (result.float() - expected.float()).abs().max().item() / scale


# ------------------------------------------------------------------ fresh processes
def first_call_child(args: argparse.Namespace) -> dict:
    """In a fresh process: the first call of one model, timed, with a breakdown for
    the incremental engine (capture; capture + plan + pre-window checks)."""
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    case = cases(args.tiny, args.stride)[args.first_call]
    model = build_model(case, device)
    image = make_input(case, device)
    sync(device)
    if args.child_kind == "naive":
        layout = case.layouts()[0] if args.child_channels_last else torch.contiguous_format
        model = model.to(memory_format=layout)
        (seconds,), _ = timed(
            lambda: naive_occlusion(
                model, image, case.window, case.stride, 0, args.child_batch, layout
            ),
            device,
            1,
        )
        return {"seconds": seconds}
    spans = _time_preparation()
    occlusion = IncrementalOcclusion(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (seconds,), _ = timed(
            lambda: occlusion.attribute(
                image,
                sliding_window_shapes=case.window,
                strides=case.stride,
                target=0,
                perturbations_per_eval=args.ppe,
            ),
            device,
            1,
        )
    return {
        "seconds": seconds,
        "capture_seconds": spans.get("capture"),
        "prepare_seconds": spans.get("prepare"),
        "engine": occlusion.last_run.engine if occlusion.last_run is not None else None,
    }


def _time_preparation() -> dict[str, float]:
    """Wraps the engine's capture and preparation (capture + plan + the checks
    before any window) with timers; the spans' seconds land in the returned dict.
    Internals: where they moved, the dict stays empty."""
    spans: dict[str, float] = {}
    try:
        from captum_krypton.engine import preparer
    except ImportError:
        return spans

    def timing(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spans[label] = spans.get(label, 0.0) + time.perf_counter() - start

        return wrapped

    if hasattr(preparer, "capture_cached"):
        preparer.capture_cached = timing("capture", preparer.capture_cached)
    if hasattr(preparer, "Preparer"):
        preparer.Preparer.prepare = timing("prepare", preparer.Preparer.prepare)
    return spans


def run_child(
    args: argparse.Namespace, name: str, kind: str, cache_dir: str, extra: list[str]
) -> dict:
    """Runs this script's `--first-call` mode in a new process with TRITON_CACHE_DIR
    set; returns its JSON and the process's whole wall time."""
    command = [sys.executable, os.path.abspath(__file__), "--first-call", name]
    command += ["--child-kind", kind, "--device", args.device, "--ppe", str(args.ppe)]
    command += ["--tiny"] if args.tiny else []
    command += ["--stride", str(args.stride)] if args.stride is not None else []
    env = {
        **os.environ,
        "TRITON_CACHE_DIR": cache_dir,
        "CAPTUM_KRYPTON_CACHE_DIR": os.path.join(cache_dir, "captum_krypton"),
    }
    start = time.perf_counter()
    try:
        out = subprocess.run(
            command + extra,
            env=env,
            capture_output=True,
            text=True,
            timeout=args.first_call_timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.first_call_timeout} s"}
    wall = time.perf_counter() - start
    if out.returncode != 0:
        return {"error": out.stderr[-1500:], "process_seconds": wall}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": f"no result printed: {out.stdout[-500:]}", "process_seconds": wall}
    return {**json.loads(lines[-1]), "process_seconds": wall}


def fresh_process_first_calls(
    args: argparse.Namespace, name: str, naive_config: dict | None
) -> dict:
    """Incremental first calls with an empty Triton cache and again with it filled,
    and the naive first call (its best fp32 config), each in a new process."""
    cache = tempfile.mkdtemp(prefix="triton_cold_")
    try:
        cold = run_child(args, name, "incremental", cache, [])
        warm = run_child(args, name, "incremental", cache, [])
        naive = None
        if naive_config is not None:
            extra = ["--child-batch", str(naive_config["batch"])]
            extra += ["--child-channels-last"] if naive_config["channels_last"] else []
            naive = run_child(args, name, "naive", cache, extra)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    ratio = None
    if naive and "seconds" in naive and "seconds" in cold:
        ratio = cold["seconds"] / naive["seconds"]
    return {"incremental_cold": cold, "incremental_warm": warm, "naive": naive, "ratio": ratio}


# ------------------------------------------------------------------ one model
def run_model(case: Case, args: argparse.Namespace, save: Callable[[dict], None]) -> dict:
    """Every column for one model; `save` is called with the row after each stage."""
    device = torch.device(args.device)
    grid = WindowGrid(case.shape, case.window, case.strides())
    row: dict[str, Any] = {
        "model": case.name,
        "input_shape": [1, *case.shape],
        "window": list(case.window),
        "stride": case.stride if isinstance(case.stride, int) else list(case.stride),
        "windows": grid.num_windows,
        "complete": False,
        "errors": {},
        "notes": [],
    }
    if len(case.shape) == 3:
        row["size"] = case.shape[-1]
    maps: dict[str, torch.Tensor] = {}

    def stage(label: str, fn: Callable[[], None]) -> None:
        started = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # one stage failing leaves the others' numbers
            row["errors"][label] = "out of memory" if is_oom(exc) else repr(exc)[:1000]
            print(f"  {case.name}: {label} failed: {row['errors'][label]}", flush=True)
        free_memory(device)
        row.setdefault("stage_seconds", {})[label] = time.perf_counter() - started
        save(row)

    model = build_model(case, device)
    image = make_input(case, device)

    def limit() -> None:
        row.update(plan_limit(model, image, case))

    def incremental(precision: str) -> Callable[[], None]:
        def measure() -> None:
            net, x = model, image
            if precision == "bf16":
                net = copy.deepcopy(model).to(torch.bfloat16)
                x = image.to(torch.bfloat16)
            result = time_incremental(
                net, x, case, device, args.repeats, args.ppe, args.eager_batches
            )
            maps[f"incremental_{precision}"] = result.pop("map")
            row[f"incremental_{precision}"] = result

        return measure

    def naive(precision: str) -> Callable[[], None]:
        modes = ("fp32",) if precision == "fp32" else ("autocast", "bf16")

        def measure() -> None:
            result = sweep_naive(case, model, image, modes, args.batches, args.repeats)
            if "map" in result:
                maps[f"naive_{precision}"] = result.pop("map")
            row[f"naive_{precision}"] = result

        return measure

    def exactness() -> None:
        naive_s = row.get("naive_fp32", {}).get("seconds")
        if naive_s is not None and 3 * naive_s > args.exactness_max_seconds:
            row["notes"].append(
                f"exactness skipped: Captum's map estimated above {args.exactness_max_seconds} s"
            )
            return
        kwargs = dict(sliding_window_shapes=case.window, strides=case.stride, target=0)
        try:
            (seconds,), expected = timed(
                lambda: Occlusion(model).attribute(
                    image, perturbations_per_eval=args.ppe, **kwargs
                ),
                device,
                1,
            )
        except Exception as exc:
            if not is_oom(exc):
                raise
            row["notes"].append(f"exactness: Captum at ppe {args.ppe} ran out of memory")
            return
        row["exactness"] = {
            "captum_ppe": args.ppe,
            "captum_seconds": seconds,
            "captum_map_max": expected.abs().max().item(),
        }
        for key, value in maps.items():
            row["exactness"][f"{key}_vs_captum"] = relative_diff(value, expected)
        if row.get("incremental_fp32", {}).get("engine") == "captum":
            row["notes"].append("incremental fell back to Captum's path: exactness is trivial")

    def captum_timing() -> None:
        kwargs = dict(sliding_window_shapes=case.window, strides=case.stride, target=0)
        seconds: dict[int, float | None] = {}
        for batch in args.captum_batches:

            def call(batch: int = batch) -> torch.Tensor:
                return Occlusion(model).attribute(image, perturbations_per_eval=batch, **kwargs)

            try:
                call()
                (seconds[batch],), _ = timed(call, device, 1)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                seconds[batch] = None
                free_memory(device)
        ran = {b: s for b, s in seconds.items() if s is not None}
        row["captum_seconds"] = seconds
        if ran:
            row["captum_best_batch"] = min(ran, key=ran.get)

    def first_calls() -> None:
        free_memory(device)
        row["first_call"] = fresh_process_first_calls(
            args, case.name, row.get("naive_fp32", {}).get("config")
        )

    stage("plan", limit)
    stage("incremental_fp32", incremental("fp32"))
    stage("incremental_bf16", incremental("bf16"))
    stage("naive_fp32", naive("fp32"))
    stage("naive_bf16", naive("bf16"))
    if args.exactness:
        stage("exactness", exactness)
    if args.captum:
        stage("captum", captum_timing)
    if args.fresh_process:
        stage("first_call", first_calls)
    summarize(row)
    row["complete"] = True
    return row


def summarize(row: dict) -> None:
    """Ratios and shares from the row's measurements (kept under the old names too)."""
    limit = row.get("flop_ratio_limit")
    note = "plan re-runs the whole model per window (FLOP limit below the engine's minimum)"
    if row.get("rerun_whole_model") and note not in row["notes"]:
        row["notes"].append(note)
    for precision in ("fp32", "bf16"):
        naive_s = row.get(f"naive_{precision}", {}).get("seconds")
        ours_s = row.get(f"incremental_{precision}", {}).get("seconds")
        ratio = naive_s / ours_s if naive_s and ours_s else None
        row[f"ratio_{precision}"] = ratio
        share = ratio / limit if ratio is not None and limit is not None and limit >= 1.3 else None
        row[f"share_of_limit_{precision}"] = share
    fp32_naive, fp32_ours = row.get("naive_fp32", {}), row.get("incremental_fp32", {})
    row["naive_seconds"] = fp32_naive.get("seconds")
    row["naive_config"] = fp32_naive.get("config")
    row["incremental_seconds"] = fp32_ours.get("seconds")
    row["incremental_first_call_seconds"] = fp32_ours.get("first_call_in_process_seconds")
    row["incremental_eager_batches_seconds"] = fp32_ours.get("eager_batches_seconds")
    row["speedup_vs_naive"] = row["ratio_fp32"]
    row["share_of_limit"] = row["share_of_limit_fp32"]
    row["peak_mib_incremental"] = fp32_ours.get("peak_mib")
    row["peak_mib_naive"] = fp32_naive.get("peak_mib")
    exact = row.get("exactness", {})
    row["max_diff_vs_captum"] = exact.get("incremental_fp32_vs_captum")
    row["max_diff_naive_vs_captum"] = exact.get("naive_fp32_vs_captum")
    best = row.get("captum_best_batch")
    if best is not None and fp32_ours.get("seconds"):
        row["speedup_vs_captum"] = row["captum_seconds"][best] / fp32_ours["seconds"]


# ------------------------------------------------------------------ results file
def environment(device: torch.device) -> dict:
    """Versions and the device, for the JSON header."""
    import captum

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": name,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "triton": triton_version,
        "captum": captum.__version__,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
    }


def read_results(path: str) -> dict:
    """The JSON file's content, or an empty one."""
    if not os.path.exists(path):
        return {"runs": [], "results": []}
    with open(path) as f:
        data = json.load(f)
    data.setdefault("runs", [])
    data.setdefault("results", [])
    return data


def merge(results: list[dict], row: dict, order: list[str]) -> list[dict]:
    """`results` with `row` in place of its model's entry (a skipped row never
    replaces measurements), ordered as `order`."""
    by_model = {r["model"]: r for r in results}
    old = by_model.get(row["model"])
    if not (row.get("skipped") and old is not None and not old.get("skipped")):
        by_model[row["model"]] = row
    rank = {name: i for i, name in enumerate(order)}
    return sorted(by_model.values(), key=lambda r: rank.get(r["model"], len(rank)))


def write_results(path: str, data: dict) -> None:
    """Writes the JSON atomically (a run killed mid-write keeps the last file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    partial = f"{path}.tmp"
    with open(partial, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(partial, path)


# ------------------------------------------------------------------ tables
def _s(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def tables(data: dict) -> str:
    """Two markdown tables: speed and memory; first calls and exactness."""
    env = data.get("environment", {})
    lines = [
        f"{env.get('device', '?')}, torch {env.get('torch', '?')}, torchvision "
        f"{env.get('torchvision', '?')}, Triton {env.get('triton', '?')}",
        "",
        "| model | input | window / stride | windows | naive fp32 (config) | incr fp32 "
        "| ratio | naive bf16 (config) | incr bf16 | ratio | FLOP limit | share "
        "| peak MiB incr / naive |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    second = [
        "",
        "| model | first call incr cold | warm | naive | cold / naive "
        "| capture / prepare (cold) | max diff vs Captum fp32 (ppe) | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data.get("results", []):
        if r.get("skipped"):
            lines.append(f"| {r['model']} | skipped: {r['skipped']} |" + " |" * 11)
            continue
        shape = "x".join(str(d) for d in r["input_shape"][1:])
        stride = r["stride"] if isinstance(r["stride"], int) else tuple(r["stride"])
        naive32, naive16 = r.get("naive_fp32", {}), r.get("naive_bf16", {})
        ours32, ours16 = r.get("incremental_fp32", {}), r.get("incremental_bf16", {})

        def ours(cell: dict) -> str:
            text = _s(cell.get("seconds"))
            return text + (" (Captum path)" if cell.get("engine") == "captum" else "")

        memory = f"{_s(r.get('peak_mib_incremental'), 0)} / {_s(r.get('peak_mib_naive'), 0)}"
        share = r.get("share_of_limit_fp32")
        lines.append(
            f"| {r['model']} | {shape} | {tuple(r['window'])} / {stride} | {r['windows']} "
            f"| {_s(naive32.get('seconds'))} ({naive32.get('label', '-')}) | {ours(ours32)} "
            f"| {_x(r.get('ratio_fp32'))} "
            f"| {_s(naive16.get('seconds'))} ({naive16.get('label', '-')}) | {ours(ours16)} "
            f"| {_x(r.get('ratio_bf16'))} | {_x(r.get('flop_ratio_limit'))} "
            f"| {'-' if share is None else f'{100 * share:.0f}%'} | {memory} |"
        )
        first = r.get("first_call", {})
        cold, warm = first.get("incremental_cold") or {}, first.get("incremental_warm") or {}
        naive_first = first.get("naive") or {}
        exact = r.get("exactness", {})
        diff = exact.get("incremental_fp32_vs_captum")
        diff_text = "-" if diff is None else f"{diff:.1e} ({exact.get('captum_ppe')})"
        notes = list(r.get("notes", [])) + [f"{k} failed" for k in r.get("errors", {})]
        if not r.get("complete", True):
            notes.append("incomplete")
        second.append(
            f"| {r['model']} | {_s(cold.get('seconds'), 1)} | {_s(warm.get('seconds'), 1)} "
            f"| {_s(naive_first.get('seconds'), 1)} | {_x(first.get('ratio'))} "
            f"| {_s(cold.get('capture_seconds'), 1)} / {_s(cold.get('prepare_seconds'), 1)} "
            f"| {diff_text} | {'; '.join(notes)} |"
        )
    return "\n".join(lines + second)


def _strip(row: dict) -> dict:
    """The row without tensors (for printing)."""
    return {k: v for k, v in row.items() if not isinstance(v, torch.Tensor)}


# ------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = list(cases())
    parser.add_argument("--models", nargs="+", default=names, choices=names, metavar="MODEL")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu")
    parser.add_argument("--tiny", action="store_true", help="small inputs: a CPU smoke test")
    parser.add_argument("--quick", action="store_true", help="batches 256 and 1024, 2 repeats")
    parser.add_argument("--stride", type=int, default=None, help="replaces image models' stride")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="naive batch sizes")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 5)")
    parser.add_argument("--ppe", type=int, default=256, help="Captum's perturbations_per_eval")
    parser.add_argument(
        "--exactness",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one Captum map per model for the exactness column",
    )
    parser.add_argument("--exactness-max-seconds", type=float, default=60.0)
    parser.add_argument("--captum", action="store_true", help="also time Captum per ppe")
    parser.add_argument("--captum-batches", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument(
        "--fresh-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="first calls in fresh processes (cold / warm Triton cache, naive)",
    )
    parser.add_argument("--first-call-timeout", type=float, default=300.0)
    parser.add_argument(
        "--eager-batches",
        action="store_true",
        help="also time cuda_graphs=False (no CUDA graphs: every batch launched from the host)",
    )
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; then skip")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--out-name", default="gpu.json")
    parser.add_argument("--append", action="store_true", help="merge into the existing file")
    parser.add_argument(
        "--missing-only",
        action="store_true",
        help="with --append: only models without a complete row in the file",
    )
    parser.add_argument("--report", action="store_true", help="print the file's tables only")
    parser.add_argument("--first-call", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-kind", default="incremental", help=argparse.SUPPRESS)
    parser.add_argument("--child-batch", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--child-channels-last", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batches is None:
        args.batches = (
            [4, 16] if args.tiny else [256, 1024] if args.quick else [128, 256, 512, 1024]
        )
    if args.repeats is None:
        args.repeats = 1 if args.tiny else 2 if args.quick else 5
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.first_call is not None:
        print(json.dumps(first_call_child(args)), flush=True)
        return
    path = os.path.join(args.out, args.out_name)
    if args.report:
        print(tables(read_results(path)))
        return
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    table = cases(args.tiny, args.stride)
    data = read_results(path) if args.append else {"runs": [], "results": []}
    data["environment"] = environment(device)
    data["device"], data["torch"] = data["environment"]["device"], torch.__version__
    data["runs"].append({"argv": sys.argv[1:], "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    done = {r["model"] for r in data["results"] if r.get("complete") and not r.get("skipped")}
    started = time.perf_counter()
    order = list(table)

    def save(row: dict) -> None:
        data["results"] = merge(data["results"], _strip(row), order)
        write_results(path, data)

    for name in args.models:
        if args.missing_only and name in done:
            print(f"{name}: already in {path}", flush=True)
            continue
        elapsed = time.perf_counter() - started
        if args.time_budget is not None and elapsed > args.time_budget:
            save({"model": name, "skipped": f"time budget ({elapsed:.0f} s > {args.time_budget})"})
            print(f"{name}: skipped (time budget)", flush=True)
            continue
        print(f"{name}: ...", flush=True)
        begun = time.perf_counter()
        row = run_model(table[name], args, save)
        row["benchmark_wall_seconds"] = time.perf_counter() - begun
        save(row)
        short = {k: row.get(k) for k in ("model", "ratio_fp32", "ratio_bf16", "flop_ratio_limit")}
        print(json.dumps({**short, "seconds": row["benchmark_wall_seconds"]}), flush=True)
    print()
    print(tables(data))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
