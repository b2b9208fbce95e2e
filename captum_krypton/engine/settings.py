"""How the incremental engine runs a call: plan, kernels, batches, self-check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from captum_krypton.engine.occlusion import PreparedOcclusion

Kernels = Literal["auto", "torch", "triton"]


@dataclass(frozen=True)
class EngineSettings:
    """The engine's part of the keyword extras of `IncrementalOcclusion.attribute`
    (documented there); the defaults are the documented ones.

    full_threshold: None: the cost model picks the nodes computed whole; a share
        of the feature map: boxes covering at least that much are computed whole.
    kernels: "auto", "torch" or "triton".
    cuda_graphs: replay one captured window batch on CUDA; None: decided per call.
    max_memory: bytes one window batch may use (None: the device's default).
    windows_per_batch: fixed windows per batch (None: from `max_memory`).
    self_check: check the call against the forward function.
    """

    full_threshold: float | None = None
    kernels: Kernels = "auto"
    cuda_graphs: bool | None = None
    max_memory: int | None = None
    windows_per_batch: int | None = None
    self_check: bool = True

    def __post_init__(self) -> None:
        if self.windows_per_batch is not None and self.windows_per_batch < 1:
            raise ValueError("windows_per_batch must be at least 1")

    def batch_size(self, ready: PreparedOcclusion) -> int:
        """Windows per batch for this prepared call."""
        return self.windows_per_batch or ready.windows_per_batch(self.max_memory)

    def choose_kernels(self, ready: PreparedOcclusion) -> PreparedOcclusion:
        """`ready` with these settings' kernels and CUDA graphs."""
        return ready.choose_kernels(self.kernels, self.cuda_graphs)
