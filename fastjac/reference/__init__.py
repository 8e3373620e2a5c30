"""Pure-PyTorch reference kernels: the semantics every backend must reproduce (see csrc/KERNELS.md).

They are written with differentiable PyTorch operations, so they also serve as the ground truth
for derivatives of any order that have no dedicated kernel.
"""
from .batch_norm import bn_bwd, bn_dbwd, bn_fwd, bn_jvp
from .bitmask import pack_mask, unpack_mask
from .relu import relu_bwd, relu_fwd
from .softplus import softplus_bwd, softplus_dbwd, softplus_fwd

__all__ = [
    "bn_bwd", "bn_dbwd", "bn_fwd", "bn_jvp", "pack_mask", "unpack_mask",
    "relu_bwd", "relu_fwd", "softplus_bwd", "softplus_dbwd", "softplus_fwd",
]
