from .nso import NSM, NSO

__all__ = ["NSO", "NSM"]
