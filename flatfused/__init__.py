"""flatfused: fused flat-minima optimizers (NSO, SAM, WSAM) for PyTorch.

The optimizers keep the published reference APIs; their inner loops run as fused kernels over
flat parameter buffers on one of the backends "cuda", "triton", "cpu" (compiled C++) or "torch".
"""
from . import ops
from .allocator import tune_cpu_allocator
from .bn import disable_running_stats, enable_running_stats
from .ops import noise, philox_bits
from .optim import NSM, NSO, SAM, StepPhase, StepRefused, WeightedSAM, norm_parameters

__version__ = "0.1.0"

__all__ = ["NSO", "NSM", "SAM", "WeightedSAM", "StepPhase", "StepRefused", "norm_parameters",
           "noise", "philox_bits",
           "ops", "enable_running_stats", "disable_running_stats", "tune_cpu_allocator",
           "__version__"]
