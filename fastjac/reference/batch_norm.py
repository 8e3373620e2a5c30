"""Reference BatchNorm (+ fused ReLU) kernels, closed forms of csrc/KERNELS.md in differentiable PyTorch.

In training mode the saved ``mean``/``invstd`` are re-expressed as functions of ``x`` (same values,
derivatives of the batch statistics), so that autograd through these functions gives correct
derivatives of any order; this is what the autograd layer falls back on beyond the second order.
"""
import torch

from .bitmask import pack_mask, unpack_mask


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _channel(t, x):
    """View a per-channel vector so it broadcasts against ``x`` (N x C x ...)."""
    return t.view((1, -1) + (1,) * (x.dim() - 2))


def _dims(x):
    return [0] + list(range(2, x.dim()))


def _live_stats(x, mean, invstd, training):
    """Saved statistics as values, with the batch statistics' dependence on ``x`` in training mode."""
    mean, invstd = _channel(mean, x), _channel(invstd, x)
    if not training:
        return mean, invstd
    mu = x.mean(_dims(x), keepdim=True)
    var = ((x - mu) ** 2).mean(_dims(x), keepdim=True)
    eps = (invstd.detach() ** -2 - var.detach()).clamp_min(0)
    r = (var + eps).rsqrt()
    return mean + (mu - mu.detach()), invstd + (r - r.detach())


def _gamma(weight, x):
    return _channel(weight, x) if weight is not None else 1.0


def _masked(g, mask, relu, x):
    return g * unpack_mask(mask, x.shape) if relu else g


def _mean(t, x):
    return t.mean(_dims(x), keepdim=True)


def bn_fwd(x, weight, bias, running_mean, running_var, training, momentum, eps, relu):
    """``(y, mean, invstd, mask)``; running statistics updated in place when training."""
    xs = x.to(_stat_dtype(x))
    if training:
        mean = xs.mean(_dims(x))
        var = xs.var(_dims(x), unbiased=False)
        if running_mean is not None:
            with torch.no_grad():
                count = x.numel() // x.shape[1]
                running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
                unbiased = var * count / (count - 1)
                running_var.mul_(1 - momentum).add_(momentum * unbiased.to(running_var.dtype))
    else:
        mean, var = running_mean.to(xs.dtype, copy=True), running_var.to(xs.dtype)
    invstd = (var + eps).rsqrt()
    z = (xs - _channel(mean, x)) * _channel(invstd, x) * _gamma(weight, x)
    if bias is not None:
        z = z + _channel(bias, x)
    z = z.to(x.dtype)
    if relu:
        positive = z > 0
        return torch.where(positive, z, torch.zeros_like(z)), mean, invstd, pack_mask(positive)
    return z, mean, invstd, torch.empty(0, dtype=torch.uint8, device=x.device)


def bn_bwd(grad, x, mean, invstd, weight, mask, training, relu):
    """VJP of ``bn`` for ``(x, weight, bias)``: ``(gx, gw, gb)``."""
    mu, r = _live_stats(x, mean, invstd, training)
    gamma = _gamma(weight, x)
    g = _masked(grad, mask, relu, x)
    xh = (x - mu) * r
    gx = gamma * r * g
    if training:
        gx = gamma * r * (g - _mean(g, x) - xh * _mean(g * xh, x))
    return gx, (g * xh).sum(_dims(x)), g.sum(_dims(x))


def bn_dbwd(ggx, ggw, ggb, grad, x, mean, invstd, weight, mask, training, relu):
    """VJP of :func:`bn_bwd` for ``(grad, x, weight)``: ``(ggrad, gx, gw)`` (absent inputs are zero)."""
    mu, r = _live_stats(x, mean, invstd, training)
    gamma = _gamma(weight, x)
    g = _masked(grad, mask, relu, x)
    xh = (x - mu) * r
    u = ggx if ggx is not None else torch.zeros_like(x)
    p = _channel(ggw, x) if ggw is not None else 0.0
    q = _channel(ggb, x) if ggb is not None else 0.0
    count = x.numel() // x.shape[1]
    if training:
        A, B = _mean(g, x), _mean(g * xh, x)
        U, Ux, UG = _mean(u, x), _mean(u * xh, x), _mean(u * g, x)
        C = UG - U * A - Ux * B
        ggrad = gamma * r * (u - U - xh * Ux) + p * xh + q
        gx = (-gamma * r * r * (B * u + Ux * g + xh * (C - 2 * B * Ux) - B * U - Ux * A)
              + p * r * (g - A - xh * B))
        gw = (r * count * C).reshape(-1)
    else:
        ggrad = gamma * r * u + p * xh + q
        gx = p * r * g
        gw = (r * count * _mean(u * g, x)).reshape(-1)
    ggrad = _masked(ggrad, mask, relu, x)
    return ggrad, gx * torch.ones_like(x), gw


def bn_jvp(tx, tw, tb, x, mean, invstd, weight, mask, training, relu):
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
    return _masked(out, mask, relu, x)
