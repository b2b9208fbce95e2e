"""The region plan: per node of the graph, `none`, `box` (with its geometry) or `full`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from captum_krypton.capture import CapturedGraph, UnsupportedForIncremental
from captum_krypton.ops import (
    FULL_RULE,
    FUSED_RULE,
    Geometry,
    NodeInfo,
    OpRule,
    describe_target,
    rule_for,
)
from captum_krypton.plan.approximation import EXACT, PlanApproximation
from captum_krypton.plan.context import GlobalContext, find_global_context
from captum_krypton.plan.cost import DeviceCosts, cheapest_full_set, device_costs

#: A plan saving less than this factor (of estimated time; of FLOPs when a
#: coverage threshold replaces the cost model) is not worth its bookkeeping: the
#: batch runs as plain re-inference of the whole model on occluded inputs.
MIN_INCREMENTAL_GAIN = 1.15
#: Rows per window batch the cost model assumes (the engine's CUDA batch bound).
PLANNING_ROWS = 1024


@dataclass
class NodePlan:
    node: fx.Node
    info: NodeInfo
    rule: OpRule
    spec: Any
    mode: str  # "none" | "box" | "full"
    geometry: Geometry | None
    reason: str
    flops_full: float
    flops_incremental: float
    row_bytes: int

    @property
    def op(self) -> str:
        if self.node.op == "placeholder":
            return "input"
        return describe_target(self.node)


@dataclass
class RegionPlan:
    """How each node is evaluated for a window batch, and what that saves."""

    captured: CapturedGraph
    nodes: dict[fx.Node, NodePlan]
    order: list[fx.Node]  # the nodes a window batch evaluates, in order
    num_examples: int
    last_use: dict[fx.Node, int] = field(default_factory=dict)
    rerun_whole_model: bool = False
    #: Estimated seconds per batch of `PLANNING_ROWS` rows: this plan's
    #: incremental assignment and plain re-inference (None with a threshold).
    estimated_seconds: float | None = None
    estimated_full_seconds: float | None = None
    costs: DeviceCosts | None = None
    #: The approximations this plan was made with (exact by default).
    approximation: PlanApproximation = EXACT
    #: The global statistics that could be frozen (found with or without the
    #: approximation), and the nodes frozen: they keep the clean run's values.
    global_context: GlobalContext = field(default_factory=GlobalContext)
    frozen: GlobalContext = field(default_factory=GlobalContext)
    #: Per-window offsets on the device, made once per plan (executor.Views).
    device_arrays: dict = field(default_factory=dict)
    #: Outcome of the once-per-plan batch checks (engine/self_check.py): layout
    #: checked, what the batch check measured, or the failure to raise again.
    #: Incremental or plain re-inference, as measured on CUDA (engine/path_choice.py).
    path_choice: Any = None
    #: On CUDA: whether values evaluated in full are made channels-last (the layout
    #: cuDNN runs fastest, and the one plain re-inference gets) instead of the clean
    #: values' layout; None until a first batch has tried it (engine/occlusion.py).
    full_channels_last: bool | None = None
    #: On CUDA: the CUDA graphs of this plan's window batches and the private
    #: clean run they read, by baseline (engine/graphs.py).
    cuda_graphs: dict = field(default_factory=dict)
    batch_layout_checked: bool = False
    batch_behaviour: Any = None
    batch_failure: Exception | None = None

    def fits(self, env: dict[fx.Node, Any]) -> bool:
        """Whether a clean run's values have the shapes this plan was made for."""
        for node, node_plan in self.nodes.items():
            planned, value = node_plan.info.value, env.get(node)
            if isinstance(planned, torch.Tensor):
                if not (
                    isinstance(value, torch.Tensor)
                    and value.shape == planned.shape
                    and value.dtype == planned.dtype
                ):
                    return False
            elif type(value) is not type(planned):
                return False
        return True

    def release_values(self) -> None:
        """Keep only shapes of the activations the plan was made from (meta tensors),
        so a reused plan does not hold a clean run's memory."""
        activations = self.captured.depends_on_input | self.captured.batch_aligned

        def lighten(value: Any) -> Any:
            return value.to("meta") if isinstance(value, torch.Tensor) else value

        def argument(node: fx.Node) -> Any:
            value = self.nodes[node].info.value
            return lighten(value) if node in activations else value

        for node, node_plan in self.nodes.items():
            info = node_plan.info
            info.args = fx.node.map_arg(node.args, argument)
            info.kwargs = fx.node.map_arg(node.kwargs, argument)
        for node, node_plan in self.nodes.items():
            if node in activations:
                node_plan.info.value = lighten(node_plan.info.value)

    @property
    def tau(self) -> float:
        """Projective-field threshold: box sides capped at tau x map side (1: exact)."""
        return self.approximation.tau

    @property
    def exact(self) -> bool:
        """Whether this plan computes exact occlusion: no cap, nothing frozen."""
        return self.tau == 1.0 and not self.frozen.statistics

    @property
    def frozen_statistics(self) -> tuple[str, ...]:
        """Names of the global statistics taken from the clean run."""
        return tuple(node.name for node in self.frozen.statistics)

    @property
    def flops_full(self) -> float:
        return sum(p.flops_full for p in self.nodes.values())

    @property
    def flops_incremental(self) -> float:
        return sum(p.flops_incremental for p in self.nodes.values())

    @property
    def cost_per_row(self) -> float:
        """This plan's estimated cost of one (window, example) row: seconds where the
        cost model ran, else FLOPs; comparable between plans made with the same
        settings (approximations choose between plans with it)."""
        if self.estimated_seconds is None or self.estimated_full_seconds is None:
            flops = self.flops_full if self.rerun_whole_model else self.flops_incremental
            return flops / self.num_examples
        seconds = self.estimated_full_seconds if self.rerun_whole_model else self.estimated_seconds
        return seconds / PLANNING_ROWS

    @property
    def theoretical_speedup(self) -> float:
        """FLOPs of full re-inference over FLOPs of this plan (the speedup limit)."""
        if self.rerun_whole_model:
            return 1.0
        return self.flops_full / max(self.flops_incremental, 1.0)

    def peak_row_bytes(self) -> int:
        """Largest memory live at once for one row (one window of one example)."""
        live: dict[fx.Node, int] = {}
        peak = 0
        for step, node in enumerate(self.order):
            plan = self.nodes[node]
            temp = 0
            if plan.mode == "full":
                temp = sum(
                    _tensor_bytes(self.nodes[a].info.value)
                    for a in node.all_input_nodes
                    if self.nodes[a].mode == "box"
                )
            elif plan.mode == "box":
                temp = 2 * sum(live.get(a, 0) for a in node.all_input_nodes)
            live[node] = plan.row_bytes
            peak = max(peak, sum(live.values()) + temp)
            for done in [n for n in live if self.last_use.get(n, step) <= step]:
                del live[done]
        return max(peak, 1)

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for node in self.order:
            p = self.nodes[node]
            if p.mode == "none" or node.op == "output":
                continue
            value = p.info.value
            map_size = tuple(value.shape[2:]) if isinstance(value, torch.Tensor) else ()
            rows.append(
                {
                    "node": node.name,
                    "op": p.op,
                    "mode": p.mode,
                    "box": p.geometry.size if p.geometry else map_size,
                    "map": map_size,
                    "flops_full": p.flops_full,
                    "flops_incremental": p.flops_incremental,
                    "reason": p.reason,
                }
            )
        return rows

    def summary(self, max_rows: int | None = None) -> str:
        """A readable table: per layer the box, the mode and the FLOP ratio."""
        lines = [f"{'node':<28} {'op':<18} {'mode':<5} {'box / map':<22} {'FLOP ratio':>10}"]
        table = self.table()
        shown = table if max_rows is None else table[:max_rows]
        for row in shown:
            ratio = (
                f"{row['flops_full'] / row['flops_incremental']:.2f}x"
                if row["flops_incremental"] > 0
                else "-"
            )
            extent = f"{'x'.join(map(str, row['box']))} / {'x'.join(map(str, row['map']))}"
            lines.append(
                f"{row['node'][:28]:<28} {row['op'][:18]:<18} {row['mode']:<5} "
                f"{extent:<22} {ratio:>10}"
            )
        if len(shown) < len(table):
            lines.append(f"... {len(table) - len(shown)} more nodes")
        full_at = next((r["node"] for r in table if r["mode"] == "full"), None)
        if self.estimated_seconds is not None and self.estimated_full_seconds is not None:
            lines.append(
                f"cost model ({self.costs.source}): estimated "
                f"{self.estimated_full_seconds / self.estimated_seconds:.2f}x faster than "
                "plain re-inference"
            )
        if self.tau < 1.0:
            lines.append(
                f"approximate: box sides capped at tau = {self.tau:g} of their map "
                "(changes beyond the cap are dropped)"
            )
        if self.frozen.statistics:
            lines.append(
                f"approximate: frozen global context, {len(self.frozen.statistics)} global "
                f"statistics (and the {len(self.frozen.nodes) - len(self.frozen.statistics)} "
                "nodes after them) keep the clean run's values: "
                + ", ".join(self.frozen_statistics)
            )
        elif self.approximation.freeze_global_context:
            lines.append(
                "frozen global context asked for, nothing frozen: "
                + (
                    "windows run as plain re-inference"
                    if self.global_context.statistics
                    else "no global statistic returns onto a spatial map"
                )
            )
        choice = self.path_choice
        if choice is not None and choice.seconds_per_window:
            measured = ", ".join(
                f"{name} {seconds * 1e6:.1f} us"
                for name, seconds in choice.seconds_per_window.items()
            )
            chosen = choice.path + (f" ({choice.reason})" if choice.path == "plain" else "")
            lines.append(f"measured per window: {measured}; runs {chosen}")
        elif self.rerun_whole_model:
            lines.append(
                f"the plan saves less than {MIN_INCREMENTAL_GAIN:.2f}x: windows run as "
                "plain re-inference of the whole model"
            )
        lines.append(
            f"FLOPs per window: full re-inference {self.flops_full / 1e6:.1f} M, "
            f"incremental {self.flops_incremental / 1e6:.1f} M; "
            f"theoretical speedup {self.theoretical_speedup:.2f}x"
            + (f"; switches to full at '{full_at}'" if full_at else "")
        )
        return "\n".join(lines)


def _annotate(captured: CapturedGraph, env: dict[fx.Node, Any]) -> None:
    for node in captured.nodes:
        value = env.get(node)
        is_tensor = isinstance(value, torch.Tensor)
        node.meta["is_tensor"] = is_tensor
        node.meta["ndim"] = value.dim() if is_tensor else 0
        node.meta["shape"] = tuple(value.shape) if is_tensor else None
        node.meta["batch_aligned"] = node in captured.batch_aligned


def _row_bytes(value: Any, geometry: Geometry | None) -> int:
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return 0
    per_row = value[0].numel() * value.element_size()
    if geometry is not None:
        per_row = per_row * geometry.volume // max(geometry.map_volume, 1)
    return per_row


def check_ops(captured: CapturedGraph) -> None:
    """Let every rule veto incremental evaluation before anything runs."""
    for node in captured.nodes:
        if node.op == "call_function":
            info = NodeInfo(node, node.args, node.kwargs, None, node in captured.depends_on_input)
            rule_for(node).check(info)
    if captured.state_writes:
        raise UnsupportedForIncremental(captured.state_writes[0])


def _fuse_into_producers(nodes: dict[fx.Node, NodePlan]) -> None:
    """A box node whose producer's rule can absorb it (conv + eval BatchNorm + ReLU)
    is computed by the producer: one pass over the tile fewer per absorbed op."""
    computed_by: dict[fx.Node, NodePlan] = {}
    for plan in nodes.values():
        source = plan.node.args[0] if plan.node.args else None
        if not isinstance(source, fx.Node) or source not in nodes:
            continue
        producer = computed_by.get(source, nodes[source])
        if (
            plan.mode != "box"
            or producer.mode != "box"
            or len(source.users) != 1
            or not producer.geometry.same_as(plan.geometry)
        ):
            continue
        absorbed = producer.rule.absorb(producer.spec, plan.info)
        if absorbed is not None:
            producer.spec = absorbed
            plan.rule = FUSED_RULE
            computed_by[plan.node] = producer


def _tensor_bytes(value: Any) -> int:
    """Bytes of one row of a tensor value (0 for non-tensors)."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return 0
    return value[0].numel() * value.element_size()


def _node_costs(
    plan: NodePlan, nodes: dict[fx.Node, NodePlan], rows: int, costs: DeviceCosts
) -> tuple[float, float, float]:
    """(incremental, full, projection) seconds of one node for a batch of `rows`."""
    node, info = plan.node, plan.info
    out_bytes = _tensor_bytes(info.value)
    inputs = [a for a in node.all_input_nodes if nodes[a].mode != "none"]
    in_bytes = sum(_tensor_bytes(nodes[a].info.value) for a in inputs)
    if node.op == "output":
        return float("inf"), 0.0, 0.0
    if node.op == "placeholder":  # building the occluded inputs: boxes or whole images
        full = costs.seconds(0, rows * 2 * out_bytes, 2)
    else:
        full = costs.seconds(rows * plan.flops_full, rows * (out_bytes + in_bytes), 1)
    projection = costs.seconds(0, rows * 2 * out_bytes, 1)
    geometry = plan.geometry
    if plan.mode != "box" or geometry is None:
        return float("inf"), full, projection
    share = geometry.volume / max(geometry.map_volume, 1)
    if node.op == "placeholder":
        return costs.seconds(0, rows * 2 * out_bytes * share, 2), full, projection
    read = plan.rule.read_volume(info, plan.spec, geometry)
    moved = out_bytes * share
    launches = 1
    for arg in inputs:
        per_position = _tensor_bytes(nodes[arg].info.value) / max(geometry.map_volume, 1)
        if read != geometry.volume:  # a gathered tile: written, then read by the op
            moved += 2 * read * per_position
            launches = 2
        else:
            moved += read * per_position
            launches += nodes[arg].mode == "box" and not nodes[arg].geometry.same_as(geometry)
    incremental = costs.seconds(rows * plan.flops_full * share, rows * moved, launches)
    return incremental, full, projection


def _choose_full_nodes(
    nodes: dict[fx.Node, NodePlan], order: list[fx.Node], rows: int, costs: DeviceCosts
) -> tuple[set[fx.Node], float, float]:
    """The cheapest set of nodes to run `full`, and the estimated seconds per batch
    of that plan and of plain re-inference."""
    incremental, full, projection = {}, {}, {}
    for node in order:
        incremental[node], full[node], projection[node] = _node_costs(
            nodes[node], nodes, rows, costs
        )
    consumers = {n: [u for u in n.users if u in full] for n in order}
    full_set = cheapest_full_set(incremental, full, projection, consumers)
    planned = sum(full[n] if n in full_set else incremental[n] for n in order)
    planned += sum(
        projection[n]
        for n in order
        if n not in full_set and any(u in full_set for u in consumers[n])
    )
    return full_set, planned, sum(full.values())


def _plan_node(
    captured: CapturedGraph,
    node: fx.Node,
    env: dict[fx.Node, Any],
    nodes: dict[fx.Node, NodePlan],
    input_geometry: Geometry,
    threshold: float,
    tau: float,
    frozen: frozenset[fx.Node] = frozenset(),
) -> NodePlan:
    """One node's rule, spec, mode and box, from its inputs' plans."""
    info = NodeInfo(
        node=node,
        args=fx.node.map_arg(node.args, lambda n: env[n]),
        kwargs=fx.node.map_arg(node.kwargs, lambda n: env[n]),
        value=env[node],
    )
    rule = rule_for(node)
    flops_full = rule.flops(info) if node.op == "call_function" else 0.0
    geometry: Geometry | None = None
    spec = None
    reason = ""
    if node.op == "output":
        mode = "full"
    elif node not in captured.depends_on_input:
        mode = "none"
    elif node in frozen:
        mode, reason = "none", "frozen global context: the clean run's value"
    elif node is captured.input_node:
        mode, geometry = "box", input_geometry
    else:
        inputs = [
            a for a in node.all_input_nodes if a in captured.depends_on_input and a not in frozen
        ]
        in_geoms = {a: nodes[a].geometry for a in inputs if nodes[a].mode == "box"}
        if len(in_geoms) < len(inputs):
            reason = "an input is full"
        elif rule is FULL_RULE:
            reason = f"no box rule for {describe_target(node)}"
        elif not rule.any_layout and any(g.dims is not None for g in in_geoms.values()):
            reason = f"{rule.name} needs channels-first boxes (dims 2, 3, ...)"
        else:
            spec = rule.spec(info)
            geometry = rule.propagate(info, spec, in_geoms) if spec is not None else None
            if geometry is not None and tau < 1.0:
                geometry = geometry.capped(tau)
            if geometry is None:
                reason = f"{rule.name} cannot keep a box here"
            elif geometry.volume >= threshold * geometry.map_volume:
                reason = f"box covers {geometry.volume / geometry.map_volume:.0%} of the map"
                geometry = None
        mode = "box" if geometry is not None else "full"
    return NodePlan(
        node=node,
        info=info,
        rule=rule,
        spec=spec,
        mode=mode,
        geometry=geometry,
        reason=reason,
        flops_full=flops_full,
        flops_incremental=0.0,
        row_bytes=0,
    )


def _apply_cost_model(
    captured: CapturedGraph, nodes: dict[fx.Node, NodePlan], order: list[fx.Node], rows: int
) -> tuple[DeviceCosts, float, float]:
    """Switch to `full` the nodes the cost model finds cheaper so; returns the
    costs used and the estimated seconds of the plan and of plain re-inference."""
    value = nodes[captured.input_node].info.value
    costs = device_costs(value.device, value.dtype)
    full_set, estimated, estimated_full = _choose_full_nodes(nodes, order, rows, costs)
    for node in order:
        plan = nodes[node]
        # Whole-model re-inference still builds its inputs from the input boxes.
        if node in full_set and plan.mode == "box" and node is not captured.input_node:
            plan.mode, plan.geometry = "full", None
            plan.reason = "the cost model finds full evaluation cheaper"
        elif plan.mode == "full" and not plan.reason and node.op != "output":
            plan.reason = "an input is full"
    return costs, estimated, estimated_full


def _last_uses(order: list[fx.Node]) -> dict[fx.Node, int]:
    """The step after which each node's value is no longer read."""
    last_use: dict[fx.Node, int] = {}
    for step, node in enumerate(order):
        for arg in node.all_input_nodes:
            last_use[arg] = step
    for step, node in enumerate(order):
        last_use.setdefault(node, step)
    return last_use


def build_plan(
    captured: CapturedGraph,
    env: dict[fx.Node, Any],
    input_geometry: Geometry,
    full_threshold: float | None = None,
    rows: int = PLANNING_ROWS,
    approximation: PlanApproximation = EXACT,
) -> RegionPlan:
    """Plan every node from the clean run's values and the windows' input boxes.

    By default a cost model (plan/cost.py) picks, over the whole graph, the nodes
    run `full`; `full_threshold` replaces it with a coverage rule (a box covering
    that share of its map or more is computed whole). `rows` is the batch size
    the cost model assumes. `approximation.tau` < 1 caps every box side at tau x
    its map side (changes beyond the cap are dropped); with
    `approximation.freeze_global_context` the global statistics that return onto
    spatial maps keep the clean run's values (plan/context.py). Both approximate.
    """
    _annotate(captured, env)
    nodes: dict[fx.Node, NodePlan] = {}
    threshold = float("inf") if full_threshold is None else full_threshold
    tau = approximation.tau
    context = find_global_context(captured, env)
    frozen = context if approximation.freeze_global_context else GlobalContext()
    for node in captured.nodes:
        nodes[node] = _plan_node(
            captured, node, env, nodes, input_geometry, threshold, tau, frozen.nodes
        )
    order = [node for node in captured.nodes if nodes[node].mode != "none"]
    costs = estimated = estimated_full = None
    if full_threshold is None:
        costs, estimated, estimated_full = _apply_cost_model(captured, nodes, order, rows)
    for node in order:
        node_plan = nodes[node]
        share = 1.0
        if node_plan.mode == "box":
            share = node_plan.geometry.volume / max(node_plan.geometry.map_volume, 1)
        node_plan.flops_incremental = node_plan.flops_full * share
        node_plan.row_bytes = _row_bytes(node_plan.info.value, node_plan.geometry)
    _fuse_into_producers(nodes)
    num_examples = env[captured.input_node].shape[0]
    plan = RegionPlan(
        captured,
        nodes,
        order,
        num_examples,
        _last_uses(order),
        approximation=approximation,
        global_context=context,
        frozen=frozen,
    )
    plan.costs, plan.estimated_seconds, plan.estimated_full_seconds = (
        costs,
        estimated,
        estimated_full,
    )
    # A plan whose FLOPs save less than the minimum gain does not pay for its
    # gathers and launches whatever the estimate says (regnet_y_400mf, 1.13x in
    # FLOPs: 3.5 s incremental against 2.0 s plain on a 2-core CPU).
    saves_too_little = plan.theoretical_speedup < MIN_INCREMENTAL_GAIN
    if estimated is not None:
        plan.rerun_whole_model = (
            nodes[captured.input_node].mode == "full"
            or estimated_full < MIN_INCREMENTAL_GAIN * estimated
            or saves_too_little
        )
    else:
        plan.rerun_whole_model = saves_too_little
    if plan.rerun_whole_model:  # plain re-inference is exact: nothing is frozen
        plan.frozen = GlobalContext()
    return plan
