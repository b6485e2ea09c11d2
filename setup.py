"""Build of flatfused: the Python package and its compiled extension flatfused._C.

    pip install --no-build-isolation .        # or -e . for development

flatfused._C holds the C++ CPU kernels (always) and the CUDA kernels (csrc/cuda/, when torch is
a CUDA build and nvcc is found), compiled with ninja at install time against the installed torch.

Environment:
    FLATFUSED_BUILD_CUDA=0|1   force the CUDA kernels off / on (1 without nvcc is an error)
    TORCH_CUDA_ARCH_LIST       GPU architectures; unset: the visible GPUs', or
                               7.5;8.0;9.0;10.0+PTX when no GPU is visible
    MAX_JOBS                   parallel compile jobs (ninja)
    FLATFUSED_DEBUG=1          keep debug information in the C++ objects (off: -g0)
"""
from __future__ import annotations

import glob
import os
import re
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Turing (T4, RTX 20xx), Ampere (one binary for 8.0/8.6/8.9), Hopper, Blackwell, and PTX for
# newer GPUs to compile at load time: the architectures of torch's own CUDA 13 builds.
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;9.0;10.0+PTX"


def _version() -> str:
    with open(os.path.join(ROOT, "flatfused", "__init__.py"), encoding="utf-8") as f:
        match = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", f.read(), re.M)
    return match.group(1) if match else "0.0.0"


def _say(message: str) -> None:
    print(f"flatfused setup: {message}", flush=True)


def _sources(pattern: str) -> list[str]:
    # setuptools wants paths relative to setup.py
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _packages() -> tuple[list[str], dict[str, str]]:
    """flatfused and its subpackages, plus triton_kernels/ installed as flatfused.triton_kernels."""
    packages = find_packages(where=ROOT, include=["flatfused", "flatfused.*"])
    package_dir = {}
    if os.path.isfile(os.path.join(ROOT, "triton_kernels", "__init__.py")):
        sub = find_packages(where=os.path.join(ROOT, "triton_kernels"))
        for name in ["flatfused.triton_kernels"] + [f"flatfused.triton_kernels.{s}" for s in sub]:
            packages.append(name)
            package_dir[name] = os.path.join("triton_kernels", *name.split(".")[2:])
    return packages, package_dir


def _usable_cuda_home(path) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")) and (
        os.path.exists(os.path.join(path, "bin", "nvcc")) or os.path.exists(os.path.join(path, "bin", "nvcc.exe")))


def _resolve_cuda_home(cpp_extension):
    """torch's CUDA_HOME, or a real toolkit when torch guessed wrong.

    Without CUDA_HOME/CUDA_PATH, torch takes the parent of the directory of the nvcc on PATH;
    when that nvcc is a wrapper script (e.g. /usr/local/bin/nvcc) the guess has no CUDA headers.
    Then use /usr/local/cuda or /usr/local/cuda-<torch's CUDA version> instead.
    """
    home = cpp_extension.CUDA_HOME
    if _usable_cuda_home(home) or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return home
    import torch

    version = torch.version.cuda or ""
    candidates = [f"/usr/local/cuda-{version}", "/usr/local/cuda"] + sorted(
        glob.glob("/usr/local/cuda-*"), reverse=True)
    for candidate in candidates:
        if _usable_cuda_home(candidate):
            _say(f"CUDA_HOME guessed as {home!r} has no CUDA headers; using {candidate}")
            cpp_extension.CUDA_HOME = candidate  # read by torch's include paths and nvcc lookup
            os.environ["CUDA_HOME"] = candidate
            return candidate
    return home


def _want_cuda(torch, cuda_home, cuda_sources) -> bool:
    forced = os.environ.get("FLATFUSED_BUILD_CUDA", "").strip()
    if forced not in ("", "0", "1"):
        raise RuntimeError(f"FLATFUSED_BUILD_CUDA must be 0 or 1, got {forced!r}")
    nvcc = None
    if cuda_home is not None:
        nvcc = os.path.join(cuda_home, "bin", "nvcc.exe" if os.name == "nt" else "nvcc")
        if not os.path.exists(nvcc):
            nvcc = None
    if forced == "0":
        _say("FLATFUSED_BUILD_CUDA=0: building the CPU kernels only")
        return False
    if forced == "1":
        if torch.version.cuda is None:
            raise RuntimeError(
                "FLATFUSED_BUILD_CUDA=1 but the installed torch is not a CUDA build "
                f"(torch {torch.__version__}); install a CUDA build of torch or unset FLATFUSED_BUILD_CUDA")
        if nvcc is None:
            raise RuntimeError(
                "FLATFUSED_BUILD_CUDA=1 but nvcc was not found (CUDA_HOME="
                f"{cuda_home!r}); install the CUDA toolkit matching torch's CUDA {torch.version.cuda} "
                "and set CUDA_HOME, or unset FLATFUSED_BUILD_CUDA")
        if not cuda_sources:
            _say("FLATFUSED_BUILD_CUDA=1 but csrc/cuda/ has no sources: building the CPU kernels only")
            return False
        return True
    if torch.version.cuda is None:
        _say(f"torch {torch.__version__} is not a CUDA build: building the CPU kernels only")
        return False
    if nvcc is None:
        _say("nvcc not found (set CUDA_HOME to build the CUDA kernels): building the CPU kernels only")
        return False
    if not cuda_sources:
        _say("no CUDA sources in csrc/cuda/: building the CPU kernels only")
        return False
    return True


def _set_cuda_arch_list(torch) -> None:
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        _say(f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        return
    try:
        visible = torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:  # no driver
        visible = False
    if visible:
        _say("TORCH_CUDA_ARCH_LIST unset: compiling for the visible GPUs' architectures")
        return
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    _say(f"TORCH_CUDA_ARCH_LIST unset and no GPU visible: defaulting to {DEFAULT_CUDA_ARCH_LIST!r} "
         "(set TORCH_CUDA_ARCH_LIST to choose)")


def _import_torch():
    try:
        import torch
    except ImportError:
        sys.exit("flatfused setup: torch is needed to build flatfused._C against it; install "
                 "torch first, then `pip install --no-build-isolation .`")
    if "pip-build-env" in (torch.__file__ or ""):
        # pip's isolated build environment fetched a torch of its own: the extension would be
        # built against it and then fail to load next to the torch that runs it.
        _say(f"WARNING: building against the torch {torch.__version__} of pip's isolated build "
             "environment, not yours; install with `pip install --no-build-isolation .`")
    return torch


def _extensions():
    torch = _import_torch()
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    CUDA_HOME = _resolve_cuda_home(cpp_extension)
    cpu_sources = _sources("csrc/ops.cpp") + _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    with_cuda = _want_cuda(torch, CUDA_HOME, cuda_sources)

    # No -std flag: torch's cpp_extension passes the standard its headers need (C++20 for
    # torch >= 2.10; the flatfused sources are C++17). -ffp-contract=off: no implicit FMA, so
    # the step math rounds as torch's does (the noise code uses explicit FMA intrinsics).
    # -fno-math-errno / -fno-trapping-math change no result (no -ffast-math); they let GCC
    # inline sqrtf and if-convert the elementwise loops so that they vectorise.
    cxx = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    # Python's own CFLAGS carry -g: debug information for the ~2000 vectorised loop instances
    # of the base steps made their compile 1.5x slower and its peak memory 6x (4.3 GB for the
    # one file they were then), and the library 3.7x larger. FLATFUSED_DEBUG=1 keeps it.
    if os.environ.get("FLATFUSED_DEBUG", "0") in ("", "0"):
        cxx.append("-g0")
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inline and uses OpenMP (torch's default backend); libgomp is
        # the one torch already loaded.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    nvcc = ["-O3", "-lineinfo"]  # no --use_fast_math: it would change logf/cosf results
    define_macros = []
    sources = cpu_sources
    if with_cuda:
        _set_cuda_arch_list(torch)
        define_macros.append(("FLATFUSED_WITH_CUDA", None))
        sources = cpu_sources + cuda_sources
        ext = CUDAExtension(
            "flatfused._C", sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)
        _say(f"building flatfused._C with CPU and CUDA kernels (CUDA {torch.version.cuda}, {CUDA_HOME})")
    else:
        ext = CppExtension(
            "flatfused._C", sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=link)
        _say("building flatfused._C with CPU kernels")
    if os.environ.get("MAX_JOBS"):
        _say(f"MAX_JOBS={os.environ['MAX_JOBS']}")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


packages, package_dir = _packages()
ext_modules, cmdclass = _extensions()

setup(
    name="flatfused",
    version=_version(),
    description="Fused flat-minima optimizers (NSO, SAM, WSAM) and sharpness tools for PyTorch",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    # the op schemas: read by flatfused/schemas.py at run time, included by csrc/ops.cpp
    package_data={"flatfused": ["op_schemas.def"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch", "numpy"],
    extras_require={"test": ["pytest", "pytest-randomly", "pytest-benchmark", "matplotlib",
                             "open-clip-torch[training]==3.3.0", "braceexpand",
                             "transformers>=5", "accelerate>=1.10", "lightning>=2.5",
                             "pytorch_optimizer>=4.1"],
                    "plot": ["matplotlib"], "bench": ["matplotlib", "pytorch_optimizer>=4.1"], "open_clip": ["open-clip-torch[training]", "braceexpand"],
                    "transformers": ["transformers>=5", "accelerate>=1.10"],
                    "lightning": ["lightning>=2.5"]},
    entry_points={"console_scripts": ["flatfused = flatfused.cli:main"]},
    zip_safe=False,
)
