from .nso import NSM, NSO
from .sam import SAM
from .wsam import WeightedSAM

__all__ = ["NSO", "NSM", "SAM", "WeightedSAM"]
