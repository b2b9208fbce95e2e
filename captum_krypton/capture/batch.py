"""Where a model mixes the examples of a batch, read off its graph.

The engine runs many (window, example) rows in one batch, as Captum does at
perturbations_per_eval > 1; that is only the same as Captum's default of one
window per forward when every row is computed on its own. A node breaks that
when it reduces over the batch dimension (`x - x.min()`, a score standardized
over the batch), merges the batch with another dimension (`x.view(-1)`), or
assumes one batch size (`x.view(1, -1)`).

Two checks find such nodes. `find_batch_coupling` reads the capture's symbolic
shapes (the batch is a symbol) and the ops' `dim` arguments before anything runs.
`find_batch_mixing` compares each node's shape in the clean run (N rows) with
its shape in a run of several windows (copies x N rows): exactly one dimension
must grow, from N to copies x N. What neither sees is left to the numerical
check of a batch against windows run one at a time (engine/self_check.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from captum_krypton.capture.schema import is_view

if TYPE_CHECKING:  # pragma: no cover
    from captum_krypton.capture.graph import CapturedGraph


def _describe(node: fx.Node) -> str:
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    return f"'{node.name}' ({name})"


def _holds_tensor(value: Any) -> bool:
    """A tensor, or a tuple or list of values one of which holds one (split, max)."""
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v) for v in value)
    return isinstance(value, torch.Tensor)


def batch_dimension(
    clean: torch.Size, batched: torch.Size, examples: int, copies: int
) -> int | None:
    """The dim of a value that holds the rows: the one dim that grows from
    `examples` to `copies * examples` between the two runs; None if there is none."""
    if len(clean) != len(batched):
        return None
    grown = [d for d, (a, b) in enumerate(zip(clean, batched)) if a != b]
    if len(grown) != 1:
        return None
    dim = grown[0]
    if clean[dim] != examples or batched[dim] != copies * examples:
        return None
    return dim


def find_batch_mixing(
    captured: CapturedGraph,
    clean_env: dict[fx.Node, Any],
    batch_env: dict[fx.Node, Any],
    examples: int,
    copies: int,
) -> str | None:
    """The first node, in graph order, whose values are not one row per example
    in both runs, described for a warning; None when every node keeps its rows.

    Judged are the nodes that read rows: those computed from a tensor that holds
    rows (the input, per-example tensors, and what follows from them). A tensor
    made from the input's size, dtype or device alone (`torch.full(...,
    device=x.device)`) holds no rows. `batch_env` may stop early (the batched run
    raised): nodes not in it are not judged."""
    rows = {n for n in captured.batch_aligned if n.op == "placeholder"}
    for node in captured.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if not any(a in rows and _holds_tensor(clean_env.get(a)) for a in node.all_input_nodes):
            continue
        rows.add(node)
        clean, batched = clean_env.get(node), batch_env.get(node)
        if not isinstance(clean, torch.Tensor) or not isinstance(batched, torch.Tensor):
            continue
        if batch_dimension(clean.shape, batched.shape, examples, copies) is None:
            if clean.dim() == 0 or clean.shape == batched.shape:
                how = "reduces over the batch dimension"
            else:
                how = "merges the batch dimension with another one or assumes one batch size"
            return (
                f"{_describe(node)} {how} (shape {tuple(clean.shape)} for {examples} "
                f"example(s), {tuple(batched.shape)} for {copies * examples} rows): the model "
                "mixes the examples of a batch"
            )
    return None


def is_per_example(value: Any, examples: int | None) -> bool:
    """Whether an additional forward argument has one row per example.

    Captum passes additional arguments unchanged at perturbations_per_eval=1 and,
    above it, repeats every tensor of one or more dims along dim 0 once per
    perturbation. Both agree for a tensor whose first dim is the number of
    examples, so such a tensor is treated as per example, and every other one
    (scalars, and tensors shared by all examples) is passed unchanged.
    """
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == examples


def expand_additional_args(args: Any, examples: int, copies: int) -> tuple:
    """Additional forward arguments for `copies` perturbations of `examples`
    examples in one batch (rows perturbation-major): per-example tensors repeated
    as Captum repeats them, everything else unchanged."""
    return tuple(
        torch.cat([a] * copies) if copies > 1 and is_per_example(a, examples) else a for a in args
    )


def _batch_dims(value: Any, symbols: frozenset) -> list[int] | None:
    """Positions of a symbolic tensor's dims that are exactly a batch symbol; None
    if some dim mixes a batch symbol with anything else (`s0 * 512`, `s0 + 1`)."""
    found = []
    for position, size in enumerate(value.shape):
        if not isinstance(size, torch.SymInt):
            continue
        expr = size.node.expr
        if expr in symbols:
            found.append(position)
        elif expr.free_symbols & symbols:
            return None
    return found


def _dim_arguments(node: fx.Node, rank: int) -> set[int]:
    """The dims an op names in its `dim` / `dims` arguments, made non-negative."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return set()
    named = {}
    for position, argument in enumerate(schema.arguments):
        if position < len(node.args):
            named[argument.name] = node.args[position]
        elif argument.name in node.kwargs:
            named[argument.name] = node.kwargs[argument.name]
    dims: set[int] = set()
    for name in ("dim", "dims"):
        value = named.get(name)
        values = value if isinstance(value, (list, tuple)) else [value]
        dims.update(v % rank for v in values if isinstance(v, int) and rank > 0)
    return dims


def find_batch_coupling(captured: CapturedGraph) -> str | None:
    """The first node, in graph order, that the capture's symbolic shapes show to
    mix the rows of a batch; None when every node keeps one row per example.

    Read off the graph alone: a node that reads rows must keep exactly one dim
    that is exactly the batch (a reduction over it, `x.view(-1)` or a fixed batch
    size leave none or merge it), and an op that keeps its input's shape must not
    name the batch dim in its `dim` arguments (softmax, cumsum, flip, sort,
    index_select over dim 0) or index it (`x[perm]`).
    """
    symbols = captured.batch_symbols
    rows = {n for n in captured.batch_aligned if n.op == "placeholder"}
    for node in captured.nodes:
        if node.op != "call_function" or node in captured.size_exprs:
            continue
        sources = [a for a in node.all_input_nodes if a in rows]
        if not sources:
            continue
        value = node.meta.get("val")
        values = value if isinstance(value, (list, tuple)) else [value]
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        if not tensors:
            continue
        rows.add(node)
        for tensor in tensors:
            dims = _batch_dims(tensor, symbols)
            if dims is None or len(dims) != 1:
                how = (
                    "reduces over the batch dimension"
                    if dims == []
                    else "merges the batch dimension with another one or assumes one batch size"
                )
                return f"{_describe(node)} {how} (shape {tuple(tensor.shape)})"
        first = node.args[0] if node.args else None
        source = first.meta.get("val") if isinstance(first, fx.Node) and first in rows else None
        if not isinstance(source, torch.Tensor) or not isinstance(value, torch.Tensor):
            continue
        if is_view(node):  # a view keeping the shape keeps every row (`x[:, 1:]`)
            continue
        batch = _batch_dims(source, symbols)
        if not batch or len(batch) != 1 or tuple(source.shape) != tuple(value.shape):
            continue
        named = _dim_arguments(node, source.dim())
        indexed = getattr(node.target, "__name__", "").startswith("index.") and (
            len(node.args) > 1
            and len(node.args[1]) > batch[0]
            and node.args[1][batch[0]] is not None
        )
        if batch[0] in named or indexed:
            return f"{_describe(node)} works along the batch dimension"
    return None
