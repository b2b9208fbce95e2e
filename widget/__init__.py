"""Notebook widget: the occlusion heatmap, live while it is computed."""

from captum_krypton.widget.occlusion import OcclusionWidget

__all__ = ["OcclusionWidget"]
