"""Fused Softplus matching ``F.softplus`` (threshold branch included), differentiable to any order.

``y = log1p(exp(beta x)) / beta`` (``x`` where ``beta x > threshold``). Chain: ``fastjac::softplus`` ->
``fastjac::softplus_backward`` (``g * sigmoid(beta x)``) -> ``fastjac::softplus_double_backward``
(``(gg * d1, gg * g * d2)``, ``d2 = beta s (1 - s)``), all fused kernels; third and higher orders
differentiate the reference formulas. That is the Python chain; the C++ chain (``csrc/autograd/softplus.cpp``)
runs ``fastjac::softplus_fwd`` -> ``softplus_bwd`` -> ``softplus_dbwd`` -> ``softplus_dbwd_backward`` (the
reference VJP registered below). :mod:`fastjac.ops._paths` says which serves a call.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, reference
from .._autograd import differentiable, reference_links, save_inputs, saved_inputs
from ._checks import check_float_tensor
from . import _vmap
from ._paths import cpp_entry, use_cpp_chain
from ._third_order import register_reference_vjp


def _like(t):
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


_cpp_softplus = cpp_entry("softplus")  # the C++ chain's entry


@torch.library.custom_op("fastjac::softplus", mutates_args=())
def _softplus_op(x: Tensor, beta: float, threshold: float) -> Tensor:
    return _backend.kernels(x.device).softplus_fwd(x.contiguous(), beta, threshold)


@torch.library.custom_op("fastjac::softplus_backward", mutates_args=())
def _softplus_backward_op(grad: Tensor, x: Tensor, beta: float, threshold: float) -> Tensor:
    return _backend.kernels(x.device).softplus_bwd(grad.contiguous(), x.contiguous(), beta, threshold)


@torch.library.custom_op("fastjac::softplus_double_backward", mutates_args=())
def _softplus_double_backward_op(
    ggrad: Tensor, grad: Tensor, x: Tensor, beta: float, threshold: float
) -> tuple[Tensor, Tensor]:
    k = _backend.kernels(x.device)
    return k.softplus_dbwd(ggrad.contiguous(), grad.contiguous(), x.contiguous(), beta, threshold)


_softplus_op.register_fake(lambda x, beta, threshold: _like(x))
_softplus_backward_op.register_fake(lambda grad, x, beta, threshold: _like(x))
_softplus_double_backward_op.register_fake(lambda ggrad, grad, x, beta, threshold: (_like(x), _like(x)))


# --- level 1: softplus -------------------------------------------------------------------------
def _softplus_vjp(ctx, grad):
    x, beta, threshold = saved_inputs(ctx)
    return (None if grad is None else softplus_backward(grad, x, beta, threshold)), None, None


def _softplus_jvp(ctx, tx, _tb, _tt):
    x, beta, threshold = saved_inputs(ctx)
    return softplus_backward(tx, x, beta, threshold)


# --- level 2: softplus_backward(grad, x) -------------------------------------------------------
def _softplus_backward_vjp(ctx, ggrad):
    if ggrad is None:
        return None, None, None, None
    grad, x, beta, threshold = saved_inputs(ctx)
    g_grad, g_x = softplus_double_backward(ggrad, grad, x, beta, threshold)
    return g_grad, g_x, None, None


def _softplus_backward_jvp(ctx, tgrad, tx, _tb, _tt):
    grad, x, beta, threshold = saved_inputs(ctx)
    out = None
    if tgrad is not None:
        out = softplus_backward(tgrad, x, beta, threshold)
    if tx is not None:
        # d/dx (g d1(x)) . tx = g d2 tx: the x-output of the double backward with ggrad = tx
        term = softplus_double_backward(tx, grad, x, beta, threshold)[1]
        out = term if out is None else out + term
    return out


_dbwd_vjp, _dbwd_jvp = reference_links(reference.softplus_dbwd)  # level 3 and beyond
register_reference_vjp("softplus_dbwd_backward", reference.softplus_dbwd, num_grads=2, differentiable=(0, 1, 2))
_softplus = differentiable(
    _softplus_op, setup_context=save_inputs, backward=_softplus_vjp, jvp=_softplus_jvp, vmap=_vmap.elementwise
)
_softplus_backward = differentiable(
    _softplus_backward_op, setup_context=save_inputs, backward=_softplus_backward_vjp, jvp=_softplus_backward_jvp,
    vmap=_vmap.linear_in_first,
)
_softplus_double_backward = differentiable(
    _softplus_double_backward_op, setup_context=save_inputs, backward=_dbwd_vjp, jvp=_dbwd_jvp, vmap=_vmap.elementwise
)


def softplus_backward(grad: Tensor, x: Tensor, beta: float, threshold: float) -> Tensor:
    """VJP of softplus: ``grad * sigmoid(beta x)`` (``grad`` on the linear branch)."""
    return _softplus_backward(grad.contiguous(), x, float(beta), float(threshold))


def softplus_double_backward(ggrad: Tensor, grad: Tensor, x: Tensor, beta: float, threshold: float):
    """VJP of :func:`softplus_backward` for ``(grad, x)``: ``(ggrad * d1, ggrad * grad * d2)``."""
    return _softplus_double_backward(ggrad.contiguous(), grad.contiguous(), x, float(beta), float(threshold))


def softplus(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    """``F.softplus``: ``log(1 + exp(beta x)) / beta``, linear where ``beta x > threshold``."""
    if use_cpp_chain(x) and x.is_floating_point() and beta != 0:
        return _cpp_softplus(x, float(beta), float(threshold))
    check_float_tensor(x, "x", "softplus")
    if beta == 0:
        raise ValueError("fastjac.ops.softplus: beta must be non-zero")
    return _softplus(x.contiguous(), float(beta), float(threshold))
