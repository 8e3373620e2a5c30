"""Reference perturbation kernels: the counter-based noise of ``csrc/common/philox.h`` in pure PyTorch.

Same stream as the compiled kernels, bit for bit for the integer words: element ``e = offset + i`` owns word
``W[e]`` = word ``e & 3`` of Philox-4x32-10 (Salmon et al. 2011) of counter ``(lo32(e >> 2), hi32(e >> 2), 0, 0)``
under key ``(lo32(seed), hi32(seed))``. Rademacher ``z[e] = 1 - 2 * (W[e] >> 31)``; Gaussian pairs
``(z[2k], z[2k+1])`` are the Box-Muller pair of ``(W[2k], W[2k+1])`` with 24-bit uniforms (see the header).
PyTorch has no unsigned 32-bit multiply-high, so the Philox products are formed from 16-bit limbs in int64
(every partial product and carry stays below 2**35). Works on any device.
"""
from __future__ import annotations

import math

import torch

GAUSSIAN, RADEMACHER = 0, 1
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32, _MASK16 = 0xFFFFFFFF, 0xFFFF


def _mulhilo(a: torch.Tensor, m: int):
    """``(hi, lo)`` 32-bit halves of ``a * m`` for int64 tensors ``a`` in [0, 2**32) and a constant ``m``."""
    a_lo, a_hi = a & _MASK16, a >> 16
    m_lo, m_hi = m & _MASK16, m >> 16
    ll, lh, hl, hh = a_lo * m_lo, a_lo * m_hi, a_hi * m_lo, a_hi * m_hi  # each < 2**32
    mid = (ll >> 16) + (lh & _MASK16) + (hl & _MASK16)  # bits 16.. of the product, < 3 * 2**16
    lo = ((mid & _MASK16) << 16) | (ll & _MASK16)
    hi = hh + (lh >> 16) + (hl >> 16) + (mid >> 16)
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox-4x32-10 of int64 counter tensors (values in [0, 2**32)) under the key ``(k0, k1)``."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def _words(seed: int, offset: int, numel: int, device) -> torch.Tensor:
    """``W[offset .. offset + numel)`` as int64, computed one Philox block per four elements."""
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if numel == 0:
        return torch.empty((0,), dtype=torch.int64, device=device)
    first, last = offset >> 2, (offset + numel - 1) >> 2
    block = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    zero = torch.zeros_like(block)
    seed &= (1 << 64) - 1
    words = philox4x32_10(block & _MASK32, block >> 32, zero, zero, seed & _MASK32, seed >> 32)
    stream = torch.stack(words, dim=1).reshape(-1)
    start = offset - 4 * first
    return stream[start:start + numel]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def noise(numel: int, seed: int, offset: int, distribution: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``z[offset .. offset + numel)`` in ``dtype`` (float32 for float32 / float16 / bfloat16 requests, float64
    for float64)."""
    if distribution not in (GAUSSIAN, RADEMACHER):
        raise ValueError(f"distribution must be 0 (Gaussian) or 1 (Rademacher), got {distribution}")
    if distribution == RADEMACHER:
        return 1.0 - 2.0 * (_words(seed, offset, numel, device) >> 31).to(dtype)
    start = offset & ~1  # whole Box-Muller pairs
    w = _words(seed, start, offset + numel - start + ((offset + numel) & 1), device).view(-1, 2)
    u1 = ((w[:, 0] >> 8) + 1).to(dtype) * 2.0**-24
    u2 = (w[:, 1] >> 8).to(dtype) * 2.0**-24
    r, theta = torch.sqrt(-2.0 * torch.log(u1)), (2 * math.pi) * u2
    z = torch.stack((r * torch.cos(theta), r * torch.sin(theta)), dim=1).reshape(-1)
    return z[offset - start:offset - start + numel]


def _rows(t: torch.Tensor) -> int:
    return 1 if t.dim() == 0 else t.shape[0]


def _matrix_shape(t: torch.Tensor) -> tuple[int, int]:
    """``(rows, D)``: rows along dim 0 (one for a 0-dim tensor), ``D`` elements each."""
    rows = _rows(t)
    return rows, (t.numel() // rows if rows else 0)


def philox_words(like: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """``W[offset + i]`` for every element of ``like`` (shape only), int64 in [0, 2**32)."""
    return _words(seed, offset, like.numel(), like.device).view(like.shape)


def perturb_fwd(x: torch.Tensor, sigma: torch.Tensor, seed: int, offset: int, distribution: int) -> torch.Tensor:
    """``x + sigma[row] * z[offset + i]``, ``sigma`` of shape ``()`` or ``(rows,)`` (rows along dim 0)."""
    a = _compute_dtype(x.dtype)
    shape = _matrix_shape(x)
    z = noise(x.numel(), seed, offset, distribution, a, x.device).view(shape)
    s = sigma.to(torch.float64).to(a).reshape(-1, 1)
    return (x.to(a).reshape(shape) + s * z).to(x.dtype).view(x.shape)


def noise_row_dot(g: torch.Tensor, seed: int, offset: int, distribution: int) -> torch.Tensor:
    """Per row ``r``: ``sum_j g[r, j] z[offset + r D + j]``, shape ``(rows,)``, float64 for float64 ``g``
    else float32 (accumulated in float64)."""
    a = _compute_dtype(g.dtype)
    shape = _matrix_shape(g)
    z = noise(g.numel(), seed, offset, distribution, a, g.device).to(torch.float64).view(shape)
    return (g.to(torch.float64).reshape(shape) * z).sum(dim=1).to(a)
