"""Triton BatchNorm (+ fused ReLU) kernels: ``bn_fwd``, ``bn_bwd``, ``bn_dbwd``, ``bn_jvp`` of csrc/KERNELS.md.

Inputs are ``N x C x S`` (S = prod(spatial)), reduced per channel over ``M = N S`` elements. Launches per call:

- ``bn_fwd``: training per-channel moments (:func:`_bn_moments_kernel`: one read, per-lane Welford updates, lanes
  merged with Chan et al.'s formula), then :func:`.batch_norm_coef.bn_stats_kernel` (partials merged, ``mean``,
  ``invstd``, running statistics updated in place exactly once with the unbiased variance, or the running
  statistics in eval), then ``y = z = a x + c`` or ``relu(z)`` (:func:`_bn_fwd_kernel`);
- every later kernel: pass 1 per-channel sums (:func:`_bn_sums_kernel`), per-channel coefficients
  (:func:`.batch_norm_coef.bn_coef_kernel`, the formulas of ``csrc/common/batch_norm.h``), pass 2 one affine
  combination per element (:func:`_bn_affine_kernel`).

Reductions are deterministic: each channel is split into fixed chunks (``_launch.REDUCE_CHUNK``) reduced by one
program each into a ``C x P`` buffer whose partials the per-channel kernels add in order; no atomics. With
``relu`` the mask ``m = bn_relu_on(z)`` (``z > 0`` or NaN) is recomputed in every kernel from x, mean, invstd,
weight and bias with the same ``z_coef``, ``bn_z`` and ``bn_relu_on``, so it is the forward's ``y > 0 or NaN`` bit
for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from .batch_norm_coef import BWD, DBWD, JVP, K_COLUMNS, bn_coef_kernel, bn_stats_kernel, channel_z
from ._jit import block_offsets, bn_relu_on, bn_z, channel_of, channel_offsets, div_rn, select


@triton.jit
def _bn_moments_kernel(x_ptr, part_ptr, S, CS, M, CHUNK, IDX32: tl.constexpr, ACC: tl.constexpr,
                       BLOCK: tl.constexpr):
    """Partial ``(count, mean, M2, sum)`` of elements ``[p CHUNK, (p + 1) CHUNK)`` of channel ``c`` (grid ``C x P``;
    the plain sum serves a channel holding inf, :func:`.batch_norm_coef.mean_var`).

    Divisions are IEEE-rounded (``div_rn``; compiled Triton's ``/`` on float32 is approximate), so a constant
    channel gets its exact mean, as in the C++/CUDA kernels (measured on an H100: ``/`` gave 1.2500001 for 1.25)."""
    c = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    lane = tl.arange(0, BLOCK)
    n = tl.zeros([BLOCK], ACC)
    mean = tl.zeros([BLOCK], ACC)
    m2 = tl.zeros([BLOCK], ACC)
    total = tl.zeros([BLOCK], ACC)
    for j0 in range(0, CHUNK, BLOCK):
        j = p * CHUNK + j0 + lane
        inside = j < M
        x = tl.load(x_ptr + channel_offsets(j, c, S, CS, IDX32), mask=inside, other=0).to(ACC)
        total += x
        n += inside.to(ACC)
        d = x - mean
        mean += tl.where(inside, div_rn(d, tl.maximum(n, 1.0), ACC), 0.0)
        m2 += tl.where(inside, d * (x - mean), 0.0)
    count = tl.sum(n, axis=0)
    mu = div_rn(tl.sum(n * mean, axis=0), tl.maximum(count, 1.0), ACC)
    dev = mean - mu
    out = part_ptr + (c * tl.num_programs(1) + p) * 4
    tl.store(out, count)
    tl.store(out + 1, mu)
    tl.store(out + 2, tl.sum(m2, axis=0) + tl.sum(n * dev * dev, axis=0))
    tl.store(out + 3, tl.sum(total, axis=0))


@triton.jit
def _bn_fwd_kernel(x_ptr, k_ptr, y_ptr, numel, S, C, RELU: tl.constexpr, IDX32: tl.constexpr, ACC: tl.constexpr,
                   BLOCK: tl.constexpr):
    """``y = z = a x + c`` or ``relu(z)`` (a selection by ``bn_relu_on(z)``), ``(a, c)`` from the coefficient table."""
    offs = block_offsets(BLOCK)
    inside = offs < numel
    k = k_ptr + channel_of(offs, S, C, IDX32) * 10
    x = tl.load(x_ptr + offs, mask=inside, other=0).to(ACC)
    z = bn_z(tl.load(k + 8, mask=inside, other=0), x, tl.load(k + 9, mask=inside, other=0))
    if RELU:
        z = select(bn_relu_on(z, y_ptr.dtype.element_ty), z)
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _masked_grad(g_ptr, offs, inside, x, za, zc, RELU: tl.constexpr, ACC: tl.constexpr):
    """``g~ = m ? g : 0`` (``g`` unchanged without the fused ReLU)."""
    g = tl.load(g_ptr + offs, mask=inside, other=0).to(ACC)
    if RELU:
        g = select(bn_relu_on(bn_z(za, x, zc), g_ptr.dtype.element_ty), g)
    return g


@triton.jit
def _bn_sums_kernel(x_ptr, g_ptr, u_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, part_ptr, S, CS, M, CHUNK,
                    HAS_G: tl.constexpr, HAS_U: tl.constexpr, RELU: tl.constexpr, HAS_W: tl.constexpr,
                    HAS_B: tl.constexpr, IDX32: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1: partial ``(Su, Sux, Sg~, Sg~xh, Sug~)`` of one chunk of channel ``c`` (grid ``C x P``; absent
    operands contribute zeros)."""
    c = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    lane = tl.arange(0, BLOCK)
    mean = tl.load(mean_ptr + c).to(ACC)
    r = tl.load(invstd_ptr + c).to(ACC)
    cv = tl.full([BLOCK], 0, tl.int64) + c  # the channel in every lane: its (a, c) as in bn_coef_kernel
    za, zc = channel_z(mean_ptr, invstd_ptr, w_ptr, b_ptr, cv, cv >= 0, HAS_W, HAS_B, ACC)
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
def _affine_at(k, inside, u, g, xh, HAS_G: tl.constexpr, HAS_U: tl.constexpr, HAS_XH: tl.constexpr):
    """``cu u + cg g~ + cx xh + c0`` with the coefficients ``(cu, cg, cx, c0)`` at ``k`` (per element; without
    ``HAS_XH`` the ``cx xh`` term is omitted: ``cx`` is 0 there, and ``0 * xh`` would be NaN at a non-finite x)."""
    v = tl.load(k + 3, mask=inside, other=0)
    if HAS_XH:
        v += tl.load(k + 2, mask=inside, other=0) * xh
    if HAS_G:
        v += tl.load(k + 1, mask=inside, other=0) * g
    if HAS_U:
        v += tl.load(k, mask=inside, other=0) * u
    return v


@triton.jit
def _bn_affine_kernel(x_ptr, g_ptr, u_ptr, mean_ptr, invstd_ptr, k_ptr, out1_ptr, out2_ptr, numel, S, C,
                      HAS_G: tl.constexpr, HAS_U: tl.constexpr, G_IN_OUT1: tl.constexpr, RELU: tl.constexpr,
                      MASK_OUT1: tl.constexpr, TWO: tl.constexpr, XH1: tl.constexpr, XH2: tl.constexpr,
                      IDX32: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2: ``out1 = [m *] affine(k1)`` (reading ``g~`` only when ``G_IN_OUT1``: bn_dbwd's ``ggrad`` has no
    ``g~`` term) and, when ``TWO``, ``out2 = affine(k2)``; ``m`` is recomputed when ``RELU``. ``out1`` / ``out2``
    have a ``cx xh`` term only with ``XH1`` / ``XH2``."""
    offs = block_offsets(BLOCK)
    inside = offs < numel
    c = channel_of(offs, S, C, IDX32)
    k = k_ptr + c * 10
    x = tl.load(x_ptr + offs, mask=inside, other=0).to(ACC)
    xh = tl.zeros_like(x)
    if XH1 or XH2:
        xh = (x - tl.load(mean_ptr + c, mask=inside, other=0).to(ACC)) * tl.load(invstd_ptr + c, mask=inside,
                                                                                other=0).to(ACC)
    u = xh  # placeholders for absent operands (their coefficients are not read)
    g = xh
    za = xh
    zc = xh
    if RELU:
        za = tl.load(k + 8, mask=inside, other=0)
        zc = tl.load(k + 9, mask=inside, other=0)
    if HAS_U:
        u = tl.load(u_ptr + offs, mask=inside, other=0).to(ACC)
    if HAS_G:
        g = _masked_grad(g_ptr, offs, inside, x, za, zc, RELU, ACC)
    v1 = _affine_at(k, inside, u, g, xh, G_IN_OUT1, HAS_U, XH1)
    if RELU and MASK_OUT1:
        v1 = select(bn_relu_on(bn_z(za, x, zc), out1_ptr.dtype.element_ty), v1)
    tl.store(out1_ptr + offs, v1.to(out1_ptr.dtype.element_ty), mask=inside)
    if TWO:
        v2 = _affine_at(k + 4, inside, u, g, xh, HAS_G, HAS_U, XH2)
        tl.store(out2_ptr + offs, v2.to(out2_ptr.dtype.element_ty), mask=inside)


def _chunk(M):
    """Elements of one channel per reduction program (a multiple of the reduction block)."""
    block = _launch.REDUCE_BLOCK
    return min(_launch.REDUCE_CHUNK, triton.cdiv(max(M, 1), block) * block)


class _Channels:
    """An ``N x C x S`` input with its saved statistics and optional weight / bias: the launches of pass 1,
    the coefficient kernel and pass 2."""

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
        self.w, self.b = _launch.contiguous(weight), _launch.contiguous(bias)
        self.k = torch.empty((self.C, K_COLUMNS), dtype=self.stat, device=x.device)

    def _ptr(self, t):
        return self.x if t is None else t

    def sums(self, g, u, relu):
        """Pass 1: ``C x P x 5`` partial sums (none when nothing is summed)."""
        x, C, M = self.x, self.C, self.M
        if M == 0 or (g is None and u is None):
            return None
        chunk = _chunk(M)
        parts = torch.empty((C, triton.cdiv(M, chunk), 5), dtype=self.stat, device=x.device)
        with _launch.device_guard(x):
            _bn_sums_kernel[(C, parts.shape[1])](
                x, self._ptr(g), self._ptr(u), self.mean, self.invstd, self._ptr(self.w), self._ptr(self.b), parts,
                self.S, C * self.S, M, chunk, HAS_G=g is not None, HAS_U=u is not None, RELU=relu,
                HAS_W=self.w is not None, HAS_B=self.b is not None, IDX32=self.idx32, ACC=self.acc,
                BLOCK=_launch.REDUCE_BLOCK)
        return parts

    def coefficients(self, kind, parts, training, p=None, q=None):
        """Fill the coefficient table from the partial sums; returns ``(gw, gb)`` (``gb`` only for bn_bwd)."""
        gw = torch.empty(self.C, dtype=self.stat, device=self.x.device)
        gb = torch.empty_like(gw) if kind == BWD else gw
        if self.C:
            with _launch.device_guard(self.x):
                bn_coef_kernel[(triton.cdiv(self.C, _launch.CHANNEL_BLOCK),)](
                    self._ptr(parts), 0 if parts is None else parts.shape[1], self.mean, self.invstd,
                    self._ptr(self.w), self._ptr(self.b), self._ptr(p), self._ptr(q), self.k, gw, gb, self.C, self.M,
                    KIND=kind, TRAINING=training, HAS_W=self.w is not None, HAS_B=self.b is not None,
                    HAS_P=p is not None, HAS_Q=q is not None, ACC=self.acc, BLOCK_C=_launch.CHANNEL_BLOCK)
        return gw, gb

    def affine(self, g, u, two, relu, mask_out1, xh=(True, True)):
        """Pass 2: ``out1`` from ``k1``, or ``(out1, out2)`` from ``k1``, ``k2`` when ``two`` (then ``out1`` has no
        ``g~`` term), in x's dtype; ``out1`` is masked when ``relu`` and ``mask_out1``. ``xh``: whether ``out1``,
        ``out2`` have a ``cx xh`` term; not where ``cx`` is zero in eval mode (gx; ggrad without ``ggw``, y_dot
        without ``tw``), like the C++ plans (csrc/common/batch_norm_element.h), so that a non-finite ``x`` does
        not reach outputs that do not depend on it."""
        x = self.x
        out1 = torch.empty_like(x)
        out2 = torch.empty_like(x) if two else out1
        if x.numel():
            with _launch.device_guard(x):
                _bn_affine_kernel[(triton.cdiv(x.numel(), _launch.BLOCK),)](
                    x, self._ptr(g), self._ptr(u), self.mean, self.invstd, self.k, out1, out2, x.numel(), self.S,
                    self.C, HAS_G=g is not None, HAS_U=u is not None, G_IN_OUT1=g is not None and not two,
                    RELU=relu, MASK_OUT1=mask_out1, TWO=two, XH1=xh[0], XH2=xh[1], IDX32=self.idx32, ACC=self.acc,
                    BLOCK=_launch.BLOCK)
        return (out1, out2) if two else out1


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
    stat = _launch.stat_dtype(x)
    mean = torch.empty(x.shape[1], dtype=stat, device=x.device)
    invstd = torch.empty_like(mean)
    ch = _Channels(x, mean, invstd, weight, bias)
    C, M = ch.C, ch.M
    if training and M == 1:  # an empty batch is allowed, as in PyTorch (no statistics, running ones untouched)
        raise RuntimeError(f"{op}: Expected more than 1 value per channel when training, got input size "
                           f"{tuple(x.shape)}")
    if not training and running_mean is None:
        raise RuntimeError(f"{op}: running_mean and running_var are required when training=false")
    # written in place once by bn_stats_kernel; non-contiguous ones through a contiguous copy
    rm, rv = _launch.contiguous(running_mean), _launch.contiguous(running_var)
    parts = None
    with _launch.device_guard(x):
        if training and M:
            chunk = _chunk(M)
            parts = torch.empty((C, triton.cdiv(M, chunk), 4), dtype=stat, device=x.device)
            _bn_moments_kernel[(C, parts.shape[1])](x, parts, ch.S, C * ch.S, M, chunk, IDX32=ch.idx32, ACC=ch.acc,
                                                     BLOCK=_launch.REDUCE_BLOCK)
        params = torch.tensor([eps, momentum, 1 - momentum], dtype=stat, device=x.device)
        if C:
            bn_stats_kernel[(triton.cdiv(C, _launch.CHANNEL_BLOCK),)](
                x if parts is None else parts, 0 if parts is None else parts.shape[1], ch._ptr(rm), ch._ptr(rv),
                ch._ptr(ch.w), ch._ptr(ch.b), params, mean, invstd, ch.k, C, M, TRAINING=training,
                HAS_RUNNING=rm is not None and M > 0, HAS_W=ch.w is not None, HAS_B=ch.b is not None, ACC=ch.acc,
                BLOCK_C=_launch.CHANNEL_BLOCK)
        y = torch.empty_like(x)
        if x.numel():
            _bn_fwd_kernel[(triton.cdiv(x.numel(), _launch.BLOCK),)](
                x, ch.k, y, x.numel(), ch.S, C, RELU=relu, IDX32=ch.idx32, ACC=ch.acc, BLOCK=_launch.BLOCK)
    for given, used in ((running_mean, rm), (running_var, rv)):
        if training and given is not None and given is not used:
            given.copy_(used)
    return y, mean, invstd


def bn_bwd(grad, x, mean, invstd, weight, bias, training: bool, relu: bool):
    """``(gx, gw, gb)``: ``gx = γ r (g~ - Sg/M - xh Sgx/M)`` (training) or ``γ r g~`` (eval), ``gw = Sgx``,
    ``gb = Sg`` (``g~ = m g`` with the recomputed mask when ``relu``)."""
    _check_saved("fastjac.triton.bn_bwd", x, mean, invstd, weight, bias, relu, grad=grad)
    x, g = x.contiguous(), grad.contiguous()
    ch = _Channels(x, mean, invstd, weight, bias if relu else None)
    gw, gb = ch.coefficients(BWD, ch.sums(g, None, relu), training)
    return ch.affine(g, None, False, relu, False, xh=(training, False)), gw, gb


def bn_dbwd(ggx, ggw, ggb, grad, x, mean, invstd, weight, bias, training: bool, relu: bool):
    """``(ggrad, gx, gw)``, the VJP of :func:`bn_bwd` for ``(grad, x, weight)`` with ``u = ggx``, ``p = ggw``,
    ``q = ggb`` (absent ones count as zero); formulas in :func:`.batch_norm_coef.dbwd_coef`."""
    op = "fastjac.triton.bn_dbwd"
    _check_saved(op, x, mean, invstd, weight, bias, relu, grad=grad, ggx=ggx)
    _launch.check_channel(ggw, x, op, "ggw")
    _launch.check_channel(ggb, x, op, "ggb")
    x, g, u = x.contiguous(), grad.contiguous(), _launch.contiguous(ggx)
    ch = _Channels(x, mean, invstd, weight, bias if relu else None)
    parts = ch.sums(g, u, relu) if training or u is not None else None
    gw, _ = ch.coefficients(DBWD, parts, training, _launch.contiguous(ggw), _launch.contiguous(ggb))
    ggrad, gx = ch.affine(g, u, True, relu, True, xh=(training or ggw is not None, training))
    return ggrad, gx, gw


def bn_jvp(tx, tw, tb, x, mean, invstd, weight, bias, training: bool, relu: bool):
    """``y_dot``: training ``z_dot = γ r (tx - mean(tx) - xh mean(tx xh)) + tw xh + tb``, eval
    ``γ r tx + tw xh + tb``; times the recomputed mask when ``relu`` (absent tangents count as zero)."""
    op = "fastjac.triton.bn_jvp"
    _check_saved(op, x, mean, invstd, weight, bias, relu, tx=tx)
    _launch.check_channel(tw, x, op, "tw")
    _launch.check_channel(tb, x, op, "tb")
    x, u = x.contiguous(), _launch.contiguous(tx)
    ch = _Channels(x, mean, invstd, weight, bias if relu else None)
    ch.coefficients(JVP, ch.sums(None, u, relu) if training else None, training, _launch.contiguous(tw),
                    _launch.contiguous(tb))
    return ch.affine(None, u, False, relu, True, xh=(training or tw is not None, False))
