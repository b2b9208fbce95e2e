"""Opt-in approximations: projective-field threshold, drill-down, target SSIM."""

from captum_krypton.approx.calibrate import Calibration
from captum_krypton.approx.quality import attribution_ssim
from captum_krypton.approx.settings import Approximation

__all__ = ["Approximation", "Calibration", "attribution_ssim"]
