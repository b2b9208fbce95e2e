"""The op registry: one rule per ATen op says how a changed box travels through it.

A node's region is `none` (same as in the clean run), `box` (only a box of the
spatial dims differs; all channels), or `full` (recomputed whole). Rules are
keyed on the ATen op overloads of export's training IR (`aten.conv2d.default`,
`aten.batch_norm.default`, ...). The decomposition table is fixed and small: an
in-place op (`aten.relu_`) is looked up under its out-of-place op (`aten.relu`),
and nothing else is decomposed. An op without a rule is `full` by construction.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import fx


class BoxRun(Protocol):
    """What a rule may ask of one batch of windows (the engine's BatchRun): the
    boxes' starts and size, reads over (box | clean view | padding), operand
    values, and running an op. Rules never import the engine."""

    rows: int
    device: torch.device
    use_triton: bool
    views: Any  # the clean run's values and device constants
    plan: Any  # the region plan being run

    def starts(self, node: fx.Node) -> torch.Tensor: ...
    def size(self, node: fx.Node) -> tuple[int, ...]: ...
    def clean_value(self, node: fx.Node) -> Any: ...
    def operand_value(self, node: fx.Node) -> Any: ...
    def full_value(self, node: fx.Node) -> Any: ...
    def read(
        self, node: fx.Node, starts: torch.Tensor, size: tuple[int, ...], **pad: Any
    ) -> torch.Tensor: ...
    def read_at(self, node: fx.Node, target: fx.Node) -> torch.Tensor: ...
    def read_operand(self, node: fx.Node, target: fx.Node) -> Any: ...
    def call(self, node: fx.Node, args: tuple, kwargs: dict) -> Any: ...
    def run_node_full(self, node: fx.Node) -> Any: ...
    def boxed(self, node: fx.Node) -> bool: ...
    def mutates(self, node: fx.Node) -> bool: ...
    def owned(self, node: fx.Node, tensor: torch.Tensor) -> torch.Tensor: ...
    def fastest(self, key: Any, candidates: dict) -> Any: ...
    def conv_region(
        self, node: fx.Node, starts: torch.Tensor, out_size: tuple[int, ...], spec: Any
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class Geometry:
    """One box per window: the same size for all, each at its own start.

    The box spans the spatial dims of the node's value, which are its dims
    2, 3, ... (channels-first, `dims` None) or, after a permute or reshape
    (channels-last blocks: ConvNeXt's LayerNorm and Linear), the positions in
    `dims`. Every other dim (batch aside) is taken whole.
    """

    size: tuple[int, ...]
    starts: np.ndarray  # (num_windows, ndim) int64
    map_size: tuple[int, ...]
    dims: tuple[int, ...] | None = None

    def box_dims(self) -> tuple[int, ...]:
        """Positions of the box's dims in the node's value."""
        return self.dims if self.dims is not None else tuple(range(2, 2 + len(self.size)))

    def moved_to(self, dims: tuple[int, ...]) -> Geometry:
        """The same box with its dims at positions `dims` (channels-first: None)."""
        canonical = tuple(range(2, 2 + len(self.size)))
        moved = None if tuple(dims) == canonical else tuple(int(d) for d in dims)
        return dataclasses.replace(self, dims=moved)

    @property
    def volume(self) -> int:
        return math.prod(self.size)

    @property
    def map_volume(self) -> int:
        return math.prod(self.map_size)

    def same_as(self, other: Geometry) -> bool:
        return (
            self.size == other.size
            and self.dims == other.dims
            and np.array_equal(self.starts, other.starts)
        )

    def capped(self, tau: float) -> Geometry:
        """Each side at most ceil(tau x map side), centred on the uncapped box
        (Krypton's projective-field threshold: changes beyond it are dropped)."""
        limit = np.asarray([max(1, math.ceil(tau * m)) for m in self.map_size], dtype=np.int64)
        size = np.asarray(self.size, dtype=np.int64)
        capped = np.minimum(size, limit)
        if np.array_equal(capped, size):
            return self
        starts = self.starts + (size - capped) // 2
        starts = np.clip(starts, 0, np.asarray(self.map_size) - capped)
        return Geometry(
            tuple(int(s) for s in capped), starts.astype(np.int64), self.map_size, self.dims
        )

    @staticmethod
    def from_bounds(
        lo: np.ndarray,
        hi: np.ndarray,
        map_size: tuple[int, ...],
        dims: tuple[int, ...] | None = None,
    ) -> Geometry:
        """Uniform box covering [lo, hi) of every window, shifted inward at borders."""
        limit = np.asarray(map_size, dtype=np.int64)
        size = np.clip((hi - lo).max(axis=0), 1, limit)
        starts = np.clip(lo, 0, limit - size)
        return Geometry(tuple(int(s) for s in size), starts.astype(np.int64), map_size, dims)


@dataclass
class NodeInfo:
    """What a rule may know about a node at planning time."""

    node: fx.Node
    args: tuple  # argument values of the clean run
    kwargs: dict
    value: Any  # the node's value in the clean run
    #: Whether the node sees the occluded input (else it is the same in every row).
    depends_on_input: bool = True

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape[2:])


class OpRule:
    """Base rule: evaluate the node whole (`full`)."""

    name = "full"
    #: Whether the rule takes boxes whose dims are not at 2, 3, ... (after a
    #: permute); a rule that does not is `full` on them.
    any_layout = False

    def check(self, info: NodeInfo) -> None:
        """Raise UnsupportedForIncremental when the op makes Captum's path necessary."""

    def spec(self, info: NodeInfo) -> Any:
        """Static parameters the box execution needs, or None if it cannot run on boxes."""
        return None

    def propagate(
        self, info: NodeInfo, spec: Any, in_geoms: dict[fx.Node, Geometry]
    ) -> Geometry | None:
        """The node's output box given its boxed inputs; None means `full`."""
        return None

    def absorb(self, spec: Any, consumer: NodeInfo) -> Any:
        """A new spec that also computes `consumer` (the node's only user, on the same
        box), or None when this op cannot take it in."""
        return None

    def read_volume(self, info: NodeInfo, spec: Any, geometry: Geometry) -> int:
        """Input positions read per row to compute the box (for the cost model)."""
        return geometry.volume

    def global_statistic(self, info: NodeInfo) -> bool:
        """Whether the node reduces every spatial dim (2, 3, ...) of its first
        argument to one value per example and channel: a global statistic, which
        frozen global context may take from the clean run (plan/context.py)."""
        return False

    def run_box(self, run: BoxRun, info: NodeInfo, spec: Any) -> torch.Tensor:
        raise NotImplementedError

    def run_full(self, run: BoxRun, info: NodeInfo) -> Any:
        return run.run_node_full(info.node)

    def flops(self, info: NodeInfo) -> float:
        """Approximate FLOPs per example of the whole op (elementwise: one per element)."""
        value = info.value
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return float(value[0].numel()) if value.dim() > 1 else 1.0
        return 0.0


FULL_RULE = OpRule()
_RULES: dict[Any, OpRule] = {}


def register(rule: OpRule, *ops: Any) -> OpRule:
    """Make `rule` the rule of each ATen op overload in `ops`."""
    for op in ops:
        _RULES[op] = rule
    return rule


def functional_op(op: Any) -> Any:
    """The out-of-place overload of an in-place ATen op (`relu_` -> `relu`), else `op`."""
    packet = getattr(op, "overloadpacket", None)
    name = getattr(packet, "__name__", "")
    if not name.endswith("_") or name.startswith("_"):
        return op
    functional = getattr(torch.ops.aten, name[:-1], None)
    return getattr(functional, op._overloadname, op) if functional is not None else op


def rule_for(node: fx.Node) -> OpRule:
    """The node's rule: its op's, after the decomposition table; else FULL_RULE."""
    if node.op != "call_function":
        return FULL_RULE
    try:
        return _RULES.get(node.target) or _RULES.get(functional_op(node.target), FULL_RULE)
    except TypeError:  # unhashable callables
        return FULL_RULE


def overloads(*names: str, only: tuple[str, ...] | None = None) -> list:
    """The overloads of the named ATen ops that exist in this torch (all of them,
    or those named in `only`)."""
    found = []
    for name in names:
        packet = getattr(torch.ops.aten, name, None)
        if packet is None:
            continue
        found.extend(getattr(packet, o) for o in packet.overloads() if only is None or o in only)
    return found


def box_shape(
    shape: tuple[int, ...], rows: int, dims: tuple[int, ...], size: tuple[int, ...]
) -> tuple[int, ...]:
    """A value's shape for `rows` rows, cut to a box of `size` along `dims`."""
    cut = [rows, *shape[1:]]
    for dim, extent in zip(dims, size):
        cut[dim] = extent
    return tuple(cut)


def call_on_tile(run: BoxRun, info: NodeInfo, tile: torch.Tensor) -> Any:
    """The node's op on `tile` in place of its first argument; its other operands
    (parameters, constants, sizes) as this call's clean run has them."""
    args = fx.node.map_arg(info.node.args, run.operand_value)
    kwargs = dict(fx.node.map_arg(info.node.kwargs, run.operand_value))
    return run.call(info.node, (tile, *args[1:]), kwargs)


def registered_ops() -> dict[str, list[str]]:
    """Which ops have which rule, for docs and tests."""
    table: dict[str, list[str]] = {}
    for op, rule in _RULES.items():
        table.setdefault(rule.name, []).append(str(op))
    return {name: sorted(ops) for name, ops in sorted(table.items())}


def bind(node: fx.Node, args: tuple | None = None, kwargs: dict | None = None) -> dict[str, Any]:
    """The op's arguments by their schema names, defaults filled in; `args` and
    `kwargs` replace the node's own (e.g. the clean run's values)."""
    args = node.args if args is None else args
    kwargs = node.kwargs if kwargs is None else kwargs
    bound: dict[str, Any] = {}
    for position, argument in enumerate(node.target._schema.arguments):
        if position < len(args):
            bound[argument.name] = args[position]
        elif argument.name in kwargs:
            bound[argument.name] = kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
    return bound


def describe_target(node: fx.Node) -> str:
    """The op's short name for plans and messages (`conv2d`, `relu_`)."""
    packet = getattr(node.target, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(node.target, "__name__", str(node.target))
