"""flatfused: fused flat-minima optimizers (NSO, SAM, WSAM) for PyTorch."""
__version__ = "0.1.0"
