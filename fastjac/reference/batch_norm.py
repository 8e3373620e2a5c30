"""Reference BatchNorm (+ fused ReLU) kernels, closed forms of csrc/KERNELS.md in differentiable PyTorch.

In training mode the saved ``mean``/``invstd`` are re-expressed as functions of ``x`` (same values,
derivatives of the batch statistics), so that autograd through these functions gives correct
derivatives of any order; this is what the autograd layer falls back on beyond the second order.

With ``relu`` the ReLU mask ``m = relu_on(z)`` (``z > 0`` or NaN, :func:`.relu.relu_on`) is not saved: every
function recomputes it from ``x`` and the saved ``mean``, ``invstd``, ``weight``, ``bias`` with :func:`_z`, the same
formula the forward uses for ``y`` (``z = a x + c``, ``a = γ invstd``, ``c = β - a mean``), so the two agree exactly. The mask is piecewise
constant: it is computed from the values (no derivatives through it).

Element outputs are in x's dtype (as the kernels'), per-channel ones in the statistics dtype. An empty channel
(an empty batch) has zero per-channel outputs: its means are sums over nothing, 0, not ``mean()``'s NaN
(:func:`_mean`), and the training forward leaves the running statistics alone, as PyTorch does.
"""
import math

import torch

from .relu import relu_on


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _channel(t, x):
    """View a per-channel vector so it broadcasts against ``x`` (N x C x ...)."""
    return t.view((1, -1) + (1,) * (x.dim() - 2))


def _dims(x):
    return [0] + list(range(2, x.dim()))


def _count(x):
    """Values per channel, ``N * prod(spatial)``."""
    return math.prod(x.shape[:1] + x.shape[2:])


def _mean(t, x):
    """Per-channel mean over ``N x spatial`` (keepdim); 0 for an empty batch (a sum over nothing, not NaN)."""
    return t.mean(_dims(x), keepdim=True) if _count(x) else t.sum(_dims(x), keepdim=True)


def _live_stats(x, mean, invstd, training):
    """Saved statistics as values, with the batch statistics' dependence on ``x`` in training mode."""
    mean, invstd = _channel(mean, x), _channel(invstd, x)
    if not training:
        return mean, invstd
    mu = _mean(x, x)
    var = _mean((x - mu) ** 2, x)
    eps = (invstd.detach() ** -2 - var.detach()).clamp_min(0)
    r = (var + eps).rsqrt()
    return mean + (mu - mu.detach()), invstd + (r - r.detach())


def _gamma(weight, x):
    return _channel(weight, x) if weight is not None else 1.0


def _z(x, mean, invstd, weight, bias):
    """The forward output before the ReLU, ``z = a x + c`` per channel in the statistics' dtype, then in x's
    dtype: ``a = γ invstd``, ``c = β - a mean`` (γ = weight or 1, β = bias or 0)."""
    stat = _stat_dtype(x)
    a = invstd if weight is None else weight.to(stat) * invstd
    c = -a * mean if bias is None else bias.to(stat) - a * mean
    return (x.to(stat) * _channel(a, x) + _channel(c, x)).to(x.dtype)


def _mask(x, mean, invstd, weight, bias):
    """The fused ReLU's mask ``relu_on(z)`` (boolean: ``z > 0`` or NaN), from the values only."""
    with torch.no_grad():
        z = _z(x.detach(), mean.detach(), invstd.detach(), None if weight is None else weight.detach(),
               None if bias is None else bias.detach())
        return relu_on(z)


def _select(g, m):
    """``g`` where the mask is set, else 0 (a selection, like the kernels: 0 even where g is not finite)."""
    return torch.where(m, g, torch.zeros_like(g))


def _masked(g, relu, x, mean, invstd, weight, bias):
    return _select(g, _mask(x, mean, invstd, weight, bias)) if relu else g


def bn_fwd(x, weight, bias, running_mean, running_var, training, momentum, eps, relu):
    """``(y, mean, invstd)``, ``y = z`` or ``relu(z)`` (:func:`_z`); running statistics updated in place when
    training."""
    xs = x.to(_stat_dtype(x))
    if training:
        if _count(x):
            mean, var = xs.mean(_dims(x)), xs.var(_dims(x), unbiased=False)
        else:  # an empty batch: no statistics (0, 0), running statistics left alone
            mean = var = xs.new_zeros(x.shape[1])
        if running_mean is not None and _count(x):
            with torch.no_grad():
                count = _count(x)
                running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
                unbiased = var * count / (count - 1)
                running_var.mul_(1 - momentum).add_(momentum * unbiased.to(running_var.dtype))
    else:
        mean, var = running_mean.to(xs.dtype, copy=True), running_var.to(xs.dtype)
    invstd = (var + eps).rsqrt()
    z = _z(x, mean, invstd, weight, bias)
    if relu:
        return _select(z, relu_on(z)), mean, invstd
    return z, mean, invstd


def bn_bwd(grad, x, mean, invstd, weight, bias, training, relu):
    """VJP of ``bn`` for ``(x, weight, bias)``: ``(gx, gw, gb)``; ``bias`` is only read for the mask."""
    g = _masked(grad, relu, x, mean, invstd, weight, bias)
    mu, r = _live_stats(x, mean, invstd, training)
    gamma = _gamma(weight, x)
    xh = (x - mu) * r
    gx = gamma * r * g
    if training:
        gx = gamma * r * (g - _mean(g, x) - xh * _mean(g * xh, x))
    return gx.to(x.dtype), (g * xh).sum(_dims(x)), g.sum(_dims(x))


def bn_dbwd(ggx, ggw, ggb, grad, x, mean, invstd, weight, bias, training, relu):
    """VJP of :func:`bn_bwd` for ``(grad, x, weight)``: ``(ggrad, gx, gw)`` (absent inputs are zero)."""
    m = _mask(x, mean, invstd, weight, bias) if relu else None
    mu, r = _live_stats(x, mean, invstd, training)
    gamma = _gamma(weight, x)
    g = _select(grad, m) if relu else grad
    xh = (x - mu) * r
    u = ggx if ggx is not None else torch.zeros_like(x)
    p = _channel(ggw, x) if ggw is not None else 0.0
    q = _channel(ggb, x) if ggb is not None else 0.0
    count = _count(x)
    if training:
        A, B = _mean(g, x), _mean(g * xh, x)
        U, Ux, UG = _mean(u, x), _mean(u * xh, x), _mean(u * g, x)
        C = UG - U * A - Ux * B
        ggrad = gamma * r * (u - U - xh * Ux) + p * xh + q
        gx = (-gamma * r * r * (B * u + Ux * g + xh * (C - 2 * B * Ux) - B * U - Ux * A)
              + p * r * (g - A - xh * B))
        gw = (r * count * C).reshape(-1) if count else torch.zeros_like(r).reshape(-1)
    else:
        # no xh term without ggw: xh is NaN at a non-finite x, and PyTorch's ggrad does not read it there
        ggrad = gamma * r * u + (p * xh if ggw is not None else 0.0) + q
        gx = p * r * g if ggw is not None else torch.zeros_like(x)
        gw = (r * (u * g).sum(_dims(x), keepdim=True)).reshape(-1) if count else torch.zeros_like(r).reshape(-1)
    ggrad = _select(ggrad, m) if relu else ggrad
    return ggrad.to(x.dtype), (gx * torch.ones_like(x)).to(x.dtype), gw


def bn_jvp(tx, tw, tb, x, mean, invstd, weight, bias, training, relu):
    """Forward-mode JVP of ``bn`` (with fused ReLU when ``relu``) for tangents ``(tx, tw, tb)``."""
    mu, r = _live_stats(x, mean, invstd, training)
    gamma = _gamma(weight, x)
    xh = (x - mu) * r
    out = torch.zeros_like(x)
    if tx is not None:
        out = out + gamma * r * (tx - _mean(tx, x) - xh * _mean(tx * xh, x) if training else tx)
    if tw is not None:
        out = out + _channel(tw, x) * xh
    if tb is not None:
        out = out + _channel(tb, x)
    return _masked(out, relu, x, mean, invstd, weight, bias).to(x.dtype)
