"""The saliency methods by name (each method's module registers itself) and the target-class check they share."""
from __future__ import annotations

from typing import Callable

from torch import Tensor

__all__ = ["METHODS", "register", "check_target_range"]

METHODS: dict[str, Callable[..., Tensor]] = {}


def register(name: str):
    """Decorator adding a saliency method ``fn(model, x, target, **options) -> (N, H, W)`` under ``name``."""
    def wrap(fn):
        if name in METHODS:
            raise ValueError(f"saliency method {name!r} is registered twice")
        METHODS[name] = fn
        return fn
    return wrap


def check_target_range(target: Tensor, out: Tensor) -> None:
    """``target`` (one class per sample) indexes the columns of the logits ``out`` ``(N, K)``: a ValueError naming
    ``target`` and the valid range ``[0, K)`` otherwise."""
    k = out.shape[1]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= k):
        raise ValueError(f"target: classes must lie in [0, {k}) (the model has {k} outputs), got "
                         f"{sorted(set(target.tolist()))}")
