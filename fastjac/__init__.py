"""fastjac: fast, correct Jacobian-based training losses for PyTorch.

Fused second-order differentiable ops (:mod:`fastjac.ops`), drop-in modules (:mod:`fastjac.nn`) and
:func:`convert` to swap them into an existing model. :func:`backends` tells which kernels can run.
:func:`full_jacobian` decomposes an output into input- and bias-Jacobians; :mod:`fastjac.losses` holds the
Jacobian losses.
"""
from . import losses, nn, ops
from ._backend import backends, current_backend, set_backend, use_backend
from ._convert import convert
from .full_jacobian import FullJacobian, full_jacobian

__all__ = [
    "FullJacobian", "backends", "convert", "current_backend", "full_jacobian", "losses", "nn", "ops",
    "set_backend", "use_backend",
]
__version__ = "0.1.0"
