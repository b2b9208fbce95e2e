"""Incremental occlusion of one input tensor: clean run, plan, window batches, sums."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from captum._utils.common import _expand_target, _select_targets
from captum._utils.typing import TargetType
from torch.utils import _pytree as pytree

from captum_krypton.capture import CapturedGraph, UnsupportedForIncremental, evaluate
from captum_krypton.capture.graph import not_one_tensor
from captum_krypton.engine.executor import BatchRun, Views
from captum_krypton.engine.graphs import PlanGraphs, numerics_key, plan_graphs, release_graphs
from captum_krypton.engine.path_choice import choose_path, needs_measurement
from captum_krypton.engine.windows import WindowGrid
from captum_krypton.kernels import use_triton
from captum_krypton.plan import (
    EXACT,
    PLANNING_ROWS,
    PlanApproximation,
    RegionPlan,
    build_plan,
    check_ops,
)

#: Default memory for one window batch on the CPU; on CUDA, half the free memory.
DEFAULT_CPU_MEMORY = 1 << 30


#: On CUDA a batch holds at most this many rows (windows x examples): larger
#: batches add no throughput, and a bounded, power-of-two batch keeps the shapes
#: the same from call to call, so cudnn's algorithm choices are reused.
MAX_CUDA_ROWS = PLANNING_ROWS
#: Plain re-inference of the whole model keeps every activation of a batch: its
#: throughput stops growing well before that, at a quarter of the rows.
MAX_CUDA_ROWS_WHOLE_MODEL = 256


#: On the CPU, plain re-inference runs fastest in small batches (cache-sized
#: activations): efficientnet_b0 at 224 px took 3.2 s for 196 windows in batches
#: of 8, 3.7 s in 16, 7.6 s in 64 (2-core CPU; benchmarks/cpu_speed.py).
MAX_CPU_ROWS_WHOLE_MODEL = 8


#: Plans kept per traced model (a plan is reused while the input shape, window,
#: strides and the model's parameters stay the same).
MAX_CACHED_PLANS = 8


def default_memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return (free + cached) // 2
    return DEFAULT_CPU_MEMORY


_autotuning_lock = threading.Lock()
_autotuning_users = 0
_autotuning_saved = False


@contextlib.contextmanager
def cudnn_autotuning(device: torch.device) -> Iterator[None]:
    """cuDNN's algorithm search for the window batches, whose shapes repeat from
    batch to batch (bounded power-of-two sizes); the caller's setting is restored
    when the last of concurrent runs (one per GPU) ends."""
    global _autotuning_users, _autotuning_saved
    if device.type != "cuda":
        yield
        return
    with _autotuning_lock:
        if _autotuning_users == 0:
            _autotuning_saved = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = True
        _autotuning_users += 1
    try:
        yield
    finally:
        with _autotuning_lock:
            _autotuning_users -= 1
            if _autotuning_users == 0:
                torch.backends.cudnn.benchmark = _autotuning_saved


def _check_baseline(inputs: torch.Tensor, baseline: Any) -> None:
    """Outside its window the occluded input must equal the input, as in Captum's
    formula input * 1 + baseline * 0; a dtype change or non-finite baseline breaks that."""
    if isinstance(baseline, torch.Tensor):
        try:
            torch.broadcast_shapes(baseline.shape, inputs.shape)
        except RuntimeError as exc:
            raise UnsupportedForIncremental("baseline does not broadcast to the input") from exc
        finite = bool(torch.isfinite(baseline).all()) if baseline.is_floating_point() else True
        if baseline.device != inputs.device:
            raise UnsupportedForIncremental("baseline is on another device than the input")
    elif isinstance(baseline, (int, float)):
        finite = math.isfinite(baseline)
    else:
        raise UnsupportedForIncremental(f"baseline of type {type(baseline).__name__}")
    if not finite:
        raise UnsupportedForIncremental("baseline has non-finite values")
    if torch.result_type(inputs, baseline) != inputs.dtype:
        raise UnsupportedForIncremental("baseline would change the input's dtype")


@dataclass
class PreparedOcclusion:
    """Everything computed before the first window: the views and the plan."""

    captured: CapturedGraph
    inputs: torch.Tensor
    baseline: Any
    grid: WindowGrid
    views: Views
    plan: RegionPlan
    output: torch.Tensor
    use_triton: bool = False
    #: CUDA graphs of window batches (engine/graphs.py): None decides (a batch size
    #: is captured the second time the plan runs it), True captures at once, False
    #: never; only with Triton kernels on CUDA.
    cuda_graphs: bool | None = False
    full_threshold: float | None = None
    #: The user's forward function and its additional arguments as given; its
    #: output on the clean input and, where the self-check ran them in the same
    #: batch, on windows `checked_windows` (engine/self_check.py fills these in).
    forward: Callable[..., Any] | None = None
    additional_args: tuple = ()
    eager_output: torch.Tensor | None = None
    checked_windows: np.ndarray | None = None
    checked_outputs: torch.Tensor | None = None
    #: What the plan's batch check measured (None without the self-check).
    batch_behaviour: Any = None
    #: The model's parameters and buffers as the call found them
    #: (CapturedGraph.model_state): plans for other approximations in the same
    #: call are looked up under it without walking the model again.
    state_key: tuple = ()

    @classmethod
    def prepare(
        cls,
        captured: CapturedGraph,
        inputs: torch.Tensor,
        baseline: Any,
        window: Sequence[int],
        strides: Sequence[int],
        full_threshold: float | None = None,
        approximation: PlanApproximation = EXACT,
        forward: Callable[..., Any] | None = None,
        additional_args: tuple = (),
    ) -> PreparedOcclusion:
        if inputs.dim() < 3:
            raise UnsupportedForIncremental("the input has no spatial dimensions")
        if inputs.shape[0] == 0:
            raise UnsupportedForIncremental("the input batch is empty")
        _check_baseline(inputs, baseline)
        check_ops(captured)  # before the clean run, which would update training-mode state
        state_key, state_values = captured.model_state()
        with torch.no_grad():
            env = evaluate(captured, inputs, state_values=state_values)
        output = env[captured.output_node]
        if not isinstance(output, torch.Tensor):
            raise not_one_tensor(output)
        if not output.is_floating_point():
            raise UnsupportedForIncremental(
                f"the model's output is {output.dtype}, not floating point"
            )
        if output.dim() == 0 or output.shape[0] != inputs.shape[0]:
            raise UnsupportedForIncremental(
                "the output does not have one row per example (aggregated output)"
            )
        grid = WindowGrid(tuple(inputs.shape[1:]), tuple(window), tuple(strides))
        plan = _cached_plan(captured, env, inputs, grid, full_threshold, approximation, state_key)
        return cls(
            captured,
            inputs,
            baseline,
            grid,
            Views(env, plan.device_arrays),
            plan,
            output,
            full_threshold=full_threshold,
            forward=forward,
            additional_args=tuple(additional_args),
            state_key=state_key,
        )

    def choose_kernels(self, kernels: str, cuda_graphs: bool | None) -> PreparedOcclusion:
        """Triton kernels per `kernels` ("auto": on CUDA when installed); CUDA graphs
        only with them, on CUDA: they need kernels that never wait on the host."""
        device = self.inputs.device
        self.use_triton = use_triton(kernels, device)
        usable = self.use_triton and device.type == "cuda"
        self.cuda_graphs = cuda_graphs if usable else False
        return self

    def with_approximation(self, approximation: PlanApproximation) -> PreparedOcclusion:
        """The same input and windows under other plan approximations: the clean
        run's values are shared, only the plan differs."""
        if approximation == self.plan.approximation:
            return self
        env = self.views.env
        plan = _cached_plan(
            self.captured,
            env,
            self.inputs,
            self.grid,
            self.full_threshold,
            approximation,
            self.state_key,
        )
        views = Views(env, plan.device_arrays, shared_copies=self.views)
        return dataclasses.replace(self, plan=plan, views=views)

    def with_tau(self, tau: float) -> PreparedOcclusion:
        """`with_approximation` with another projective-field threshold only."""
        return self.with_approximation(dataclasses.replace(self.plan.approximation, tau=tau))

    def windows_per_batch(self, memory_budget: int | None) -> int:
        """Windows per batch within the memory budget; on CUDA, a power of two, and
        (once per plan, where the plan saves little) after choosing between the
        incremental plan and plain re-inference by measurement (path_choice.py)."""
        if needs_measurement(self):
            with cudnn_autotuning(self.inputs.device):  # as the batches will run
                choose_path(self, memory_budget)
        budget = memory_budget or default_memory_budget(self.inputs.device)
        num_examples = self.inputs.shape[0]
        windows = budget // (self.plan.peak_row_bytes() * num_examples)
        if self.inputs.device.type == "cuda":
            rows = MAX_CUDA_ROWS_WHOLE_MODEL if self.plan.rerun_whole_model else MAX_CUDA_ROWS
            choice = self.plan.path_choice
            if choice is not None and choice.path == "plain" and choice.rows:
                rows = choice.rows
            windows = min(windows, rows // num_examples)
            windows = 1 << (max(windows, 1).bit_length() - 1)  # a power of two
        elif self.plan.rerun_whole_model:
            windows = min(windows, MAX_CPU_ROWS_WHOLE_MODEL // num_examples)
        if self.captured.max_rows is not None:  # the model's own limit on its batch
            windows = min(windows, self.captured.max_rows // num_examples)
        return int(max(1, min(self.grid.num_windows, windows)))

    def input_tiles(self, run: BatchRun) -> torch.Tensor:
        """The occluded input boxes of a batch's rows."""
        node = self.captured.input_node
        lo, hi = self.grid.all_bounds
        per_row = []
        for key, bounds in (("window_lo", lo), ("window_hi", hi)):
            every_window = run.views.device_array(key, bounds, run.device)
            per_row.append(run.windows_of(every_window).repeat_interleave(run.num_examples, 0))
        return self.grid.occluded_tiles(
            self.inputs, self.baseline, run.starts(node), run.size(node), *per_row
        )

    def batch_run(
        self, window_ids: torch.Tensor, full_channels_last: bool | None = None
    ) -> BatchRun:
        extra = dict(self.captured.placeholder_values)
        if full_channels_last is None:
            full_channels_last = bool(self.plan.full_channels_last)
        return BatchRun(
            self.plan,
            self.views,
            window_ids,
            self.input_tiles,
            extra,
            self.use_triton,
            full_channels_last,
        )

    def run_windows(self, first: int, count: int) -> torch.Tensor:
        """Model output for each (window, example) row of windows [first, first + count)."""
        return self.run_window_ids(torch.arange(first, first + count, device=self.inputs.device))

    def run_window_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Model output for each (window, example) row of the given windows.

        On CUDA the first batch of a plan tries its full-mode values channels-last;
        where the model's ops refuse that layout (a `.view` that needs the clean
        layout's strides), the plan keeps the clean values' layout."""
        plan = self.plan
        with torch.no_grad():
            if plan.full_channels_last is None and self._tries_channels_last():
                try:
                    output = self.batch_run(ids, full_channels_last=True).run()
                except torch.cuda.OutOfMemoryError:
                    raise
                except RuntimeError:
                    plan.full_channels_last = False
                else:
                    plan.full_channels_last = True
                    return output
            return self.batch_run(ids).run()

    def _tries_channels_last(self) -> bool:
        """Whether full-mode values may go channels-last: on CUDA, where cuDNN and
        the Triton kernels are fastest on it."""
        return self.inputs.is_cuda

    def initial_outputs(self, target: TargetType) -> torch.Tensor:
        """The clean run's selected outputs, flattened to (1, outputs)."""
        return _select_targets(self.output, target).reshape(1, -1)

    def attribution_from(self, diffs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Captum's average over covering windows, from every window's output difference."""
        return self._average(diffs, dtype).to(self.inputs.device)

    def _average(self, diffs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """On the CPU: the sum over covering windows in the output's dtype, divided
        by the counts in float32, as Captum computes it."""
        total, count = self.grid.accumulate(diffs)
        return _spread_non_finite(self.grid, diffs, total.to(dtype).float() / count.float())

    def attribution_float64(self, diffs: torch.Tensor, one_channel: bool = False) -> torch.Tensor:
        """`attribution_from` in float64 on diffs' device, without Captum's
        rounding to the output's dtype: what calibration compares.

        one_channel: where every window spans all channels, each channel's map is
        the same; then only one is computed, (N, 1, *spatial), which SSIM scores
        as it scores all of them (approx.quality)."""
        grid = self.grid
        if one_channel and grid.counts[0] == 1:
            grid = _one_channel(grid)
        total, count = grid.accumulate(diffs)
        return total / count

    def partial_attribution(
        self, diffs: torch.Tensor, computed: np.ndarray, dtype: torch.dtype
    ) -> torch.Tensor:
        """The average over covering windows among those `computed` so far (NaN at
        positions none of them covers): the heatmap of an unfinished run."""
        mask = torch.from_numpy(computed).to(diffs.device)
        known = torch.where(mask[:, None], diffs, torch.zeros((), dtype=diffs.dtype))
        total, _ = self.grid.accumulate(known)
        covering, _ = self.grid.accumulate(mask[:, None].to(torch.float64))
        result = total.to(dtype).float() / covering[0].float()
        return result.to(self.inputs.device)

    def fill_diffs(
        self,
        window_ids: np.ndarray,
        target: TargetType,
        windows_per_batch: int,
        flat_initial: torch.Tensor,
        diffs: torch.Tensor,
    ) -> Iterator[int]:
        """Compute windows `window_ids` (in this order) into their rows of `diffs`
        (windows x outputs), batch by batch; yields each finished batch's size.

        A batch that runs out of CUDA memory is retried at half the size; rows of
        finished batches are kept. Stopping the iteration between batches leaves
        every finished row in place and nothing half-written."""
        num_outputs = flat_initial.shape[1]
        device = self.inputs.device
        position = 0
        # All ids go to the device at once: a copy per batch from host memory would
        # wait for the previous batch, and the host could not run ahead.
        every_id = torch.from_numpy(np.ascontiguousarray(window_ids, dtype=np.int64)).to(device)
        with cudnn_autotuning(device), self._graph_session() as graphs:
            while position < len(window_ids):
                count = min(windows_per_batch, len(window_ids) - position)
                ids = every_id[position : position + count]
                padded = ids
                if device.type == "cuda" and count < windows_per_batch:
                    padded = _pad_to_bucket(ids, windows_per_batch)
                try:
                    graphed = None if graphs is None else graphs.batch(len(padded))
                    if graphed is not None:
                        output = graphed.run(padded)
                    else:
                        output = self.run_window_ids(padded)
                        if graphs is not None:
                            graphs.ran(len(padded))
                    output = output[: count * self.inputs.shape[0]]
                except torch.cuda.OutOfMemoryError:
                    if windows_per_batch == 1:
                        raise
                    windows_per_batch = max(1, windows_per_batch // 2)
                    if graphs is not None:  # their memory pools go first
                        graphs = None
                        release_graphs(self.captured.plans.values())
                    torch.cuda.empty_cache()
                    continue
                modified = _select_targets(output, _expand_target(target, count))
                diffs[ids] = flat_initial - modified.reshape(-1, num_outputs)
                position += count
                yield count

    def _graph_session(self) -> contextlib.AbstractContextManager:
        """The CUDA graphs this call's batches may replay (engine/graphs.py), or
        a context of None. The plan keeps them for later calls, except where
        additional forward arguments hold tensors (a graph would read the tensors
        of the call that captured it): then they last this call only."""
        if self.cuda_graphs is False:
            return contextlib.nullcontext(None)
        extra = pytree.tree_leaves(list(self.captured.placeholder_values.values()))
        if any(isinstance(value, torch.Tensor) for value in extra):
            if not self.cuda_graphs:
                return contextlib.nullcontext(None)
            graphs = PlanGraphs()
        else:
            baseline = self.baseline
            if isinstance(baseline, torch.Tensor):
                key: tuple = ("tensor", tuple(baseline.shape), baseline.dtype)
            else:
                # repr, not the value: 0.0 == -0.0, but a graph bakes the scalar in
                key = ("scalar", type(baseline).__name__, repr(baseline))
            graphs = plan_graphs(self, (key, numerics_key()))
        return graphs.session(self, eager_warm_up=bool(self.cuda_graphs))


def _spread_non_finite(
    grid: WindowGrid, diffs: torch.Tensor, average: torch.Tensor
) -> torch.Tensor:
    """Captum adds each window's output difference times its 0/1 mask over the
    whole input, so a non-finite difference (an overflow, a NaN) makes every
    position outside that window NaN (inf * 0), and inside it the sum of the
    windows covering it. The sums over covering windows give the latter; here
    each output's positions outside any of its non-finite windows become NaN."""
    bad = ~torch.isfinite(diffs)
    if not bool(bad.any()):
        return average
    covered, _ = grid.accumulate(bad.to(torch.float64))  # (outputs, *shape)
    inside_all = covered == bad.sum(0).to(covered).view(-1, *[1] * (covered.dim() - 1))
    return average.masked_fill(~inside_all.to(average.device), float("nan"))


@functools.lru_cache(maxsize=16)
def _one_channel(grid: WindowGrid) -> WindowGrid:
    """The grid over one channel of the input, for windows that span all of them
    (the same window ids, and its own cached covering tables)."""
    return WindowGrid((1, *grid.shape[1:]), (1, *grid.window[1:]), (1, *grid.strides[1:]))


#: On CUDA a partial batch is padded up to a multiple of this many windows: with
#: cuDNN's algorithm search on, every new batch shape costs a search, and
#: drill-down's batches would otherwise take a new size on every call.
CUDA_BATCH_BUCKET = 64


def _pad_to_bucket(ids: torch.Tensor, limit: int) -> torch.Tensor:
    """`ids` with its last id repeated up to the next multiple of CUDA_BATCH_BUCKET
    (at most `limit`); the extra rows are computed and dropped."""
    size = min(limit, -(-len(ids) // CUDA_BATCH_BUCKET) * CUDA_BATCH_BUCKET)
    if size <= len(ids):
        return ids
    return torch.cat([ids, ids[-1:].expand(size - len(ids))])


def _cached_plan(
    captured: CapturedGraph,
    env: dict,
    inputs: torch.Tensor,
    grid: WindowGrid,
    full_threshold: float | None,
    approximation: PlanApproximation,
    state_key: tuple,
) -> RegionPlan:
    """The plan for these settings, from the model's cache while everything it
    depends on is unchanged, else built and cached."""
    examples = inputs.shape[0]
    rows = max(1, min(grid.num_windows, PLANNING_ROWS // examples)) * examples
    key = (
        tuple(inputs.shape),
        inputs.dtype,
        inputs.device,
        grid.window,
        grid.strides,
        full_threshold,
        rows,
        approximation,
        torch.backends.cudnn.allow_tf32,
        state_key,
    )
    plan = captured.plans.get(key)
    if plan is None or not plan.fits(env):
        try:
            plan = build_plan(
                captured, env, grid.input_geometry(), full_threshold, rows, approximation
            )
        except UnsupportedForIncremental:
            raise
        except Exception as exc:  # a rule that failed on this model: Captum's path
            raise UnsupportedForIncremental(
                f"planning failed ({type(exc).__name__}: {exc})"
            ) from exc
        plan.release_values()
        while len(captured.plans) >= MAX_CACHED_PLANS:
            captured.plans.pop(next(iter(captured.plans)))
        captured.plans[key] = plan
    return plan
