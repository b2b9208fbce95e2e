"""Explaining one output of a model that returns several (a tuple, list, dict or
namedtuple, such as a detection head's boxes and scores).

Captum's Occlusion needs a forward that returns one tensor. `SelectOutput` wraps
the model so that its forward returns the chosen output; being an `nn.Module`,
the wrapper is captured whole, so the incremental engine still applies (a lambda
that picks the output would be run on Captum's slow path).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class SelectOutput(nn.Module):
    """`model`'s output `key`: an index into a tuple or list, a key of a dict, or
    a field name of a namedtuple or other object.

    Args:
        model (nn.Module): The model; it is called with the wrapper's arguments
            (the input, then any additional forward arguments), unchanged, and
            stays the wrapper's submodule (its parameters are shared, not copied).
        key (int, str or any hashable): Which output to return.

    Example::

        >>> occlusion = IncrementalOcclusion(SelectOutput(detector, "scores"))
        >>> attributions = occlusion.attribute(image, (3, 16, 16), strides=8, target=0)

    Raises:
        TypeError: at call time, when the selected output is not a tensor.
    """

    def __init__(self, model: nn.Module, key: Any) -> None:
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, inputs: Any, *additional_forward_args: Any) -> torch.Tensor:
        output = self.model(inputs, *additional_forward_args)
        if isinstance(self.key, str) and not isinstance(output, dict):
            selected = getattr(output, self.key)
        else:
            selected = output[self.key]
        if not isinstance(selected, torch.Tensor):
            raise TypeError(
                f"output {self.key!r} of the model is {type(selected).__name__}, not a tensor"
            )
        return selected
