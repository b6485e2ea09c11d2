"""Compiles every Triton kernel of flatfused for a real GPU target, without a GPU.

Run as a script in its own process (tests/backends/test_triton_compile.py does): ``python
tests/triton_aot.py ARCH`` prints one JSON line per kernel specialization. The launchers run on
small CPU tensors with the arguments the optimizers pass, but with TRITON_INTERPRET=0 and a driver
that reports ``GPUTarget("cuda", ARCH, 32)``, every launch compiles (Triton's own binder picks
the specialization: dtypes, 16-byte alignment, constexprs) through the real compiler down to a
cubin with the ptxas bundled in the triton wheel, and is not run. This catches what the
interpreter accepts and the compiler rejects, and shows in the PTX whether accesses vectorise.
"""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import sys
import time
import traceback

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ARCH = int(sys.argv[1]) if len(sys.argv) > 1 else 90
N = 3 * 4096 + 5  # several programs of every kernel, ragged end

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class AotDriver:
    """The parts of Triton's driver a warm-up compile consults."""

    def get_current_target(self):
        return GPUTarget("cuda", ARCH, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _access_bytes(suffixes: str) -> int:
    """Bytes one access moves, from its PTX suffixes (``.v4.b32``: 16)."""
    lanes = re.search(r"\.v(\d)", suffixes)
    bits = re.search(r"\.[bfsu](8|16|32|64)\b", suffixes)
    return (int(lanes.group(1)) if lanes else 1) * int(bits.group(1)) // 8


def ptx_counts(ptx: str) -> dict:
    """Global accesses by kind. Predicated scalar ones are the masked edge path; unpredicated
    vector ones the interior path when it vectorises (``vector16``: 16 bytes, ``vector_narrow``:
    fewer); unpredicated scalar ones are the rest: the rng state's two int64 reads, a
    reduction's single values, or an interior path that did not vectorise. ``.nc`` loads are
    libdevice's constant tables (sin/cos argument reduction)."""
    counts = {"vector16": 0, "vector_narrow": 0, "edge_scalar": 0, "other_scalar": 0,
              "table": 0, "shared_stores": 0, "vector_bytes": 0, "edge_bytes": 0}
    for line in ptx.splitlines():
        line = line.strip()
        access = re.search(r"\b(ld|st)\.(global|shared)((?:\.\w+)*)", line)
        if access is None:
            continue
        space, suffixes = access.group(2), access.group(3)
        if space == "shared":
            counts["shared_stores"] += access.group(1) == "st"
        elif ".nc" in suffixes:
            counts["table"] += 1
        elif ".v2" in suffixes or ".v4" in suffixes:
            size = _access_bytes(suffixes)
            counts["vector16" if size == 16 else "vector_narrow"] += 1
            counts["vector_bytes"] += size
        elif line.startswith("@"):
            counts["edge_scalar"] += 1
            counts["edge_bytes"] += _access_bytes(suffixes)
        else:
            counts["other_scalar"] += 1
    return counts


def unavailable() -> str | None:
    """Why this triton cannot compile for ARCH here, or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        get_ptxas(ARCH).path
    except Exception as e:  # no NVIDIA backend, or no ptxas for ARCH
        return f"triton cannot compile for sm_{ARCH} here: {type(e).__name__}: {e}"
    return None


def main() -> int:
    reason = unavailable()
    if reason is not None:
        print(json.dumps({"skip": reason}))
        return 0
    driver.set_active(AotDriver())
    records = []
    current = {"case": None}
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        t = time.perf_counter()
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        records.append({"case": current["case"], "kernel": self.fn.__name__,
                        "seconds": round(time.perf_counter() - t, 3), "arch": ARCH,
                        "cubin_bytes": len(kernel.asm["cubin"]), **ptx_counts(kernel.asm["ptx"])})
        return kernel

    JITFunction.run = compile_only
    from flatfused import triton_kernels as tk
    from flatfused.triton_kernels import _common as nz
    if nz.INTERPRETED:
        raise SystemExit("triton_aot.py: TRITON_INTERPRET must be off in this process")
    nz.check_device = lambda op, device: None  # CPU tensors stand in for device ones here

    rng = torch.tensor([7, 3], dtype=torch.int64)

    def case(name, fn, *args, **kwargs):
        current["case"] = name
        try:
            fn(*args, **kwargs)
        except Exception as e:  # reported, the other cases still compile
            records.append({"case": name, "error": f"{type(e).__name__}: {e}",
                            "traceback": traceback.format_exc(limit=3)})

    for dt in PARAM_DTYPES:
        d = str(dt).replace("torch.", "")
        w, w0, g, src, m, v = (torch.zeros(N, dtype=dt) for _ in range(6))
        acc = torch.zeros(N)
        for base in (0, 1):
            case(f"perturb_ {d} base={base} save grad", tk.perturb_, w, w0, rng, base, 0, 0.1,
                 True, g)
        case(f"perturb_ {d} base=0", tk.perturb_, w, w0, rng, 0, 0, 0.1, False)
        case(f"accumulate_perturb_ {d} init zero_grad save", tk.accumulate_perturb_, w, w0, acc,
             g, rng, 0, 0, 0.1, True, 0.5, True, True)
        case(f"accumulate_perturb_ {d}", tk.accumulate_perturb_, w, w0, acc, g, rng, 0, 0, 0.1,
             False, 0.5, False, False)
        case(f"zero_ {d}", tk.zero_, g)
        case(f"accumulate_ {d} init zero_grad", tk.accumulate_, acc, g, 0.5, True, True)
        case(f"accumulate_ {d}", tk.accumulate_, acc, g, 0.5, False, False)
        case(f"restore_ {d}", tk.restore_, w, w0, None, None, 1.0)
        case(f"restore_ {d} grad src", tk.restore_, w, w0, g, src, 0.5)
        # The base step as NSO (restore from w0, write the gradient), SAM and WSAM (restore,
        # saved gradient mixed in, decoupled sharpness step) and a plain step call it.
        case(f"sgd_step_ {d} nso", tk.sgd_step_, w, w0, g, None, m, 0.5, 0.1, 0.9, 0.0, 0.0,
             False, False, False, True)
        case(f"sgd_step_ {d} plain first", tk.sgd_step_, w, None, g, None, m, 1.0, 0.1, 0.9, 0.1,
             1e-4, True, True, True, False)
        case(f"sgd_step_ {d} no momentum", tk.sgd_step_, w, w0, g, None, None, 1.0, 0.1, 0.0,
             0.0, 0.0, False, False, False, False)
        case(f"sgd_step_ {d} wsam", tk.sgd_step_, w, w0, g, src, m, 1.0, 0.1, 0.9, 0.0, 1e-4,
             False, False, False, True, 0.3, 0.7)
        case(f"adam_step_ {d} nso adamw", tk.adam_step_, w, w0, g, None, m, v, 0.5, 1e-3, 0.9,
             0.999, 1e-8, 1e-2, 1e-2, 0.5, True, False, True)
        case(f"adam_step_ {d} plain adam maximize", tk.adam_step_, w, None, g, None, m, v, 1.0,
             1e-3, 0.9, 0.999, 1e-8, 1e-2, 1e-2, 0.5, False, True, False)
        case(f"adam_step_ {d} wsam", tk.adam_step_, w, w0, g, src, m, v, 1.0, 1e-3, 0.9, 0.999,
             1e-8, 0.0, 1e-2, 0.5, True, False, True, 0.3, 0.7)
        out = torch.zeros(1)
        case(f"grad_norm_sq_ {d}", tk.grad_norm_sq_, out, g, None)
        case(f"grad_norm_sq_ {d} adaptive", tk.grad_norm_sq_, out, g, w)
        case(f"sam_ascent_ {d} save zero_grad", tk.sam_ascent_, w, w0, g, src, out, 0.05, 1e-12,
             False, True)
        case(f"sam_ascent_ {d} adaptive", tk.sam_ascent_, w, w0, g, None, out, 0.05, 1e-12, True,
             False)
    for dist in range(nz.NUM_DISTRIBUTIONS):
        case(f"noise_ float32 dist={dist}", tk.noise_, torch.zeros(N), rng, 0, dist)
        case(f"perturb_ float32 dist={dist}", tk.perturb_, torch.zeros(N), torch.zeros(N), rng, 0,
             dist, 0.1, True)
    for dt in (torch.bfloat16, torch.float16, torch.float64):
        case(f"noise_ {str(dt).replace('torch.', '')}", tk.noise_, torch.zeros(N, dtype=dt), rng,
             0, 0)
    for base in (0, 2):
        case(f"philox_bits_ base={base}", tk.philox_bits_, torch.zeros(N, dtype=torch.int32), rng,
             base)
    modules = [importlib.import_module(f"{tk.__name__}.{info.name}")
               for info in pkgutil.iter_modules(tk.__path__)]
    kernels = sorted({name for module in modules for name, obj in vars(module).items()
                      if isinstance(obj, JITFunction) and name.endswith("_kernel")})
    print(json.dumps({"kernels": kernels}))
    for r in records:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
