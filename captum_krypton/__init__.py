"""Exact drop-in for captum.attr.Occlusion, computed by incremental CNN inference."""

from captum_krypton.approx import Approximation, attribution_ssim
from captum_krypton.attr import FallbackWarning, IncrementalNotApplicable, IncrementalOcclusion
from captum_krypton.engine.progressive import OcclusionProgress, OcclusionReport
from captum_krypton.engine.self_check import SelfCheckReport
from captum_krypton.outputs import SelectOutput

__all__ = [
    "IncrementalOcclusion",
    "FallbackWarning",
    "IncrementalNotApplicable",
    "SelectOutput",
    "OcclusionProgress",
    "OcclusionReport",
    "SelfCheckReport",
    "Approximation",
    "attribution_ssim",
]
__version__ = "0.1.0"
