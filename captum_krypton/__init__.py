"""Exact drop-in for captum.attr.Occlusion, computed by incremental CNN inference."""

from captum_krypton.attr import FallbackWarning, IncrementalNotApplicable, IncrementalOcclusion

__all__ = ["IncrementalOcclusion", "FallbackWarning", "IncrementalNotApplicable"]
__version__ = "0.1.0"
