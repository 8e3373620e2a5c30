"""Gradient saliency baselines and the random baseline (thesis §3.5).

Channel reduction, shared by every gradient-based map here: the absolute value summed over channels.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import check_target_range, register

__all__ = ["input_gradients", "channel_abs_sum"]


def input_gradients(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """``∇ₓ f_target(x)`` per sample (each sample's own logit; samples of a batch are independent in eval mode)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = model(x)
        if out.dim() != 2:
            raise ValueError(f"model: expected logits of shape (N, K), got {tuple(out.shape)}")
        check_target_range(target, out)
        (grad,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), x)
    return grad


def channel_abs_sum(t: Tensor) -> Tensor:
    """``Σ_c |t_c|``: ``(N, C, H, W)`` -> ``(N, H, W)``."""
    return t.abs().sum(1)


@register("input_gradient")
def input_gradient(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Input-gradient saliency (Simonyan et al. 2013): ``Σ_c |∇ₓ f|``."""
    return channel_abs_sum(input_gradients(model, x, target))


@register("input_x_gradient")
def input_x_gradient(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Input ⊙ gradient: ``Σ_c |x ⊙ ∇ₓ f|`` (the input-Jacobian term of the full-Jacobian, thesis Eq. 3.1)."""
    return channel_abs_sum(x * input_gradients(model, x, target))


@register("random")
def random(model: nn.Module, x: Tensor, target: Tensor, generator: torch.Generator) -> Tensor:
    """Uniform random maps: the chance baseline of every evaluation (thesis §3.5)."""
    return torch.rand((x.shape[0],) + tuple(x.shape[2:]), generator=generator, device=x.device, dtype=x.dtype)
