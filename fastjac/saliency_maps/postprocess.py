"""Helpers shared by the saliency maps: rescale to [0, 1] and bilinear resize (thesis §3.4.2, ψ of Eq. 3.2),
and the check of integer options."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["positive_int", "rescale_unit", "upsample_to"]


def positive_int(name: str, value) -> int:
    """``value`` if it is a positive int, else a ValueError naming the option ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


def rescale_unit(t: Tensor, dims: Sequence[int]) -> Tensor:
    """``(t − min) / (max − min)`` with min and max taken over ``dims`` (one map per remaining index).

    The linear rescale of thesis §3.4.2: each map then spans exactly [0, 1]. A constant map (zero range, e.g. an
    all-zero map or a 1×1 map) gives 0 — not NaN — so it adds nothing to a sum of maps.
    """
    dims = tuple(dims)
    low = t.amin(dim=dims, keepdim=True)
    span = t.amax(dim=dims, keepdim=True) - low
    return torch.where(span > 0, (t - low) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(t))


def upsample_to(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of ``(N, C, h, w)`` maps to ``size = (H, W)`` (``align_corners=False``); identity when the
    size already matches. Bilinear weights are non-negative, so non-negative maps stay non-negative."""
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
