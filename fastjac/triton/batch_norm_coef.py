"""Per-channel BatchNorm math of the Triton backend: the counterpart of ``csrc/common/batch_norm.h``
(csrc/KERNELS.md, "BatchNorm formulas"), as ``@triton.jit`` functions plus the two per-channel kernels that
apply them (one program per block of channels, one launch per op call). Computed in the kernels' compute dtype
(float32, float64 for float64 inputs; the CPU backend uses double).

Every kernel after the forward is "pass 1: per-channel sums; coefficients (here); pass 2: one affine combination
per element" ``out = cu u + cg g~ + cx xh + c0``. Pass 1 leaves ``P`` partial sums per channel, in the order
``(Su, Sux, Sg, Sgx, Sug)`` (``u``: the element's second-order input ``ggx`` or ``tx``; ``g~``: the masked
gradient; ``xh = (x - mean) invstd``), added here in a fixed order. The coefficient table has 10 columns per
channel: ``k1 = (cu, cg, cx, c0)``, ``k2`` (the same for bn_dbwd's second output) and the fused ReLU's
``(a, c)`` of ``z = a x + c``.
"""
import triton
import triton.language as tl

from ._jit import block_offsets, div_rn

K_COLUMNS = 10  # k1 (4), k2 (4), za, zc
BWD, DBWD, JVP = 0, 1, 2


@triton.jit
def z_coef(mean, r, gamma, beta):
    """``a = γ r``, ``c = β - a mean`` (one fused multiply-add) of ``z = a x + c``."""
    a = gamma * r
    return a, tl.fma(-a, mean, beta)


@triton.jit
def load_or(ptr, c, inside, fill, PRESENT: tl.constexpr, ACC: tl.constexpr):
    """``ptr[c]`` in ``ACC``, or ``fill`` where the optional per-channel vector is absent."""
    v = tl.full(c.shape, fill, ACC)
    if PRESENT:
        v = tl.load(ptr + c, mask=inside, other=fill).to(ACC)
    return v


@triton.jit
def channel_z(mean_ptr, invstd_ptr, w_ptr, b_ptr, c, inside, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
              ACC: tl.constexpr):
    """The fused ReLU's ``(a, c)`` of channels ``c`` from the saved statistics, weight (γ = 1 when absent) and
    bias (β = 0)."""
    mean = tl.load(mean_ptr + c, mask=inside, other=0).to(ACC)
    r = tl.load(invstd_ptr + c, mask=inside, other=0).to(ACC)
    return z_coef(mean, r, load_or(w_ptr, c, inside, 1.0, HAS_W, ACC), load_or(b_ptr, c, inside, 0.0, HAS_B, ACC))


@triton.jit
def bwd_coef(sg, sgx, count, gamma, r, TRAINING: tl.constexpr):
    """``bn_bwd``: ``gx = γ r (g~ - Sg/M - xh Sgx/M)`` (training) or ``γ r g~`` (eval): ``(cg, cx, c0)``;
    ``gw = Sgx``, ``gb = Sg``."""
    gr = gamma * r
    cx = tl.zeros_like(gr)
    c0 = tl.zeros_like(gr)
    if TRAINING:
        cx = -gr * sgx / count
        c0 = -gr * sg / count
    return gr, cx, c0


@triton.jit
def dbwd_coef(su, sux, sg, sgx, sug, count, gamma, r, p, q, TRAINING: tl.constexpr):
    """``bn_dbwd`` with ``u = ggx``, ``p = ggw``, ``q = ggb``: ``A = Sg/M``, ``B = Sgx/M``, ``U = Su/M``,
    ``Ux = Sux/M``, ``UG = Sug/M``, ``C = UG - U A - Ux B``.

    training: ``ggrad = m (γ r (u - U - xh Ux) + p xh + q)``,
    ``gx = -γ r² (B u + Ux g~ + xh (C - 2 B Ux) - B U - Ux A) + p r (g~ - A - xh B)``, ``gw = r M C``;
    eval: ``ggrad = m (γ r u + p xh + q)``, ``gx = p r g~``, ``gw = r M UG``.
    Returns ggrad's ``(cu, cx, c0)`` (without the mask), gx's ``(cu, cg, cx, c0)`` and ``gw``."""
    gr = gamma * r
    zero = tl.zeros_like(gr)
    ggrad_cx = p
    ggrad_c0 = q
    gx_cu = zero
    gx_cg = p * r
    gx_cx = zero
    gx_c0 = zero
    gw = r * sug
    if TRAINING:
        A = sg / count
        B = sgx / count
        U = su / count
        Ux = sux / count
        C = sug / count - U * A - Ux * B
        gr2 = gr * r
        pr = p * r
        ggrad_cx = p - gr * Ux
        ggrad_c0 = q - gr * U
        gx_cu = -gr2 * B
        gx_cg = pr - gr2 * Ux
        gx_cx = -gr2 * (C - 2.0 * B * Ux) - pr * B
        gx_c0 = gr2 * (B * U + Ux * A) - pr * A
        gw = r * count * C
    gw = tl.where(count > 0, gw, 0.0)  # an empty channel: a sum over nothing (C is 0 / 0)
    return gr, ggrad_cx, ggrad_c0, gx_cu, gx_cg, gx_cx, gx_c0, gw


@triton.jit
def jvp_coef(su, sux, count, gamma, r, tw, tb, TRAINING: tl.constexpr):
    """``bn_jvp``: training ``z_dot = γ r (tx - St/M - xh Stx/M) + tw xh + tb``, eval ``γ r tx + tw xh + tb``
    (``St``, ``Stx``: the ``u`` sums; the mask is applied by pass 2): ``(cu, cx, c0)``."""
    gr = gamma * r
    cx = tw
    c0 = tb
    if TRAINING:
        cx = tw - gr * sux / count
        c0 = tb - gr * su / count
    return gr, cx, c0


@triton.jit
def mean_var(n, mean, m2, total, ACC: tl.constexpr):
    """``bn_mean_var`` of csrc/common/batch_norm.h: ``(mean, M2 / n)`` from Chan's merged moments, but where the
    merged mean is not finite (the channel holds inf or NaN: Welford's update gives inf - inf = NaN for +inf among
    finite values) PyTorch's ``sum / n`` and a NaN variance; ``(0, 0)`` for an empty channel."""
    finite = (mean - mean) == 0
    n1 = tl.maximum(n, 1.0)
    mean = tl.where(finite, mean, div_rn(total, n1, ACC))
    var = tl.where(finite, div_rn(m2, n1, ACC), float("nan"))
    return mean, var


@triton.jit
def _store4(k, inside, cu, cg, cx, c0):
    tl.store(k, cu, mask=inside)
    tl.store(k + 1, cg, mask=inside)
    tl.store(k + 2, cx, mask=inside)
    tl.store(k + 3, c0, mask=inside)


@triton.jit
def bn_coef_kernel(part_ptr, P, mean_ptr, invstd_ptr, w_ptr, b_ptr, p_ptr, q_ptr, k_ptr, gw_ptr, gb_ptr, C, M,
                   KIND: tl.constexpr, TRAINING: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   HAS_P: tl.constexpr, HAS_Q: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """Coefficients of ``bn_bwd`` (``KIND`` 0; writes ``gw``, ``gb``), ``bn_dbwd`` (1; ``p``, ``q`` = ggw, ggb;
    writes ``gw``) or ``bn_jvp`` (2; ``p``, ``q`` = tw, tb) for a block of channels, from the ``P`` partial sums
    of pass 1 (``P = 0``: all sums zero)."""
    c = block_offsets(BLOCK_C)
    inside = c < C
    su = tl.zeros([BLOCK_C], ACC)
    sux = tl.zeros([BLOCK_C], ACC)
    sg = tl.zeros([BLOCK_C], ACC)
    sgx = tl.zeros([BLOCK_C], ACC)
    sug = tl.zeros([BLOCK_C], ACC)
    for i in range(0, P):
        s = part_ptr + (c * P + i) * 5
        su += tl.load(s, mask=inside, other=0).to(ACC)
        sux += tl.load(s + 1, mask=inside, other=0).to(ACC)
        sg += tl.load(s + 2, mask=inside, other=0).to(ACC)
        sgx += tl.load(s + 3, mask=inside, other=0).to(ACC)
        sug += tl.load(s + 4, mask=inside, other=0).to(ACC)
    count = tl.zeros([BLOCK_C], ACC) + M  # (an int argument equal to 1 arrives as a constexpr)
    r = tl.load(invstd_ptr + c, mask=inside, other=0).to(ACC)
    gamma = load_or(w_ptr, c, inside, 1.0, HAS_W, ACC)
    p = load_or(p_ptr, c, inside, 0.0, HAS_P, ACC)
    q = load_or(q_ptr, c, inside, 0.0, HAS_Q, ACC)
    k = k_ptr + c * 10
    zero = tl.zeros_like(r)
    if KIND == 0:
        cg, cx, c0 = bwd_coef(sg, sgx, count, gamma, r, TRAINING)
        _store4(k, inside, zero, cg, cx, c0)
        tl.store(gw_ptr + c, sgx, mask=inside)
        tl.store(gb_ptr + c, sg, mask=inside)
    elif KIND == 1:
        ggrad_cu, ggrad_cx, ggrad_c0, gx_cu, gx_cg, gx_cx, gx_c0, gw = dbwd_coef(su, sux, sg, sgx, sug, count, gamma,
                                                                                r, p, q, TRAINING)
        _store4(k, inside, ggrad_cu, zero, ggrad_cx, ggrad_c0)
        _store4(k + 4, inside, gx_cu, gx_cg, gx_cx, gx_c0)
        tl.store(gw_ptr + c, gw, mask=inside)
    else:
        cu, cx, c0 = jvp_coef(su, sux, count, gamma, r, p, q, TRAINING)
        _store4(k, inside, cu, zero, cx, c0)
    za, zc = channel_z(mean_ptr, invstd_ptr, w_ptr, b_ptr, c, inside, HAS_W, HAS_B, ACC)
    tl.store(k + 8, za, mask=inside)
    tl.store(k + 9, zc, mask=inside)


@triton.jit
def bn_stats_kernel(part_ptr, P, rm_ptr, rv_ptr, w_ptr, b_ptr, params_ptr, mean_ptr, invstd_ptr, k_ptr, C, M,
                    TRAINING: tl.constexpr, HAS_RUNNING: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """bn_fwd's statistics for a block of channels. Training: merge the ``P`` partial ``(count, mean, M2, sum)`` in
    order (Chan et al.), biased ``var = M2 / M`` (:func:`mean_var`; the caller passes no running statistics for an
    empty batch, which leaves them alone); running statistics updated in place,
    ``rm = (1 - momentum) rm + momentum mean``, ``rv = (1 - momentum) rv + momentum var M / (M - 1)``.
    Eval: ``mean = rm``, ``var = rv``. Writes ``mean``, ``invstd = 1 / sqrt(var + eps)`` and the ``(a, c)`` of
    ``z = a x + c`` (columns 8, 9 of the coefficient table). ``params = (eps, momentum, 1 - momentum)``."""
    c = block_offsets(BLOCK_C)
    inside = c < C
    eps = tl.load(params_ptr).to(ACC)
    if TRAINING:
        n = tl.zeros([BLOCK_C], ACC)
        mean = tl.zeros([BLOCK_C], ACC)
        m2 = tl.zeros([BLOCK_C], ACC)
        total_sum = tl.zeros([BLOCK_C], ACC)
        for i in range(0, P):
            s = part_ptr + (c * P + i) * 4
            nb = tl.load(s, mask=inside, other=0).to(ACC)
            total = n + nb
            frac = div_rn(nb, tl.maximum(total, 1.0), ACC)
            delta = tl.load(s + 1, mask=inside, other=0).to(ACC) - mean
            mean += delta * frac
            m2 += tl.load(s + 2, mask=inside, other=0).to(ACC) + delta * delta * n * frac
            total_sum += tl.load(s + 3, mask=inside, other=0).to(ACC)
            n = total
        mean, var = mean_var(n, mean, m2, total_sum, ACC)
        if HAS_RUNNING:
            momentum = tl.load(params_ptr + 1).to(ACC)
            keep = tl.load(params_ptr + 2).to(ACC)
            count = tl.zeros([BLOCK_C], ACC) + M
            rm = tl.load(rm_ptr + c, mask=inside, other=0).to(ACC)
            rv = tl.load(rv_ptr + c, mask=inside, other=0).to(ACC)
            tl.store(rm_ptr + c, (rm * keep + mean * momentum).to(rm_ptr.dtype.element_ty), mask=inside)
            tl.store(rv_ptr + c, (rv * keep + var * count / (count - 1.0) * momentum).to(rv_ptr.dtype.element_ty),
                     mask=inside)
    else:
        mean = tl.load(rm_ptr + c, mask=inside, other=0).to(ACC)
        var = tl.load(rv_ptr + c, mask=inside, other=1).to(ACC)
    r = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + c, mean, mask=inside)
    tl.store(invstd_ptr + c, r, mask=inside)
    za, zc = z_coef(mean, r, load_or(w_ptr, c, inside, 1.0, HAS_W, ACC), load_or(b_ptr, c, inside, 0.0, HAS_B, ACC))
    tl.store(k_ptr + c * 10 + 8, za, mask=inside)
    tl.store(k_ptr + c * 10 + 9, zc, mask=inside)
