"""The hybrid planner's cost model (HyInf): per node, incremental or full?

A node's cost for one batch of rows is its arithmetic (FLOPs x seconds per FLOP)
plus its memory traffic (bytes x seconds per byte) plus its launches (x seconds
per launch). On CUDA the three rates are measured once per device, dtype and
TF32 setting; on the CPU they are fixed estimates (so plans do not depend on
machine load). The choice is a minimum cut of the graph: a node evaluated `full`
makes its consumers `full` too, and a boxed node read by a `full` one pays a
projection once. The cut gives the cheapest assignment over the whole DAG.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import networkx as nx
import torch


@dataclass(frozen=True)
class DeviceCosts:
    """Seconds per FLOP, per byte moved and per launched op."""

    flop_s: float
    byte_s: float
    launch_s: float
    source: str

    def seconds(self, flops: float, moved_bytes: float, launches: float) -> float:
        return flops * self.flop_s + moved_bytes * self.byte_s + launches * self.launch_s


#: A 2-core CPU: ~40 GFLOP/s in convolutions, ~5 GB/s for gathers and copies,
#: ~15 us of Python and dispatch per op.
CPU_COSTS = DeviceCosts(1 / 40e9, 1 / 5e9, 15e-6, "fixed CPU estimate")


def _median_seconds(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@functools.cache
def _measured_cuda_costs(device_index: int, dtype: torch.dtype, tf32: bool) -> DeviceCosts:
    device = torch.device("cuda", device_index)
    with torch.no_grad(), torch.cuda.device(device):
        x = torch.randn(256, 64, 28, 28, device=device, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(64, 64, 3, 3, device=device, dtype=dtype)
        w = w.contiguous(memory_format=torch.channels_last)
        conv_flops = 2 * x.numel() * 64 * 9
        conv_s = _median_seconds(lambda: torch.nn.functional.conv2d(x, w, padding=1))
        big = torch.empty(1 << 26, device=device, dtype=torch.float32)
        copy_s = _median_seconds(lambda: big.clone())
        tiny = torch.zeros(1, device=device)
        launches = 200
        launch_s = _median_seconds(lambda: [tiny.add(1) for _ in range(launches)]) / launches
    return DeviceCosts(
        flop_s=conv_s / conv_flops,
        byte_s=copy_s / (2 * 4 * (1 << 26)),
        launch_s=launch_s,
        source=f"measured on {torch.cuda.get_device_name(device)}",
    )


def device_costs(device: torch.device, dtype: torch.dtype) -> DeviceCosts:
    """The rates of `device` (measured once per process on CUDA)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if dtype not in (torch.float16, torch.bfloat16, torch.float64):
            dtype = torch.float32
        return _measured_cuda_costs(index, dtype, torch.backends.cudnn.allow_tf32)
    return CPU_COSTS


def cheapest_full_set(
    incremental: dict[object, float],
    full: dict[object, float],
    projection: dict[object, float],
    consumers: dict[object, list[object]],
) -> set[object]:
    """The set of nodes to evaluate `full` that minimizes the total cost.

    incremental[v] / full[v]: v's cost either way (inf: must be full);
    projection[u]: the cost of turning u's boxes into full tensors, paid when u
    is boxed and some consumer is full; consumers[u]: the nodes reading u.
    A full node's consumers are full (closure), enforced by infinite edges.
    """
    graph = nx.DiGraph()
    source, sink = ("source",), ("sink",)

    def capacity(seconds: float) -> dict:
        # Integer nanoseconds keep the max-flow exact; no attribute = infinite.
        return {} if seconds == float("inf") else {"capacity": round(seconds * 1e9)}

    for node in full:
        graph.add_edge(source, node, **capacity(full[node]))
        graph.add_edge(node, sink, **capacity(incremental[node]))
    for node, readers in consumers.items():
        if not readers:
            continue
        projected = ("projection", node)
        graph.add_edge(node, projected, **capacity(projection[node]))
        for reader in readers:
            graph.add_edge(reader, node)  # reader boxed while node full: forbidden
            graph.add_edge(projected, reader)  # reader full: node's projection is paid
    _, (boxed_side, full_side) = nx.minimum_cut(graph, source, sink)
    return {node for node in full_side if node in full}
