"""Fused ReLU: saves a packed 1-bit mask (not x, not y); derivative at x == 0 is 0, NaN propagates as in torch.relu.

Chain: forward (y, mask) -> backward (g * m), whose own VJP and JVP are the backward again, so every order is
exact and the second derivative w.r.t. ``x`` is an absent (``None``) gradient rather than an allocated zero
tensor. C++ chain: ``fastjac::relu_fwd`` -> ``fastjac::relu_bwd`` (``csrc/autograd/relu.cpp``); Python chain:
``fastjac::relu`` -> ``fastjac::relu_backward`` (below). :mod:`fastjac.ops._paths` says which serves a call.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from .._autograd import differentiable
from ._checks import check_float_tensor
from . import _vmap
from ._paths import cpp_entry, use_cpp_chain


_cpp_relu = cpp_entry("relu")  # the C++ chain's entry


@torch.library.custom_op("fastjac::relu", mutates_args=())
def _relu_op(x: Tensor) -> tuple[Tensor, Tensor]:
    return _backend.kernels(x.device).relu_fwd(x.contiguous())


@_relu_op.register_fake
def _(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)


@torch.library.custom_op("fastjac::relu_backward", mutates_args=())
def _relu_backward_op(grad: Tensor, mask: Tensor) -> Tensor:
    return _backend.kernels(grad.device).relu_bwd(grad.contiguous(), mask)


@_relu_backward_op.register_fake
def _(grad, mask):
    return torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)


def _save_mask(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _relu_vjp(ctx, grad, _grad_mask):
    (mask,) = ctx.saved_tensors
    return None if grad is None else relu_backward(grad, mask)


def _relu_jvp(ctx, tangent):
    (mask,) = ctx.saved_tensors
    return relu_backward(tangent, mask), None


def _save_backward(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _relu_backward_vjp(ctx, ggrad):
    (mask,) = ctx.saved_tensors
    return (None if ggrad is None else relu_backward(ggrad, mask)), None


def _relu_backward_jvp(ctx, tangent, _tangent_mask):
    (mask,) = ctx.saved_tensors
    return relu_backward(tangent, mask)


_relu = differentiable(_relu_op, setup_context=_save_mask, backward=_relu_vjp, jvp=_relu_jvp, vmap=_vmap.relu_forward)
_relu_backward = differentiable(
    _relu_backward_op, setup_context=_save_backward, backward=_relu_backward_vjp, jvp=_relu_backward_jvp,
    vmap=_vmap.relu_backward,
)


def relu_backward(grad: Tensor, mask: Tensor) -> Tensor:
    """VJP of ReLU, ``m ? grad : 0`` (``m``: x > 0 or NaN) with the forward's packed mask; differentiable in ``grad``."""
    return _relu_backward(grad.contiguous(), mask)


def relu(x: Tensor) -> Tensor:
    """``max(x, 0)`` with derivative ``1[x > 0]`` (0 at x == 0, as ``torch.relu``)."""
    if use_cpp_chain(x) and x.is_floating_point():
        return _cpp_relu(x)
    check_float_tensor(x, "x", "relu")
    return _relu(x)[0]
