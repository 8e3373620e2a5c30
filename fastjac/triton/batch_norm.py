"""Triton BatchNorm (+ fused ReLU) kernels: ``bn_fwd``, ``bn_bwd``, ``bn_dbwd``, ``bn_jvp`` of csrc/KERNELS.md.

Inputs are ``N x C x S`` (S = prod(spatial)), reduced per channel over ``M = N S`` elements. Structure:

- forward (training): per-channel moments (one read: per-lane Welford updates, lanes and programs merged with
  Chan et al.'s formula), then ``y = z = a x + c`` or ``relu(z)`` (``a``, ``c`` from :mod:`.batch_norm_coef`);
  running statistics updated in place exactly once, on the host side of the launch, with the unbiased variance;
- every later kernel: pass 1 per-channel sums (:func:`_bn_sums_kernel`), coefficients on C-vectors
  (:mod:`.batch_norm_coef`), pass 2 one affine combination per element (:func:`_bn_affine_kernel`).

Reductions are deterministic: each channel is split into fixed chunks (``_launch.REDUCE_CHUNK``) reduced by one
program each into a ``C x P`` buffer, summed on the host in a fixed order; no atomics. With ``relu`` the mask
``m = z > 0`` is recomputed in every kernel from x, mean, invstd, weight and bias with ``bn_z`` / ``relu_on``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from . import batch_norm_coef as coef
from ._jit import block_offsets, bn_z, channel_of, channel_offsets, relu_on, select


@triton.jit
def _bn_moments_kernel(x_ptr, part_ptr, S, CS, M, CHUNK, IDX32: tl.constexpr, ACC: tl.constexpr,
                       BLOCK: tl.constexpr):
    """Partial ``(count, mean, M2)`` of elements ``[p CHUNK, (p + 1) CHUNK)`` of channel ``c`` (grid ``C x P``)."""
    c = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    lane = tl.arange(0, BLOCK)
    n = tl.zeros([BLOCK], ACC)
    mean = tl.zeros([BLOCK], ACC)
    m2 = tl.zeros([BLOCK], ACC)
    for j0 in range(0, CHUNK, BLOCK):
        j = p * CHUNK + j0 + lane
        inside = j < M
        x = tl.load(x_ptr + channel_offsets(j, c, S, CS, IDX32), mask=inside, other=0).to(ACC)
        n += inside.to(ACC)
        d = x - mean
        mean += tl.where(inside, d / tl.maximum(n, 1.0), 0.0)
        m2 += tl.where(inside, d * (x - mean), 0.0)
    count = tl.sum(n, axis=0)
    mu = tl.sum(n * mean, axis=0) / tl.maximum(count, 1.0)
    dev = mean - mu
    out = part_ptr + (c * tl.num_programs(1) + p) * 3
    tl.store(out, count)
    tl.store(out + 1, mu)
    tl.store(out + 2, tl.sum(m2, axis=0) + tl.sum(n * dev * dev, axis=0))


@triton.jit
def _bn_fwd_kernel(x_ptr, za_ptr, zc_ptr, y_ptr, numel, S, C, RELU: tl.constexpr, IDX32: tl.constexpr,
                   ACC: tl.constexpr, BLOCK: tl.constexpr):
    """``y = z = a x + c`` or ``relu(z)`` (a selection by ``relu_on(z)``)."""
    offs = block_offsets(BLOCK)
    inside = offs < numel
    c = channel_of(offs, S, C, IDX32)
    x = tl.load(x_ptr + offs, mask=inside, other=0).to(ACC)
    z = bn_z(tl.load(za_ptr + c, mask=inside, other=0), x, tl.load(zc_ptr + c, mask=inside, other=0))
    if RELU:
        z = select(relu_on(z, y_ptr.dtype.element_ty), z)
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _masked_grad(g_ptr, offs, inside, x, za, zc, RELU: tl.constexpr, ACC: tl.constexpr):
    """``g~ = m ? g : 0`` (``g`` unchanged without the fused ReLU)."""
    g = tl.load(g_ptr + offs, mask=inside, other=0).to(ACC)
    if RELU:
        g = select(relu_on(bn_z(za, x, zc), g_ptr.dtype.element_ty), g)
    return g


@triton.jit
def _bn_sums_kernel(x_ptr, g_ptr, u_ptr, mean_ptr, invstd_ptr, za_ptr, zc_ptr, part_ptr, S, CS, M, CHUNK,
                    HAS_G: tl.constexpr, HAS_U: tl.constexpr, RELU: tl.constexpr, IDX32: tl.constexpr,
                    ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1: partial ``(Su, Sux, Sg~, Sg~xh, Sug~)`` of one chunk of channel ``c`` (grid ``C x P``; absent
    operands contribute zeros)."""
    c = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    lane = tl.arange(0, BLOCK)
    mean = tl.load(mean_ptr + c).to(ACC)
    r = tl.load(invstd_ptr + c).to(ACC)
    za = tl.load(za_ptr + c).to(ACC)
    zc = tl.load(zc_ptr + c).to(ACC)
    s_u = tl.zeros([BLOCK], ACC)
    s_ux = tl.zeros([BLOCK], ACC)
    s_g = tl.zeros([BLOCK], ACC)
    s_gx = tl.zeros([BLOCK], ACC)
    s_ug = tl.zeros([BLOCK], ACC)
    for j0 in range(0, CHUNK, BLOCK):
        j = p * CHUNK + j0 + lane
        inside = j < M
        offs = channel_offsets(j, c, S, CS, IDX32)
        x = tl.load(x_ptr + offs, mask=inside, other=0).to(ACC)
        xh = (x - mean) * r
        if HAS_G:
            g = _masked_grad(g_ptr, offs, inside, x, za, zc, RELU, ACC)
            s_g += g
            s_gx += g * xh
        if HAS_U:
            u = tl.load(u_ptr + offs, mask=inside, other=0).to(ACC)
            s_u += u
            s_ux += u * xh
            if HAS_G:
                s_ug += u * g
    out = part_ptr + (c * tl.num_programs(1) + p) * 5
    tl.store(out, tl.sum(s_u, axis=0))
    tl.store(out + 1, tl.sum(s_ux, axis=0))
    tl.store(out + 2, tl.sum(s_g, axis=0))
    tl.store(out + 3, tl.sum(s_gx, axis=0))
    tl.store(out + 4, tl.sum(s_ug, axis=0))


@triton.jit
def _affine_at(k_ptr, c, inside, u, g, xh, HAS_G: tl.constexpr, HAS_U: tl.constexpr):
    """``cu u + cg g~ + cx xh + c0`` with the channel's coefficients ``k[c] = (cu, cg, cx, c0)``."""
    k = k_ptr + c * 4
    v = tl.load(k + 2, mask=inside, other=0) * xh + tl.load(k + 3, mask=inside, other=0)
    if HAS_G:
        v += tl.load(k + 1, mask=inside, other=0) * g
    if HAS_U:
        v += tl.load(k, mask=inside, other=0) * u
    return v


@triton.jit
def _bn_affine_kernel(x_ptr, g_ptr, u_ptr, mean_ptr, invstd_ptr, za_ptr, zc_ptr, k1_ptr, k2_ptr, out1_ptr,
                      out2_ptr, numel, S, C, HAS_G: tl.constexpr, HAS_U: tl.constexpr, G_IN_OUT1: tl.constexpr,
                      RELU: tl.constexpr, MASK_OUT1: tl.constexpr, TWO: tl.constexpr, IDX32: tl.constexpr,
                      ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2: ``out1 = [m *] affine(k1)`` (reading ``g~`` only when ``G_IN_OUT1``: bn_dbwd's ``ggrad`` has no
    ``g~`` term) and, when ``TWO``, ``out2 = affine(k2)``; ``m`` is recomputed when ``RELU``."""
    offs = block_offsets(BLOCK)
    inside = offs < numel
    c = channel_of(offs, S, C, IDX32)
    x = tl.load(x_ptr + offs, mask=inside, other=0).to(ACC)
    xh = (x - tl.load(mean_ptr + c, mask=inside, other=0).to(ACC)) * tl.load(invstd_ptr + c, mask=inside,
                                                                            other=0).to(ACC)
    u = xh  # placeholders for absent operands (their coefficients are not read)
    g = xh
    za = xh
    zc = xh
    if RELU:
        za = tl.load(za_ptr + c, mask=inside, other=0)
        zc = tl.load(zc_ptr + c, mask=inside, other=0)
    if HAS_U:
        u = tl.load(u_ptr + offs, mask=inside, other=0).to(ACC)
    if HAS_G:
        g = _masked_grad(g_ptr, offs, inside, x, za, zc, RELU, ACC)
    v1 = _affine_at(k1_ptr, c, inside, u, g, xh, G_IN_OUT1, HAS_U)
    if RELU and MASK_OUT1:
        v1 = select(relu_on(bn_z(za, x, zc), out1_ptr.dtype.element_ty), v1)
    tl.store(out1_ptr + offs, v1.to(out1_ptr.dtype.element_ty), mask=inside)
    if TWO:
        v2 = _affine_at(k2_ptr, c, inside, u, g, xh, HAS_G, HAS_U)
        tl.store(out2_ptr + offs, v2.to(out2_ptr.dtype.element_ty), mask=inside)


class _Channels:
    """Shape of an ``N x C x S`` input and its per-channel vectors, in float64 and in the compute dtype."""

    def __init__(self, x, mean, invstd, weight, bias):
        self.x = x
        self.C = x.shape[1]
        self.S = 1
        for d in x.shape[2:]:
            self.S *= d
        self.M = x.shape[0] * self.S
        self.acc = _launch.acc_type(x)
        self.idx32 = _launch.index32(x)
        self.stat = _launch.stat_dtype(x)
        self.mean, self.invstd = mean.contiguous(), invstd.contiguous()
        self.r = invstd.to(torch.float64)
        self.gamma = coef._f64(weight, self.r, 1.0)
        a, c = coef.z_coef(mean, invstd, weight, bias)
        self.za, self.zc = a.to(self.stat), c.to(self.stat)  # rounded once to the compute dtype

    def sums(self, g, u, relu):
        """Pass 1: ``C x 5`` float64 sums (:mod:`.batch_norm_coef` columns)."""
        x, C, M = self.x, self.C, self.M
        if M == 0 or (g is None and u is None):
            return torch.zeros((C, 5), dtype=torch.float64, device=x.device)
        block = _launch.REDUCE_BLOCK
        chunk = min(_launch.REDUCE_CHUNK, triton.cdiv(M, block) * block)
        parts = torch.empty((C, triton.cdiv(M, chunk), 5), dtype=self.stat, device=x.device)
        with _launch.device_guard(x):
            _bn_sums_kernel[(C, parts.shape[1])](
                x, x if g is None else g, x if u is None else u, self.mean, self.invstd, self.za, self.zc, parts,
                self.S, C * self.S, M, chunk, HAS_G=g is not None, HAS_U=u is not None, RELU=relu,
                IDX32=self.idx32, ACC=self.acc, BLOCK=block)
        return parts.to(torch.float64).sum(1)

    def affine(self, g, u, k1, k2, relu, mask_out1):
        """Pass 2: ``out1`` from the affine ``k1``, or ``(out1, out2)`` when ``k2`` is given (then ``out1`` has
        no ``g~`` term), in x's dtype; ``out1`` is masked when ``relu`` and ``mask_out1``."""
        x, two = self.x, k2 is not None
        out1 = torch.empty_like(x)
        out2 = torch.empty_like(x) if two else out1
        if x.numel():
            k1 = k1.to(self.stat)
            k2 = k2.to(self.stat) if two else k1
            with _launch.device_guard(x):
                _bn_affine_kernel[(triton.cdiv(x.numel(), _launch.BLOCK),)](
                    x, x if g is None else g, x if u is None else u, self.mean, self.invstd, self.za, self.zc, k1,
                    k2, out1, out2, x.numel(), self.S, self.C, HAS_G=g is not None, HAS_U=u is not None,
                    G_IN_OUT1=g is not None and not two, RELU=relu, MASK_OUT1=mask_out1, TWO=two,
                    IDX32=self.idx32, ACC=self.acc, BLOCK=_launch.BLOCK)
        return (out1, out2) if two else out1


def _moments(x, C, S, M):
    """Training statistics: per-channel mean and biased variance (float64)."""
    block = _launch.REDUCE_BLOCK
    chunk = min(_launch.REDUCE_CHUNK, triton.cdiv(M, block) * block)
    parts = torch.empty((C, triton.cdiv(M, chunk), 3), dtype=_launch.stat_dtype(x), device=x.device)
    with _launch.device_guard(x):
        _bn_moments_kernel[(C, parts.shape[1])](x, parts, S, C * S, M, chunk, IDX32=_launch.index32(x),
                                                 ACC=_launch.acc_type(x), BLOCK=block)
    return coef.moments(parts)


def _check_saved(op, x, mean, invstd, weight, bias, relu, **like):
    _launch.check_bn_input(x, op)
    for name, t in like.items():
        if t is not None:
            _launch.check_like(t, x, op, name)
    _launch.check_stats(x, mean, invstd, op)
    _launch.check_channel(weight, x, op, "weight")
    if relu:
        _launch.check_channel(bias, x, op, "bias")


def bn_fwd(x, weight, bias, running_mean, running_var, training: bool, momentum: float, eps: float, relu: bool):
    """``(y, mean, invstd)``, ``y = z`` or ``relu(z)``, ``z = γ (x - mean) invstd + β``; training: batch mean and
    biased variance, ``running_mean`` / ``running_var`` (if given) updated in place once with the unbiased
    variance; eval: the running statistics."""
    op = "fastjac.triton.bn_fwd"
    _launch.check_bn_input(x, op)
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"),
                    (running_var, "running_var")):
        _launch.check_channel(t, x, op, name)
    if (running_mean is None) != (running_var is None):
        raise RuntimeError(f"{op}: running_mean and running_var must be given together")
    x = x.contiguous()
    C, stat = x.shape[1], _launch.stat_dtype(x)
    M = x.numel() // C if C else 0
    if training:
        if M <= 1:
            raise RuntimeError(f"{op}: Expected more than 1 value per channel when training, got input size "
                               f"{tuple(x.shape)}")
        mean64, var64 = _moments(x, C, x.numel() // (x.shape[0] * C), M)
        mean, var = mean64.to(stat), var64.to(stat)
        invstd = coef.invstd(var, eps)
        if running_mean is not None:
            coef.update_running(running_mean, running_var, mean, var, M, momentum)
    else:
        if running_mean is None:
            raise RuntimeError(f"{op}: running_mean and running_var are required when training=false")
        mean = running_mean.to(stat, copy=True)
        invstd = coef.invstd(running_var.to(stat), eps)
    ch = _Channels(x, mean, invstd, weight, bias)
    y = torch.empty_like(x)
    if x.numel():
        with _launch.device_guard(x):
            _bn_fwd_kernel[(triton.cdiv(x.numel(), _launch.BLOCK),)](
                x, ch.za, ch.zc, y, x.numel(), ch.S, C, RELU=relu, IDX32=ch.idx32, ACC=ch.acc, BLOCK=_launch.BLOCK)
    return y, mean, invstd


def bn_bwd(grad, x, mean, invstd, weight, bias, training: bool, relu: bool):
    """``(gx, gw, gb)``: ``gx = γ r (g~ - Sg/M - xh Sgx/M)`` (training) or ``γ r g~`` (eval), ``gw = Sgx``,
    ``gb = Sg`` (``g~ = m g`` with the recomputed mask when ``relu``)."""
    _check_saved("fastjac.triton.bn_bwd", x, mean, invstd, weight, bias, relu, grad=grad)
    x, g = x.contiguous(), grad.contiguous()
    ch = _Channels(x, mean, invstd, weight, bias if relu else None)
    s = ch.sums(g, None, relu)
    k_gx, gw, gb = coef.bwd_coef(s, ch.M, ch.gamma, ch.r, training)
    return ch.affine(g, None, k_gx, None, relu, False), gw.to(ch.stat), gb.to(ch.stat)


def bn_dbwd(ggx, ggw, ggb, grad, x, mean, invstd, weight, bias, training: bool, relu: bool):
    """``(ggrad, gx, gw)``, the VJP of :func:`bn_bwd` for ``(grad, x, weight)`` with ``u = ggx``, ``p = ggw``,
    ``q = ggb`` (absent ones count as zero); formulas in :func:`.batch_norm_coef.dbwd_coef`."""
    op = "fastjac.triton.bn_dbwd"
    _check_saved(op, x, mean, invstd, weight, bias, relu, grad=grad, ggx=ggx)
    _launch.check_channel(ggw, x, op, "ggw")
    _launch.check_channel(ggb, x, op, "ggb")
    x, g, u = x.contiguous(), grad.contiguous(), _launch.contiguous(ggx)
    ch = _Channels(x, mean, invstd, weight, bias if relu else None)
    s = ch.sums(g, u, relu) if training or u is not None else ch.sums(None, None, relu)
    p, q = coef._f64(ggw, ch.r, 0.0), coef._f64(ggb, ch.r, 0.0)
    k_ggrad, k_gx, gw = coef.dbwd_coef(s, ch.M, ch.gamma, ch.r, p, q, training)
    ggrad, gx = ch.affine(g, u, k_ggrad, k_gx, relu, True)
    return ggrad, gx, gw.to(ch.stat)


def bn_jvp(tx, tw, tb, x, mean, invstd, weight, bias, training: bool, relu: bool):
    """``y_dot``: training ``z_dot = γ r (tx - mean(tx) - xh mean(tx xh)) + tw xh + tb``, eval
    ``γ r tx + tw xh + tb``; times the recomputed mask when ``relu`` (absent tangents count as zero)."""
    op = "fastjac.triton.bn_jvp"
    _check_saved(op, x, mean, invstd, weight, bias, relu, tx=tx)
    _launch.check_channel(tw, x, op, "tw")
    _launch.check_channel(tb, x, op, "tb")
    x, u = x.contiguous(), _launch.contiguous(tx)
    ch = _Channels(x, mean, invstd, weight, bias if relu else None)
    s = ch.sums(None, u, relu) if training else ch.sums(None, None, relu)
    k = coef.jvp_coef(s, ch.M, ch.gamma, ch.r, coef._f64(tw, ch.r, 0.0), coef._f64(tb, ch.r, 0.0), training)
    return ch.affine(None, u, k, None, relu, True)
