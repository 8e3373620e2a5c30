"""Integrated gradients (Sundararajan et al. 2017), a baseline of thesis §3.5 (and the example of thesis §3.3).

``IG(x) = (x − x') ⊙ ∫₀¹ ∇ₓf(x' + α(x − x')) dα``, the integral by the midpoint Riemann rule with ``steps``
points ``α_k = (k + ½) / steps``. Completeness: ``Σ IG ≈ f(x) − f(x')`` (exact as ``steps → ∞``; the midpoint
rule's error is O(steps⁻²) for a smooth ``f``, and it is exact for an ``f`` linear on the path).
The map is ``Σ_c |IG|``.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor, nn

from .registry import register
from .gradients import channel_abs_sum, input_gradients
from .postprocess import positive_int

__all__ = ["integrated_gradients_attribution", "integrated_gradients"]


def _baseline_like(baseline, x: Tensor) -> Tensor:
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline))
    if isinstance(baseline, Tensor):
        try:
            return torch.broadcast_to(baseline.to(device=x.device, dtype=x.dtype), x.shape)
        except RuntimeError:
            pass
    raise ValueError(f"baseline: expected a float or a tensor broadcastable to x {tuple(x.shape)} (a per-sample "
                     f"(N, C, H, W) baseline cannot be combined with batch_size), got "
                     f"{tuple(baseline.shape) if isinstance(baseline, Tensor) else repr(baseline)}")


def integrated_gradients_attribution(model: nn.Module, x: Tensor, target: Tensor,
                                     baseline: Union[float, Tensor] = 0.0, steps: int = 25) -> Tensor:
    """The signed integrated gradients ``(N, C, H, W)`` (midpoint rule, ``steps`` gradient evaluations)."""
    steps = positive_int("steps", steps)
    base = _baseline_like(baseline, x)
    delta = x.detach() - base
    total = torch.zeros_like(delta)
    for k in range(steps):
        total += input_gradients(model, base + ((k + 0.5) / steps) * delta, target)
    return delta * total / steps


@register("integrated_gradients")
def integrated_gradients(model: nn.Module, x: Tensor, target: Tensor, baseline: Union[float, Tensor] = 0.0,
                         steps: int = 25) -> Tensor:
    """Integrated-gradients map ``Σ_c |IG|``; options ``baseline`` (float or tensor broadcastable to x, default
    0 = black for un-normalised, the mean image for normalised inputs) and ``steps`` (default 25)."""
    return channel_abs_sum(integrated_gradients_attribution(model, x, target, baseline, steps))
