"""Capture a model with `torch.export` (non-strict), specialized to the call's shapes.

Why torch.export rather than torch.fx symbolic tracing or make_fx: it runs the
model's own Python (so sizes computed from the input, position-embedding
interpolation, weight standardization, weight norm, parametrizations and forward
hooks are captured as the ATen ops they run), its graph is export's training IR
(`aten.conv2d`, `aten.batch_norm`, `aten.linear`, ...: the ops the model calls,
so the captured graph computes bit for bit what the model computes), and it was
measured faster than `make_fx(tracing_mode="symbolic")` (benchmarks/capture_zoo.py;
docs/compatibility.md).

Every dimension is specialized to the call's shapes except the batch: the engine
runs the graph on the clean input (N rows) and on batches of windows (many x N
rows), so the batch dimension stays symbolic. Export specializes a batch of 1, so
the model is captured on at least 2 rows (the input repeated).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree

from captum_krypton.capture.batch import expand_additional_args, is_per_example
from captum_krypton.capture.graph import (
    CapturedGraph,
    UnsupportedForIncremental,
    value_inputs,
)
from captum_krypton.capture.schema import is_view, mutates_first_argument

#: One export at a time in the process: concurrent exports (two threads' first
#: calls) corrupt each other's tracing state (fake mode, module stack), and
#: `_quiet` changes process-wide logging and warning filters.
_EXPORT_LOCK = threading.Lock()

#: Ops that only check what the capture already knows (shapes, dtypes): dropped.
_ASSERTIONS = ("_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range")


@contextlib.contextmanager
def _quiet() -> Any:
    """Export's own warnings and log lines are about its IR, not the user's model."""
    loggers = [logging.getLogger(name) for name in ("torch.export", "torch._export", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export(module: nn.Module, inputs: torch.Tensor, additional_args: Sequence[Any]) -> Any:
    examples = inputs.shape[0]
    copies = 1 if examples >= 2 else 2
    trace_input = torch.cat([inputs] * copies) if copies > 1 else inputs
    trace_args = expand_additional_args(additional_args, examples, copies)
    specs = [{0: Dim.AUTO}]
    specs += [{0: Dim.AUTO} if is_per_example(a, examples) else None for a in additional_args]
    dynamic = _by_parameter(module, specs)
    try:
        with _EXPORT_LOCK, _quiet():
            return torch.export.export(
                module,
                (trace_input, *trace_args),
                dynamic_shapes=dynamic,
                strict=False,
            )
    except Exception as exc:  # capture failures come in every exception type
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UnsupportedForIncremental(
            f"torch.export could not capture the model on a batch of {copies * examples} "
            f"({type(exc).__name__}: {message[:300]})"
        ) from exc


def _by_parameter(module: nn.Module, specs: list) -> Any:
    """Export's dynamic-shape specs in the structure of forward's signature: the
    arguments that fill a `*args` parameter share one tuple of specs."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return tuple(specs)
    structured: list = []
    for position, parameter in enumerate(parameters):
        if parameter.kind is parameter.VAR_POSITIONAL:
            if position < len(specs):
                structured.append(tuple(specs[position:]))
            return tuple(structured)
        if position < len(specs) and parameter.kind in (
            parameter.POSITIONAL_ONLY,
            parameter.POSITIONAL_OR_KEYWORD,
        ):
            structured.append(specs[position])
    return tuple(specs)


def capture(
    module: nn.Module, inputs: torch.Tensor, additional_args: Sequence[Any] = ()
) -> CapturedGraph:
    """Capture `module` called as module(inputs, *additional_args).

    Returns the graph specialized to these shapes with a symbolic batch. Raises
    UnsupportedForIncremental with the reason when export fails, the model fixes
    its batch size, sizes depend on values, or the model writes into its input
    or its own state.
    """
    exported = _export(module, inputs, additional_args)
    graph_module = exported.graph_module
    graph = graph_module.graph
    for node in list(graph.nodes):
        name = getattr(node.target, "__name__", "")
        if node.op == "call_function" and not node.users and name.startswith(_ASSERTIONS):
            graph.erase_node(node)
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    specs = exported.graph_signature.input_specs
    leaves, args_spec = pytree.tree_flatten(tuple(additional_args))
    state: dict[fx.Node, str] = {}
    constants: dict[fx.Node, Any] = {}
    user: list[fx.Node] = []
    for node, spec in zip(placeholders, specs):
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            state[node] = spec.target
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            constants[node] = exported.constants[spec.target]
        elif spec.kind == InputKind.USER_INPUT:
            user.append(node)
        else:
            raise UnsupportedForIncremental(f"the captured graph has a {spec.kind.name} input")
    if len(user) != 1 + len(leaves):
        raise UnsupportedForIncremental("the captured graph's inputs do not match forward's")
    input_node = user[0]
    placeholder_values = dict(zip(user[1:], leaves))
    output_node = next(n for n in reversed(nodes) if n.op == "output")
    captured = CapturedGraph(
        root=module,
        graph_module=graph_module,
        nodes=nodes,
        input_node=input_node,
        placeholder_values=placeholder_values,
        output_node=output_node,
        out_spec=exported.call_spec.out_spec,
        args_spec=args_spec,
        state=state,
        constants=constants,
    )
    _find_batch_symbols(captured, inputs.shape[0])
    for symbol in captured.batch_symbols:
        bounds = exported.range_constraints.get(symbol)
        limit = _finite(getattr(bounds, "upper", None))
        if limit is not None:
            captured.max_rows = min(limit, captured.max_rows or limit)
        lowest = _finite(getattr(bounds, "lower", None))
        if lowest is not None and lowest > 2:  # export traces 2 rows or more: 2 is no branch
            captured.min_rows = max(lowest, captured.min_rows or lowest)
    _check_not_mutated(captured)
    _redirect_inplace_aliases(nodes, _sees_input(captured))
    captured.depends_on_input = _sees_input(captured)
    captured.align_batch(inputs.shape[0])
    return captured


def _finite(bound: Any) -> int | None:
    """A range bound as an int, None where it is infinite or missing."""
    try:
        return int(bound)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def _symbol_of(value: Any) -> Any:
    return value.node.expr if isinstance(value, torch.SymInt) else None


def _find_batch_symbols(captured: CapturedGraph, examples: int) -> None:
    """The batch's symbols (the input's and per-example tensors' first dims) and
    every size node as an expression of them; raise if the batch was fixed."""
    symbols = set()
    sources = [captured.input_node] + [
        n for n, v in captured.placeholder_values.items() if is_per_example(v, examples)
    ]
    for node in sources:
        symbol = _symbol_of(node.meta["val"].shape[0])
        if symbol is None or not symbol.is_Symbol:
            raise UnsupportedForIncremental(
                "the model fixes its batch size (it works on one example at a time)"
            )
        symbols.add(symbol)
    captured.batch_symbols = frozenset(symbols)
    for node in captured.nodes:
        value = node.meta.get("val")
        if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            expr = value.node.expr
            if not expr.free_symbols <= symbols:
                raise UnsupportedForIncremental(
                    f"'{node.name}' is a size that depends on the input's values"
                )
            captured.size_exprs[node] = expr
        elif isinstance(value, torch.Tensor):
            for size in value.shape:
                if isinstance(size, torch.SymInt) and not size.node.expr.free_symbols <= symbols:
                    raise UnsupportedForIncremental(
                        f"'{node.name}' has a shape that depends on the input's values"
                    )


def _check_not_mutated(captured: CapturedGraph) -> None:
    """A model writing into its input changes what Captum occludes next, and one
    updating its own buffers changes between Captum's batches: only Captum's path
    reproduces either."""
    owners: dict[fx.Node, str] = {captured.input_node: "the model's input"}
    owners.update({n: "an additional forward argument" for n in captured.placeholder_values})
    owners.update({n: f"'{name}'" for n, name in captured.state.items()})
    for node in captured.nodes:
        first = node.args[0] if node.args else None
        if first not in owners:
            continue
        if is_view(node):
            owners[node] = owners[first]
        elif mutates_first_argument(node):
            message = f"'{node.name}' ({node.target}) writes into {owners[first]} in place"
            if owners[first].startswith("'"):  # the model's own state: rules speak first
                captured.state_writes.append(message)
            else:
                raise UnsupportedForIncremental(message)


def _redirect_inplace_aliases(nodes: list[fx.Node], sees_input: set[fx.Node]) -> None:
    """After `relu_(a)`, later readers of `a` see the new values: point them at the
    in-place node, so every node that sees the input can then run out of place
    (on a copy) with the same results. Such a write into a view of a tensor read
    again later cannot be run on a copy: refused. Ops that do not see the input
    (a mask built with slice writes) run in place, as the model runs them."""
    position = {node: i for i, node in enumerate(nodes)}
    for node in nodes:
        if node.op != "call_function" or not mutates_first_argument(node):
            continue
        target = node.args[0] if node.args else None
        if not isinstance(target, fx.Node):
            continue
        if target in sees_input:
            base = target
            while is_view(base) and isinstance(base.args[0], fx.Node):
                base = base.args[0]
                if any(position[u] > position[node] for u in base.users):
                    raise UnsupportedForIncremental(
                        f"'{node.name}' writes in place into a view of '{base.name}', read later"
                    )
        for user in list(target.users):
            if user is not node and position[user] > position[node]:
                user.replace_input_with(target, node)


def _sees_input(captured: CapturedGraph) -> set[fx.Node]:
    """Nodes computed from the occluded input (sizes aside)."""
    sees = {captured.input_node}
    for node in captured.nodes:
        if node not in captured.size_exprs and any(a in sees for a in value_inputs(node)):
            sees.add(node)
    return sees


def trace_cache_key(inputs: torch.Tensor, additional_args: Sequence[Any]) -> tuple:
    """Key under which a capture can be reused: every shape but the batch, dtypes,
    devices, which tensors are per example, and the non-tensor arguments."""
    examples = inputs.shape[0]

    def key(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            batch = "batch" if is_per_example(value, examples) else tuple(value.shape[:1])
            return ("tensor", batch, tuple(value.shape[1:]), value.dtype, value.device)
        if isinstance(value, float):  # repr: -0.0 is not 0.0 to a traced constant
            return ("value", float, repr(value))
        try:
            hash(value)
            return ("value", type(value), value)
        except TypeError:
            return ("object", id(value))

    leaves, spec = pytree.tree_flatten((inputs, *additional_args))
    return (str(spec), *(key(v) for v in leaves))


def capture_cached(
    cache: dict[tuple, CapturedGraph],
    module: nn.Module,
    inputs: torch.Tensor,
    additional_args: Sequence[Any],
) -> CapturedGraph:
    """A capture for these arguments, reused when only tensor values changed (their
    new values are bound to the graph's inputs)."""
    key = trace_cache_key(inputs, additional_args)
    captured = cache.get(key)
    if captured is None:
        captured = cache[key] = capture(module, inputs, additional_args)
    else:
        leaves = pytree.tree_leaves(tuple(additional_args))
        captured.placeholder_values = dict(zip(captured.placeholder_values, leaves))
    captured.align_batch(inputs.shape[0])
    return captured
