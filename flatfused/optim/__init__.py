from .param_filter import norm_parameters
from .nso import NSM, NSO
from .sam import SAM
from .step_state import StepPhase, StepRefused
from .wsam import WeightedSAM

__all__ = ["NSO", "NSM", "SAM", "WeightedSAM", "StepPhase", "StepRefused", "norm_parameters"]
