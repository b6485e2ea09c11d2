"""Faithful pure-PyTorch restatements of the published reference implementations.

They reproduce the references' behaviour *and cost* (per-parameter Python loops, per-parameter
clones, CPU-sampled noise) and serve as validation oracles and benchmark baselines; flatfused's
own optimizers live in :mod:`flatfused.optim`.
"""
from .bn import (
    disable_running_stats,
    enable_running_stats,
    reference_disable_running_stats,
    reference_enable_running_stats,
)
from .nso import (
    NSM,
    NSO,
    FlatfusedNoiseSource,
    flatfused_noise_source,
    make_distribution,
    train_step,
)
from .sam import SAM, sam_train_step
from .wsam import WeightedSAM

__all__ = [
    "NSM",
    "NSO",
    "FlatfusedNoiseSource",
    "flatfused_noise_source",
    "make_distribution",
    "train_step",
    "SAM",
    "sam_train_step",
    "WeightedSAM",
    "disable_running_stats",
    "enable_running_stats",
    "reference_disable_running_stats",
    "reference_enable_running_stats",
]
