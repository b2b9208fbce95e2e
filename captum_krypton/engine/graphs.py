"""CUDA graphs of window batches, kept with the plan and replayed across calls.

A window batch issues hundreds of small kernels (halo reads, box convs, their
index arithmetic); on fast GPUs the host issuing them is the bound, not the GPU.
A CUDA graph replays a whole batch as one launch (torch.cuda.CUDAGraph).

A graph reads fixed addresses, so it must not read the tensors of the call that
captured it: the next call would silently get the old clean run. Each plan's
graphs read a private copy of the clean run instead (`GraphState`); every call
copies its own clean values, input and baseline into that copy before the first
replay. The plan's parameters and buffers are read in place, as eager batches
read them (a new parameter version is a new plan). Derived copies of clean
values (channels-last, padded) are computed inside each graph, so a replay never
reads one made for another call. Settings that a capture fixes but eager
batches read at run time (autocast, TF32, deterministic algorithms) key the
graphs too (`numerics_key`).

With `cuda_graphs=None` (the default) a batch size is captured the second time
the plan runs it, so a one-off call pays no capture, and only while no Triton
kernel compiles in the background; `cuda_graphs=True` captures
at the first full batch (after one eager warm-up batch). The self-check's
windows are taken from the run's own table, so replayed batches are checked
against the forward function like eager ones.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import warnings
import weakref
from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils import _pytree as pytree

from captum_krypton.engine.executor import Views
from captum_krypton.kernels import choices_settled

if TYPE_CHECKING:
    from captum_krypton.engine.occlusion import PreparedOcclusion


class GraphState:
    """A private copy of one call's clean run, input and baseline, in the layout of
    the plan's window batches: what the plan's graphs read."""

    def __init__(self, prepared: PreparedOcclusion):
        state_nodes = set(prepared.captured.state)
        clones: dict[int, torch.Tensor] = {}

        def private(value: Any) -> Any:
            if not isinstance(value, torch.Tensor):
                return value
            clone = clones.get(id(value))
            if clone is None:
                clone = clones[id(value)] = value.clone()
            return clone

        env = {}
        self._copied: list[tuple[Any, list[torch.Tensor]]] = []
        for node, value in prepared.views.env.items():
            if node in state_nodes:  # parameters and buffers: read in place
                env[node] = value
                continue
            env[node] = pytree.tree_map(private, value)
            leaves = [v for v in pytree.tree_leaves(env[node]) if isinstance(v, torch.Tensor)]
            if leaves:
                self._copied.append((node, leaves))
        inputs = private(prepared.inputs)
        baseline = prepared.baseline
        self._baseline = baseline.clone() if isinstance(baseline, torch.Tensor) else None
        self.prepared = dataclasses.replace(
            prepared,
            inputs=inputs,
            baseline=self._baseline if self._baseline is not None else baseline,
            views=Views(env, prepared.plan.device_arrays),
            forward=None,
            eager_output=None,
            checked_windows=None,
            checked_outputs=None,
        )
        self._inputs = inputs
        self._holds = prepared.views.clean_run

    def load(self, prepared: PreparedOcclusion) -> bool:
        """Copy `prepared`'s clean values, input and baseline in (queued on the
        current stream, before the replays), unless this copy holds them already
        (an earlier stage of the same call). False where their shapes differ."""
        if self._holds is prepared.views.clean_run:
            return True
        pairs = [(self._inputs, prepared.inputs)]
        if self._baseline is not None:
            pairs.append((self._baseline, prepared.baseline))
        env = prepared.views.env
        for node, leaves in self._copied:
            new = [v for v in pytree.tree_leaves(env.get(node)) if isinstance(v, torch.Tensor)]
            if len(new) != len(leaves):
                return False
            pairs.extend(zip(leaves, new))
        for mine, theirs in pairs:
            if not isinstance(theirs, torch.Tensor) or (
                mine.shape != theirs.shape or mine.dtype != theirs.dtype
            ):
                return False
        for mine, theirs in pairs:
            if mine is not theirs:
                mine.copy_(theirs)
        self._holds = prepared.views.clean_run
        return True


class GraphedBatch:
    """One window batch captured as a CUDA graph and replayed for every batch of the
    same size: the plan's many small launches cost one launch. The batch's window
    ids live in a static device tensor that each replay refills."""

    def __init__(self, size: int, ids: torch.Tensor, graph: Any, output: torch.Tensor):
        self.size, self._ids, self._graph, self._output = size, ids, graph, output

    @classmethod
    def capture(
        cls, state: PreparedOcclusion, size: int, pool: Any = None, announce: bool = True
    ) -> GraphedBatch | None:
        """A graph of `size` windows of `state`'s plan (None where an op cannot be
        captured; with `announce`, a RuntimeWarning says so)."""
        device = state.inputs.device
        ids = torch.zeros(size, dtype=torch.long, device=device)
        # Derived copies made by an earlier capture belong to that graph: this one
        # makes (and refreshes on every replay) its own.
        state.views.forget_copies()
        graph = torch.cuda.CUDAGraph()
        # Captured on a side stream of this device with thread_local errors, and
        # without torch.cuda.graph's device-wide synchronize and empty_cache: with
        # devices=, other threads keep running batches on other GPUs meanwhile, and
        # emptying the allocator's cache under them costs every GPU its memory blocks.
        stream = _capture_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.no_grad(), torch.cuda.stream(stream):
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                output = state.batch_run(ids).run()
            except torch.cuda.OutOfMemoryError:
                _end_failed_capture(graph)
                raise
            except RuntimeError as exc:  # an op that syncs with the host cannot be captured
                _end_failed_capture(graph)
                if announce:
                    warnings.warn(
                        f"CUDA graph capture failed, running eagerly: {exc}", RuntimeWarning, 2
                    )
                return None
            graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(stream)
        if not isinstance(output, torch.Tensor):
            return None
        return cls(size, ids, graph, output)

    def run(self, ids: torch.Tensor) -> torch.Tensor:
        self._ids.copy_(ids)
        self._graph.replay()
        return self._output


class PlanGraphs:
    """A plan's graphs (one per batch size, sharing one memory pool) and the
    private clean run they read; kept on the plan for later calls.

    One call at a time replays them: a call that finds them busy (another thread
    on the same plan) runs its batches eagerly."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: Any = None
        self._state: GraphState | None = None
        self._batches: dict[int, GraphedBatch] = {}
        self._seen: set[int] = set()
        self._failed: set[int] = set()
        self._loaded = False

    @contextlib.contextmanager
    def session(self, prepared: PreparedOcclusion, eager_warm_up: bool):
        """Graphs for one call's batches: `batch(size)` inside the block gives a
        graph to replay, or None (run that batch eagerly, then `ran(size)`)."""
        if not self._lock.acquire(blocking=False):
            yield None
            return
        self._loaded = False
        try:
            yield _Session(self, prepared, eager_warm_up)
        finally:
            self._lock.release()

    def _graph(
        self, prepared: PreparedOcclusion, size: int, eager_warm_up: bool
    ) -> GraphedBatch | None:
        if size in self._failed:
            return None
        graphed = self._batches.get(size)
        if graphed is None and not eager_warm_up:
            # The second time the plan runs this size, and while no kernel compiles
            # in the background: a graph keeps the kernels it was captured with.
            if size not in self._seen or not choices_settled():
                return None
        if self._state is None:
            self._state = GraphState(prepared)
            self._loaded = True
        elif not self._loaded:
            if not self._state.load(prepared):
                self._failed.add(size)
                return None
            self._loaded = True
        if graphed is not None:
            return graphed
        if size not in self._seen:  # cuda_graphs=True: warm caches, kernel choices
            # (a padded batch may hold more rows than the grid has windows)
            every = torch.arange(size, device=prepared.inputs.device)
            prepared.run_window_ids(every % prepared.grid.num_windows)
            self._seen.add(size)
        if self._pool is None:
            self._pool = memory_pool()
        graphed = GraphedBatch.capture(self._state.prepared, size, self._pool, eager_warm_up)
        if graphed is None:
            self._failed.add(size)
            return None
        self._batches[size] = graphed
        return graphed


@dataclasses.dataclass
class _Session:
    graphs: PlanGraphs
    prepared: PreparedOcclusion
    eager_warm_up: bool

    def batch(self, size: int) -> GraphedBatch | None:
        return self.graphs._graph(self.prepared, size, self.eager_warm_up)

    def ran(self, size: int) -> None:
        """An eager batch of `size` windows ran: its caches and kernel choices are
        warm, so the next batch of that size may be captured."""
        self.graphs._seen.add(size)


def plan_graphs(prepared: PreparedOcclusion, key: Hashable) -> PlanGraphs:
    """The plan's graphs for `key` (the baseline, `numerics_key()`), made on
    first use."""
    plan = prepared.plan
    table = plan.cuda_graphs
    graphs = table.get(key)
    if graphs is None:
        while len(table) >= MAX_KEYS:
            table.pop(next(iter(table)))
        graphs = table[key] = PlanGraphs()
    _keep_graphs_of(plan, prepared.inputs.device)
    return graphs


def numerics_key() -> tuple:
    """The settings that a capture fixes but an eager batch reads at run time:
    autocast, TF32 and reduced-precision reductions, deterministic algorithms. A
    call under other settings gets graphs of its own, so that it computes what
    its eager batches would."""
    matmul = torch.backends.cuda.matmul
    return (
        torch.is_autocast_enabled("cuda"),
        torch.get_autocast_dtype("cuda"),
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
        matmul.allow_fp16_reduced_precision_reduction,
        matmul.allow_bf16_reduced_precision_reduction,
    )


def release_graphs(plans: Iterable[Any]) -> None:
    """Drop the plans' graphs and their memory pools (a batch ran out of memory,
    or other plans are in use): later calls capture afresh. A call replaying
    some of them keeps them until it ends."""
    for plan in plans:
        plan.cuda_graphs.clear()


def memory_pool() -> Any:
    """A new memory pool for one plan's graphs (torch.cuda.graph_pool_handle)."""
    return torch.cuda.graph_pool_handle()


#: Plans that keep graphs at a time, per device (graphs hold their batches'
#: memory): the last used.
MAX_GRAPHED_PLANS = 3
_graphed_plans: dict[Any, collections.OrderedDict] = {}
_graphed_plans_lock = threading.Lock()


def _keep_graphs_of(plan: Any, device: torch.device) -> None:
    """Mark `plan` the last used on `device`; release the graphs of the plans
    used longest ago beyond MAX_GRAPHED_PLANS (other input shapes, windows,
    settings or models)."""
    with _graphed_plans_lock:
        recent = _graphed_plans.setdefault(device, collections.OrderedDict())
        recent[id(plan)] = weakref.ref(plan)
        recent.move_to_end(id(plan))
        for ident, ref in list(recent.items()):
            if ref() is None:
                del recent[ident]
        stale = []
        while len(recent) > MAX_GRAPHED_PLANS:
            stale.append(recent.popitem(last=False)[1]())
    release_graphs(p for p in stale if p is not None)


#: Graph sets a plan keeps, one per baseline and numerics (a scalar baseline is
#: part of the graph).
MAX_KEYS = 2


_capture_streams: dict[torch.device, torch.cuda.Stream] = {}
_capture_streams_lock = threading.Lock()


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for graph captures, made on first use."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    device = torch.device("cuda", index)
    with _capture_streams_lock:
        stream = _capture_streams.get(device)
        if stream is None:
            stream = _capture_streams[device] = torch.cuda.Stream(device)
    return stream


def _end_failed_capture(graph: torch.cuda.CUDAGraph) -> None:
    """End a capture that an op broke off (the capture is invalid by then)."""
    with contextlib.suppress(RuntimeError):
        graph.capture_end()
