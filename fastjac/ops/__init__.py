"""Fused, second-order differentiable ops mirroring ``torch.nn.functional``."""
from .batch_norm import batch_norm, batch_norm_relu
from .perturb import noise, noise_dot, perturb
from .relu import relu
from .softplus import softplus

__all__ = ["batch_norm", "batch_norm_relu", "noise", "noise_dot", "perturb", "relu", "softplus"]
