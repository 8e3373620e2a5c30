"""Batching rules (``torch.vmap``, hence ``jacrev``, ``jacfwd``, ``hessian``, per-sample gradients) for the links of
the Python chain.

A rule receives the *physical* tensors of one vmap level (the batch dimension at ``in_dims[i]``, or absent) and
runs the same link once on a reshaped problem whose answer holds every batch member's, then says where the batch
dimension of each output is. The link is called through its ``autograd.Function`` again (``apply``), so transforms
below this vmap level (grad, jvp, another vmap) see it as usual and every order of derivative still composes.

- **Elementwise links** (softplus and its backward links): the batch dimension is just one more dimension; unbatched
  operands are broadcast (expanded) to the batch. Softplus's backward, linear in the cotangent, is one kernel call on
  the shared ``x`` and a broadcast product when only the cotangent is batched (``jacrev``).
- **ReLU** (its packed 1-bit mask, ``csrc/KERNELS.md``): each batch member's values are one row, padded to a whole
  number of mask bytes, so member ``b``'s mask is bytes ``[b k, (b + 1) k)`` of the one kernel call's mask
  (``k = ceil(n / 8)``, ``n`` values per member) and the mask is batched as a ``(B, k)`` tensor. No padding (no copy)
  when ``n`` is a multiple of 8.
- **BatchNorm** links: ``B`` problems on ``x`` of shape ``(N, C, *S)`` are one problem on ``(N, B C, *S)`` (the batch
  folded into the channels, per-channel vectors of shape ``(B C,)``): each batch member gets its own batch
  statistics in training, its own running statistics, weight and bias — PyTorch's ``vmap`` semantics of
  ``F.batch_norm``. An eval-mode forward whose per-channel vectors are all unbatched folds the batch into ``N``
  instead (a view, no copy). As in PyTorch, a training-mode call on a batched ``x`` whose running statistics are not
  batched is an error (they would be updated in place once per member).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def batch_first(t, dim, size: int):
    """``t`` with its batch dimension first; an unbatched ``t`` broadcast to ``size`` members (a view)."""
    if t is None or not isinstance(t, Tensor):
        return t
    return t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0)


# --- elementwise links --------------------------------------------------------------------------------------------
def elementwise(apply, info, in_dims, *args):
    """Rule of a link whose tensor operands all have one shape and whose outputs are elementwise in them."""
    batched = {d for a, d in zip(args, in_dims) if isinstance(a, Tensor)}
    if len(batched) == 1 and None not in batched:  # every operand batched at the same dim: nothing to move
        out_dim = batched.pop()
    else:
        args, out_dim = [batch_first(a, d, info.batch_size) for a, d in zip(args, in_dims)], 0
    out = apply(*args)
    return out, (tuple(out_dim for _ in out) if isinstance(out, tuple) else out_dim)


def linear_in_first(apply, info, in_dims, grad, *rest):
    """Rule of a link linear in its first operand, ``f(grad, x, ...) = grad * f(1, x, ...)`` (softplus_backward):
    with only ``grad`` batched (``jacrev``: the cotangents), ``f(1, x)`` once and a broadcast product, instead of
    the batch's copies of ``x``; otherwise :func:`elementwise`."""
    if in_dims[0] is None or any(d is not None for d in in_dims[1:]):
        return elementwise(apply, info, in_dims, grad, *rest)
    x = rest[0]
    return grad.movedim(in_dims[0], 0) * apply(torch.ones_like(x), *rest), 0


# --- ReLU: one mask row of whole bytes per batch member -----------------------------------------------------------
def _mask_bytes(n: int) -> int:
    return (n + 7) // 8


def _rows(t: Tensor, n: int) -> Tensor:
    """``t`` (batch first) as ``(B, 8 ceil(n / 8))`` rows: each member's ``n`` values, zero-padded to whole bytes."""
    rows = t.reshape(t.shape[0], n)
    pad = 8 * _mask_bytes(n) - n
    return torch.nn.functional.pad(rows, (0, pad)) if pad else rows


def relu_forward(apply, info, in_dims, x):
    """Rule of ``relu(x) -> (y, mask)``: one call on the padded rows; the mask comes back as ``(B, k)``."""
    x = x.movedim(in_dims[0], 0)
    size, n = x.shape[0], math.prod(x.shape[1:])
    y, mask = apply(_rows(x, n))
    return (y[:, :n].reshape(x.shape), mask.view(size, _mask_bytes(n))), (0, 0)


def relu_backward(apply, info, in_dims, grad, mask):
    """Rule of ``relu_backward(grad, mask)``: the gradient as padded rows against the ``(B, k)`` mask rows (an
    unbatched mask, as ``jacrev`` gives, repeated per member)."""
    size = info.batch_size
    grad, mask = batch_first(grad, in_dims[0], size), batch_first(mask, in_dims[1], size)
    n = math.prod(grad.shape[1:])
    out = apply(_rows(grad, n), mask.reshape(-1))
    return out[:, :n].reshape(grad.shape), 0


# --- BatchNorm: the batch folded into the channels ----------------------------------------------------------------
def _fold_full(t, dim, size: int):
    """An ``(N, C, *S)`` operand (batch at ``dim``) as ``(N, B C, *S)``."""
    if t is None:
        return None
    t = batch_first(t, dim, size)
    return t.movedim(0, 1).reshape(t.shape[1], size * t.shape[2], *t.shape[3:])


def _fold_channel(t, dim, size: int):
    """A ``(C,)`` operand (batch at ``dim``) as ``(B C,)``."""
    return None if t is None else batch_first(t, dim, size).reshape(-1)


def _unfold_full(t: Tensor, size: int):
    """``(N, B C, *S)`` back to ``(N, B, C, *S)``: the batch at dim 1 (a view)."""
    return t.view(t.shape[0], size, t.shape[1] // size, *t.shape[2:]), 1


def _unfold_channel(t: Tensor, size: int):
    return t.view(size, t.numel() // size), 0


def channel_folded(kinds: str, out_kinds: str):
    """Rule of a BatchNorm link: ``kinds[i]`` says what operand ``i`` is (``f``: an ``(N, C, *S)`` tensor, ``c``: a
    per-channel vector, ``-``: a flag or float), ``out_kinds`` the same of each output."""

    def rule(apply, info, in_dims, *args):
        size = info.batch_size
        folded = [_fold_full(a, d, size) if k == "f" else _fold_channel(a, d, size) if k == "c" else a
                  for a, d, k in zip(args, in_dims, kinds)]
        out = apply(*folded)
        single = not isinstance(out, tuple)
        pairs = [(_unfold_full if k == "f" else _unfold_channel)(o, size) for o, k in zip((out,) if single else out,
                                                                                         out_kinds)]
        outs, dims = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
        return (outs[0], dims[0]) if single else (outs, dims)

    return rule


_UNBATCHED_RUNNING_STATS = (
    "fastjac.ops.batch_norm under vmap: x is batched but running_mean / running_var are not, so training mode would "
    "update them in place once per batch member (PyTorch raises here too). Use eval mode, running statistics of "
    "their own per member (batched), none (track_running_stats=False), or torch.func.replace_all_batch_norm_modules_"
)


def batch_norm_forward(apply, info, in_dims, x, weight, bias, running_mean, running_var, training, momentum, eps,
                       relu):
    """Rule of the forward link ``(y, mean, invstd, new running mean, new running var)``; the running statistics are
    updated once, in place, for each batch member that owns them."""
    size = info.batch_size
    dx, dw, db, dm, dv = in_dims[:5]
    has_stats = running_mean is not None
    if training and has_stats and dx is not None and (dm is None or dv is None):
        raise RuntimeError(_UNBATCHED_RUNNING_STATS)
    flags = (training, momentum, eps, relu)
    if not training and dw is None and db is None and dm is None and dv is None:
        x = x.movedim(dx, 0)  # eval with shared per-channel vectors: the batch folded into N
        y, *rest = apply(x.reshape(-1, *x.shape[2:]), weight, bias, running_mean, running_var, *flags)
        return (y.view(x.shape), *rest), (0, None, None, None, None)
    stats = [None if r is None else batch_first(r, d, size) for r, d in ((running_mean, dm), (running_var, dv))]
    folded_stats = [None if r is None else r.reshape(-1) for r in stats]
    y, mean, invstd, new_mean, new_var = apply(
        _fold_full(x, dx, size), _fold_channel(weight, dw, size), _fold_channel(bias, db, size), *folded_stats, *flags
    )
    if training and has_stats:
        with torch.no_grad():
            for r, folded, d in zip(stats, folded_stats, (dm, dv)):
                if d is None:  # shared statistics of an unbatched x: every member's update is the same
                    r[0].copy_(folded[: r.shape[1]])
                elif not r.is_contiguous():  # the reshape copied: write the update back
                    r.copy_(folded.view(r.shape))
    outs = [_unfold_full(y, size), _unfold_channel(mean, size), _unfold_channel(invstd, size)]
    outs += [_unfold_channel(s, size) if has_stats else (s, None) for s in (new_mean, new_var)]
    return tuple(o[0] for o in outs), tuple(o[1] for o in outs)

