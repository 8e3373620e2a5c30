"""Fused BatchNorm and BatchNorm+ReLU, with ``nn.BatchNorm`` running-statistics semantics.

Chain (``relu`` flag fuses the ReLU; its mask ``z > 0 or NaN`` is not saved but recomputed by every kernel from the
saved x, mean, invstd, weight and bias, with the forward's own formula, csrc/KERNELS.md "Fused ReLU"):
``fastjac::batch_norm`` (y, mean, invstd, updated running statistics, written back once by the caller) ->
``fastjac::batch_norm_backward`` (gx, gw, gb) -> ``fastjac::batch_norm_double_backward`` (ggrad, gx, gw),
plus ``fastjac::batch_norm_jvp`` for forward mode. The backward links take the saved batch statistics as
constants and return total derivatives (the statistics' dependence on ``x`` is in the formulas of
``csrc/KERNELS.md``), so nothing downstream ever touches the running statistics again.
Orders beyond the double backward differentiate the reference formulas. That is the Python chain; the C++ chain
(``csrc/autograd/batch_norm.cpp``) runs ``fastjac::bn_fwd`` (running statistics updated in place by the kernel)
-> ``bn_bwd`` -> ``bn_dbwd`` -> ``bn_dbwd_backward`` (the reference VJP registered below), with the argument
checks in C++ too. :mod:`fastjac.ops._paths` says which serves a call.
"""
from __future__ import annotations

import contextvars
import math
from typing import Optional

import torch
from torch import Tensor

from .. import _backend, reference
from .._autograd import differentiable, direct, reference_links, save_inputs, saved_inputs
from ._checks import check_channel_vector, check_float_tensor
from . import _vmap
from ._paths import cpp_entry, use_cpp_chain
from .frozen_backward import recording_switch
from ._scoped import ScopedSetting
from ._third_order import register_reference_vjp


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _like(t):
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _channel_stat(x):
    return x.new_empty((x.shape[1],), dtype=_stat_dtype(x))


def _c(t):
    return None if t is None else t.contiguous()


_cpp_batch_norm = cpp_entry("batch_norm")  # the C++ chain's entry
_cpp_batch_norm_with_stats = cpp_entry("batch_norm_with_stats")  # the same, returning (y, mean, invstd)


class StatsSink:
    """Where the training-mode fused BatchNorm calls made while this sink is set (:func:`set_stats_sink`) leave the
    ``(mean, invstd)`` they normalised with, the last call's in ``stats`` (None until a call takes the C++ chain).
    ``differentiable``: as differentiable outputs (functions of x, hence of the parameters before), from a
    switchable graph whose switch stays off (``csrc/autograd/chain.h``). :mod:`fastjac.batch_norm_stats` records
    the clean pass's statistics from here instead of recomputing them."""

    __slots__ = ("differentiable", "stats")

    def __init__(self, differentiable: bool = False):
        self.differentiable, self.stats = differentiable, None


_STATS_SINK: ScopedSetting[StatsSink] = ScopedSetting("fastjac_bn_stats_sink")


def set_stats_sink(sink: Optional[StatsSink]) -> contextvars.Token:
    """Set the sink of the calls that follow (in this context); undo with ``reset_stats_sink(token)``."""
    return _STATS_SINK.set(sink)


def reset_stats_sink(token: contextvars.Token) -> None:
    _STATS_SINK.reset(token)


@torch.library.custom_op("fastjac::batch_norm", mutates_args=())
def _batch_norm_op(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # Functional (autograd needs it): the kernel updates copies of the running statistics, which the
    # caller writes back once; they are C-element vectors, so the copies cost nothing measurable.
    rm = None if running_mean is None else running_mean.clone()
    rv = None if running_var is None else running_var.clone()
    y, mean, invstd = _backend.kernels(x.device).bn_fwd(
        x.contiguous(), weight, bias, rm, rv, training, momentum, eps, relu
    )
    rm, rv = (x.new_empty((0,), dtype=_stat_dtype(x)) if r is None else r for r in (rm, rv))
    return y, mean, invstd, rm, rv


@_batch_norm_op.register_fake
def _(x, weight, bias, running_mean, running_var, training, momentum, eps, relu):
    stats = [x.new_empty((0,), dtype=_stat_dtype(x)) if r is None else _like(r) for r in (running_mean, running_var)]
    return _like(x), _channel_stat(x), _channel_stat(x), *stats


@torch.library.custom_op("fastjac::batch_norm_backward", mutates_args=())
def _batch_norm_backward_op(
    grad: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    training: bool, relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    k = _backend.kernels(x.device)
    return k.bn_bwd(grad.contiguous(), x, mean, invstd, weight, bias, training, relu)


@_batch_norm_backward_op.register_fake
def _(grad, x, mean, invstd, weight, bias, training, relu):
    return _like(x), _channel_stat(x), _channel_stat(x)


@torch.library.custom_op("fastjac::batch_norm_double_backward", mutates_args=())
def _batch_norm_double_backward_op(
    ggx: Optional[Tensor], ggw: Optional[Tensor], ggb: Optional[Tensor], grad: Tensor, x: Tensor,
    mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], training: bool, relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    k = _backend.kernels(x.device)
    return k.bn_dbwd(_c(ggx), _c(ggw), _c(ggb), grad.contiguous(), x, mean, invstd, weight, bias, training, relu)


@_batch_norm_double_backward_op.register_fake
def _(ggx, ggw, ggb, grad, x, mean, invstd, weight, bias, training, relu):
    return _like(x), _like(x), _channel_stat(x)


@torch.library.custom_op("fastjac::batch_norm_jvp", mutates_args=())
def _batch_norm_jvp_op(
    tx: Optional[Tensor], tw: Optional[Tensor], tb: Optional[Tensor], x: Tensor, mean: Tensor,
    invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], training: bool, relu: bool,
) -> Tensor:
    k = _backend.kernels(x.device)
    return k.bn_jvp(_c(tx), _c(tw), _c(tb), x, mean, invstd, weight, bias, training, relu)


@_batch_norm_jvp_op.register_fake
def _(tx, tw, tb, x, mean, invstd, weight, bias, training, relu):
    return _like(x)


# --- link 1: batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, relu) ---
def _save_forward(ctx, inputs, output):
    x, weight, bias = inputs[0], inputs[1], inputs[2]
    _, mean, invstd, new_mean, new_var = output
    ctx.mark_non_differentiable(mean, invstd, new_mean, new_var)
    # Nothing else: the fused ReLU's mask is recomputed from these (bias is only read for it).
    ctx.save_for_backward(x, weight, bias if inputs[8] else None, mean, invstd)
    ctx.training, ctx.relu = inputs[5], inputs[8]


def _forward_vjp(ctx, grad, *_non_differentiable):
    if grad is None:
        return (None,) * 9
    x, weight, bias, mean, invstd = ctx.saved_tensors
    gx, gw, gb = batch_norm_backward(grad, x, mean, invstd, weight, bias, ctx.training, ctx.relu)
    need = ctx.needs_input_grad
    gw = gw.to(weight.dtype) if need[1] else None
    gb = gb.to(weight.dtype if weight is not None else gb.dtype) if need[2] else None
    return (gx if need[0] else None), gw, gb, None, None, None, None, None, None


def _forward_jvp(ctx, tx, tw, tb, *_):
    x, weight, bias, mean, invstd = ctx.saved_tensors
    y_dot = _batch_norm_jvp(tx, tw, tb, x, mean, invstd, weight, bias, ctx.training, ctx.relu)
    return y_dot, None, None, None, None


# --- link 2: batch_norm_backward(grad, x, mean, invstd, weight, bias, training, relu) ----------------
# bias only enters through the ReLU mask, which is piecewise constant: no derivative w.r.t. it (nor through the
# mask w.r.t. x); the forward link's gradient w.r.t. bias is gb of link 2.
def _backward_vjp(ctx, ggx, ggw, ggb):
    if ggx is None and ggw is None and ggb is None:
        return (None,) * 8
    grad, x, mean, invstd, weight, bias, training, relu = saved_inputs(ctx)
    ggrad, gx, gw = batch_norm_double_backward(ggx, ggw, ggb, grad, x, mean, invstd, weight, bias, training, relu)
    need = ctx.needs_input_grad
    gw = gw.to(weight.dtype) if need[4] else None
    return (ggrad if need[0] else None), (gx if need[1] else None), None, None, gw, None, None, None


_backward_ref_vjp, _backward_ref_jvp = reference_links(reference.bn_bwd)
_dbwd_vjp, _dbwd_jvp = reference_links(reference.bn_dbwd)
_jvp_vjp, _jvp_jvp = reference_links(reference.bn_jvp)
register_reference_vjp("bn_dbwd_backward", reference.bn_dbwd, num_grads=3, differentiable=(0, 1, 2, 3, 4, 7))

_batch_norm_direct = direct(_batch_norm_op)


def _forward_and_update(x, weight, bias, running_mean, running_var, training, momentum, eps, relu):
    """The op, then the one and only running-statistics update. Inside the autograd.Function's forward
    this sees plain tensors even under torch.func transforms, as PyTorch's own batch norm does."""
    out = _batch_norm_direct(x, weight, bias, running_mean, running_var, training, momentum, eps, relu)
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(out[3])
            running_var.copy_(out[4])
    return out


_batch_norm = differentiable(
    _batch_norm_op, setup_context=_save_forward, backward=_forward_vjp, jvp=_forward_jvp,
    vmap=_vmap.batch_norm_forward, forward=_forward_and_update,
)
# batching rules of the links after the forward (fastjac.ops._vmap)
_BACKWARD_RULE = _vmap.channel_folded("ffcccc--", "fcc")  # (grad, x, mean, invstd, weight, bias, ..) -> (gx, gw, gb)
_DOUBLE_BACKWARD_RULE = _vmap.channel_folded("fccffcccc--", "ffc")  # (ggx, ggw, ggb, grad, x, ...) -> (ggrad, gx, gw)
_JVP_RULE = _vmap.channel_folded("fccfcccc--", "f")  # (tx, tw, tb, x, mean, invstd, weight, bias, ..) -> y_dot
_batch_norm_backward = differentiable(
    _batch_norm_backward_op, setup_context=save_inputs, backward=_backward_vjp, jvp=_backward_ref_jvp,
    vmap=_BACKWARD_RULE,
)
_batch_norm_double_backward = differentiable(
    _batch_norm_double_backward_op, setup_context=save_inputs, backward=_dbwd_vjp, jvp=_dbwd_jvp,
    vmap=_DOUBLE_BACKWARD_RULE,
)
_batch_norm_jvp = differentiable(
    _batch_norm_jvp_op, setup_context=save_inputs, backward=_jvp_vjp, jvp=_jvp_jvp, vmap=_JVP_RULE
)


def batch_norm_backward(grad, x, mean, invstd, weight, bias, training: bool, relu: bool):
    """VJP of batch norm (+ReLU) for ``(x, weight, bias)``: ``(gx, gw, gb)``, differentiable
    (``bias`` is only read for the ReLU mask, with ``relu``)."""
    return _batch_norm_backward(grad.contiguous(), x, mean, invstd, weight, bias, training, relu)


def batch_norm_double_backward(ggx, ggw, ggb, grad, x, mean, invstd, weight, bias, training: bool, relu: bool):
    """VJP of :func:`batch_norm_backward` for ``(grad, x, weight)``; any of ``ggx, ggw, ggb`` may be None."""
    return _batch_norm_double_backward(
        _c(ggx), _c(ggw), _c(ggb), grad.contiguous(), x, mean, invstd, weight, bias, training, relu
    )


def _validate(op, x, running_mean, running_var, weight, bias, training, momentum, eps):
    check_float_tensor(x, "x", op)
    if x.dim() < 2:
        raise ValueError(f"fastjac.ops.{op}: x must be N x C x (spatial...) with at least 2 dims, got shape {tuple(x.shape)}")
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        check_channel_vector(t, name, op, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"fastjac.ops.{op}: running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise ValueError(f"fastjac.ops.{op}: running_mean and running_var are required when training=False")
    # values per channel as PyTorch counts them; an empty batch (0) is allowed in training (empty output, running
    # statistics left alone), as in PyTorch
    if training and math.prod(x.shape[:1] + x.shape[2:]) == 1:
        raise ValueError(
            f"fastjac.ops.{op}: expected more than 1 value per channel when training, got x of shape {tuple(x.shape)}"
        )
    if not isinstance(momentum, (int, float)) or isinstance(momentum, bool):
        raise TypeError(f"fastjac.ops.{op}: momentum must be a float (the module resolves momentum=None), got {momentum!r}")
    # PyTorch's F.batch_norm: eps > 0 in training, eps >= 0 in eval (1 / sqrt(running_var + eps) may be inf)
    if training and not eps > 0:
        raise ValueError(f"fastjac.ops.{op}: eps must be positive in training mode, got {eps!r}")
    if not eps >= 0:
        raise ValueError(f"fastjac.ops.{op}: eps must be non-negative, got {eps!r}")


def _run(op, relu, x, running_mean, running_var, weight, bias, training, momentum, eps):
    if isinstance(x, Tensor) and x.dim() == 1 and x.numel() == 0:
        # PyTorch accepts a 1-D empty input (an OpInfo sample of F.batch_norm): N x C = 0 x 0 here, so the
        # per-channel vectors must be empty or None
        y = _run(op, relu, x.view(0, 0), running_mean, running_var, weight, bias, training, momentum, eps)
        return y.view(x.shape)
    switch = recording_switch()
    if use_cpp_chain(x) and type(momentum) is float:  # the C++ chain checks the other arguments itself
        flag = None if switch is None or not training else switch.flag
        sink = _STATS_SINK.get()
        if sink is None or not training:
            return _cpp_batch_norm(x, weight, bias, running_mean, running_var, bool(training), momentum, float(eps),
                                   relu, flag)
        if flag is None and sink.differentiable:
            flag = torch.zeros((), dtype=torch.bool)  # a switch that stays off: the statistics are differentiable
        y, mean, invstd = _cpp_batch_norm_with_stats(x, weight, bias, running_mean, running_var, True, momentum,
                                                     float(eps), relu, flag)
        sink.stats = (mean, invstd)
        return y
    if switch is not None and training:
        raise RuntimeError(
            f"fastjac.ops.{op}: inside FrozenBackward.recording() a training-mode fused BatchNorm needs the C++ "
            f"chain (the cpu or cuda backend in plain eager mode, fastjac.ops._paths); this call takes the Python "
            f"chain (backend {_backend.backend_name(x.device)!r}, or a transform, mode or tensor subclass)"
        )
    _validate(op, x, running_mean, running_var, weight, bias, training, momentum, eps)
    out = _batch_norm(
        x.contiguous(), weight, bias, running_mean, running_var, bool(training), float(momentum), float(eps), relu
    )
    return out[0]


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """``F.batch_norm``: ``y = (x - mean) / sqrt(var + eps) * weight + bias`` per channel (dim 1).

    Training uses batch statistics and updates the running ones once, ``r <- (1 - momentum) r + momentum s``
    with the unbiased variance; eval uses the running statistics.
    """
    return _run("batch_norm", False, x, running_mean, running_var, weight, bias, training, momentum, eps)


def batch_norm_relu(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """``relu(batch_norm(...))`` fused, forward to double backward; same arguments as :func:`batch_norm`."""
    return _run("batch_norm_relu", True, x, running_mean, running_var, weight, bias, training, momentum, eps)
