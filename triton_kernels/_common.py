"""Shared pieces of the Triton kernels: the per-counter noise (docs/rng.md) and launcher checks.

Device side (``@triton.jit``):

- ``noise4(seed, counters, DIST)``: the four lanes' fp32 noise of a block of Philox counters,
  for each distribution code 0..4 exactly as ``csrc/philox.h`` defines it (normal is
  ``tl.randn4x`` operation for operation; the others transform the lane's own uniform).
- ``bits_block`` / ``noise_block``: the bits / noise interleaved to element order
  (``[4 * BLOCK]``, slot ``4 * c + lane``) for the BLOCK counters from ``offset +
  first_counter``, with ``(seed, offset)`` read from the ``rng`` tensor inside the kernel.
- ``rng_slots`` / ``elem_slots``: a program's element indices ``j`` and whether all of them are
  in range; ``load_f32`` / ``store``: accesses with fp32 arithmetic and one rounding on store.

Kernel layout shared by every RNG op: element ``j`` has logical index ``i = base + j``, counter
``offset + i // 4``, lane ``i % 4``. Program ``p`` owns counters ``base // 4 + p * BLOCK + [0,
BLOCK)``, i.e. slots ``j = p * 4 * BLOCK - base % 4 + [0, 4 * BLOCK)``; slots outside ``[0, n)``
are masked. ``base % 4`` is a constexpr so that the common aligned case (0) keeps its
contiguous, 16-byte aligned accesses visible to the compiler.

Every kernel has its per-element body twice: unmasked for interior programs (``mask=None``) and
masked for the at most two edge programs, so that interior accesses vectorise whatever ``n`` is.
tests/backends/test_triton_compile.py checks it in the PTX for sm_80, sm_90 and sm_100: with ``base % 4 ==
0`` every interior access of fp32 and 16-bit tensors is a 16-byte ``ld/st.global.v4.b32``;
``base % 4 != 0`` gives scalar accesses. 16-bit tensors next to the fp32 noise or accumulator
also go through a shared-memory layout conversion.

Host side: argument checks with clear ``ValueError``s and the grid of an RNG op.

Under TRITON_INTERPRET=1 (``INTERPRETED``, fixed when this module is imported, as triton.jit
decides it) two things differ, both in helpers here and never in compiled code: tan is sin / cos
(no libdevice), and fp32 -> bf16 stores round to nearest even explicitly (the interpreter's
cast truncates; compiled, it rounds to nearest even).
"""
from __future__ import annotations

import contextlib
import operator

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))

# Counters per program of the RNG ops (4 * RNG_BLOCK elements) and elements per program of the
# others. Module attributes so that tests can shrink them to exercise many programs.
RNG_BLOCK = 1024
ELEM_BLOCK = 4096
NUM_WARPS = 4

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
NUM_DISTRIBUTIONS = 5  # 0 normal, 1 laplace, 2 uniform, 3 binomial, 4 cauchy


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def uniform(bits):
    """Triton's uint_to_uniform_float: the lane read as int32, negatives folded, into [0, 1)."""
    x = bits.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * 4.6566127342e-10


@triton.jit
def box_muller(u1, u2):
    """Triton's pair_uniform_to_normal, operation for operation."""
    u1 = tl.maximum(1.0e-7, u1)
    th = 6.283185307179586 * u2
    r = tl.sqrt(-2.0 * tl.log(u1))
    return r * tl.cos(th), r * tl.sin(th)


@triton.jit
def tan(x):
    """tanf: libdevice's on a GPU; sin / cos in the interpreter, which has no libdevice."""
    if INTERPRETED:
        return tl.sin(x) / tl.cos(x)
    else:
        return libdevice.tan(x)


@triton.jit
def uniform_to_distribution(u, DIST: tl.constexpr):
    """The non-normal distributions (codes 1..4) as transforms of the element's own uniform."""
    if DIST == 1:  # laplace(0, 1/sqrt 2)
        v = u - 0.5
        t = tl.maximum(1.0 - 2.0 * tl.abs(v), 1.0e-7)
        mag = tl.log(t) * -0.70710678118654752
        return tl.where(v < 0.0, -mag, mag)
    elif DIST == 2:  # uniform(-sqrt 3, sqrt 3)
        return (2.0 * u - 1.0) * 1.7320508075688772
    elif DIST == 3:  # binomial(4, 0.5) by inverse CDF
        return ((u >= 0.0625).to(tl.float32) + (u >= 0.3125).to(tl.float32)
                + (u >= 0.6875).to(tl.float32) + (u >= 0.9375).to(tl.float32))
    else:  # 4: cauchy(0, 1)
        return tan((tl.maximum(u, 1.0e-7) - 0.5) * 3.141592653589793)


@triton.jit
def noise4(seed, counters, DIST: tl.constexpr):
    """fp32 noise of the 4 lanes of Philox(seed, counters) for distribution code DIST."""
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    u0 = uniform(r0)
    u1 = uniform(r1)
    u2 = uniform(r2)
    u3 = uniform(r3)
    if DIST == 0:
        n0, n1 = box_muller(u0, u1)
        n2, n3 = box_muller(u2, u3)
    else:
        n0 = uniform_to_distribution(u0, DIST)
        n1 = uniform_to_distribution(u1, DIST)
        n2 = uniform_to_distribution(u2, DIST)
        n3 = uniform_to_distribution(u3, DIST)
    return n0, n1, n2, n3


@triton.jit
def interleave4(a, b, c, d):
    """[BLOCK] x 4 lanes -> [4 * BLOCK] in element order a0 b0 c0 d0 a1 b1 ..."""
    # join(join(a, c), join(b, d)) has shape [BLOCK, 2, 2]: [k, p, q] is lane 2 * p + q.
    x = tl.join(tl.join(a, c), tl.join(b, d))
    return tl.reshape(x, [4 * a.shape[0]])


@triton.jit
def block_counters(rng_ptr, first_counter, BLOCK: tl.constexpr):
    """Seed and the BLOCK Philox counters offset + first_counter + [0, BLOCK) (int64)."""
    seed = tl.load(rng_ptr)
    offset = tl.load(rng_ptr + 1)
    counters = offset + first_counter + tl.arange(0, BLOCK).to(tl.int64)
    return seed, counters


@triton.jit
def bits_block(rng_ptr, first_counter, BLOCK: tl.constexpr):
    """int32 bit patterns of the 4 * BLOCK elements of counters first_counter + [0, BLOCK)."""
    seed, counters = block_counters(rng_ptr, first_counter, BLOCK)
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    bits = interleave4(r0, r1, r2, r3)
    return bits.to(tl.int32, bitcast=True)


@triton.jit
def noise_block(rng_ptr, first_counter, BLOCK: tl.constexpr, DIST: tl.constexpr):
    """fp32 noise of the 4 * BLOCK elements of counters first_counter + [0, BLOCK)."""
    seed, counters = block_counters(rng_ptr, first_counter, BLOCK)
    n0, n1, n2, n3 = noise4(seed, counters, DIST)
    return interleave4(n0, n1, n2, n3)


@triton.jit
def rng_slots(pid, n, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    """Element indices j (int64) of RNG program pid's 4 * BLOCK slots; whether all are in [0, n)."""
    start = pid.to(tl.int64) * (4 * BLOCK) - SHIFT
    j = start + tl.arange(0, 4 * BLOCK).to(tl.int64)
    return j, (start >= 0) & (start + 4 * BLOCK <= n)


@triton.jit
def elem_slots(pid, n, BLOCK: tl.constexpr):
    """Element indices j (int64) of element-wise program pid, and whether all are in [0, n)."""
    start = pid.to(tl.int64) * BLOCK
    return start + tl.arange(0, BLOCK).to(tl.int64), start + BLOCK <= n


@triton.jit
def load_f32(ptr, j, mask):
    """Load (mask None: unmasked), converted to fp32 before any arithmetic."""
    return tl.load(ptr + j, mask=mask).to(tl.float32)


@triton.jit
def bf16_rne_bits(x):
    """fp32 -> bf16 bit pattern (uint16), round to nearest even, NaN kept NaN."""
    b = x.to(tl.uint32, bitcast=True)
    rounded = (b + (0x7FFF + ((b >> 16) & 1))) >> 16
    return tl.where(x != x, (b >> 16) | 0x40, rounded).to(tl.uint16)


@triton.jit
def store(ptr, j, value, mask):
    """Masked store of fp32 ``value``, rounded once (to nearest even) to the storage dtype."""
    out = value.to(ptr.dtype.element_ty)
    if INTERPRETED:  # the interpreter's fp32 -> bf16 cast truncates
        if ptr.dtype.element_ty == tl.bfloat16:
            out = bf16_rne_bits(value).to(tl.bfloat16, bitcast=True)
    tl.store(ptr + j, out, mask=mask)


# ------------------------------------------------------------------------------- host helpers


def check_tensor(op: str, name: str, t, n: int | None, device, dtypes) -> None:
    """ValueError unless ``t`` is 1-D, contiguous, of ``n`` elements, on ``device``, of ``dtypes``.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{op}: {name} must be 1-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")
    if n is not None and t.numel() != n:
        raise ValueError(f"{op}: {name} has {t.numel()} elements, expected {n}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{op}: {name} has dtype {t.dtype}, expected one of {names}")


def check_same_dtype(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise ValueError(
                f"{op}: {name} has dtype {t.dtype}, expected {ref.dtype} (as {ref_name})")


def check_device(op: str, device) -> None:
    if device.type == "cpu" and not INTERPRETED:
        raise ValueError(
            f"{op}: the triton backend needs GPU tensors (or TRITON_INTERPRET=1), got CPU")


def check_rng(op: str, rng, device) -> None:
    """ValueError unless ``rng`` is an int64 tensor [seed, offset] on ``device``."""
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.int64 or rng.numel() != 2:
        raise ValueError(f"{op}: rng must be an int64 tensor [seed, offset]")
    if not rng.is_contiguous():
        raise ValueError(f"{op}: rng must be contiguous")
    if rng.device != device:
        raise ValueError(
            f"{op}: rng is on {rng.device}, expected {device} (the kernel reads it there)")


def check_base(op: str, base, dist=None) -> tuple[int, int | None]:
    """(base, dist) as ints; ValueError unless base >= 0 and dist (when given) is a code 0..4."""
    try:
        base = operator.index(base)
    except TypeError:
        base = None
    if base is None or isinstance(base, bool) or base < 0:
        raise ValueError(f"{op}: base must be a non-negative int")
    if dist is not None:
        try:
            dist = operator.index(dist)
        except TypeError:
            dist = None
        if dist is None or not 0 <= dist < NUM_DISTRIBUTIONS:
            raise ValueError(f"{op}: dist must be a distribution code 0..{NUM_DISTRIBUTIONS - 1}")
    return base, dist


def on_device(device):
    """Launch context: Triton launches on the current CUDA device, so make it the tensors'."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def rng_layout(n: int, base: int) -> tuple[int, int, tuple[int]]:
    """(base % 4, base // 4, grid) of an RNG op over n elements starting at logical index base."""
    shift = base % 4
    return shift, base // 4, (triton.cdiv(shift + n, 4 * RNG_BLOCK),)


def elem_grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, ELEM_BLOCK),)
