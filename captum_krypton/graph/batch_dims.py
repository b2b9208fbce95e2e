"""Where a model mixes the examples of a batch, read off its graph.

The engine runs many (window, example) rows in one batch, as Captum does at
perturbations_per_eval > 1; that is only the same as Captum's default of one
window per forward when every row is computed on its own. A node breaks that
when it reduces over the batch dimension (`x - x.min()`, a score standardized
over the batch), merges the batch with another dimension (`x.view(-1)`), or
assumes one batch size (`x.view(1, -1)`).

Such nodes are found by comparing each node's shape in the clean run (N rows)
with its shape in a run of several windows (copies x N rows): exactly one
dimension must grow, from N to copies x N. A node whose shapes say nothing
(same shape, batch dim kept) but that mixes rows anyway, e.g. a softmax over
dim 0, is left to the numerical check of a batch against windows run one at a
time (engine/self_check.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from captum_krypton.graph.capture import CapturedGraph


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
