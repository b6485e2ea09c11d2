"""The RNG spec in pure PyTorch (docs/rng.md): Philox4x32-10 as Triton's ``randint4x`` computes it.

This is the reference statement every compiled backend is tested against. 32-bit lanes are held
in int64 tensors so that every product fits: a 32x32-bit product is split into two 32x16-bit ones.
"""
from __future__ import annotations

import math

import torch

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF

DISTRIBUTIONS = {"normal": 0, "laplace": 1, "uniform": 2, "binomial": 3, "cauchy": 4}


def distribution_code(distribution: str | None) -> int:
    """Code of a reference ``distribution`` name (``None`` means normal); codes pass through."""
    if isinstance(distribution, int) and not isinstance(distribution, bool):
        if distribution in DISTRIBUTIONS.values():
            return distribution
        raise ValueError(f"unknown distribution code {distribution}")
    name = "normal" if distribution is None else distribution
    if not isinstance(name, str) or name.lower() not in DISTRIBUTIONS:
        raise ValueError(
            f"unknown distribution {distribution!r}; expected None or one of {sorted(DISTRIBUTIONS)}"
        )
    return DISTRIBUTIONS[name.lower()]


def _mulhilo(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of x * m for uint32 x (held in int64) and a 32-bit constant m."""
    p = x * (m >> 16)  # < 2**48
    q = x * (m & 0xFFFF)  # < 2**48
    hi = (p + (q >> 16)) >> 16
    lo = (((p & 0xFFFF) << 16) + q) & MASK32
    return hi, lo


def philox4x32_10(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 of int64 ``counters`` under ``seed``; returns int64 [len, 4] holding uint32."""
    c = counters.to(torch.int64)
    c0 = c & MASK32
    c1 = (c >> 32) & MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    seed &= (1 << 64) - 1
    k0, k1 = seed & MASK32, seed >> 32
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def _lanes(seed: int, offset: int, base: int, n: int, device) -> torch.Tensor:
    """The uint32 lanes (int64) of elements base .. base+n-1, grouped as rows of 4 counters' lanes."""
    first = base // 4
    last = (base + n - 1) // 4 if n > 0 else first - 1
    counters = torch.arange(first, last + 1, device=device, dtype=torch.int64) + offset
    return philox4x32_10(seed, counters)  # [num_counters, 4]


def _slice(rows: torch.Tensor, base: int, n: int) -> torch.Tensor:
    start = base % 4
    return rows.reshape(-1)[start : start + n]


def philox_bits(n: int, seed: int, offset: int, base: int = 0, device="cpu") -> torch.Tensor:
    """int32 bit patterns of elements ``base .. base+n-1`` of the draw at ``(seed, offset)``."""
    bits = _slice(_lanes(seed, offset, base, n, device), base, n)
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)


def uint_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float on uint32 lanes held in int64: fp32 in [0, 1)."""
    x = torch.where(bits >= 2**31, bits - 2**32, bits)  # as int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * 4.6566127342e-10


def _box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u1 = torch.clamp_min(u1, 1.0e-7)
    th = u2 * 6.283185307179586
    r = torch.sqrt(torch.log(u1) * -2.0)
    return r * torch.cos(th), r * torch.sin(th)


def uniform_to_distribution(u: torch.Tensor, dist: int) -> torch.Tensor:
    """The non-normal distributions as transforms of the element's own uniform (fp32)."""
    if dist == 1:  # laplace(0, 1/sqrt 2)
        v = u - 0.5
        t = torch.clamp_min(1.0 - 2.0 * v.abs(), 1.0e-7)
        mag = torch.log(t) * -0.70710678118654752
        return torch.where(v < 0, -mag, mag)
    if dist == 2:  # uniform(-sqrt 3, sqrt 3)
        return (2.0 * u - 1.0) * 1.7320508075688772
    if dist == 3:  # binomial(4, 0.5) by inverse CDF
        return ((u >= 0.0625).float() + (u >= 0.3125).float() + (u >= 0.6875).float()
                + (u >= 0.9375).float())
    if dist == 4:  # cauchy(0, 1)
        return torch.tan((torch.clamp_min(u, 1.0e-7) - 0.5) * math.pi)
    raise ValueError(f"unknown distribution code {dist}")


def noise(n: int, seed: int, offset: int, base: int = 0, dist: int = 0, device="cpu") -> torch.Tensor:
    """fp32 noise of elements ``base .. base+n-1`` of the draw at ``(seed, offset)``."""
    u = uint_to_uniform(_lanes(seed, offset, base, n, device))  # [counters, 4]
    if dist == 0:
        n0, n1 = _box_muller(u[:, 0], u[:, 1])
        n2, n3 = _box_muller(u[:, 2], u[:, 3])
        values = torch.stack([n0, n1, n2, n3], dim=-1)
    else:
        values = uniform_to_distribution(u, dist)
    return _slice(values, base, n)


def counters_per_draw(numel: int) -> int:
    """How far one draw over ``numel`` elements advances the offset: ceil(numel / 4)."""
    return (numel + 3) // 4
