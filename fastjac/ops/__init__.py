"""Fused, second-order differentiable ops mirroring ``torch.nn.functional``.

Which autograd chain serves a call (C++ or Python) is decided in :mod:`fastjac.ops._paths`;
:class:`FrozenBackward` gives per-sample input gradients of a training-mode network in one pass.
"""
from .batch_norm import batch_norm, batch_norm_relu
from .conv import conv
from .frozen_backward import FrozenBackward
from .perturb import noise, noise_dot, perturb
from .relu import relu
from .softplus import softplus

__all__ = ["FrozenBackward", "batch_norm", "batch_norm_relu", "conv", "noise", "noise_dot", "perturb", "relu", "softplus"]
