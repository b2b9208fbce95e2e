"""Captum's own arguments of one `attribute` call, kept together and checked as
Captum checks them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from captum._utils.common import _format_output, _format_tensor_into_tuples, _is_tuple
from captum._utils.typing import BaselineType, TargetType, TensorOrTupleOfTensorsGeneric
from captum.attr._utils.common import (
    _format_and_verify_sliding_window_shapes,
    _format_and_verify_strides,
)

from captum_krypton.engine.windows import WindowGrid

Shapes = tuple[tuple[int, ...], ...]


@dataclass(frozen=True, eq=False)
class CaptumArguments:
    """The arguments of `captum.attr.Occlusion.attribute`, as the caller gave them
    (see there for their meaning); `positional()` gives them in Captum's order."""

    inputs: TensorOrTupleOfTensorsGeneric
    sliding_window_shapes: Any
    strides: Any = None
    baselines: BaselineType = None
    target: TargetType = None
    additional_forward_args: Any = None
    perturbations_per_eval: int = 1
    show_progress: bool = False

    def positional(self) -> tuple:
        return (
            self.inputs,
            self.sliding_window_shapes,
            self.strides,
            self.baselines,
            self.target,
            self.additional_forward_args,
            self.perturbations_per_eval,
            self.show_progress,
        )

    def replace(self, **changes: Any) -> CaptumArguments:
        return dataclasses.replace(self, **changes)

    @property
    def formatted_inputs(self) -> tuple[torch.Tensor, ...]:
        return _format_tensor_into_tuples(self.inputs)

    @property
    def examples(self) -> int:
        """The batch size: the first dim of the (first) input tensor; 0 without one."""
        inputs = self.inputs
        if isinstance(inputs, tuple) and inputs and isinstance(inputs[0], torch.Tensor):
            inputs = inputs[0]
        return inputs.shape[0] if isinstance(inputs, torch.Tensor) else 0

    def format_output(self, attribution: torch.Tensor) -> TensorOrTupleOfTensorsGeneric:
        """One input's attribution shaped as Captum returns it (a tuple for tuple inputs)."""
        return _format_output(_is_tuple(self.inputs), (attribution,))

    def window_shapes(self) -> tuple[Shapes, Shapes]:
        """Per input, the window shape and the stride per dim, after Captum's checks
        (with its assertion messages)."""
        formatted = self.formatted_inputs
        strides = _format_and_verify_strides(self.strides, formatted)
        windows = _format_and_verify_sliding_window_shapes(self.sliding_window_shapes, formatted)
        return windows, verify_windows(formatted, windows, strides)

    def num_windows(self) -> int:
        """How many windows Captum's Occlusion evaluates for these arguments."""
        windows, strides = self.window_shapes()
        return sum(
            WindowGrid(tuple(inp.shape[1:]), window, stride).num_windows
            for inp, window, stride in zip(self.formatted_inputs, windows, strides)
        )


def verify_windows(
    inputs: tuple[torch.Tensor, ...], windows: Shapes, strides: tuple[Any, ...]
) -> Shapes:
    """Captum's checks of windows and strides, with its messages; per-dim strides."""
    per_dim = []
    for i, inp in enumerate(inputs):
        remaining = np.subtract(inp.shape[1:], windows[i])
        assert (np.array(remaining) >= 0).all(), (
            f"Sliding window dimensions {windows[i]} cannot exceed input dimensions"
            f"{tuple(inp.shape[1:])}."
        )
        assert np.logical_or(np.array(remaining) == 0, np.array(strides[i]) <= windows[i]).all(), (
            f"Stride dimension {strides[i]} cannot be larger than sliding window shape "
            f"dimension {windows[i]}."
        )
        stride = strides[i]
        per_dim.append(
            tuple(stride for _ in windows[i]) if isinstance(stride, int) else tuple(stride)
        )
    return tuple(per_dim)
