"""Argument checks on tensor values that need no host synchronisation (safe inside a training step)."""
from __future__ import annotations

from typing import Callable

import torch


def assert_in_range(target: torch.Tensor, k: int, message: Callable[[], str]) -> None:
    """Check ``0 <= target < k`` with ``torch._assert_async``: on the CPU a failure is a ``ValueError`` with
    ``message()``; on an accelerator the check is queued with the kernels, no sync, and a failure surfaces as
    a device-side assert at a later launch (as an out-of-range index does in ``gather`` or ``cross_entropy``)."""
    try:
        torch._assert_async(((target >= 0) & (target < k)).all(), f"target classes must lie in [0, {k})")
    except RuntimeError:
        raise ValueError(message()) from None
