"""Kernels of the engine: torch ops everywhere, Triton kernels on CUDA.

`region_kernels` is the one place that chooses between them. Both backends have
the same functions with the same arguments and math: `compose_region` (a region
of each row read over box | clean view | padding) and `conv_region` (a conv over
such a region). The torch ones are the references the Triton kernels are tested
against (tests/test_triton_kernels.py), and the CPU path runs them.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import torch


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(choice: str, device: torch.device) -> bool:
    """Whether the Triton kernels serve this run: "auto" means on CUDA, when present."""
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"kernels must be 'auto', 'torch' or 'triton', not {choice!r}")
    if choice == "torch":
        return False
    if choice == "triton":
        if not triton_importable():
            raise RuntimeError("kernels='triton' needs the triton package")
        return True
    return device.type == "cuda" and triton_importable()


def region_kernels(triton: bool) -> Any:
    """The module whose `compose_region` the engine calls: Triton's or torch's."""
    if triton:
        return triton_module()
    from captum_krypton.kernels import torch_ops

    return torch_ops


def triton_module():
    """The Triton kernels, imported on first use (so TRITON_INTERPRET set by then applies)."""
    from captum_krypton.kernels import triton_ops

    return triton_ops


def triton_conv_module():
    """The implicit-GEMM Triton conv, imported on first use."""
    from captum_krypton.kernels import triton_conv

    return triton_conv


def conv_supports_implicit_gemm(weight: torch.Tensor, groups: int) -> bool:
    """Whether the implicit-GEMM Triton conv takes this conv (dense, fp32/fp16/bf16)."""
    return groups == 1 and weight.dtype in (torch.float32, torch.float16, torch.bfloat16)


def wait_for_compilation() -> None:
    """Block until the Triton kernels compiling in the background are ready.

    On CUDA the first calls run on cuDNN while the implicit-GEMM conv compiles in
    a background thread; the engine measures and switches to it at a later call
    once it is ready. Benchmarks that time steady-state calls wait here first."""
    module = sys.modules.get("captum_krypton.kernels.triton_conv")
    if module is not None:
        module.wait_for_compilation()


def choices_settled() -> bool:
    """Whether no Triton kernel compiles in the background: a CUDA graph captured
    while one does would keep a stand-in for it (see `choice.fastest`)."""
    module = sys.modules.get("captum_krypton.kernels.triton_conv")
    return module is None or not module.compiling()
