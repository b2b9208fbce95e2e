"""Property test: random small conv DAGs, windows, strides and baselines vs Captum."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from tests.conftest import check_model

EXAMPLES = int(os.environ.get("KRYPTON_PROPERTY_EXAMPLES", "60"))


class RandomDag(nn.Module):
    """Runs a generated program: each step reads earlier nodes by index."""

    def __init__(self, program, layers, classes=3):
        super().__init__()
        self.program = program
        self.layers = nn.ModuleList(layers)
        self.head = nn.LazyLinear(classes)

    def forward(self, x):
        values = [x]
        for op, args, layer in self.program:
            if op == "module":
                values.append(self.layers[layer](values[args[0]]))
            elif op == "add":
                values.append(values[args[0]] + values[args[1]])
            elif op == "mul":
                values.append(values[args[0]] * torch.sigmoid(values[args[1]]))
            elif op == "cat":
                values.append(torch.cat([values[args[0]], values[args[1]]], dim=1))
        return self.head(values[-1].mean((2, 3)))


@st.composite
def dags(draw):
    channels, height, width = (
        draw(st.integers(1, 3)),
        draw(st.integers(6, 16)),
        draw(st.integers(6, 16)),
    )
    shapes = [(channels, height, width)]
    program, layers = [], []
    for _ in range(draw(st.integers(1, 7))):
        src = draw(st.integers(0, len(shapes) - 1))
        c, h, w = shapes[src]
        kind = draw(st.sampled_from(["conv", "conv", "pool", "act", "bn", "merge"]))
        if kind == "merge":
            partners = [i for i, s in enumerate(shapes) if s[1:] == (h, w) and i != src]
            if not partners:
                continue
            other = draw(st.sampled_from(partners))
            op = draw(st.sampled_from(["add", "mul", "cat"]))
            if op != "cat" and shapes[other][0] != c:
                op = "cat"
            program.append((op, (src, other), None))
            shapes.append((c + shapes[other][0], h, w) if op == "cat" else (c, h, w))
            continue
        if kind == "act":
            choices = [nn.ReLU(), nn.GELU(), nn.Tanh()] + ([nn.ReLU(inplace=True)] if src else [])
            layer = draw(st.sampled_from(choices))
            out = (c, h, w)
        elif kind == "bn":
            layer = nn.BatchNorm2d(c)
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
            out = (c, h, w)
        else:
            k = draw(st.integers(1, 4))
            stride = draw(st.integers(1, 3))
            dilation = draw(st.integers(1, 2)) if kind == "conv" else 1
            extent = dilation * (k - 1) + 1
            pad = draw(st.integers(0, k // 2))
            ho = (h + 2 * pad - extent) // stride + 1
            wo = (w + 2 * pad - extent) // stride + 1
            if ho < 1 or wo < 1:
                continue
            if kind == "conv":
                groups = draw(st.sampled_from([1, c]))
                cout = groups * draw(st.integers(1, 3))
                layer = nn.Conv2d(c, cout, k, stride, pad, dilation, groups=groups)
                out = (cout, ho, wo)
            else:
                if k == 1 and stride > 1 or pad * 2 > k:
                    continue
                layer = (nn.MaxPool2d if draw(st.booleans()) else nn.AvgPool2d)(k, stride, pad)
                out = (c, ho, wo)
        layers.append(layer)
        program.append(("module", (src,), len(layers) - 1))
        shapes.append(out)
    model = RandomDag(program, layers).eval()
    with torch.no_grad():
        model(torch.zeros(1, channels, height, width))  # materialize the lazy head
    window = (
        draw(st.integers(1, channels)),
        draw(st.integers(1, height)),
        draw(st.integers(1, width)),
    )
    strides = tuple(draw(st.integers(1, k)) for k in window)
    batch = draw(st.integers(1, 2))
    baseline = draw(st.sampled_from(["zero", "scalar", "tensor", "per_example"]))
    return model.double().eval(), (batch, channels, height, width), window, strides, baseline


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=dags(), seed=st.integers(0, 2**16))
def test_random_dags_match_captum(case, seed):
    model, shape, window, strides, baseline_kind = case
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(shape, generator=generator, dtype=torch.float64)
    baseline = {
        "zero": None,
        "scalar": 0.7,
        "tensor": torch.randn(shape[1:], generator=generator, dtype=torch.float64),
        "per_example": torch.randn(shape, generator=generator, dtype=torch.float64),
    }[baseline_kind]
    target = [int(t) for t in torch.randint(0, 3, (shape[0],), generator=generator)]
    check_model(
        model,
        inputs,
        sliding_window_shapes=window,
        strides=strides,
        baselines=baseline,
        target=target,
        options={"full_threshold": float(seed % 3) / 2 + 0.3},
    )
