"""Rules of the ops that can run on boxes. Each op's whole rule lives in one entry."""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from captum_krypton.graph.capture import UnsupportedForIncremental
from captum_krypton.graph.registry import FULL_RULE, Geometry, NodeInfo, OpRule, register
from captum_krypton.kernels import conv_supports_implicit_gemm as triton_conv_supports

if TYPE_CHECKING:  # pragma: no cover
    from captum_krypton.engine.executor import BatchRun


def _tuple(value: Any, ndim: int) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return tuple(int(value[0]) for _ in range(ndim))
        return tuple(int(v) for v in value)
    return tuple(int(value) for _ in range(ndim))


def _bind(info: NodeInfo, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    """Positional and keyword arguments of a functional op, by name."""
    bound = dict(defaults)
    bound.update(zip(names, info.args))
    bound.update(info.kwargs)
    return bound


def _first_arg(info: NodeInfo) -> fx.Node | None:
    arg = info.node.args[0] if info.node.args else info.node.kwargs.get("input")
    return arg if isinstance(arg, fx.Node) else None


def _is_box_tensor(info: NodeInfo) -> bool:
    return isinstance(info.value, torch.Tensor) and info.value.dim() >= 3


# ---------------------------------------------------------------- sliding windows
@dataclass(frozen=True)
class WindowSpec:
    """A sliding-window op (conv or pool) along the spatial dims."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    pad_lo: tuple[int, ...]
    dilation: tuple[int, ...]

    @property
    def extent(self) -> tuple[int, ...]:
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation))

    def grow(self, geom: Geometry, out_size: tuple[int, ...]) -> Geometry:
        """Output rows whose receptive fields meet the input box (DESIGN.md formula)."""
        stride = np.asarray(self.stride)
        pad = np.asarray(self.pad_lo)
        extent = np.asarray(self.extent)
        a = geom.starts
        b = geom.starts + np.asarray(geom.size)
        lo = np.maximum(-((extent - 1 - a - pad) // stride), 0)  # ceil((a-(E-1)+P)/S)
        hi = np.minimum((b - 1 + pad) // stride + 1, np.asarray(out_size))
        hi = np.maximum(hi, lo + 1)
        return Geometry.from_bounds(lo, hi, out_size)

    def read_window(
        self, out_starts: torch.Tensor, out_size: tuple[int, ...], run: BatchRun
    ) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Input rows read to produce an output box: starts (may be negative) and size."""
        stride = run.views.constant(self.stride, out_starts.device)
        pad = run.views.constant(self.pad_lo, out_starts.device)
        size = tuple((z - 1) * s + e for z, s, e in zip(out_size, self.stride, self.extent))
        return out_starts * stride - pad, size

    def pad_hi(self, in_size: tuple[int, ...], out_size: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(
            max(0, (n - 1) * s - p + e - h)
            for n, s, p, e, h in zip(out_size, self.stride, self.pad_lo, self.extent, in_size)
        )


class SlidingWindowRule(OpRule):
    """Shared propagation of conv and pooling: grow the box by the kernel's reach."""

    pad_value = 0.0

    def propagate(self, info, spec, in_geoms):
        geom = in_geoms.get(_first_arg(info))
        if geom is None or len(in_geoms) != 1:
            return None
        return spec.window.grow(geom, info.spatial_shape)

    def read_volume(self, info, spec, geometry):
        window = spec.window
        return math.prod(
            (z - 1) * s + e for z, s, e in zip(geometry.size, window.stride, window.extent)
        )

    def read_tile(self, run: BatchRun, info: NodeInfo, spec: Any) -> torch.Tensor:
        out_starts = run.starts(info.node)
        out_size = run.size(info.node)
        starts, size = spec.window.read_window(out_starts, out_size, run)
        source = _first_arg(info)
        in_size = tuple(run.clean_value(source).shape[2:])
        return run.read(
            source,
            starts,
            size,
            pad_lo=spec.window.pad_lo,
            pad_hi=spec.window.pad_hi(in_size, info.spatial_shape),
            pad_value=self.pad_value,
        )


@dataclass(frozen=True)
class ConvSpec:
    window: WindowSpec
    weight: torch.Tensor
    bias: torch.Tensor | None
    groups: int
    activation: str | None = None  # a ReLU absorbed into the conv's epilogue

    @functools.cached_property
    def gemm_weight(self) -> torch.Tensor:
        """The weight as the implicit-GEMM kernel reads it, made once."""
        from captum_krypton.kernels.triton_conv import gemm_weight

        return gemm_weight(self.weight)


#: ReLU in its module, functional, in-place and method forms.
_RELU_TARGETS = (F.relu, F.relu_, torch.relu, torch.relu_, "relu", "relu_")


def _is_relu(info: NodeInfo) -> bool:
    if info.module is not None:
        return type(info.module) is nn.ReLU
    return info.node.op in ("call_function", "call_method") and any(
        info.node.target is t or info.node.target == t for t in _RELU_TARGETS
    )


class ConvRule(SlidingWindowRule):
    name = "conv"
    _functional = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

    def spec(self, info):
        if not _is_box_tensor(info):
            return None
        ndim = info.value.dim() - 2
        if info.module is not None:
            conv = info.module
            if conv.padding_mode != "zeros":
                return None
            weight, bias = conv.weight, conv.bias
            stride, padding, dilation, groups = (
                conv.stride,
                conv.padding,
                conv.dilation,
                conv.groups,
            )
        else:
            b = _bind(
                info,
                ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
            )
            weight_node = (
                info.node.args[1] if len(info.node.args) > 1 else info.node.kwargs.get("weight")
            )
            if not isinstance(b["weight"], torch.Tensor) or weight_node is None:
                return None
            weight, bias = b["weight"], b["bias"]
            stride, padding, dilation, groups = (
                b["stride"],
                b["padding"],
                b["dilation"],
                b["groups"],
            )
        kernel = tuple(weight.shape[2:])
        dilation = _tuple(dilation, ndim)
        if isinstance(padding, str):
            if padding == "valid":
                pad_lo = (0,) * ndim
            else:  # "same": torch pads the smaller half on the left
                pad_lo = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
        else:
            pad_lo = _tuple(padding, ndim)
        window = WindowSpec(kernel, _tuple(stride, ndim), pad_lo, dilation)
        return ConvSpec(window, weight, bias, int(groups))

    def absorb(self, spec: ConvSpec, consumer: NodeInfo) -> ConvSpec | None:
        """Fold an eval BatchNorm that follows the conv into its weight and bias, and
        a ReLU after them into the epilogue."""
        if _is_relu(consumer) and spec.activation is None:
            return dataclasses.replace(spec, activation="relu")
        bn = consumer.module
        if (
            not isinstance(bn, nn.modules.batchnorm._BatchNorm)
            or bn.running_mean is None
            or spec.activation is not None
        ):
            return None
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        bias = spec.bias if spec.bias is not None else torch.zeros_like(bn.running_mean)
        bias = (bias - bn.running_mean) * scale
        if bn.bias is not None:
            bias = bias + bn.bias
        weight = spec.weight * scale.view(-1, *([1] * (spec.weight.dim() - 1)))
        return ConvSpec(spec.window, weight.detach(), bias.detach(), spec.groups)

    def run_box(self, run, info, spec):
        window = spec.window
        out_size = run.size(info.node)
        source = _first_arg(info)

        def tile_then_conv():
            tile = self.read_tile(run, info, spec)
            conv = self._functional[tile.dim() - 2]
            out = conv(tile, spec.weight, spec.bias, window.stride, 0, window.dilation, spec.groups)
            return out.relu_() if spec.activation == "relu" else out

        candidates = {"tile+conv": tile_then_conv}
        if run.use_triton and run.device.type == "cuda" and spec.activation == "relu":

            def tile_then_fused_conv():
                tile = self.read_tile(run, info, spec)
                return torch.cudnn_convolution_relu(
                    tile,
                    spec.weight,
                    spec.bias,
                    window.stride,
                    [0] * len(out_size),
                    window.dilation,
                    spec.groups,
                )

            candidates["tile+conv_relu"] = tile_then_fused_conv
        if run.use_triton and triton_conv_supports(spec.weight, spec.groups):

            def implicit_gemm():
                starts, _ = window.read_window(run.starts(info.node), out_size, run)
                return run.conv_region(source, starts, out_size, spec)

            candidates["implicit_gemm"] = implicit_gemm
        key = (
            "conv",
            1 << (run.rows - 1).bit_length(),  # a partial last batch shares the choice
            tuple(run.clean_value(source).shape[1:]),
            run.plan.nodes[source].geometry.size if run.boxed(source) else None,
            tuple(spec.weight.shape),
            window,
            out_size,
            spec.activation,
            spec.weight.dtype,
            torch.backends.cudnn.allow_tf32,
        )
        return run.fastest(key, candidates)

    def flops(self, info):
        spec = self.spec(info)
        if spec is None:
            return super().flops(info)
        per_output = 2 * spec.weight.shape[1] * math.prod(spec.window.kernel)
        return float(info.value[0].numel() * per_output)


register(
    ConvRule(),
    modules=(nn.Conv1d, nn.Conv2d, nn.Conv3d),
    functions=(F.conv1d, F.conv2d, F.conv3d),
)


@dataclass(frozen=True)
class PoolSpec:
    window: WindowSpec
    kind: str  # "max" or "avg"
    divisor_override: int | None


class PoolRule(SlidingWindowRule):
    name = "pool"
    _max = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
    _avg = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}

    def __init__(self, kind: str):
        self.kind = kind
        self.pad_value = -math.inf if kind == "max" else 0.0

    def spec(self, info):
        if not _is_box_tensor(info) or not info.value.is_floating_point():
            return None
        ndim = info.value.dim() - 2
        if info.module is not None:
            m = info.module
            params = {
                "kernel_size": m.kernel_size,
                "stride": m.stride,
                "padding": m.padding,
                "dilation": getattr(m, "dilation", 1),
                "ceil_mode": m.ceil_mode,
                "return_indices": getattr(m, "return_indices", False),
                "count_include_pad": getattr(m, "count_include_pad", True),
                "divisor_override": getattr(m, "divisor_override", None),
            }
        elif self.kind == "max":
            params = _bind(
                info,
                (
                    "input",
                    "kernel_size",
                    "stride",
                    "padding",
                    "dilation",
                    "ceil_mode",
                    "return_indices",
                ),
                {
                    "stride": None,
                    "padding": 0,
                    "dilation": 1,
                    "ceil_mode": False,
                    "return_indices": False,
                },
            )
        else:
            params = _bind(
                info,
                (
                    "input",
                    "kernel_size",
                    "stride",
                    "padding",
                    "ceil_mode",
                    "count_include_pad",
                    "divisor_override",
                ),
                {
                    "stride": None,
                    "padding": 0,
                    "ceil_mode": False,
                    "count_include_pad": True,
                    "divisor_override": None,
                },
            )
        if params.get("return_indices"):
            return None
        kernel = _tuple(params["kernel_size"], ndim)
        stride = params["stride"]
        stride = kernel if stride is None or stride == [] or stride == () else _tuple(stride, ndim)
        padding = _tuple(params["padding"], ndim)
        dilation = _tuple(params.get("dilation", 1), ndim)
        window = WindowSpec(kernel, stride, padding, dilation)
        if self.kind == "avg":
            in_size = info.args[0].shape[2:]
            floor_size = tuple(
                (h + 2 * p - k) // s + 1 for h, p, k, s in zip(in_size, padding, kernel, stride)
            )
            if params["ceil_mode"] and floor_size != info.spatial_shape:
                return None  # ceil-mode border windows divide by a shrunken count
            if not params["count_include_pad"] and any(padding):
                return None
        return PoolSpec(window, self.kind, params.get("divisor_override"))

    def run_box(self, run, info, spec):
        tile = self.read_tile(run, info, spec)
        w = spec.window
        ndim = tile.dim() - 2
        if spec.kind == "max":
            return self._max[ndim](tile, w.kernel, w.stride, 0, w.dilation)
        if ndim == 1:
            return F.avg_pool1d(tile, w.kernel, w.stride, 0)
        return self._avg[ndim](tile, w.kernel, w.stride, 0, divisor_override=spec.divisor_override)

    def flops(self, info):
        spec = self.spec(info)
        if spec is None:
            return super().flops(info)
        return float(info.value[0].numel() * math.prod(spec.window.kernel))


register(
    PoolRule("max"),
    modules=(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d),
    functions=(F.max_pool1d, F.max_pool2d, F.max_pool3d),
)
register(
    PoolRule("avg"),
    modules=(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d),
    functions=(
        F.avg_pool1d,
        F.avg_pool2d,
        F.avg_pool3d,
        torch._C._nn.avg_pool2d,
        torch._C._nn.avg_pool3d,
    ),
)


# ---------------------------------------------------------------- pointwise
class PointwiseRule(OpRule):
    """Ops acting on each element (or each channel) alone: the box stays the same."""

    name = "pointwise"

    def spec(self, info):
        first = _first_arg(info)
        if not _is_box_tensor(info) or first is None:
            return None
        for other in info.node.all_input_nodes:
            # Extra tensors must broadcast per channel at most and be the same
            # for every row (no batch dim), e.g. BatchNorm's running stats.
            if (
                other is not first
                and other.meta.get("is_tensor")
                and (other.meta["ndim"] > 1 or other.meta["batch_aligned"])
            ):
                return None
        return True

    def propagate(self, info, spec, in_geoms):
        source = _first_arg(info)
        if set(in_geoms) != {source}:
            return None
        return in_geoms[source]

    def run_box(self, run, info, spec):
        source = _first_arg(info)
        tile = run.read_at(source, info.node)
        if run.mutates(info.node):
            tile = run.owned(source, tile)
        # Other operands (parameters, constants) as this call's clean run has them.
        args = fx.node.map_arg(info.node.args, run.clean_value)
        kwargs = dict(fx.node.map_arg(info.node.kwargs, run.clean_value))
        if info.node.args:
            args = (tile, *args[1:])
        else:
            kwargs["input"] = tile
        return run.call(info.node, args, kwargs)


class TrainingSensitiveRule(PointwiseRule):
    """BatchNorm and dropout: pointwise in eval mode; in training mode, Captum's path."""

    def check(self, info):
        module = info.module
        if module is not None:
            if module.training:
                raise UnsupportedForIncremental(
                    f"model is in training mode ({type(module).__name__} '{info.node.target}')"
                )
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
                module.running_mean is None
            ):
                raise UnsupportedForIncremental(
                    f"{type(module).__name__} '{info.node.target}' uses batch statistics"
                )
            return
        training = info.kwargs.get("training")
        name = getattr(info.node.target, "__name__", "")
        if training is None:
            names = {"batch_norm": 5, "dropout": 2, "stochastic_depth": 3}
            position = names.get(name)
            if position is not None and len(info.args) > position:
                training = info.args[position]
        if training and not (name == "batch_norm" and _standardizes_a_constant(info)):
            raise UnsupportedForIncremental(f"'{info.node.name}' runs in training mode")


def _standardizes_a_constant(info: NodeInfo) -> bool:
    """F.batch_norm in training mode on a value that does not see the input and
    with no running statistics to update: weight standardization (timm's
    StdConv2d, NFNets, BiT). It computes the same in every forward, as the engine
    computes it once."""
    running = [info.kwargs.get(k) for k in ("running_mean", "running_var")]
    running = [*info.args[1:3], *running]
    return not info.depends_on_input and all(r is None for r in running)


class FusedRule(OpRule):
    """A node whose op was folded into its producer: it passes the box on."""

    name = "fused"

    def run_box(self, run, info, spec):
        return run.read_at(_first_arg(info), info.node)


FUSED_RULE = FusedRule()


class IdentityRule(TrainingSensitiveRule):
    """Identity in eval mode (dropout, stochastic depth): the box passes unchanged."""

    name = "identity"

    def run_box(self, run, info, spec):
        return run.read_at(_first_arg(info), info.node)


_POINTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Threshold,
    nn.LogSigmoid,
    nn.Hardshrink,
    nn.Softshrink,
)
_POINTWISE_FUNCTIONS = (
    F.relu,
    F.relu_,
    torch.relu,
    torch.relu_,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.sigmoid,
    torch.sigmoid,
    F.tanh,
    torch.tanh,
    F.hardtanh,
    F.hardswish,
    F.hardsigmoid,
    F.softplus,
    F.softsign,
    F.logsigmoid,
    F.prelu,
    torch.exp,
    torch.abs,
    torch.neg,
    torch.sqrt,
    torch.square,
    torch.clamp,
    torch.clip,
    operator.neg,
    operator.pos,
    torch.nan_to_num,
)
_POINTWISE_METHODS = (
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "exp",
    "abs",
    "neg",
    "sqrt",
    "square",
    "clamp",
    "clamp_",
    "clip",
    "clip_",
    "contiguous",
    "float",
    "double",
    "half",
    "bfloat16",
    "to",
    "type_as",
    "clone",
    "detach",
)
register(
    PointwiseRule(),
    modules=_POINTWISE_MODULES,
    functions=_POINTWISE_FUNCTIONS,
    methods=_POINTWISE_METHODS,
)
register(
    TrainingSensitiveRule(),
    modules=(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
    functions=(F.batch_norm,),
)
_identity_modules: tuple[type, ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_identity_functions: tuple[Any, ...] = (
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
)
try:  # torchvision's stochastic depth is an fx leaf function
    from torchvision.ops import StochasticDepth, stochastic_depth

    _identity_modules += (StochasticDepth,)
    _identity_functions += (stochastic_depth,)
except ImportError:  # pragma: no cover - torchvision is optional
    pass
register(IdentityRule(), modules=_identity_modules, functions=_identity_functions)


# ---------------------------------------------------------------- several operands
class MergeRule(OpRule):
    """Ops over several same-shaped tensors (add, mul, cat): the boxes' bounding box.

    Each operand is read over the output box: its own box where it has one, its
    clean view elsewhere; operands that are not boxed read their clean value.
    """

    def operand_nodes(self, info: NodeInfo) -> list[fx.Node]:
        return [a for a in info.node.all_input_nodes]

    def spec(self, info):
        return True if _is_box_tensor(info) else None

    def propagate(self, info, spec, in_geoms):
        if not in_geoms:
            return None
        shape = tuple(info.value.shape)
        for node in in_geoms:
            if tuple(node.meta["shape"]) != self.expected_shape(info, node, shape):
                return None  # a boxed operand that broadcasts changes everything
        lo = np.minimum.reduce([g.starts for g in in_geoms.values()])
        hi = np.maximum.reduce([g.starts + np.asarray(g.size) for g in in_geoms.values()])
        return Geometry.from_bounds(lo, hi, info.spatial_shape)

    def expected_shape(self, info, node, out_shape):
        return out_shape


class ElementwiseRule(MergeRule):
    name = "elementwise"

    def run_box(self, run, info, spec):
        def read(arg):
            if isinstance(arg, fx.Node):
                return run.read_operand(arg, info.node)
            return arg

        args = tuple(read(a) for a in info.node.args)
        kwargs = {k: read(v) for k, v in info.node.kwargs.items()}
        if run.mutates(info.node) and isinstance(info.node.args[0], fx.Node):
            args = (run.owned(info.node.args[0], args[0]), *args[1:])
        return run.call(info.node, args, kwargs)


register(
    ElementwiseRule(),
    functions=(
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        torch.add,
        torch.sub,
        torch.subtract,
        torch.mul,
        torch.multiply,
        torch.div,
        torch.maximum,
        torch.minimum,
        torch.where,
    ),
    methods=(
        "add",
        "add_",
        "sub",
        "sub_",
        "mul",
        "mul_",
        "div",
        "div_",
        "maximum",
        "minimum",
    ),
)


class CatRule(MergeRule):
    """Concatenation along channels; other dims would move boxes, so `full`."""

    name = "cat"

    def spec(self, info):
        if not _is_box_tensor(info):
            return None
        dim = info.kwargs.get("dim", info.args[1] if len(info.args) > 1 else 0)
        if dim % info.value.dim() != 1:
            return None
        return True

    def expected_shape(self, info, node, out_shape):
        return (out_shape[0], node.meta["shape"][1], *out_shape[2:])

    def run_box(self, run, info, spec):
        tensors = info.node.args[0] if info.node.args else info.node.kwargs["tensors"]
        tiles = [run.read_operand(t, info.node) for t in tensors]
        return torch.cat(tiles, dim=1)


register(CatRule(), functions=(torch.cat, torch.concat, torch.concatenate))


# ---------------------------------------------------------------- shapes
class ShapeRule(OpRule):
    """`x.size()`, `x.shape`, `x.dim()`: answered without recomputing `x`."""

    name = "shape"

    def run_full(self, run, info):
        source = info.node.args[0]
        shape = (run.rows, *tuple(run.clean_value(source).shape[1:]))
        if info.node.op == "call_function":  # getattr(x, "shape")
            if info.node.args[1] != "shape":
                return run.run_node_full(info.node)
            return torch.Size(shape)
        if info.node.target == "dim":
            return len(shape)
        dim = info.node.args[1] if len(info.node.args) > 1 else info.node.kwargs.get("dim")
        return torch.Size(shape) if dim is None else shape[dim]


register(ShapeRule(), methods=("size", "dim"))
register(ShapeRule(), functions=(getattr,))


def describe_target(node: fx.Node, module: nn.Module | None) -> str:
    if module is not None:
        return type(module).__name__
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


__all__ = ["FULL_RULE", "ConvRule", "PoolRule", "PointwiseRule", "describe_target"]
