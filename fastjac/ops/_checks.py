"""Input validation shared by all fused ops: errors name the argument and what was expected."""
from __future__ import annotations

import torch


def check_float_tensor(t, name: str, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastjac.ops.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"fastjac.ops.{op}: {name} must have a floating-point dtype, got {t.dtype}")


def check_channel_vector(t, name: str, op: str, x: torch.Tensor) -> None:
    """``t`` is None or a floating vector of length C = x.shape[1] on x's device."""
    if t is None:
        return
    check_float_tensor(t, name, op)
    channels = x.shape[1]
    if t.shape != (channels,):
        raise ValueError(
            f"fastjac.ops.{op}: {name} must have shape ({channels},) to match input channels "
            f"x.shape[1] = {channels}, got {tuple(t.shape)}"
        )
    if t.device != x.device:
        raise ValueError(f"fastjac.ops.{op}: {name} is on {t.device} but x is on {x.device}")
