"""Graph capture: trace the model with torch.fx and run its nodes one at a time.

torch.fx is used rather than torch.export because symbolic tracing takes
milliseconds, keeps the user's own modules (so every op runs with the model's own
parameters and code, which is what makes the results equal Captum's), and copies
nothing: the traced graph only names submodules, which are looked up on the live
model each time they run.
"""

from __future__ import annotations

import inspect
import itertools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn


class UnsupportedForIncremental(Exception):
    """Incremental evaluation does not apply; the message says why."""


_INPLACE_OPERATORS = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.iand,
    operator.ior,
    operator.ixor,
}


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


def check_no_hooks(module: nn.Module) -> None:
    """Hooks expect whole feature maps; a model carrying any runs on Captum's path."""
    from torch.nn.modules import module as module_mod

    global_hooks = (
        module_mod._global_forward_hooks,
        module_mod._global_forward_pre_hooks,
    )
    if any(len(h) for h in global_hooks):
        raise UnsupportedForIncremental("global forward hooks are registered")
    for name, sub in module.named_modules():
        if sub._forward_hooks or sub._forward_pre_hooks:
            raise UnsupportedForIncremental(
                f"module '{name or type(module).__name__}' has forward hooks"
            )
        if name and "forward" in vars(sub):
            # Rules compute layers from their parameters, never through a forward
            # replaced on the instance (a wrapper, a patch): Captum's path calls it.
            raise UnsupportedForIncremental(f"module '{name}' has its forward replaced")


@dataclass
class CapturedGraph:
    """A traced forward: its nodes in order and which of them see the occluded input."""

    root: nn.Module
    graph: fx.Graph
    nodes: list[fx.Node]
    input_node: fx.Node
    placeholder_values: dict[fx.Node, Any]
    output_node: fx.Node
    depends_on_input: set[fx.Node] = field(default_factory=set)
    batch_aligned: set[fx.Node] = field(default_factory=set)
    #: Region plans made for this trace, by what they depend on (engine/occlusion.py).
    plans: dict[tuple, Any] = field(default_factory=dict)

    def state_key(self) -> tuple:
        """Identity, storage and in-place version of every parameter, buffer and
        tensor argument: a plan holds values derived from them (e.g. folded
        BatchNorm). Writes through `.data` bypass the version counter; after such
        writes, pass the model to a new IncrementalOcclusion."""
        tensors = itertools.chain(
            self.root.parameters(),
            self.root.buffers(),
            (v for v in self.placeholder_values.values() if isinstance(v, torch.Tensor)),
        )
        return tuple((id(t), t.data_ptr(), t._version) for t in tensors)

    def module(self, node: fx.Node) -> nn.Module:
        return self.root.get_submodule(node.target)

    def align_batch(self, examples: int | None) -> None:
        """Mark the nodes that hold one row per example of the call: the input, the
        additional tensors that are per example (`is_per_example`), and everything
        computed from them. Shared tensors keep their clean value in every row."""
        aligned = {self.input_node} | {
            node
            for node, value in self.placeholder_values.items()
            if is_per_example(value, examples)
        }
        for node in self.nodes:
            if any(a in aligned for a in node.all_input_nodes):
                aligned.add(node)
        self.batch_aligned = aligned


def is_per_example(value: Any, examples: int | None) -> bool:
    """Whether an additional forward argument has one row per example.

    Captum passes additional arguments unchanged at perturbations_per_eval=1 and,
    above it, repeats every tensor of one or more dims along dim 0 once per
    perturbation. Both agree for a tensor whose first dim is the number of
    examples, so such a tensor is treated as per example, and every other one
    (scalars, and tensors shared by all examples) is passed unchanged.
    """
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == examples


def expand_additional_args(args: Sequence[Any], examples: int, copies: int) -> tuple:
    """Additional forward arguments for `copies` perturbations of `examples`
    examples in one batch (rows perturbation-major): per-example tensors repeated
    as Captum repeats them, everything else unchanged."""
    return tuple(
        torch.cat([a] * copies) if copies > 1 and is_per_example(a, examples) else a for a in args
    )


def _trace_key(value: Any) -> Any:
    try:
        hash(value)
        return value
    except TypeError:
        return id(value)


def capture(module: nn.Module, additional_args: Sequence[Any]) -> CapturedGraph:
    """Trace `module` called as module(input, *additional_args)."""
    check_no_hooks(module)
    signature = inspect.signature(module.forward)
    params = list(signature.parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        raise UnsupportedForIncremental("forward takes *args or **kwargs")
    if len(params) < 1 + len(additional_args):
        raise UnsupportedForIncremental("forward takes fewer arguments than given")

    # Non-tensor arguments are baked into the trace, so Python control flow on
    # them is fine; tensors stay graph inputs.
    concrete: dict[str, Any] = {}
    given = list(additional_args)
    for i, param in enumerate(params[1:]):
        if i < len(given):
            if not isinstance(given[i], torch.Tensor):
                concrete[param.name] = given[i]
        elif param.default is not inspect.Parameter.empty:
            concrete[param.name] = param.default
        else:
            raise UnsupportedForIncremental(f"forward argument '{param.name}' is not given")

    try:
        graph = fx.Tracer().trace(module, concrete_args=concrete or None)
    except Exception as exc:  # tracing failures come in every exception type
        raise UnsupportedForIncremental(
            f"torch.fx could not trace the model ({type(exc).__name__}: {exc})"
        ) from exc

    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != len(params):
        raise UnsupportedForIncremental("the traced graph's inputs do not match forward's")
    tensors = iter(a for a in given if isinstance(a, torch.Tensor))
    placeholder_values: dict[fx.Node, Any] = {}
    input_node = placeholders[0]
    for node, param in zip(placeholders[1:], params[1:]):  # placeholders follow forward's order
        if param.name in concrete:
            placeholder_values[node] = concrete[param.name]
        else:
            placeholder_values[node] = next(tensors)
    if input_node is None:
        raise UnsupportedForIncremental("the traced graph does not use the input")
    output_node = next(n for n in reversed(nodes) if n.op == "output")

    _check_inputs_not_mutated(module, nodes)
    _redirect_inplace_aliases(module, nodes)
    captured = CapturedGraph(
        root=module,
        graph=graph,
        nodes=nodes,
        input_node=input_node,
        placeholder_values=placeholder_values,
        output_node=output_node,
    )
    for node in nodes:
        inputs = node.all_input_nodes
        if node is input_node or any(a in captured.depends_on_input for a in inputs):
            captured.depends_on_input.add(node)
    captured.align_batch(None)
    return captured


_VIEW_METHODS = {
    "view",
    "reshape",
    "permute",
    "transpose",
    "narrow",
    "select",
    "flatten",
    "squeeze",
    "unsqueeze",
    "expand",
    "expand_as",
    "view_as",
    "t",
    "unflatten",
    "movedim",
    "detach",
}


def _is_view(node: fx.Node) -> bool:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return name in _VIEW_METHODS or node.target is operator.getitem


def _check_inputs_not_mutated(module: nn.Module, nodes: list[fx.Node]) -> None:
    """A model writing into its own input changes what Captum occludes next; only
    Captum's path reproduces that, so such models run there."""
    aliases = {n for n in nodes if n.op == "placeholder"}
    for node in nodes:
        first = node.args[0] if node.args else None
        if first not in aliases:
            continue
        if _is_view(node):
            aliases.add(node)
        elif mutates_first_argument(node, module):
            raise UnsupportedForIncremental(f"'{node.name}' writes into the model's input in place")


def _redirect_inplace_aliases(module: nn.Module, nodes: list[fx.Node]) -> None:
    """After `relu_(a)`, later readers of `a` see the new values: point them at the
    in-place node, so every node can then run out of place with the same results."""
    position = {node: i for i, node in enumerate(nodes)}
    for node in nodes:
        if not node.op.startswith("call_") or not mutates_first_argument(node, module):
            continue
        target = node.args[0] if node.args else None
        if not isinstance(target, fx.Node):
            continue
        base = target
        while _is_view(base) and isinstance(base.args[0], fx.Node):
            base = base.args[0]
            if any(position[u] > position[node] for u in base.users if not _is_view(u)):
                raise UnsupportedForIncremental(
                    f"'{node.name}' writes in place into a view of '{base.name}', read later"
                )
        for user in list(target.users):
            if user is not node and position[user] > position[node]:
                user.replace_input_with(target, node)


def capture_cached(
    cache: dict[tuple, CapturedGraph],
    module: nn.Module,
    additional_args: Sequence[Any],
    examples: int,
) -> CapturedGraph:
    """A trace for these arguments, reused when only tensor values changed (their
    new values are bound to the graph's inputs); hooks are checked every time.
    `examples`: the call's batch size, which decides the per-example tensors."""
    key = trace_cache_key(additional_args)
    captured = cache.get(key)
    if captured is None:
        captured = cache[key] = capture(module, additional_args)
    else:
        check_no_hooks(module)
        tensors = iter(a for a in additional_args if isinstance(a, torch.Tensor))
        for node, value in list(captured.placeholder_values.items()):
            if isinstance(value, torch.Tensor):
                captured.placeholder_values[node] = next(tensors)
    captured.align_batch(examples)
    return captured


def trace_cache_key(additional_args: Sequence[Any]) -> tuple:
    """Key under which a trace can be reused: non-tensor arguments are baked in."""
    return tuple(
        ("tensor", a.dim()) if isinstance(a, torch.Tensor) else ("value", type(a), _trace_key(a))
        for a in additional_args
    )


def fetch_attr(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def mutates_first_argument(node: fx.Node, root: nn.Module) -> bool:
    """Whether running the node writes into its first argument (in-place op)."""
    if node.kwargs.get("inplace", False):
        return True
    if node.op == "call_module":
        return bool(getattr(root.get_submodule(node.target), "inplace", False))
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return True
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.startswith("_")
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    return False


def run_node(root: nn.Module, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    """Run one traced node with concrete arguments, exactly as the model would."""
    if node.op == "call_module":
        return root.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, node.target)(*rest, **kwargs)
    if node.op == "get_attr":
        return fetch_attr(root, node.target)
    raise ValueError(f"cannot run node of kind {node.op}")


def clone_if_tensor(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def evaluate(
    captured: CapturedGraph,
    input_value: torch.Tensor,
    placeholder_values: dict[fx.Node, Any] | None = None,
    env: dict[fx.Node, Any] | None = None,
    perturb: Callable[[Any], Any] | None = None,
) -> dict[fx.Node, Any]:
    """Plain forward through the graph, keeping every node's value (the views).

    In-place ops get a copy of their first argument so that every kept value stays
    what its node produced. `placeholder_values` replaces the additional arguments;
    values computed before an exception stay in `env` when the caller passes one;
    `perturb` is applied to every computed node's value (to measure rounding).
    """
    env = {} if env is None else env
    extra = captured.placeholder_values if placeholder_values is None else placeholder_values
    for node in captured.nodes:
        if node.op == "placeholder":
            env[node] = input_value if node is captured.input_node else extra[node]
            continue
        if node.op == "output":
            env[node] = fx.node.map_arg(node.args[0], lambda n: env[n])
            continue
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        if mutates_first_argument(node, captured.root) and args:
            args = (clone_if_tensor(args[0]), *args[1:])
        value = run_node(captured.root, node, args, kwargs)
        env[node] = value if perturb is None else perturb(value)
    return env
