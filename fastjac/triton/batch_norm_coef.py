"""Per-channel BatchNorm math of the Triton backend, in PyTorch on C-length vectors: the counterpart of
``csrc/common/batch_norm.h`` (csrc/KERNELS.md, "BatchNorm formulas"). Everything here is computed in float64
(like the CPU backend's ``double``) and rounded once to the kernels' compute dtype by the caller.

Every kernel after the forward is "pass 1: per-channel sums; coefficients (this file); pass 2: one affine
combination per element" ``out = cu u + cg g~ + cx xh + c0``; an affine is a ``C x 4`` tensor of columns
``(cu, cg, cx, c0)``. Sums are a ``C x 5`` tensor of columns ``(Su, Sux, Sg, Sgx, Sug)``: ``u`` is the element's
second-order input (``ggx`` or ``tx``), ``g~`` the (masked) gradient, ``xh = (x - mean) invstd``.
"""
from __future__ import annotations

import torch

SU, SUX, SG, SGX, SUG = range(5)


def _f64(t: torch.Tensor | None, like: torch.Tensor, fill: float) -> torch.Tensor:
    """``t`` in float64, or a vector of ``fill`` like ``like`` when absent."""
    return torch.full_like(like, fill, dtype=torch.float64) if t is None else t.to(torch.float64)


def _affine(cu=0.0, cg=0.0, cx=0.0, c0=0.0, *, like: torch.Tensor) -> torch.Tensor:
    cols = [torch.as_tensor(v, dtype=torch.float64, device=like.device).expand(like.shape) for v in (cu, cg, cx, c0)]
    return torch.stack(cols, dim=1).contiguous()


def moments(partials: torch.Tensor):
    """Merge per-program ``(count, mean, M2)`` partials (``C x P x 3``, Chan et al.'s parallel update) into the
    per-channel mean and biased variance (float64)."""
    n, mu, m2 = partials.to(torch.float64).unbind(-1)
    count = n.sum(1)
    mean = (n * mu).sum(1) / count
    var = (m2.sum(1) + (n * (mu - mean[:, None]) ** 2).sum(1)) / count
    return mean, var


def invstd(var: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(var + eps)`` in ``var``'s dtype."""
    return (var + eps).rsqrt()


def update_running(running_mean, running_var, mean, var, count: int, momentum: float) -> None:
    """In place, once: ``rm = (1 - momentum) rm + momentum mean``, ``rv = (1 - momentum) rv + momentum var M/(M-1)``
    (``mean``, ``var`` in the statistics dtype; the same operations as the reference and the CPU backend)."""
    running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype).mul(momentum))
    running_var.mul_(1 - momentum).add_(var.mul(count).div(count - 1).to(running_var.dtype).mul(momentum))


def z_coef(mean, r, weight, bias):
    """Fused-ReLU / forward coefficients ``a = γ r``, ``c = β - a mean`` (float64): ``z = a x + c``."""
    a = _f64(weight, mean, 1.0) * r.to(torch.float64)
    return a, _f64(bias, mean, 0.0) - a * mean.to(torch.float64)


def bwd_coef(s: torch.Tensor, count: int, gamma, r, training: bool):
    """``bn_bwd``: ``gx = γ r (g~ - Sg/M - xh Sgx/M)`` (training) or ``γ r g~`` (eval); ``gw = Sgx``, ``gb = Sg``.
    Returns ``(gx affine, gw, gb)``."""
    gr = gamma * r
    if training:
        gx = _affine(cg=gr, cx=-gr * s[:, SGX] / count, c0=-gr * s[:, SG] / count, like=r)
    else:
        gx = _affine(cg=gr, like=r)
    own = torch.contiguous_format  # fresh tensors: outputs of a custom op must not alias each other
    return gx, s[:, SGX].clone(memory_format=own), s[:, SG].clone(memory_format=own)


def dbwd_coef(s: torch.Tensor, count: int, gamma, r, p, q, training: bool):
    """``bn_dbwd`` with ``u = ggx``, ``p = ggw``, ``q = ggb``: ``A = Sg/M``, ``B = Sgx/M``, ``U = Su/M``,
    ``Ux = Sux/M``, ``UG = Sug/M``, ``C = UG - U A - Ux B``.

    training: ``ggrad = m (γ r (u - U - xh Ux) + p xh + q)``,
    ``gx = -γ r² (B u + Ux g~ + xh (C - 2 B Ux) - B U - Ux A) + p r (g~ - A - xh B)``, ``gw = r M C``;
    eval: ``ggrad = m (γ r u + p xh + q)``, ``gx = p r g~``, ``gw = r M UG``.
    Returns ``(ggrad affine without the mask, gx affine, gw)``."""
    gr = gamma * r
    if not training:
        return _affine(cu=gr, cx=p, c0=q, like=r), _affine(cg=p * r, like=r), r * s[:, SUG]
    A, B, U, Ux, UG = (s[:, k] / count for k in (SG, SGX, SU, SUX, SUG))
    C = UG - U * A - Ux * B
    gr2, pr = gr * r, p * r
    ggrad = _affine(cu=gr, cx=p - gr * Ux, c0=q - gr * U, like=r)
    gx = _affine(cu=-gr2 * B, cg=-gr2 * Ux + pr, cx=-gr2 * (C - 2 * B * Ux) - pr * B,
                 c0=gr2 * (B * U + Ux * A) - pr * A, like=r)
    return ggrad, gx, r * count * C


def jvp_coef(s: torch.Tensor, count: int, gamma, r, tw, tb, training: bool) -> torch.Tensor:
    """``bn_jvp``: training ``z_dot = γ r (tx - St/M - xh Stx/M) + tw xh + tb``, eval ``γ r tx + tw xh + tb``
    (the mask is applied by pass 2). ``St``, ``Stx`` are the ``u`` sums."""
    gr = gamma * r
    if training:
        return _affine(cu=gr, cx=tw - gr * s[:, SUX] / count, c0=tb - gr * s[:, SU] / count, like=r)
    return _affine(cu=gr, cx=tw, c0=tb, like=r)
