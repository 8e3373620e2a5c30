"""fastjac: fast, correct Jacobian-based training losses for PyTorch.

Fused second-order differentiable ops (:mod:`fastjac.ops`), drop-in modules (:mod:`fastjac.nn`) and
:func:`convert` to swap them into an existing model. :func:`backends` tells which kernels can run.
"""
from . import nn, ops
from ._backend import backends, current_backend, set_backend, use_backend
from ._convert import convert
from .hessian_trace import hessian_trace

__all__ = ["backends", "convert", "current_backend", "hessian_trace", "nn", "ops", "set_backend", "use_backend"]
__version__ = "0.1.0"
