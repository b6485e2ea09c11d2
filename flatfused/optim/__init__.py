from .nso import NSM, NSO
from .sam import SAM

__all__ = ["NSO", "NSM", "SAM"]
