"""Capture: the model's op-level graph (torch.export), its clean run, and its batch."""

from captum_krypton.capture.batch import (
    expand_additional_args,
    find_batch_coupling,
    find_batch_mixing,
    is_per_example,
)
from captum_krypton.capture.export import capture, capture_cached, trace_cache_key
from captum_krypton.capture.graph import (
    CapturedGraph,
    UnsupportedForIncremental,
    evaluate,
    resolve_module,
    run_node,
)
from captum_krypton.capture.schema import mutates_first_argument

__all__ = [
    "CapturedGraph",
    "UnsupportedForIncremental",
    "capture",
    "capture_cached",
    "evaluate",
    "expand_additional_args",
    "find_batch_coupling",
    "find_batch_mixing",
    "is_per_example",
    "mutates_first_argument",
    "resolve_module",
    "run_node",
    "trace_cache_key",
]
