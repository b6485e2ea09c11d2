"""flatfused's CUDA kernels (csrc/cuda/*.cu) compiled for the host and run in a CUDA emulation
(tests/cuda_emulation/), as a backend the kernel tests can call on CPU tensors.

``build(directory)`` compiles the kernels and the emulation with the host C++ compiler against
the CUDA toolkit's headers (no GPU, no nvcc, no torch headers; a few seconds) and returns
:class:`EmulatedCuda`, whose methods have the signatures of ``torch.ops.flatfused``'s ops, so
that ``flatfused.ops`` can dispatch to it (tests/backends/test_cuda_emulated.py). What the emulation
covers and what it cannot: tests/cuda_emulation/cuda_emulation.h.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"
KERNELS = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))

# csrc/dtype_code.h's DType codes.
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include directory (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h)."""
    from torch.utils import cpp_extension

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  cpp_extension.CUDA_HOME, "/usr/local/cuda"]
    for home in candidates:
        if home and (Path(home) / "include" / "cuda_bf16.h").exists():
            return Path(home) / "include"
    return None


def unavailable_reason() -> str | None:
    if cuda_include_dir() is None:
        return "no CUDA toolkit headers (set CUDA_HOME)"
    if _compiler() is None:
        return "no host C++ compiler (g++ or c++)"
    return None


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build(directory: Path) -> "EmulatedCuda":
    directory = Path(directory)
    # torch's nvcc flags for extensions: C++20, no implicit half/bfloat16 conversions
    cxx = [_compiler(), "-std=c++20", "-O2", "-ffp-contract=off", "-fPIC", "-Wall",
           "-Wno-unknown-pragmas", "-Wno-attributes", f"-I{cuda_include_dir()}",
           *(f"-D__CUDA_NO_{what}__" for what in ("HALF_OPERATORS", "HALF_CONVERSIONS",
                                                  "BFLOAT16_CONVERSIONS", "HALF2_OPERATORS")),
           "-c"]
    kernels = directory / "kernels"
    kernels.mkdir(exist_ok=True)
    _run([*cxx, "-include", str(EMULATION / "cuda_emulation.h"),
          # a misaligned access calls the emulation's handler (libubsan is not linked)
          "-fsanitize=alignment", "-fsanitize-recover=alignment",
          "-x", "c++", *map(str, KERNELS), str(EMULATION / "selftest.cu")], cwd=kernels)
    _run([*cxx, str(EMULATION / "emulation.cpp"), str(EMULATION / "capi.cpp")], cwd=directory)
    lib = directory / "libflatfused_cuda_emulated.so"
    objects = sorted(map(str, [*kernels.glob("*.o"), *directory.glob("*.o")]))
    # -Bsymbolic: the emulation's cudaGetDevice & co., not those of the libcudart torch loaded
    _run([_compiler(), "-shared", "-Wl,-Bsymbolic", *objects, "-o", str(lib)], cwd=directory)
    return EmulatedCuda(ctypes.CDLL(str(lib)))


def _run(cmd: list[str], cwd: Path) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        raise RuntimeError(f"building the emulated CUDA kernels failed:\n{' '.join(cmd)}\n"
                           f"{done.stderr}")


_p, _i64, _i32, _f64, _b = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double,
                            ctypes.c_bool)
_SIGNATURES = {
    "ffe_philox_bits": [_p, _i64, _p, _i64],
    "ffe_noise": [_p, _i32, _i64, _p, _i64, _i32],
    "ffe_perturb": [_p, _p, _p, _i32, _i64, _p, _i64, _i32, _f64, _b],
    "ffe_accumulate": [_p, _p, _i32, _i64, _f64, _b, _b],
    "ffe_accumulate_perturb": [_p, _p, _p, _p, _i32, _i64, _p, _i64, _i32, _f64, _b, _f64, _b,
                               _b],
    "ffe_restore": [_p, _p, _p, _p, _i32, _i32, _i64, _f64],
    "ffe_sgd_step": [_p, _p, _p, _p, _p, _i32, _i32, _i64, _f64, _f64, _f64, _f64, _f64, _b, _b,
                     _b, _b, _f64, _f64],
    "ffe_adam_step": [_p, _p, _p, _p, _p, _p, _i32, _i32, _i64, _f64, _f64, _f64, _f64, _f64,
                      _f64, _f64, _f64, _b, _b, _b, _f64, _f64],
    "ffe_grad_norm_sq": [_p, _p, _p, _i32, _i64, _p],
    "ffe_sam_ascent": [_p, _p, _p, _p, _p, _i32, _i64, _f64, _f64, _b, _b],
    "ffe_set_device": [_i32, _i32],
    "ffe_selftest": [_i32, _p, _p, _i32, _i32],
}

GRAD_NORM_SQ_PARTIALS = 1024  # kGradNormSqPartials


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _code(t: torch.Tensor | None, default: torch.Tensor | None = None) -> int:
    return _DTYPE_CODES[(t if t is not None else default).dtype]


class EmulatedCuda:
    """The CUDA ops on CPU tensors: ``torch.ops.flatfused``'s signatures, after
    ``flatfused.ops`` validated the arguments and made the tensors 1-D and contiguous."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = None if name == "ffe_set_device" else ctypes.c_int
        lib.ffe_error.restype = ctypes.c_char_p
        self.set_device(0, 1)

    def set_device(self, device: int, sm_count: int) -> None:
        """Make emulated device ``device`` (0-7) current, with ``sm_count`` SMs (the grid cap is
        32 blocks per SM). The launchers cache a device's SM count at its first launch."""
        if not 0 <= device < 8 or sm_count < 1:
            raise ValueError(f"emulated devices are 0-7 with at least one SM, got device "
                             f"{device} with {sm_count}")
        self.lib.ffe_set_device(device, sm_count)

    def selftest(self, kernel: str, inp: torch.Tensor | None, out: torch.Tensor, threads: int,
                 blocks: int = 1) -> None:
        """Launch one of tests/cuda_emulation/selftest.cu's kernels (``block_sum``,
        ``exited_lane``, ``divergent_barriers``, ``misaligned``); raises what the emulation
        reports."""
        which = ["block_sum", "exited_lane", "divergent_barriers", "misaligned"].index(kernel)
        self._check(self.lib.ffe_selftest(which, _ptr(inp), _ptr(out), threads, blocks))

    def _launch(self, lead: torch.Tensor, entry, *args) -> None:
        """``entry(*args)`` unless ``lead`` is empty (ops_cuda.cpp launches nothing then)."""
        if lead.numel():
            self._check(entry(*args))

    def _check(self, status: int) -> None:
        if status == -1:
            raise RuntimeError(f"emulated CUDA kernel: {self.lib.ffe_error().decode()}")
        if status != 0:
            raise RuntimeError(f"emulated CUDA launcher returned cudaError_t {status}")

    # ------------------------------------------------------------------ ops

    def philox_bits_(self, out, rng, base):
        self._launch(out, self.lib.ffe_philox_bits, _ptr(out), out.numel(), _ptr(rng), base)

    def noise_(self, out, rng, base, dist):
        self._launch(out, self.lib.ffe_noise, _ptr(out), _code(out), out.numel(), _ptr(rng), base,
                     dist)

    def perturb_(self, w, w0, rng, base, dist, sigma, save, grad=None):
        self._launch(w, self.lib.ffe_perturb, _ptr(w), _ptr(w0), _ptr(grad), _code(w), w.numel(),
                     _ptr(rng), base, dist, sigma, save)

    def zero_(self, grad):
        # ops_cuda.cpp: cudaMemsetAsync of the bytes, no kernel of ours
        if grad.numel():
            ctypes.memset(grad.data_ptr(), 0, grad.numel() * grad.element_size())

    def accumulate_(self, acc, grad, weight, init, zero_grad):
        self._launch(acc, self.lib.ffe_accumulate, _ptr(acc), _ptr(grad), _code(grad),
                     acc.numel(), weight, init, zero_grad)

    def accumulate_perturb_(self, w, w0, acc, grad, rng, base, dist, sigma, save, weight, init,
                            zero_grad):
        self._launch(w, self.lib.ffe_accumulate_perturb, _ptr(w), _ptr(w0), _ptr(acc), _ptr(grad),
                     _code(w), w.numel(), _ptr(rng), base, dist, sigma, save, weight, init,
                     zero_grad)

    def restore_(self, w, w0, grad, src, scale):
        self._launch(w, self.lib.ffe_restore, _ptr(w), _ptr(w0), _ptr(grad), _ptr(src), _code(w),
                     _code(src, w), w.numel(), scale)

    def sgd_step_(self, w, w0, grad, src, momentum_buffer, scale, lr, momentum, dampening,
                  weight_decay, nesterov, maximize, first_step, write_grad, grad_weight=0.0,
                  sharpness_weight=0.0):
        self._launch(w, self.lib.ffe_sgd_step, _ptr(w), _ptr(w0), _ptr(grad), _ptr(src),
                     _ptr(momentum_buffer), _code(w), _code(src, w), w.numel(), scale, lr,
                     momentum, dampening, weight_decay, nesterov, maximize, first_step,
                     write_grad, grad_weight, sharpness_weight)

    def adam_step_(self, w, w0, grad, src, exp_avg, exp_avg_sq, scale, lr, beta1, beta2, eps,
                   weight_decay, step_size, bias_correction2_sqrt, decoupled, maximize,
                   write_grad, grad_weight=0.0, sharpness_weight=0.0):
        self._launch(w, self.lib.ffe_adam_step, _ptr(w), _ptr(w0), _ptr(grad), _ptr(src),
                     _ptr(exp_avg), _ptr(exp_avg_sq), _code(w), _code(src, w), w.numel(), scale,
                     lr, beta1, beta2, eps, weight_decay, step_size, bias_correction2_sqrt,
                     decoupled, maximize, write_grad, grad_weight, sharpness_weight)

    def grad_norm_sq_(self, out, grad, w=None):
        # ops_cuda.cpp's scratch: one double per block of the first pass
        partials = torch.empty(GRAD_NORM_SQ_PARTIALS, dtype=torch.float64)
        self._launch(grad, self.lib.ffe_grad_norm_sq, _ptr(out), _ptr(grad), _ptr(w),
                     _code(grad), grad.numel(), _ptr(partials))

    def sam_ascent_(self, w, w0, grad, g0, norm_sq, rho, eps, adaptive, zero_grad):
        self._launch(w, self.lib.ffe_sam_ascent, _ptr(w), _ptr(w0), _ptr(grad), _ptr(g0),
                     _ptr(norm_sq), _code(w), w.numel(), rho, eps, adaptive, zero_grad)
