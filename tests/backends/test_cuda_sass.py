"""The CUDA kernels' machine code moves whole quads with vector accesses.

csrc/cuda/elementwise.cuh gives each thread a quad of 4 elements: in the vector instantiation
(``quad_kernel<true, ...>``) an interior quad moves each tensor with one 16-byte (fp32) or 8-byte
(fp16/bf16) access, and only the ragged edge quads fall back to 4 scalar accesses. This reads the
SASS that nvcc built into flatfused._C for every GPU architecture (cuobjdump, no GPU needed) and
checks that: stores, where nothing else is mixed in, exactly (one vector store per 4 scalar edge
stores); loads, by the presence of vector loads wherever a tensor is loaded. Skips when the
extension has no CUDA code or cuobjdump / c++filt are not found.
"""
from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # disassembles the extension's GPU machine code first


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates = [Path(cuda_home) / "bin" / name]
    try:  # the triton wheel bundles cuobjdump
        import triton
        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except ImportError:
        pass
    return next((str(c) for c in candidates if c.is_file()), None)


def read_sass():
    """arch -> {demangled kernel name: Counter of global access kinds}, or why not (a str)."""
    try:
        from flatfused import _C
    except ImportError:
        return "flatfused._C is not built"
    cuobjdump, cxxfilt = _tool("cuobjdump"), _tool("c++filt")
    if cuobjdump is None or cxxfilt is None:
        return "cuobjdump or c++filt not found"
    listing = subprocess.run([cuobjdump, "-lelf", _C.__file__], capture_output=True, text=True)
    archs = sorted({int(a) for a in re.findall(r"\.sm_(\d+)\.cubin", listing.stdout)})
    if not archs:
        return "flatfused._C was built without CUDA kernels"
    result = {}
    for arch in archs:
        dump = subprocess.run([cuobjdump, "-sass", "-arch", f"sm_{arch}", _C.__file__],
                              capture_output=True, text=True, check=True).stdout
        kernels = {}
        for body in re.split(r"\n\s*Function : ", dump)[1:]:
            mangled, code = body.split("\n", 1)
            name = subprocess.run([cxxfilt, mangled.strip()], capture_output=True, text=True,
                                  check=True).stdout.strip()
            # Turing's SASS spells out the default (system) scope: LDG.E.128.SYS is LDG.E.128
            kernels[name] = collections.Counter(
                f"{op}.E{suffix.removesuffix('.SYS')}"
                for op, suffix in re.findall(r"\b(LDG|STG)\.E((?:\.\w+)*)", code))
        result[arch] = kernels
    return result


@pytest.fixture(scope="module")
def sass():
    result = read_sass()
    if isinstance(result, str):
        pytest.skip(result)
    return result


def _vector_kernels(kernels):
    return {name: c for name, c in kernels.items() if "quad_kernel<true" in name}


def test_every_architecture_has_the_vector_kernels(sass):
    for arch, kernels in sass.items():
        vector = _vector_kernels(kernels)
        for op in ("PerturbOp", "RestoreOp", "AccumulateOp", "SgdStepOp", "AdamStepOp",
                   "SamAscentOp", "NoiseOp", "PhiloxBitsOp"):
            assert any(op in name for name in vector), (arch, op)


def test_interior_quads_store_with_one_vector_access_per_tensor(sass):
    """fp32/int32 tensors: STG.E.128 (16 bytes); fp16/bf16 tensors: STG.E.64 (8 bytes); each with
    its 4 scalar edge stores (STG.E / STG.E.U16) and nothing else."""
    checked = 0
    for arch, kernels in sass.items():
        for name, c in _vector_kernels(kernels).items():
            where = f"sm_{arch} {name}: {dict(c)}"
            assert c["STG.E.128"] + c["STG.E.64"] > 0, where
            assert c["STG.E"] == 4 * c["STG.E.128"], where
            assert c["STG.E.U16"] == 4 * c["STG.E.64"], where
            checked += 1
    assert checked >= 30


def test_interior_quads_load_with_vector_accesses(sass):
    """A kernel that loads tensor elements (its edge path has scalar element loads) loads them
    with vector loads in the interior: 16 bytes for 32-bit tensors; 8 bytes for 16-bit ones,
    beyond the rng state's two 8-byte reads (the RNG ops)."""
    for arch, kernels in sass.items():
        for name, c in _vector_kernels(kernels).items():
            where = f"sm_{arch} {name}: {dict(c)}"
            rng_reads = 2 if re.search(r"PerturbOp|NoiseOp|PhiloxBitsOp", name) else 0
            if c["LDG.E.U16"]:
                assert 4 * (c["LDG.E.64"] - rng_reads) == c["LDG.E.U16"], where
            if c["LDG.E"] >= 4:  # beyond a single scalar (the SAM ascent's norm)
                assert c["LDG.E.128"] > 0 and c["LDG.E"] - 4 * c["LDG.E.128"] <= 1, where


def test_scalar_instantiations_have_no_vector_accesses(sass):
    """The classification above means something: the instantiation for pointers that are not
    quad-aligned (``quad_kernel<false, ...>``) has no 16-byte access."""
    for arch, kernels in sass.items():
        for name, c in kernels.items():
            if "quad_kernel<false" in name:
                assert c["STG.E.128"] == 0 and c["LDG.E.128"] == 0, f"sm_{arch} {name}"
