"""Reference Softplus kernels, matching ``torch.nn.functional.softplus`` including its threshold.

``y = log1p(exp(beta x)) / beta`` where ``beta x <= threshold``, else ``y = x``;
``d1 = sigmoid(beta x)``, ``d2 = beta d1 (1 - d1)`` on the smooth branch, ``d1 = 1``, ``d2 = 0`` on the linear one.
"""
import torch


def _derivatives(x, beta, threshold):
    linear = x * beta > threshold
    s = torch.sigmoid(x * beta)
    d1 = torch.where(linear, torch.ones_like(s), s)
    d2 = torch.where(linear, torch.zeros_like(s), beta * s * (1 - s))
    return d1, d2


def softplus_fwd(x: torch.Tensor, beta: float, threshold: float) -> torch.Tensor:
    """Softplus forward."""
    smooth = torch.log1p(torch.exp(x * beta)) / beta
    return torch.where(x * beta > threshold, x, smooth)


def softplus_bwd(grad, x, beta: float, threshold: float) -> torch.Tensor:
    """VJP ``grad * d1(x)``; also the forward-mode JVP with ``grad`` as tangent."""
    return grad * _derivatives(x, beta, threshold)[0]


def softplus_dbwd(ggrad, grad, x, beta: float, threshold: float):
    """VJP of :func:`softplus_bwd`: ``(ggrad * d1, ggrad * grad * d2)`` for ``(grad, x)``."""
    d1, d2 = _derivatives(x, beta, threshold)
    return ggrad * d1, ggrad * grad * d2
