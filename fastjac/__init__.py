"""fastjac: fast, correct Jacobian-based training losses for PyTorch.

Fused second-order differentiable ops (:mod:`fastjac.ops`), drop-in modules (:mod:`fastjac.nn`) and
:func:`convert` to swap them into an existing model. :func:`backends` tells which kernels can run;
:func:`empty_cache` releases the pages the CPU kernels keep for their outputs (:mod:`fastjac.memory`).
:func:`input_jacobian` (exact / forward-mode / finite-difference input-Jacobians), :func:`full_jacobian`
(input- and bias-Jacobian decomposition) and :mod:`fastjac.losses` (Jacobian matching, Jacobian-norm, attention,
attention-Jacobian, bias-Jacobian and score-matching losses) and :func:`hessian_trace` implement the seed papers' losses; :func:`record_batch_norm_stats`
fixes BatchNorm statistics for extra forward passes. :func:`saliency` computes FullGrad and baseline saliency
maps; :mod:`fastjac.evaluation` evaluates them and trained models (thesis Ch. 3 and 5).
"""
from . import losses, nn, ops
from ._backend import backends, current_backend, set_backend, use_backend
from ._convert import convert
from .batch_norm_stats import BatchNormStats, record_batch_norm_stats, uses_batch_stats
from .full_jacobian import FullJacobian, full_jacobian
from .hessian_trace import hessian_trace
from .input_jacobian import InputJacobian, input_jacobian
from .memory import cpu_pool_stats, empty_cache, set_cpu_pool_limit
from .saliency_maps import saliency

__all__ = [
    "BatchNormStats", "FullJacobian", "InputJacobian", "backends", "convert", "cpu_pool_stats", "current_backend",
    "empty_cache", "full_jacobian", "hessian_trace", "input_jacobian", "losses", "nn", "ops",
    "record_batch_norm_stats", "saliency", "set_backend", "set_cpu_pool_limit", "use_backend", "uses_batch_stats",
]
__version__ = "0.1.0"
