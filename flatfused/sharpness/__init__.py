"""Sharpness and flatness measures: the Hessian (PyHessian-compatible class and a functional API),
Keskar sharpness, noise stability, the SAM edge of stability and a tracker that logs the top
eigenvalue against the edges during training."""
from .hessian import (density_on_grid, hessian, hessian_trace, hvp, matrix_weights,
                      spectral_density, top_eigenvalues)
from .keskar import ComputeKeskarSharpness, keskar_sharpness, mean_loss
from .layers import LayerSelector
from .noise_stability import NoiseStability, noise_stability
from .sam_edge import sam_edge
from .tracker import SAMEdgeTracker

__all__ = ["hessian", "hvp", "hessian_trace", "top_eigenvalues", "spectral_density",
           "density_on_grid", "matrix_weights", "LayerSelector", "ComputeKeskarSharpness",
           "keskar_sharpness", "mean_loss", "noise_stability", "NoiseStability", "sam_edge",
           "SAMEdgeTracker"]
