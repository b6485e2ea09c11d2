"""Sharpness and flatness measures: Keskar sharpness, noise stability, the SAM edge of stability."""
from .keskar import ComputeKeskarSharpness, keskar_sharpness, mean_loss
from .noise_stability import NoiseStability, noise_stability
from .sam_edge import sam_edge

__all__ = ["ComputeKeskarSharpness", "keskar_sharpness", "mean_loss", "noise_stability",
           "NoiseStability", "sam_edge"]
