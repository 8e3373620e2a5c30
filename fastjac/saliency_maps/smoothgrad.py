"""SmoothGrad (Smilkov et al. 2017) and SmoothGrad-squared (Hooker et al. 2019, ROAR), baselines of thesis §3.5.

For ``samples`` noisy copies ``x + ε_s``, ``ε_s ~ N(0, σ²I)`` with ``σ = noise_level · (max(x) − min(x))`` per
image (over all its channels and pixels):

- ``smoothgrad``: ``(1/S) Σ_s Σ_c |∇ₓf(x + ε_s)|`` — the input-gradient map (absolute value, summed over
  channels) of each noisy copy, then the mean. With ``noise_level = 0`` it equals ``input_gradient`` exactly.
- ``smoothgrad_squared``: ``(1/S) Σ_s Σ_c (∇ₓf(x + ε_s))²`` — each estimate squared before averaging (SG-SQ).

The noise comes from the dispatcher's seeded generator, drawn image by image (``(S, C, H, W)`` per image, in
batch order), so the maps are deterministic under ``seed`` and do not depend on ``batch_size``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .registry import register
from .gradients import channel_abs_sum, input_gradients
from .postprocess import positive_int

__all__ = ["smoothgrad", "smoothgrad_squared", "noisy_gradient_average"]


def noisy_gradient_average(model: nn.Module, x: Tensor, target: Tensor, generator: torch.Generator,
                           reduce: Callable[[Tensor], Tensor], samples: int, noise_level: float) -> Tensor:
    """``(1/S) Σ_s reduce(∇ₓf(x + ε_s))`` with the noise of the module docstring; ``reduce``: (N,C,H,W)->(N,H,W)."""
    samples = positive_int("samples", samples)
    if isinstance(noise_level, bool) or not isinstance(noise_level, (int, float)) or not noise_level >= 0:
        raise ValueError(f"noise_level: expected a non-negative float (a fraction of each image's range), "
                         f"got {noise_level!r}")
    x = x.detach()
    flat = x.flatten(1)
    sigma = (noise_level * (flat.amax(1) - flat.amin(1))).view(-1, 1, 1, 1, 1)
    noise = torch.stack([torch.randn((samples,) + tuple(x.shape[1:]), generator=generator, device=x.device,
                                     dtype=x.dtype) for _ in range(x.shape[0])]) * sigma
    total = x.new_zeros((x.shape[0],) + tuple(x.shape[2:]))
    for s in range(samples):
        total += reduce(input_gradients(model, x + noise[:, s], target))
    return total / samples


@register("smoothgrad")
def smoothgrad(model: nn.Module, x: Tensor, target: Tensor, generator: torch.Generator, samples: int = 25,
               noise_level: float = 0.15) -> Tensor:
    """SmoothGrad: mean over noisy copies of ``Σ_c |∇ₓf|`` (options ``samples``, ``noise_level``)."""
    return noisy_gradient_average(model, x, target, generator, channel_abs_sum, samples, noise_level)


@register("smoothgrad_squared")
def smoothgrad_squared(model: nn.Module, x: Tensor, target: Tensor, generator: torch.Generator,
                       samples: int = 25, noise_level: float = 0.15) -> Tensor:
    """SmoothGrad-squared: mean over noisy copies of ``Σ_c (∇ₓf)²`` (options ``samples``, ``noise_level``)."""
    return noisy_gradient_average(model, x, target, generator, lambda g: g.square().sum(1), samples, noise_level)
