"""Whether a model's per-sample input gradients can come from its clean pass (:class:`fastjac.ops.FrozenBackward`).

The one-pass frozen backward equals the two-pass route (the recorded batch statistics replayed in a second pass)
exactly when the network is piecewise linear in its input and every batch-statistics BatchNorm is a fused
:mod:`fastjac.nn` one served by the C++ chain (``fastjac/ops/frozen_backward.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..batch_norm_stats import uses_batch_stats
from ..ops import _paths
from .batch_norm import _FusedBatchNormForward

__all__ = ["why_not_one_pass"]

# Leaf modules that are piecewise linear in their input (ReLU masks, pooling indices and dropout masks are
# piecewise constant), besides the fused BatchNorms themselves.
_PIECEWISE_LINEAR_LEAVES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Flatten, nn.Identity, nn.Dropout,
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def why_not_one_pass(model: nn.Module, x: torch.Tensor) -> Optional[str]:
    """None when the one-pass route equals the two-pass one for ``model`` on ``x`` (module docstring), else why
    not: a batch-statistics BatchNorm that is not a fused :mod:`fastjac.nn` one, a call that would take the
    Python chain, or a module not known to be piecewise linear. A module with its own ``forward`` counts when it
    declares ``piecewise_linear = True`` (its forward adds no smooth operation to its submodules')."""
    if not _paths.use_cpp_chain(x):
        return "the call takes the Python chain (fastjac.ops._paths)"
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if uses_batch_stats(module) and not isinstance(module, _FusedBatchNormForward):
                return f"{name or 'model'} is a torch BatchNorm, not a fused fastjac one"
        elif next(module.children(), None) is None:
            if not isinstance(module, _PIECEWISE_LINEAR_LEAVES):
                return f"{name or 'model'} ({type(module).__name__}) is not known to be piecewise linear"
        elif not (isinstance(module, _CONTAINERS) or getattr(type(module), "piecewise_linear", False)):
            return f"{name or 'model'} ({type(module).__name__}) does not declare piecewise_linear = True"
    return None
