"""Triton backend: the kernels of ``csrc/KERNELS.md`` as Triton kernels, one module per op (``relu``,
``softplus``, ``batch_norm``), with shared ``@triton.jit`` helpers in ``_jit`` and Python launch helpers in
``_launch``. The functions below have the names, signatures and return types of :mod:`fastjac.reference`.

They run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before this package was first
imported (``INTERPRETED``); :mod:`fastjac._backend` imports it lazily and serves it as the ``triton`` backend.
"""
from ._launch import INTERPRETED
from .batch_norm import bn_bwd, bn_dbwd, bn_fwd, bn_jvp
from .relu import relu_bwd, relu_fwd
from .softplus import softplus_bwd, softplus_dbwd, softplus_fwd

__all__ = [
    "INTERPRETED", "bn_bwd", "bn_dbwd", "bn_fwd", "bn_jvp", "relu_bwd", "relu_fwd",
    "softplus_bwd", "softplus_dbwd", "softplus_fwd",
]
