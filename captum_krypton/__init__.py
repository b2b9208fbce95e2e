"""Exact drop-in for captum.attr.Occlusion, computed by incremental CNN inference.

The public names are imported when first used, so that `python -m captum_krypton`
can start a data-set run's other ranks before it imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from captum_krypton.approx import Approximation, Calibration, attribution_ssim
    from captum_krypton.attr import (
        FallbackWarning,
        IncrementalNotApplicable,
        IncrementalOcclusion,
    )
    from captum_krypton.engine.progressive import OcclusionProgress, OcclusionReport
    from captum_krypton.engine.self_check import SelfCheckReport
    from captum_krypton.outputs import SelectOutput

#: Where each public name lives.
_PUBLIC = {
    "IncrementalOcclusion": "captum_krypton.attr",
    "FallbackWarning": "captum_krypton.attr",
    "IncrementalNotApplicable": "captum_krypton.attr",
    "SelectOutput": "captum_krypton.outputs",
    "OcclusionProgress": "captum_krypton.engine.progressive",
    "OcclusionReport": "captum_krypton.engine.progressive",
    "SelfCheckReport": "captum_krypton.engine.self_check",
    "Approximation": "captum_krypton.approx",
    "Calibration": "captum_krypton.approx",
    "attribution_ssim": "captum_krypton.approx",
}

__all__ = [
    "IncrementalOcclusion",
    "FallbackWarning",
    "IncrementalNotApplicable",
    "SelectOutput",
    "OcclusionProgress",
    "OcclusionReport",
    "SelfCheckReport",
    "Approximation",
    "Calibration",
    "attribution_ssim",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'captum_krypton' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
