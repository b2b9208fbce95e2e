"""The captured graph: PyTorch's own op-level graph of the model, and running it.

The model is captured with `torch.export` (non-strict) as ATen ops of export's
training IR, with the batch dimension symbolic and every other dimension
specialized to the call's shapes (capture.export). This module holds the result
and runs it one node at a time, keeping every node's value (the views).

Parameters and buffers are graph inputs bound to the live model's tensors on
every run, so a model whose weights change is computed with its new weights.
Values that do not depend on the occluded input (weight standardization, weight
norm, parametrizations, constants) are computed once per call, in the clean run,
and read from it by every window.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from captum_krypton.capture.batch import is_per_example
from captum_krypton.capture.schema import mutates_first_argument


class UnsupportedForIncremental(Exception):
    """Incremental evaluation does not apply; the message says why."""


def resolve_module(forward_func: Callable[..., Any]) -> nn.Module:
    """The module whose forward is `forward_func`, or raise with the reason."""
    if isinstance(forward_func, nn.Module):
        return forward_func
    owner = getattr(forward_func, "__self__", None)
    func = getattr(forward_func, "__func__", None)
    if isinstance(owner, nn.Module) and func is getattr(type(owner), "forward", None):
        return owner
    raise UnsupportedForIncremental(
        "forward_func is neither an nn.Module nor the bound forward of one"
    )


@dataclass
class CapturedGraph:
    """A captured forward: its nodes in order and which of them see the input.

    `placeholder_values` binds the additional forward arguments (graph inputs
    after the occluded one); `state` names the parameter or buffer of `root`
    behind each state input; `constants` holds tensors the capture lifted out of
    the code. `size_exprs` gives every node whose value is a size depending on the
    batch (e.g. `x.size(0)`) as an expression of `batch_symbols`.
    """

    root: nn.Module
    graph_module: fx.GraphModule
    nodes: list[fx.Node]
    input_node: fx.Node
    placeholder_values: dict[fx.Node, Any]
    output_node: fx.Node
    out_spec: Any
    #: How the additional forward arguments nest (their leaves are placeholders).
    args_spec: Any = None
    state: dict[fx.Node, str] = field(default_factory=dict)
    constants: dict[fx.Node, Any] = field(default_factory=dict)
    size_exprs: dict[fx.Node, sympy.Expr] = field(default_factory=dict)
    batch_symbols: frozenset = frozenset()
    #: The most rows the model's own Python allows in a batch (the capture's
    #: range of the batch symbol, e.g. from `if x.shape[0] > 64: raise`); None: any.
    max_rows: int | None = None
    #: The fewest rows the capture holds for, where the model's Python branched
    #: on its batch size above 2 rows (`if x.shape[0] > 8:`); None: any.
    min_rows: int | None = None

    def holds_for(self, rows: int) -> bool:
        """Whether a batch of `rows` takes the branches the capture took (a batch
        of 1 shares them with 2 unless the capture's range says otherwise: export
        traces 2 rows or more and specializes 1)."""
        if self.max_rows is not None and rows > self.max_rows:
            return False
        return self.min_rows is None or rows >= self.min_rows

    #: In-place writes into parameters or buffers (refused once the op rules,
    #: which say why more precisely, e.g. training mode, have had their say).
    state_writes: list[str] = field(default_factory=list)
    depends_on_input: set[fx.Node] = field(default_factory=set)
    batch_aligned: set[fx.Node] = field(default_factory=set)
    _sizes: dict[tuple, int] = field(default_factory=dict, repr=False)
    #: Region plans made for this capture, by what they depend on (engine/occlusion.py).
    plans: dict[tuple, Any] = field(default_factory=dict)

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def model_state(self) -> tuple[tuple, dict[fx.Node, Any]]:
        """The live model's state, read in one walk over its modules:

        key: identity, storage and in-place version of every parameter, buffer and
            tensor argument; a plan holds values derived from them (e.g. folded
            BatchNorm). Writes through `.data` bypass the version counter; after
            such writes, pass the model to a new IncrementalOcclusion.
        values: the parameters and buffers behind the state inputs."""
        parameters, buffers = _module_state(self.root)
        extra = (v for v in self.placeholder_values.values() if isinstance(v, torch.Tensor))
        tensors = itertools.chain(_unique(parameters.values()), _unique(buffers.values()), extra)
        key = tuple((id(t), t.data_ptr(), t._version) for t in tensors)
        values = {}
        for node, name in self.state.items():
            value = parameters.get(name, buffers.get(name))
            values[node] = _fetch(self.root, name) if value is None else value
        return key, values

    def size_of(self, node: fx.Node, rows: int) -> int:
        """A batch-dependent size node's value for a batch of `rows` rows (the
        expression is evaluated once per batch size, not on every batch)."""
        key = (node, rows)
        if key not in self._sizes:
            expr = self.size_exprs[node]
            self._sizes[key] = int(expr.subs({s: rows for s in self.batch_symbols}))
        return self._sizes[key]

    def additional_args(self, leaves: list) -> tuple:
        """The additional forward arguments, structured as forward takes them."""
        return tuple(pytree.tree_unflatten(list(leaves), self.args_spec))

    def output_value(self, flat: Any) -> Any:
        """The model's output, structured as the model returns it."""
        return pytree.tree_unflatten(list(flat), self.out_spec)

    def align_batch(self, examples: int | None) -> None:
        """Mark the nodes that hold one row per example of the call: the input, the
        additional tensors that are per example (`is_per_example`), and everything
        computed from them or from the batch's size. Shared tensors keep their
        clean value in every row."""
        aligned = {self.input_node} | set(self.size_exprs)
        aligned |= {
            node
            for node, value in self.placeholder_values.items()
            if is_per_example(value, examples)
        }
        for node in self.nodes:
            if any(a in aligned for a in value_inputs(node)):
                aligned.add(node)
        self.batch_aligned = aligned


#: Factories that read only their first argument's dtype and device: the size is
#: in their other arguments, so they neither see the input nor hold its rows.
_METADATA_FACTORIES = ("new_zeros", "new_ones", "new_full", "new_empty")


def value_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs whose values (not only dtype and device) the node's value reads."""
    inputs = node.all_input_nodes
    packet = getattr(node.target, "overloadpacket", None)
    if getattr(packet, "__name__", "") in _METADATA_FACTORIES and node.args:
        first = node.args[0]
        return [a for a in inputs if a is not first or any(a is b for b in node.args[1:])]
    return inputs


def _module_state(root: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every parameter and buffer of `root` by dotted name, in the order of
    `named_parameters` and `named_buffers` (each module once): one walk over the
    modules' own tables, without nn.Module's attribute lookup per name."""
    parameters: dict[str, Any] = {}
    buffers: dict[str, Any] = {}
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", root)]
    while stack:
        prefix, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        for name, value in module._parameters.items():
            if value is not None:
                parameters.setdefault(prefix + name, value)
        for name, value in module._buffers.items():
            if value is not None:
                buffers.setdefault(prefix + name, value)
        children = [(prefix + n + ".", m) for n, m in module._modules.items() if m is not None]
        stack.extend(reversed(children))
    return parameters, buffers


def _unique(tensors: Iterable[Any]) -> list[Any]:
    """Each tensor once (a parameter shared by two modules), in order."""
    seen: set[int] = set()
    unique = []
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            unique.append(tensor)
    return unique


def _fetch(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def run_node(captured: CapturedGraph, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    """Run one captured node with concrete arguments, exactly as the model would."""
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "get_attr":
        return _fetch(captured.graph_module, node.target)
    raise ValueError(f"cannot run node of kind {node.op}")


def clone_if_tensor(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def evaluate(
    captured: CapturedGraph,
    input_value: torch.Tensor,
    placeholder_values: dict[fx.Node, Any] | None = None,
    env: dict[fx.Node, Any] | None = None,
    perturb: Callable[[Any], Any] | None = None,
    state_values: dict[fx.Node, Any] | None = None,
) -> dict[fx.Node, Any]:
    """Plain forward through the graph, keeping every node's value (the views).

    In-place ops that see the input get a copy of their first argument so that
    every kept value stays what its node produced; the others run in place, as
    the model runs them (a mask written through slices). `placeholder_values`
    replaces the additional arguments; values computed before an exception stay
    in `env` when the caller passes one; `perturb` is applied to every computed
    node's value (to measure rounding); `state_values`: the model's state as
    `CapturedGraph.model_state` read it (None: read now).
    The output node's value is the model's output, structured as it returns it.
    """
    env = {} if env is None else env
    extra = captured.placeholder_values if placeholder_values is None else placeholder_values
    if state_values is None:
        _, state_values = captured.model_state()
    bound = {**state_values, **captured.constants, **extra}
    rows = input_value.shape[0]
    for node in captured.nodes:
        if node.op == "placeholder":
            env[node] = input_value if node is captured.input_node else bound[node]
        elif node.op == "output":
            env[node] = captured.output_value(fx.node.map_arg(node.args[0], lambda n: env[n]))
        elif node in captured.size_exprs:
            env[node] = captured.size_of(node, rows)
        else:
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            copy = node in captured.depends_on_input and mutates_first_argument(node)
            if copy and args:
                args = (clone_if_tensor(args[0]), *args[1:])
            value = run_node(captured, node, args, kwargs)
            env[node] = value if perturb is None else perturb(value)
    return env


def describe_outputs(output: Any) -> str:
    """A short account of a structured output, for error messages."""

    def one(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"Tensor{tuple(value.shape)}"
        return type(value).__name__

    if isinstance(output, dict):
        return "a dict {" + ", ".join(f"{k!r}: {one(v)}" for k, v in output.items()) + "}"
    fields = getattr(output, "_fields", None)
    if fields is not None:
        values = ", ".join(f"{f}={one(getattr(output, f))}" for f in fields)
        return f"a {type(output).__name__} ({values})"
    if isinstance(output, (tuple, list)):
        return f"a {type(output).__name__} ({', '.join(one(v) for v in output)})"
    return f"a {type(output).__name__}"


def not_one_tensor(output: Any) -> AttributeError:
    """Captum's exception type for a forward that does not return one tensor, with
    what the model returned and the one-line fix."""
    if isinstance(output, dict):
        key = repr(next(iter(output), "key"))
    elif getattr(output, "_fields", None):
        key = repr(output._fields[0])
    else:
        key = "0"
    return AttributeError(
        f"the model returned {describe_outputs(output)}, not one tensor: occlusion "
        f"explains one output. Select it, e.g. "
        f"IncrementalOcclusion(captum_krypton.SelectOutput(model, {key}))"
    )
