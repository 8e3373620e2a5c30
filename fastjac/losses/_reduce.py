"""Shared helpers of the losses: argument checks, per-sample sums, batch reductions, safe normalisation.

Convention for every loss of :mod:`fastjac.losses`: a per-sample value (the sum over every non-batch
dimension), then ``reduction="mean"`` (default, batch mean), ``"sum"`` or ``"none"`` (the N values).
"""
from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def as_tensor(value, name: str, fn: str) -> Tensor:
    """A tensor, or the ``jacobian`` of a :class:`fastjac.InputJacobian` result."""
    value = getattr(value, "jacobian", value)
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() < 1:
        raise TypeError(f"fastjac.losses.{fn}: {name} must be a floating-point tensor with a batch dim, got {type(value).__name__}")
    return value


def check_same_shape(a: Tensor, b: Tensor, names: tuple[str, str], fn: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"fastjac.losses.{fn}: {names[0]} has shape {tuple(a.shape)} but {names[1]} has shape {tuple(b.shape)}; they must match")


def per_sample_sum(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).sum(1)


def reduce(per_sample: Tensor, reduction: str, fn: str) -> Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"fastjac.losses.{fn}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def safe_norm(t: Tensor, eps: float) -> Tensor:
    """Per-sample 2-norm ``max(||t_n||, eps)``, shaped to broadcast against ``t``.

    Clamping the squared norm (not adding to it) keeps the value exact above ``eps`` and makes the
    derivative at an exactly-zero ``t`` finite: ``sqrt`` is evaluated at ``eps^2 > 0`` and the clamp's
    derivative there is zero.
    """
    squared = per_sample_sum(t * t).clamp_min(eps * eps)
    return squared.sqrt().reshape(-1, *([1] * (t.dim() - 1)))


def normalize(t: Tensor, eps: float) -> Tensor:
    """``t_n / ||t_n||_2`` per sample; an all-zero sample stays zero (finite value and gradient)."""
    return t / safe_norm(t, eps)


def check_eps(eps, fn: str) -> None:
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"fastjac.losses.{fn}: eps must be a positive float, got {eps!r}")
    if torch.finfo(torch.float32).tiny > eps * eps:
        raise ValueError(f"fastjac.losses.{fn}: eps={eps!r} is too small (eps**2 underflows in float32); use eps >= 1e-18")
