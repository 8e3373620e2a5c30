"""Class-conditional samples from a classifier's implicit density model (thesis §5.4.1, §5.5.1, appendix §5.10).

A classifier's logit ``f_i(x)`` is the log-density ``log p(x | y = i)`` of its implicit density model up to the
class' normaliser (thesis §5.3), so ``∇ₓ f_i`` is that model's score and class-conditional samples need only
input-gradients:

* :func:`gradient_ascent`: ``x ← x + α ∇ₓ f_i(x)`` (activity maximisation, Simonyan et al. 2013; thesis
  §5.5.1 "gradient ascent on random inputs", Fig. 5.2): finds modes of the implicit density;
* :func:`langevin`: ``x ← x + (ε/2) ∇ₓ f_i(x) + √ε · z``, ``z ~ N(0, I)`` (Welling & Teh 2011; thesis §5.4.1),
  whose stationary law for small ε is ``∝ exp(f_i(x))``;
* :func:`denoise`: either sampler started from test images plus Gaussian noise (thesis appendix §5.10,
  Fig. 5.8, σ = 0.1) instead of from random inputs;
* :func:`initial_inputs`: the random starting points.

The thesis fixes neither the starting distribution, the number of steps nor the step size; our defaults are
stated in the evaluation options (:mod:`fastjac.evaluation.gan_test`). All functions work in the network's
input space (normalised images), optionally clamp to the valid image range after every step (``low`` /
``high``, see :func:`fastjac.evaluation.images.valid_range`), run the model in eval mode (its mode is restored),
compute no parameter gradients, process the samples in chunks of ``batch_size`` (the result does not depend on
it: every random draw is made for all samples at once), and are deterministic under ``seed``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .model_outputs import check_classes, class_logit_and_grad, eval_mode

__all__ = ["Samples", "initial_inputs", "gradient_ascent", "langevin", "noisy_start", "denoise", "INITS"]

INITS = ("uniform", "normal")


@dataclass
class Samples:
    """Result of a sampler: ``samples`` (N, C, H, W), ``classes`` (N,), and ``logits`` (steps + 1, N): the class
    logit ``f_i`` at the start and after every step."""

    samples: Tensor
    classes: Tensor
    logits: Tensor


def _generator(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an integer, got {seed!r}")
    return torch.Generator().manual_seed(seed)


def _randn(shape, generator: torch.Generator, like: Tensor) -> Tensor:
    """Standard normal draws from a CPU generator (the same numbers on every device), moved to ``like``."""
    return torch.randn(shape, generator=generator, dtype=like.dtype).to(like.device)


def initial_inputs(n: int, shape: tuple, init: str = "uniform", seed: int = 0, low: Optional[Tensor] = None,
                   high: Optional[Tensor] = None, device="cpu") -> Tensor:
    """``n`` random starting inputs of ``shape`` (C, H, W) in the network's input space.

    ``init="uniform"``: uniform between ``low`` and ``high`` (per channel: uniform random images in the valid
    range; default [0, 1]); ``"normal"``: N(0, I) (the normalised data's scale), clamped to [low, high] if given.
    """
    if init not in INITS:
        raise ValueError(f"init: expected one of {list(INITS)}, got {init!r}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected a non-negative integer, got {n!r}")
    g = _generator(seed)
    if init == "uniform":
        u = torch.rand((n,) + tuple(shape), generator=g)
        lo = torch.zeros(()) if low is None else low.cpu()
        hi = torch.ones(()) if high is None else high.cpu()
        return (lo + (hi - lo) * u).to(device)
    x = torch.randn((n,) + tuple(shape), generator=g)
    return _clamp(x, low, high).to(device)


def _clamp(x: Tensor, low: Optional[Tensor], high: Optional[Tensor]) -> Tensor:
    if low is not None:
        x = torch.maximum(x, low.to(x))
    if high is not None:
        x = torch.minimum(x, high.to(x))
    return x


def _check(x: Tensor, classes: Tensor, steps: int, step_size: float, batch_size: Optional[int]) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor (N, ...), got {getattr(x, 'shape', type(x).__name__)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected a non-negative integer, got {steps!r}")
    if not isinstance(step_size, (int, float)) or not step_size > 0:
        raise ValueError(f"step_size: expected a positive number, got {step_size!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size: expected a positive integer or None, got {batch_size!r}")
    return check_classes(classes, x.shape[0])


def _run(model: nn.Module, x: Tensor, classes: Tensor, steps: int, step_size: float, noise: float,
         normalize: bool, low, high, seed: int, batch_size: Optional[int]) -> Samples:
    """The shared loop: ``x ← clamp(x + a·d + b·z)`` with ``d`` the gradient (or, ``normalize``, the gradient
    scaled to RMS 1 per sample), ``a = step_size`` and ``b = noise`` (noise std per step)."""
    g = _generator(seed)
    x = _clamp(x.detach().clone(), low, high)
    n = x.shape[0]
    step = batch_size or max(n, 1)
    chunks = [slice(i, i + step) for i in range(0, n, step)]
    logits = torch.empty(steps + 1, n, dtype=x.dtype)
    with eval_mode(model):
        for t in range(steps + 1):
            z = _randn(x.shape, g, x) if noise and t < steps else None
            for sl in chunks:
                logit, grad = class_logit_and_grad(model, x[sl], classes[sl])
                logits[t, sl] = logit.cpu()
                if t == steps:
                    continue
                if normalize:
                    rms = grad.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12)
                    grad = grad / rms.view(-1, *([1] * (grad.dim() - 1)))
                update = x[sl] + step_size * grad
                if z is not None:
                    update = update + noise * z[sl]
                x[sl] = _clamp(update, low, high)
    return Samples(x, classes, logits)


def gradient_ascent(model: nn.Module, x: Tensor, classes: Tensor, steps: int = 100, step_size: float = 0.1, *,
                    normalize: bool = False, low: Optional[Tensor] = None, high: Optional[Tensor] = None,
                    batch_size: Optional[int] = None) -> Samples:
    """Gradient ascent on the class logit from ``x`` (thesis §5.5.1): ``x ← clamp(x + α ∇ₓ f_i(x))``,
    ``α = step_size``, ``steps`` times; ``normalize``: the step is ``α ∇f / RMS(∇f)`` (every pixel moves about
    α per step whatever the gradient's scale). Deterministic (no randomness)."""
    classes = _check(x, classes, steps, step_size, batch_size)
    return _run(model, x, classes, steps, step_size, 0.0, normalize, low, high, 0, batch_size)


def langevin(model: nn.Module, x: Tensor, classes: Tensor, steps: int = 100, step_size: float = 1e-3, *,
             noise: float = 1.0, low: Optional[Tensor] = None, high: Optional[Tensor] = None, seed: int = 0,
             batch_size: Optional[int] = None) -> Samples:
    """Langevin dynamics on ``p(x | i) ∝ exp(f_i(x))`` (Welling & Teh 2011, thesis §5.4.1):
    ``x ← clamp(x + (ε/2) ∇ₓ f_i(x) + noise · √ε · z)``, ``ε = step_size``, ``z ~ N(0, I)`` drawn with ``seed``.
    ``noise = 1`` is the exact Langevin update; ``noise < 1`` a colder chain (0: gradient ascent with step ε/2)."""
    classes = _check(x, classes, steps, step_size, batch_size)
    if not isinstance(noise, (int, float)) or noise < 0:
        raise ValueError(f"noise: expected a number >= 0, got {noise!r}")
    return _run(model, x, classes, steps, step_size / 2, noise * math.sqrt(step_size), False, low, high, seed,
                batch_size)


def noisy_start(images: Tensor, noise_std: float, seed: int = 0, low: Optional[Tensor] = None,
                high: Optional[Tensor] = None) -> Tensor:
    """``clamp(images + noise_std · n)``, ``n ~ N(0, I)`` drawn with ``seed``: the starting points of
    :func:`denoise` (thesis appendix §5.10)."""
    if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or noise_std < 0:
        raise ValueError(f"noise_std: expected a number >= 0, got {noise_std!r}")
    return _clamp(images + noise_std * _randn(images.shape, _generator(seed), images), low, high)


def denoise(model: nn.Module, images: Tensor, classes: Tensor, noise_std: float = 0.1, sampler: str = "langevin",
            steps: int = 100, step_size: float = 1e-3, *, noise: float = 1.0, normalize: bool = False,
            low: Optional[Tensor] = None, high: Optional[Tensor] = None, seed: int = 0,
            batch_size: Optional[int] = None) -> tuple[Tensor, Samples]:
    """'Denoising' (thesis appendix §5.10, Fig. 5.8): start the sampler from ``images + noise_std · n``,
    ``n ~ N(0, I)`` (drawn with ``seed``; the sampler's own noise with ``seed + 1``), instead of from random
    inputs. Returns ``(noisy_start, samples)``; ``sampler`` is ``"langevin"`` or ``"ascent"``."""
    if sampler not in ("langevin", "ascent"):
        raise ValueError(f"sampler: expected 'langevin' or 'ascent', got {sampler!r}")
    start = noisy_start(images, noise_std, seed, low, high)
    if sampler == "ascent":
        return start, gradient_ascent(model, start, classes, steps, step_size, normalize=normalize, low=low,
                                      high=high, batch_size=batch_size)
    return start, langevin(model, start, classes, steps, step_size, noise=noise, low=low, high=high, seed=seed + 1,
                           batch_size=batch_size)
