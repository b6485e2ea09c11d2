"""The ``triton`` backend of flatfused (installed as ``flatfused.triton_kernels``).

One Triton kernel per op of docs/kernels.md, each behind a launcher with the op's exact
signature: 1-D contiguous tensors of one length and device, ``rng`` an int64 tensor
``[seed, offset]`` read inside the kernel (no host sync, CUDA-graph friendly), optional tensors
``None``. The noise follows docs/rng.md; ``_common.py`` holds what the kernels share (noise, slots,
loads and stores, launcher checks).
"""
from .base_step import adam_step_, sgd_step_
from .nso import accumulate_, accumulate_perturb_, perturb_
from .restore import restore_, zero_
from .rng import noise_, philox_bits_
from .sam import grad_norm_sq_, sam_ascent_

__all__ = ["philox_bits_", "noise_", "perturb_", "zero_", "accumulate_", "accumulate_perturb_", "restore_",
           "sgd_step_", "adam_step_", "grad_norm_sq_", "sam_ascent_"]
