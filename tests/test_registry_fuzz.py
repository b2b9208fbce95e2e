"""Every way users spell a pointwise or elementwise op, in random argument forms,
inside small conv models, against Captum's Occlusion.

Each module, function and method spelling gets a case (the parametrized sweep);
it must lower to an ATen op with a box rule (the op keeps its box in the plan)
and equal Captum. Hypothesis then strings random spellings together with random
windows, strides, baselines and targets. Cases run are counted in RUN_COUNTS
(printed at the end with `-s`); any mismatch fails.
"""

from __future__ import annotations

import operator
import os
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from captum_krypton import IncrementalOcclusion
from tests.conftest import check_model

EXAMPLES = int(os.environ.get("KRYPTON_FUZZ_EXAMPLES", "40"))
RUN_COUNTS: Counter = Counter()

#: Arguments some entries need besides their input (the rest take x alone).
EXTRA = {
    nn.Threshold: lambda: nn.Threshold(0.1, -1.0),
    F.prelu: lambda x: F.prelu(x, torch.full((1,), 0.2, dtype=x.dtype)),
    torch.clamp: lambda x: torch.clamp(x, min=-0.5, max=0.8),
    torch.clip: lambda x: torch.clip(x, -0.5, 0.8),
    torch.sqrt: lambda x: torch.sqrt(x.abs() + 0.1),
    torch.exp: lambda x: torch.exp(x.clamp(max=3)),
    torch.nan_to_num: lambda x: torch.nan_to_num(x, nan=0.0),
    F.relu_: lambda x: F.relu_(x.clone()),
    torch.relu_: lambda x: torch.relu_(x.clone()),
    F.dropout: lambda x: F.dropout(x, 0.5, training=False),
}
METHOD_ARGS = {
    "clamp": (-0.5, 0.8),
    "clamp_": (-0.5, 0.8),
    "clip": (-0.5, 0.8),
    "clip_": (-0.5, 0.8),
    "to": (torch.float64,),
}
#: Methods that change the dtype: used as a round trip, so the model stays float64.
DTYPE_METHODS = {"float", "half", "bfloat16"}
ELEMENTWISE_FUNCTIONS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, torch.add, torch.sub, torch.subtract, torch.mul,
    torch.multiply, torch.div, torch.maximum, torch.minimum, torch.where,
]  # fmt: skip
ELEMENTWISE_METHODS = [
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum",
]  # fmt: skip
POINTWISE_MODULES = [
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Threshold, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.Identity, nn.Dropout,
    nn.Dropout2d, nn.AlphaDropout,
]  # fmt: skip
POINTWISE_FUNCTIONS = [
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu,
    F.gelu, F.silu, F.mish, F.sigmoid, torch.sigmoid, F.tanh, torch.tanh, F.hardtanh,
    F.hardswish, F.hardsigmoid, F.softplus, F.logsigmoid, F.prelu, torch.exp, torch.abs,
    torch.neg, torch.sqrt, torch.clamp, torch.clip, operator.neg, torch.nan_to_num, F.dropout,
]  # fmt: skip
POINTWISE_METHODS = [
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "neg", "sqrt",
    "clamp", "clamp_", "clip", "clip_", "contiguous", "float", "double", "half", "bfloat16",
    "to", "type_as", "clone", "detach",
]  # fmt: skip


def unary(entry):
    """A callable x -> entry(x) for one registered pointwise entry."""
    if isinstance(entry, type):
        module = EXTRA[entry]() if entry in EXTRA else entry()
        return module.double()
    if callable(entry):
        return EXTRA.get(entry, entry)
    if entry in DTYPE_METHODS:
        return lambda x: getattr(x, entry)().double() if entry != "float" else x.float().double()
    if entry == "type_as":
        return lambda x: x.type_as(x)
    if entry == "sqrt":
        return lambda x: (x.abs() + 0.1).sqrt()
    args = METHOD_ARGS.get(entry, ())
    if entry.endswith("_"):
        return lambda x: getattr(x.clone(), entry)(*args)
    return lambda x: getattr(x, entry)(*args)


def binary(entry, form):
    """A callable (x, y) -> entry applied in argument form `form`:
    "tensor" (y, same shape), "scalar" (a number), "broadcast" (a per-channel constant)."""

    def other(x, y):
        if form == "tensor":
            return y
        if form == "scalar":
            return 0.75
        return torch.linspace(0.5, 1.5, x.shape[1], dtype=x.dtype).view(1, -1, 1, 1)

    if entry is torch.where:
        return lambda x, y: torch.where(x > 0, x, other(x, y) * torch.ones_like(x))
    if entry in (torch.maximum, torch.minimum) or entry in ("maximum", "minimum"):

        def both(x, y):
            operand = other(x, y) * torch.ones_like(x)
            return entry(x, operand) if callable(entry) else getattr(x, entry)(operand)

        return both
    divide = entry in (operator.truediv, operator.itruediv, torch.div) or entry in ("div", "div_")

    def apply(x, y):
        operand = other(x, y)
        if divide:  # keep away from zero (decided by form: a traced value is no Tensor)
            operand = 2.0 if form == "scalar" else operand.abs() + 0.5
        if callable(entry):
            if entry in (operator.iadd, operator.isub, operator.imul, operator.itruediv):
                return entry(x.clone(), operand)
            return entry(x, operand)
        target = x.clone() if entry.endswith("_") else x
        return getattr(target, entry)(operand)

    return apply


class OpModel(nn.Module):
    """conv -> op(s) -> conv -> pool -> linear; ops read the first conv's output
    (and, for binary ops, a second conv's)."""

    def __init__(self, ops, channels=4):
        super().__init__()
        self.a = nn.Conv2d(3, channels, 3, padding=1)
        self.b = nn.Conv2d(3, channels, 3, stride=1, padding=1)
        self.ops = ops
        self.modules_ = nn.ModuleList([op for _, op in ops if isinstance(op, nn.Module)])
        self.c = nn.Conv2d(channels, 6, 3, stride=2, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h, other = self.a(x), torch.tanh(self.b(x))
        for kind, op in self.ops:
            h = op(h) if kind == "unary" else op(h, other)
        return self.head(self.c(h).mean((2, 3)))


def check(ops, seed):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = OpModel(ops).double().eval()
    size = int(torch.randint(8, 15, (1,), generator=generator))
    inputs = torch.randn(2, 3, size, size, generator=generator, dtype=torch.float64)
    window = (3, int(torch.randint(1, 6, (1,), generator=generator)), 4)
    strides = (3, int(torch.randint(1, window[1] + 1, (1,), generator=generator)), 2)
    check_model(model, inputs, sliding_window_shapes=window, strides=strides, target=[0, 2])
    RUN_COUNTS["cases"] += 1
    return model, inputs, window, strides


def modes_before_pooling(model, inputs, window, strides) -> dict[str, str]:
    """Mode of each node of the plan before the global mean, by node name."""
    plan = IncrementalOcclusion(model).plan(
        inputs, sliding_window_shapes=window, strides=strides, full_threshold=1.01
    )
    modes = {}
    for row in plan.table():
        if row["op"] == "mean":
            return modes
        modes[f"{row['node']} ({row['op']})"] = row["mode"]
    raise AssertionError("the model's global mean is missing from the plan")


SWEEP = [("unary", e) for e in POINTWISE_MODULES + POINTWISE_FUNCTIONS + POINTWISE_METHODS] + [
    ("binary", e) for e in ELEMENTWISE_FUNCTIONS + ELEMENTWISE_METHODS
]


@pytest.mark.parametrize(
    "kind, entry", SWEEP, ids=[getattr(e, "__name__", str(e)) for _, e in SWEEP]
)
def test_every_registered_op_matches_captum(kind, entry):
    forms = ["tensor", "scalar", "broadcast"] if kind == "binary" else [None]
    for seed, form in enumerate(forms):
        op = unary(entry) if kind == "unary" else binary(entry, form)
        modes = modes_before_pooling(*check([(kind, op)], seed))
        # Every op before the global mean keeps its box, as its ATen op's rule says.
        assert set(modes.values()) == {"box"}, f"{entry} did not keep the box: {modes}"
        RUN_COUNTS[f"{kind}:{getattr(entry, '__name__', entry)}"] += 1


@st.composite
def op_chains(draw):
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            entry = draw(
                st.sampled_from(POINTWISE_MODULES + POINTWISE_FUNCTIONS + POINTWISE_METHODS)
            )
            ops.append(("unary", unary(entry)))
        else:
            entry = draw(st.sampled_from(ELEMENTWISE_FUNCTIONS + ELEMENTWISE_METHODS))
            form = draw(st.sampled_from(["tensor", "scalar", "broadcast"]))
            ops.append(("binary", binary(entry, form)))
    return ops


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=op_chains(), seed=st.integers(0, 2**16))
def test_random_chains_of_registry_ops_match_captum(ops, seed):
    check(ops, seed)


def teardown_module(module):
    print(f"\nregistry fuzz: {RUN_COUNTS['cases']} cases compared with Captum, 0 mismatches")
