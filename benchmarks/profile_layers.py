"""Where an incremental call's GPU time goes, layer by layer, against plain
re-inference of the same layers.

Per node of the captured graph: the GPU milliseconds the engine's window
batches spent on it in one call (CUDA events around the node, summed over
batches), the milliseconds plain batched re-inference spends on it for the same
windows (the captured graph run on occluded batches of `--naive-rows` rows,
channels_last), and the share of the node's FLOPs the plan computes. A node's
"ideal" time is naive x that share: what the FLOP limit assumes. Nodes the plan
fuses into their producer (conv + BatchNorm + ReLU) are counted with the producer.

    python -m benchmarks.profile_layers --models googlenet densenet121 --out NAME.json

`--call-profile` adds, per model and for each approximate setting given with
`--drilldown`, the call's wall time against the GPU's busy time (torch.profiler)
and cProfile's functions with the most cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.profiler import ProfilerActivity, profile

from benchmarks.gpu import build_model, cases, make_input, occlusion_keep_mask, sync
from captum_krypton import IncrementalOcclusion, kernels
from captum_krypton.capture import evaluate
from captum_krypton.engine.executor import BatchRun, channels_last_format
from captum_krypton.engine.windows import WindowGrid
from captum_krypton.kernels import choice
from captum_krypton.ops import FUSED_RULE


class Clock:
    """Time marks on the device's own timeline: CUDA events on a GPU (what the
    kernels between two marks took), host time on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self) -> None:
        sync(self.device)


def engine_node_times(
    occlusion: IncrementalOcclusion, call: dict, clock: Clock
) -> tuple[dict, float]:
    """Device ms per node name over one call, and the call's wall seconds."""
    events: list[tuple[str, Any, Any, float]] = []
    open_events: dict[fx.Node, tuple[Any, float]] = {}

    def hook(node: fx.Node, before: bool) -> None:
        event, now = clock.mark(), time.perf_counter()
        if before:
            open_events[node] = (event, now)
        elif node in open_events:
            start, host_start = open_events.pop(node)
            events.append((node.name, start, event, now - host_start))

    BatchRun.node_hook = hook
    try:
        clock.sync()
        started = time.perf_counter()
        occlusion.attribute(**call)
        clock.sync()
        wall = time.perf_counter() - started
    finally:
        BatchRun.node_hook = None
    times: dict[str, float] = defaultdict(float)
    for name, start, end, host in events:
        times[name] += clock.ms(start, end)
        times["host:" + name] += host * 1e3
    return dict(times), wall


def naive_node_times(
    plan: Any, occluded: torch.Tensor, windows: int, clock: Clock
) -> dict[str, float]:
    """GPU ms per node name of plain re-inference of `windows` windows, from one
    batch of occluded inputs `occluded` (rows = windows per batch), scaled."""
    captured = plan.captured
    timed = [
        n
        for n in captured.nodes
        if n.op not in ("placeholder", "output") and n not in captured.size_exprs
    ]
    marks: list[Any] = []

    def mark(value: Any) -> Any:
        marks.append(clock.mark())
        return value

    with torch.no_grad():
        evaluate(captured, occluded)  # warm-up: cuDNN's search for these shapes
        clock.sync()
        start = clock.mark()
        evaluate(captured, occluded, perturb=mark)
        clock.sync()
    scale = windows / occluded.shape[0]
    times, previous = {}, start
    for node, event in zip(timed, marks):
        times[node.name] = clock.ms(previous, event) * scale
        previous = event
    return times


def layer_rows(plan: Any, engine: dict[str, float], naive: dict[str, float]) -> list[dict]:
    """One row per group of nodes the engine computes together (a producer and
    the ops fused into it), in graph order."""
    group_of: dict[fx.Node, fx.Node] = {}
    rows: dict[fx.Node, dict] = {}
    for node in plan.order:
        node_plan = plan.nodes[node]
        if node.op == "output":
            continue
        head = node
        if node_plan.rule is FUSED_RULE and isinstance(node.args[0], fx.Node):
            head = group_of.get(node.args[0], node.args[0])
        group_of[node] = head
        row = rows.setdefault(
            head,
            {
                "node": head.name,
                "ops": [],
                "mode": plan.nodes[head].mode,
                "box": list(plan.nodes[head].geometry.size) if plan.nodes[head].geometry else None,
                "flops_full": 0.0,
                "flops_incremental": 0.0,
                "engine_ms": 0.0,
                "naive_ms": 0.0,
            },
        )
        row["ops"].append(node_plan.op)
        row["flops_full"] += node_plan.flops_full
        row["flops_incremental"] += (
            node_plan.flops_incremental if node_plan.mode == "box" else node_plan.flops_full
        )
        row["engine_ms"] += engine.get(node.name, 0.0)
        row["host_ms"] = row.get("host_ms", 0.0) + engine.get("host:" + node.name, 0.0)
        row["naive_ms"] += naive.get(node.name, 0.0)
    result = []
    for row in rows.values():
        share = row["flops_incremental"] / row["flops_full"] if row["flops_full"] else 1.0
        row["ideal_ms"] = row["naive_ms"] * share
        row["excess_ms"] = row["engine_ms"] - row["ideal_ms"]
        result.append(row)
    return result


def call_profile(occlusion: IncrementalOcclusion, call: dict, top: int, clock: Clock) -> dict:
    """Wall time vs GPU kernel time of one call, and cProfile's top functions."""
    kernel_us = None
    clock.sync()
    started = time.perf_counter()
    if clock.cuda:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            occlusion.attribute(**call)
            clock.sync()
        kernel_us = sum(e.self_device_time_total for e in prof.key_averages())
    else:
        occlusion.attribute(**call)
    wall = time.perf_counter() - started
    profiler = cProfile.Profile()
    clock.sync()
    profiler.enable()
    occlusion.attribute(**call)
    clock.sync()
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    report = occlusion.last_run
    return {
        "wall_s": wall,
        "gpu_kernel_s": None if kernel_us is None else kernel_us / 1e6,
        "windows_computed": report.windows_computed,
        "windows_total": report.windows_total,
        "cprofile": text.getvalue(),
    }


def profile_model(name: str, args: argparse.Namespace) -> dict:
    case = cases(tiny=args.tiny)[name]
    device = torch.device(args.device)
    clock = Clock(device)
    model = build_model(case, device)
    image = make_input(case, device)
    occlusion = IncrementalOcclusion(model)
    call = dict(
        inputs=image,
        sliding_window_shapes=case.window,
        strides=case.stride,
        target=0,
        cuda_graphs=False if device.type == "cuda" else None,
    )
    for _ in range(2):
        occlusion.attribute(**call)
    kernels.wait_for_compilation()
    for _ in range(2):  # the kernel choices' measurements, then steady state
        occlusion.attribute(**call)
    clock.sync()
    started = time.perf_counter()
    occlusion.attribute(**call)
    clock.sync()
    plain_wall = time.perf_counter() - started
    engine, hooked_wall = engine_node_times(occlusion, call, clock)
    plan = occlusion.plan(image, case.window, case.stride)
    windows = occlusion.last_run.windows_total
    rows = min(args.naive_rows, windows)
    window = tuple(case.window)
    strides = (case.stride,) * len(window) if isinstance(case.stride, int) else case.stride
    grid = WindowGrid(tuple(image.shape[1:]), window, tuple(strides))
    keep = occlusion_keep_mask(grid, np.arange(rows), image.device)
    occluded = (image * keep.to(image.dtype)).contiguous(
        memory_format=channels_last_format(image.dim())
    )
    naive = naive_node_times(plan, occluded, windows, clock)
    layers = layer_rows(plan, engine, naive)
    result = {
        "model": name,
        "windows": windows,
        "call_s": plain_wall,
        "call_with_events_s": hooked_wall,
        "flop_limit": plan.theoretical_speedup,
        "engine_node_ms": sum(r["engine_ms"] for r in layers),
        "naive_node_ms": sum(r["naive_ms"] for r in layers),
        "ideal_ms": sum(r["ideal_ms"] for r in layers),
        "layers": layers,
        "host_node_ms": sum(r["host_ms"] for r in layers),
        # How many of the kernel choices made so far (this process) went to each
        # candidate: cuDNN ("tile+conv", "tile+conv_relu"), Triton ("implicit_gemm").
        "chosen": dict(Counter(choice._chosen.values())),
    }
    if args.call_profile:
        result["calls"] = {"exact": call_profile(occlusion, call, args.top, clock)}
        for fraction in args.drilldown:
            options = dict(call, drilldown=fraction, drilldown_factor=args.factor)
            occlusion.attribute(**options)
            occlusion.attribute(**options)
            result["calls"][f"drilldown {fraction}"] = call_profile(
                occlusion, options, args.top, clock
            )
    return result


def print_model(result: dict, rows: int) -> None:
    print(
        f"\n## {result['model']}: call {result['call_s'] * 1e3:.1f} ms "
        f"(with events {result['call_with_events_s'] * 1e3:.1f}), node GPU time "
        f"{result['engine_node_ms']:.1f} ms, naive nodes {result['naive_node_ms']:.1f} ms, "
        f"ideal {result['ideal_ms']:.1f} ms, FLOP limit {result['flop_limit']:.2f}x, "
        f"host time in nodes {result['host_node_ms']:.1f} ms, choices {result['chosen']}"
    )
    by_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for layer in result["layers"]:
        key = layer["ops"][0] + (" (full)" if layer["mode"] == "full" else "")
        for i, field in enumerate(("engine_ms", "naive_ms", "ideal_ms")):
            by_op[key][i] += layer[field]
    print("| op | engine ms | naive ms | ideal ms | excess ms |\n|---|---|---|---|---|")
    for op, (e, n, i) in sorted(by_op.items(), key=lambda kv: -(kv[1][0] - kv[1][2]))[:rows]:
        print(f"| {op} | {e:.2f} | {n:.2f} | {i:.2f} | {e - i:.2f} |")
    print("| node | ops | mode | box | engine ms | host ms | naive ms | ideal ms | excess |")
    print("|---|---|---|---|---|---|---|---|---|")
    for layer in sorted(result["layers"], key=lambda r: -r["excess_ms"])[:rows]:
        print(
            f"| {layer['node']} | {'+'.join(layer['ops'])} | {layer['mode']} | {layer['box']} "
            f"| {layer['engine_ms']:.2f} | {layer['host_ms']:.2f} | {layer['naive_ms']:.2f} "
            f"| {layer['ideal_ms']:.2f} "
            f"| {layer['excess_ms']:.2f} |"
        )
    for label, call in result.get("calls", {}).items():
        kernel = call["gpu_kernel_s"]
        print(
            f"\n### {result['model']} {label}: wall {call['wall_s'] * 1e3:.1f} ms, GPU kernels "
            f"{'-' if kernel is None else f'{kernel * 1e3:.1f}'} ms, windows "
            f"{call['windows_computed']} / {call['windows_total']}"
        )
        print(call["cprofile"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["googlenet", "densenet121"])
    parser.add_argument("--naive-rows", type=int, default=512)
    parser.add_argument("--rows", type=int, default=15, help="table rows printed per model")
    parser.add_argument("--call-profile", action="store_true")
    parser.add_argument("--drilldown", type=float, nargs="*", default=[])
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small inputs (CPU smoke test)")
    parser.add_argument("--out", default=None, help="JSON name under benchmarks/results/")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    results = []
    for name in args.models:
        result = profile_model(name, args)
        print_model(result, args.rows)
        results.append(result)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if args.out:  # after every model: a run stopped by a time limit keeps them
            path = os.path.join(os.environ.get("OUT", "benchmarks/results"), args.out)
            with open(path, "w") as f:
                device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
                json.dump({"device": device, "models": results}, f, indent=1)


if __name__ == "__main__":
    main()
