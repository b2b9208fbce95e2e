"""The op registry: one rule per op says how a changed box travels through it.

A node's region is `none` (same as in the clean run), `box` (only a box of the
spatial dims differs; all channels), or `full` (recomputed whole). Rules are
looked up by module class (for `call_module`), by function (`call_function`) or
by method name (`call_method`); anything unregistered is evaluated `full`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import fx, nn

if TYPE_CHECKING:  # pragma: no cover
    from captum_krypton.engine.executor import BatchRun


@dataclass(frozen=True)
class Geometry:
    """One box per window: the same size for all, each at its own start."""

    size: tuple[int, ...]
    starts: np.ndarray  # (num_windows, ndim) int64
    map_size: tuple[int, ...]

    @property
    def volume(self) -> int:
        return math.prod(self.size)

    @property
    def map_volume(self) -> int:
        return math.prod(self.map_size)

    def same_as(self, other: Geometry) -> bool:
        return self.size == other.size and np.array_equal(self.starts, other.starts)

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
        return Geometry(tuple(int(s) for s in capped), starts.astype(np.int64), self.map_size)

    @staticmethod
    def from_bounds(lo: np.ndarray, hi: np.ndarray, map_size: tuple[int, ...]) -> Geometry:
        """Uniform box covering [lo, hi) of every window, shifted inward at borders."""
        limit = np.asarray(map_size, dtype=np.int64)
        size = np.clip((hi - lo).max(axis=0), 1, limit)
        starts = np.clip(lo, 0, limit - size)
        return Geometry(tuple(int(s) for s in size), starts.astype(np.int64), map_size)


@dataclass
class NodeInfo:
    """What a rule may know about a node at planning time."""

    node: fx.Node
    module: nn.Module | None
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

    def run_box(self, run: BatchRun, info: NodeInfo, spec: Any) -> torch.Tensor:
        raise NotImplementedError

    def run_full(self, run: BatchRun, info: NodeInfo) -> Any:
        return run.run_node_full(info.node)

    def flops(self, info: NodeInfo) -> float:
        """Approximate FLOPs per example of the whole op (elementwise: one per element)."""
        value = info.value
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return float(value[0].numel()) if value.dim() > 1 else 1.0
        return 0.0


FULL_RULE = OpRule()
_MODULE_RULES: dict[type, OpRule] = {}
_FUNCTION_RULES: dict[Any, OpRule] = {}
_METHOD_RULES: dict[str, OpRule] = {}


def register(
    rule: OpRule,
    modules: tuple[type, ...] = (),
    functions: tuple[Callable, ...] = (),
    methods: tuple[str, ...] = (),
) -> OpRule:
    for cls in modules:
        _MODULE_RULES[cls] = rule
    for fn in functions:
        _FUNCTION_RULES[fn] = rule
    for name in methods:
        _METHOD_RULES[name] = rule
    return rule


def rule_for(node: fx.Node, module: nn.Module | None) -> OpRule:
    if node.op == "call_module" and module is not None:
        for cls in type(module).__mro__:
            if cls in _MODULE_RULES:
                return _MODULE_RULES[cls]
        return FULL_RULE
    if node.op == "call_function":
        try:
            return _FUNCTION_RULES.get(node.target, FULL_RULE)
        except TypeError:  # unhashable callables
            return FULL_RULE
    if node.op == "call_method":
        return _METHOD_RULES.get(node.target, FULL_RULE)
    return FULL_RULE


def registered_names() -> dict[str, list[str]]:
    """What has a rule, for docs and tests."""
    return {
        "modules": sorted(c.__name__ for c in _MODULE_RULES),
        "functions": sorted(getattr(f, "__name__", str(f)) for f in _FUNCTION_RULES),
        "methods": sorted(_METHOD_RULES),
    }
