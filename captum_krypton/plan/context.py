"""Frozen global context: which global statistics a plan may take from the clean run.

A global statistic (rule.global_statistic: global average or max pooling, `mean`
over every spatial dim) changes with every window, so everything it feeds is
`full` in exact mode; after a squeeze-excitation block every window changes every
position. With frozen global context, a statistic whose result only comes back
onto a spatial map (multiplied or added: squeeze-excitation's scale vector,
DeepLab's image-pooling branch) keeps the clean run's value, and so does every
node that depends on the input only through such statistics (the small MLP and
gate after the pooling). The changed box then stays a box through the block.

A statistic that reaches the output other than through a spatial map (the
classifier's global pooling) is the output itself, and is never frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import fx

from captum_krypton.capture import CapturedGraph
from captum_krypton.ops import NodeInfo, rule_for


@dataclass(frozen=True)
class GlobalContext:
    """The statistics that may be frozen and the nodes that then keep their clean
    values (the statistics themselves included)."""

    statistics: tuple[fx.Node, ...] = ()
    nodes: frozenset[fx.Node] = frozenset()


def find_global_context(captured: CapturedGraph, env: dict[fx.Node, Any]) -> GlobalContext:
    """The global statistics whose result only returns onto spatial maps, with the
    nodes that depend on the input through them alone."""
    seeds = [node for node in captured.nodes if _is_statistic(captured, node, env)]
    while True:
        context = _context_of(captured, seeds)
        kept = [seed for seed in seeds if _returns_onto_maps(captured, seed, context, env)]
        if kept == seeds:
            break
        seeds = kept
    nodes = _context_of(captured, seeds)
    return GlobalContext(tuple(seeds), frozenset(nodes))


def _is_statistic(captured: CapturedGraph, node: fx.Node, env: dict[fx.Node, Any]) -> bool:
    if node.op != "call_function" or node not in captured.depends_on_input:
        return False
    rule = rule_for(node)
    info = NodeInfo(
        node,
        fx.node.map_arg(node.args, lambda n: env[n]),
        fx.node.map_arg(node.kwargs, lambda n: env[n]),
        env[node],
    )
    return rule.global_statistic(info)


def _context_of(captured: CapturedGraph, seeds: list[fx.Node]) -> set[fx.Node]:
    """The seeds, and every node that sees the input only through them."""
    context = set(seeds)
    for node in captured.nodes:
        if node in context or node.op != "call_function":
            continue
        seen = [a for a in node.all_input_nodes if a in captured.depends_on_input]
        if node in captured.depends_on_input and seen and all(a in context for a in seen):
            context.add(node)
    return context


def _returns_onto_maps(
    captured: CapturedGraph, seed: fx.Node, context: set[fx.Node], env: dict[fx.Node, Any]
) -> bool:
    """Whether everything `seed` feeds through `context` leaves it into a spatial
    map (a value with more than one spatial position that also sees the input
    otherwise), never into the output."""
    reached, stack, left_into = {seed}, [seed], []
    while stack:
        for user in stack.pop().users:
            if user in context:
                if user not in reached:
                    reached.add(user)
                    stack.append(user)
            else:
                left_into.append(user)
    return bool(left_into) and all(_is_spatial_merge(captured, n, env) for n in left_into)


def _is_spatial_merge(captured: CapturedGraph, node: fx.Node, env: dict[fx.Node, Any]) -> bool:
    value = env.get(node)
    shape = getattr(value, "shape", None)
    return (
        node.op == "call_function"
        and shape is not None
        and len(shape) >= 3
        and math.prod(shape[2:]) > 1
    )
