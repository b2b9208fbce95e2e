"""Executes a region plan for batches of windows.

Rows of a batch are ordered window-major, example-minor (row = w * N + n), the
order Captum uses when it batches perturbations, so targets and additional
arguments expand the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import fx

from captum_krypton.capture import mutates_first_argument, run_node
from captum_krypton.kernels import choice, region_kernels, torch_ops, triton_conv_module
from captum_krypton.ops import box_shape
from captum_krypton.plan import RegionPlan


def _memory_format(value: torch.Tensor) -> torch.memory_format:
    if value.dim() == 4 and value.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if value.dim() == 5 and value.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def channels_last_format(ndim: int) -> torch.memory_format:
    """cuDNN's usual fastest layout for a 4-D (channels_last) or 5-D
    (channels_last_3d) tensor."""
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


def _channels_first_order(ndim: int, dims: tuple[int, ...]) -> list[int]:
    """Batch, then the dims outside the box in order, then the box's dims."""
    return [0, *(d for d in range(1, ndim) if d not in dims), *dims]


def to_channels_first(value: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """A value whose box dims sit at `dims` as (rows, channels, *box dims), the
    dims outside the box flattened into one channel dim (what the region kernels
    take)."""
    moved = value.permute(_channels_first_order(value.dim(), dims))
    return moved.reshape(moved.shape[0], -1, *moved.shape[moved.dim() - len(dims) :])


def from_channels_first(
    value: torch.Tensor, dims: tuple[int, ...], shape: tuple[int, ...]
) -> torch.Tensor:
    """Inverse of `to_channels_first`, to a value of `shape` (a view where it can be)."""
    order = _channels_first_order(len(shape), dims)
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return value.reshape([shape[d] for d in order]).permute(inverse)


def _empty_in_layout(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An empty tensor of `shape` whose dims are ordered in memory as `like`'s are
    (a permuted clean value projects to a permuted tensor: models `.view` it)."""
    order = sorted(range(like.dim()), key=lambda d: -like.stride(d))
    inverse = sorted(range(len(order)), key=order.__getitem__)
    buffer = torch.empty([shape[d] for d in order], dtype=like.dtype, device=like.device)
    return buffer.permute(inverse)


class Views:
    """The clean run's values (materialized views), with channels-last padded copies,
    and device copies of per-window offsets, made once per attribution so that
    window batches never wait on host-to-device copies."""

    def __init__(
        self,
        env: dict[fx.Node, Any],
        device_arrays: dict | None = None,
        shared_copies: Views | None = None,
    ):
        self.env = env
        # Which clean run these are: views of the same run under another plan
        # share it (a CUDA graph's private copy holding it needs no reload).
        self.clean_run: object = object() if shared_copies is None else shared_copies.clean_run
        # Copies of the clean values depend on the clean run only: views of the same
        # run under another plan share them.
        self._channels_last: dict[tuple, torch.Tensor] = (
            {} if shared_copies is None else shared_copies._channels_last
        )
        # Offsets depend on the plan only: a reused plan brings its device copies.
        self._device_arrays: dict[tuple, torch.Tensor] = (
            {} if device_arrays is None else device_arrays
        )

    def forget_copies(self) -> None:
        """Make copies of the clean values afresh from here on (a CUDA graph
        capture makes its own, engine/graphs.py)."""
        self._channels_last = {}

    def device_array(self, key: Any, array: np.ndarray, device: torch.device) -> torch.Tensor:
        """`array` on `device`, copied once under `key`."""
        cached = self._device_arrays.get((key, device))
        if cached is None:
            cached = torch.from_numpy(np.ascontiguousarray(array)).to(device)
            self._device_arrays[(key, device)] = cached
        return cached

    def constant(self, values: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return self.device_array(("constant", values), np.asarray(values, dtype=np.int64), device)

    def channels_first(self, node: fx.Node, dims: tuple[int, ...]) -> torch.Tensor:
        """(N, C, *box dims) copy of a node's clean value whose box dims are `dims`."""
        key = (node, "channels_first", dims)
        cached = self._channels_last.get(key)
        if cached is None:
            cached = to_channels_first(self.env[node], dims).contiguous()
            self._channels_last[key] = cached
        return cached

    def channels_last(
        self,
        node: fx.Node,
        pad_lo: tuple[int, ...] = (),
        pad_hi: tuple[int, ...] = (),
        pad_value: float = 0.0,
    ) -> torch.Tensor:
        """(N, *padded spatial, C) copy of the node's clean value, made once."""
        key = (node, pad_lo, pad_hi, pad_value)
        cached = self._channels_last.get(key)
        if cached is None:
            value = self.env[node]
            if any(pad_lo) or any(pad_hi):
                pads = [p for lo, hi in zip(reversed(pad_lo), reversed(pad_hi)) for p in (lo, hi)]
                value = torch.nn.functional.pad(value, pads, value=pad_value)
            cached = value.movedim(1, -1).contiguous()
            self._channels_last[key] = cached
        return cached


class BatchRun:
    """One batch of windows through the plan: what rules call to read and compute."""

    #: Diagnostics only (benchmarks/profile_layers.py): when set, called with each
    #: node and True before the batch evaluates it, False after. None normally.
    node_hook: Callable[[fx.Node, bool], None] | None = None

    def __init__(
        self,
        plan: RegionPlan,
        views: Views,
        window_ids: torch.Tensor,
        input_tiles: Callable[[BatchRun], torch.Tensor],
        extra_inputs: dict[fx.Node, Any],
        use_triton: bool = False,
        full_channels_last: bool = False,
    ):
        self.plan = plan
        self.views = views
        self.window_ids = window_ids  # (windows,) on the device
        self.num_examples = plan.num_examples
        self.rows = len(window_ids) * self.num_examples
        self.device = views.env[plan.captured.input_node].device
        self.example = torch.arange(self.rows, device=self.device) % self.num_examples
        self.values: dict[fx.Node, Any] = {}
        self._starts: dict[fx.Node, torch.Tensor] = {}
        self._full: dict[fx.Node, Any] = {}
        self._input_tiles = input_tiles
        self._extra_inputs = extra_inputs
        self.use_triton = use_triton
        self.kernels = region_kernels(use_triton)
        # Boxes projected to full values are written channels-last (see RegionPlan).
        self.full_channels_last = full_channels_last

    # ------------------------------------------------------------ geometry
    def starts(self, node: fx.Node) -> torch.Tensor:
        """(rows, ndim) start of the node's box for each row."""
        starts = self._starts.get(node)
        if starts is None:
            geometry = self.plan.nodes[node].geometry
            every_window = self.views.device_array(node, geometry.starts, self.device)
            starts = self.windows_of(every_window).repeat_interleave(self.num_examples, 0)
            self._starts[node] = starts
        return starts

    def windows_of(self, per_window: torch.Tensor) -> torch.Tensor:
        """This batch's entries of a per-window device tensor (a gather on the device,
        so a captured CUDA graph replays for any batch)."""
        return per_window.index_select(0, self.window_ids)

    def size(self, node: fx.Node) -> tuple[int, ...]:
        return self.plan.nodes[node].geometry.size

    def clean_value(self, node: fx.Node) -> Any:
        return self.views.env[node]

    def operand_value(self, node: fx.Node) -> Any:
        """A non-boxed operand of a box op: its clean value, or for a size that
        depends on the batch (`x.size(0)`), its value for this batch."""
        if node in self.plan.captured.size_exprs:
            return self.plan.captured.size_of(node, self.rows)
        return self.views.env[node]

    # ------------------------------------------------------------ reads
    def read(
        self,
        node: fx.Node,
        starts: torch.Tensor,
        size: tuple[int, ...],
        pad_lo: tuple[int, ...] | None = None,
        pad_hi: tuple[int, ...] | None = None,
        pad_value: float = 0.0,
    ) -> torch.Tensor:
        """Node's values over a region per row: its box where it has one, else its view,
        else `pad_value` outside the map. Returns (rows, C, *size), channels-last."""
        ndim = len(size)
        dims = self.plan.nodes[node].geometry.dims if self.boxed(node) else None
        if dims is not None:  # a permuted layout: read it channels-first
            tile = torch_ops.compose_region(
                self.views.channels_first(node, dims),
                self.example,
                starts,
                size,
                pad_value,
                to_channels_first(self.values[node], dims),
                self.starts(node),
            )
            shape = box_shape(self.clean_value(node).shape, self.rows, dims, size)
            return from_channels_first(tile, dims, shape)
        pad_lo = tuple(pad_lo or (0,) * ndim)
        pad_hi = tuple(pad_hi or (0,) * ndim)
        boxed = self.plan.nodes[node].mode == "box"
        box_starts = self.starts(node) if boxed else None
        if self.use_triton:  # one pass: box, view and padding together
            view = self.views.channels_last(node)
        else:  # the torch reference reads a copy padded once, so its rows stay in the map
            view = self.views.channels_last(node, pad_lo, pad_hi, pad_value)
            shift = self.views.constant(pad_lo, self.device)
            starts = starts + shift
            box_starts = box_starts + shift if boxed else None
        return self.kernels.compose_region(
            view.movedim(-1, 1),
            self.example,
            starts,
            size,
            pad_value,
            self.values[node] if boxed else None,
            box_starts,
        )

    def boxed(self, node: fx.Node) -> bool:
        return self.plan.nodes[node].mode == "box"

    def conv_region(
        self, node: fx.Node, starts: torch.Tensor, out_size: tuple[int, ...], spec: Any
    ) -> torch.Tensor:
        """A conv over node's values read from (box | view | zero) at `starts` (map
        coordinates of each row's read-in origin), without building the tile.

        Raises kernels.choice.CandidatePending while its kernel compiles in the
        background: it is one candidate among cuDNN's (kernels.choice.fastest)."""
        boxed = self.boxed(node)
        return triton_conv_module().conv_region(
            self.views.channels_last(node).movedim(-1, 1),
            self.example,
            starts,
            out_size,
            spec.weight,
            spec.bias,
            spec.window.stride,
            spec.window.dilation,
            self.values[node] if boxed else None,
            self.starts(node) if boxed else None,
            spec.activation,
            spec.gemm_weight,
            background=True,
        )

    def fastest(self, key: Any, candidates: dict[str, Callable[[], Any]]) -> Any:
        """The candidate measured fastest for this shape (see kernels.choice)."""
        return choice.fastest(key, candidates, self.device)

    def read_at(self, node: fx.Node, target: fx.Node) -> torch.Tensor:
        """Node's values over target's box (the box itself when they coincide)."""
        source_plan, target_plan = self.plan.nodes[node], self.plan.nodes[target]
        if source_plan.mode == "box" and source_plan.geometry.same_as(target_plan.geometry):
            return self.values[node]
        return self.read(node, self.starts(target), self.size(target))

    def read_operand(self, node: fx.Node, target: fx.Node) -> Any:
        """An operand of a merging op over target's box; unboxed operands broadcast."""
        if self.plan.nodes[node].mode == "box":
            return self.read_at(node, target)
        value = self.clean_value(node)
        if not isinstance(value, torch.Tensor):
            return value
        target_plan = self.plan.nodes[target]
        out_shape = tuple(target_plan.info.value.shape)
        geometry = target_plan.geometry
        dims = geometry.box_dims()
        shape = (1,) * (len(out_shape) - value.dim()) + tuple(value.shape)
        value = value.reshape(shape)
        if all(shape[d] == 1 for d in dims):  # no extent over the box: broadcasts as it is
            return value if shape[0] == 1 else value[self.example]
        expanded = torch.broadcast_to(value, (shape[0], *out_shape[1:]))
        rows = self.example if shape[0] > 1 else torch.zeros_like(self.example)
        source = to_channels_first(expanded, dims).movedim(1, -1)
        tile = torch_ops.gather_tiles(source, rows, self.starts(target), geometry.size)
        shape = box_shape(out_shape, self.rows, dims, geometry.size)
        return from_channels_first(tile.movedim(-1, 1), dims, shape)

    # ------------------------------------------------------------ compute
    def mutates(self, node: fx.Node) -> bool:
        return mutates_first_argument(node)

    def owned(self, node: fx.Node, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor safe to write into: a copy unless it is the node's sole-use value."""
        if (
            node in self.plan.captured.depends_on_input
            and len(node.users) == 1
            and tensor is self.values.get(node)
        ):
            return tensor
        return tensor.clone()

    def call(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        return run_node(self.plan.captured, node, args, kwargs)

    def full_value(self, node: fx.Node) -> Any:
        """The node's value for every row as ordinary batched inference would have it."""
        if node in self._full:
            return self._full[node]
        if node in self.plan.captured.size_exprs:
            return self.plan.captured.size_of(node, self.rows)
        plan = self.plan.nodes[node]
        if plan.mode == "box":
            box, clean = self.values[node], self.clean_value(node)
            if isinstance(box, torch.Tensor):
                value = self._project(node, clean, box)
            else:  # a split's pieces, each projected over its clean piece
                value = [self._project(node, c, b) for c, b in zip(clean, box)]
        elif plan.mode == "full":
            value = self.values[node]
        elif node.meta["batch_aligned"]:
            value = self._batched_clean(node)
        elif node in self.plan.frozen.nodes:  # frozen global context: each row's clean value
            value = self._example_rows(self.clean_value(node))
        else:
            value = self.clean_value(node)
        if plan.mode != "full":
            self._full[node] = value
        return value

    def _project(self, node: fx.Node, clean: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        """Each row's box written over the clean value (same dims as `node`'s box)."""
        shape = (self.rows, *clean.shape[1:])
        starts = self.starts(node)
        dims = self.plan.nodes[node].geometry.dims
        if dims is not None or clean.dim() - 2 != starts.shape[1]:
            dims = self.plan.nodes[node].geometry.box_dims()
            canonical = to_channels_first(clean, dims)
            whole = torch_ops.compose_region(
                canonical,
                self.example,
                torch.zeros_like(starts),
                tuple(canonical.shape[2:]),
                0.0,
                to_channels_first(box, dims),
                starts,
            )
            value = _empty_in_layout(clean, shape)
            return value.copy_(from_channels_first(whole, dims, shape))
        value = torch.empty(
            shape, dtype=clean.dtype, device=clean.device, memory_format=self._full_format(clean)
        )
        self.kernels.compose_region(
            clean, self.example, torch.zeros_like(starts), tuple(clean.shape[2:]), 0.0, box,
            starts, out=value,
        )  # fmt: skip
        return value

    def _full_format(self, clean: torch.Tensor) -> torch.memory_format:
        """The memory format of a projected full value: channels-last where the plan
        found the model runs on it, else the clean value's own (models may `.view`
        it; the Triton kernels write NCHW projections with positions innermost)."""
        if clean.dim() not in (4, 5):
            return torch.contiguous_format
        if self.full_channels_last:
            return channels_last_format(clean.dim())
        return torch.contiguous_format if self.use_triton else _memory_format(clean)

    def _example_rows(self, value: Any) -> Any:
        """A clean value with one row per example, repeated for every row of the batch."""
        if isinstance(value, torch.Tensor) and value.dim():
            return value[self.example]
        if isinstance(value, (list, tuple)):
            return type(value)(self._example_rows(v) for v in value)
        return value

    def _batched_clean(self, node: fx.Node) -> Any:
        """A node that does not see the occlusion but has a batch dim, for all rows."""
        if node.op == "placeholder":
            value = self._extra_inputs[node]
            return value[self.example] if isinstance(value, torch.Tensor) and value.dim() else value
        return self.run_node_full(node)

    def run_node_full(self, node: fx.Node) -> Any:
        args = fx.node.map_arg(node.args, self.full_value)
        kwargs = fx.node.map_arg(node.kwargs, self.full_value)
        if self.mutates(node) and args and isinstance(args[0], torch.Tensor):
            first = node.args[0]
            if not (
                isinstance(first, fx.Node)
                and self.plan.nodes[first].mode == "full"
                and len(first.users) == 1
            ):
                args = (args[0].clone(), *args[1:])
        return self.call(node, args, kwargs)

    def _rerun_whole_model(self) -> Any:
        """Plain batched inference of the model on the rows' occluded inputs."""
        node = self.plan.captured.input_node
        self.values[node] = self._input_tiles(self)
        inputs = self.full_value(node)
        choice = self.plan.path_choice
        if choice is not None and choice.path == "plain":  # the layout measured fastest
            inputs = inputs.contiguous(memory_format=choice.layout)
        elif inputs.is_cuda and inputs.dim() in (4, 5):  # cuDNN's usual fastest layout
            inputs = inputs.contiguous(memory_format=channels_last_format(inputs.dim()))
        captured = self.plan.captured
        extra = [self.full_value(p) for p in captured.placeholder_values]
        return captured.root(inputs, *captured.additional_args(extra))

    def run(self) -> Any:
        """Evaluate the plan's nodes; returns the model output for all rows."""
        plan = self.plan
        if plan.rerun_whole_model:
            return self._rerun_whole_model()
        hook = BatchRun.node_hook
        for step, node in enumerate(plan.order):
            node_plan = plan.nodes[node]
            if hook is not None:
                hook(node, True)
            if node is plan.captured.input_node:
                value = self._input_tiles(self)
            elif node.op == "output":
                return plan.captured.output_value(fx.node.map_arg(node.args[0], self.full_value))
            elif node_plan.mode == "box":
                value = node_plan.rule.run_box(self, node_plan.info, node_plan.spec)
            else:
                value = node_plan.rule.run_full(self, node_plan.info)
            self.values[node] = value
            if hook is not None:
                hook(node, False)
            for arg in node.all_input_nodes:
                if plan.last_use.get(arg) == step:
                    self.values.pop(arg, None)
                    self._full.pop(arg, None)
        raise RuntimeError("the graph has no output")
