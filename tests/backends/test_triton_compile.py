"""The Triton kernels compile for the GPUs flatfused builds for, and their accesses vectorise.

The other Triton tests run the kernels under TRITON_INTERPRET=1, which accepts code the compiler
rejects and says nothing of the machine code. Here tests/triton_aot.py drives every launcher as
the optimizers call it (each dtype, the flags' branches, aligned and misaligned bases) with
Triton's real compiler for sm_80, sm_90 and sm_100, down to a cubin, in a process of its own and
without a GPU, and reports the PTX's global accesses. Skips when triton or its ptxas is absent.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # compiles the kernels for GPU targets first

pytest.importorskip("triton")

ARCHS = (80, 90, 100)
SCRIPT = Path(__file__).parents[1].joinpath("triton_aot.py")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """arch -> (all kernel names, one record per compiled specialization), or a skip reason.
    The three compilers run at once; their own cache directory keeps the run hermetic."""
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "TRITON_CACHE_DIR": str(tmp_path_factory.mktemp("triton_cache"))}
    procs = {arch: subprocess.Popen([sys.executable, str(SCRIPT), str(arch)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in ARCHS}
    results = {}
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"sm_{arch}: triton_aot.py failed:\n{err[-4000:]}"
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        skip = [r["skip"] for r in lines if "skip" in r]
        if skip:
            results[arch] = skip[0]
            continue
        kernels = next(r["kernels"] for r in lines if "kernels" in r)
        results[arch] = (kernels, [r for r in lines if "case" in r])
    return results


def _records(compiled, arch):
    result = compiled[arch]
    if isinstance(result, str):
        pytest.skip(result)
    return result


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles(compiled, arch):
    kernels, records = _records(compiled, arch)
    errors = [f"{r['case']}: {r['error']}\n{r['traceback']}" for r in records if "error" in r]
    assert not errors, "\n".join(errors)
    assert len(kernels) >= 10
    assert {r["kernel"] for r in records} == set(kernels), "a kernel no case compiles"
    assert all(r["cubin_bytes"] > 0 for r in records)
    for op in ("perturb_", "accumulate_perturb_", "zero_", "accumulate_", "restore_", "sgd_step_",
               "adam_step_", "grad_norm_sq_", "sam_ascent_"):
        for dtype in ("float32", "bfloat16", "float16"):
            assert any(r["case"].startswith(f"{op} {dtype}") for r in records), (op, dtype)


@pytest.mark.parametrize("arch", ARCHS)
def test_interior_accesses_vectorise(compiled, arch):
    """Interior programs (all but the masked edge ones) move every tensor element in 16-byte
    accesses, for fp32 and 16-bit tensors alike, whenever the draw starts at a multiple of 4
    (``base % 4 == 0``: every whole-buffer launch): the interior's vector accesses move exactly
    the bytes the edge path moves in predicated scalar ones (a norm's partials kernel adds its
    one fp64 partial there), and what is left unpredicated and scalar is a constant handful
    (the rng state's two reads, the ascent's norm), not one per element. A misaligned base is
    the documented exception (triton_kernels/_common.py)."""
    _, records = _records(compiled, arch)
    checked = 0
    for r in records:
        if "error" in r:  # test_every_kernel_compiles reports it
            continue
        if any(f"base={b}" in r["case"] for b in (1, 2, 3)) or r["kernel"].endswith("_finish_kernel"):
            continue
        where = f"sm_{arch} {r['case']} ({r['kernel']}): {r}"
        partial = 8 if r["kernel"] == "_grad_norm_sq_partials_kernel" else 0
        assert r["vector16"] > 0 and r["vector_narrow"] == 0, where
        assert r["vector_bytes"] == r["edge_bytes"] - partial, where
        assert r["other_scalar"] <= 2, where
        checked += 1
    assert checked >= 70


def test_misaligned_base_compiles_with_scalar_accesses(compiled):
    """base % 4 != 0 shifts elements against the 4-lane counters: still compiled (and tested for
    values under the interpreter), with per-element scalar accesses, as documented."""
    _, records = _records(compiled, 90)
    shifted = [r for r in records if "base=1" in r["case"]]
    assert shifted and all(r["other_scalar"] > 32 for r in shifted)
