"""Counter-based perturbations ``x + sigma * z`` whose noise ``z`` is regenerated, never stored.

``z`` is the stream of ``csrc/common/philox.h`` (Philox-4x32-10; Gaussian by Box-Muller or Rademacher): element
``i`` of a tensor takes stream element ``offset + i`` of the stream of ``seed``, so ``(seed, offset)`` fixes the
noise exactly and disjoint offset ranges give independent noise. "Rows" are the slices along dim 0.

Ops (both linear in their tensor arguments, so the chain closes on itself to any order):

- ``fastjac::perturb(x, sigma, seed, offset, distribution)``: ``x + sigma[row] * z``. VJP: ``grad`` for ``x``;
  ``noise_dot(grad)`` for ``sigma``. Nothing is saved for backward: not ``x``, not ``z``.
- ``fastjac::noise_dot(g, seed, offset, distribution)``: per row ``<g[r], z[r]>``. VJP:
  ``perturb(0, grad_out)`` (the noise scaled per row), again regenerated.

Kernels (``perturb_fwd``, ``noise_row_dot``, ``philox_words``): the C++ ones of ``fastjac._C`` for CPU tensors
(CUDA tensors when the extension has CUDA kernels for them), else the pure-PyTorch reference
(:mod:`fastjac.reference.perturb`, any device, the same integer stream bit for bit). ``fastjac.use_backend
("reference")`` forces the reference.
"""
from __future__ import annotations

import functools
from typing import Union

import torch
from torch import Tensor

from .. import _backend
from .._autograd import differentiable
from ..reference import perturb as _reference
from ._checks import check_float_tensor
from ._vmap import batch_first

DISTRIBUTIONS = {"gaussian": _reference.GAUSSIAN, "rademacher": _reference.RADEMACHER}
_U64 = 1 << 64


@functools.lru_cache(maxsize=None)
def _compiled_for(dispatch_key: str) -> bool:
    if not _backend.backends()["cpu"]:  # fastjac._C not importable
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("fastjac::perturb_fwd", dispatch_key)
    except RuntimeError:  # an older build that does not declare the op
        return False


def kernels(device: torch.device):
    """The perturbation kernel table for tensors on ``device``: compiled where available, else reference."""
    if _backend.current_backend() != "reference":
        if device.type == "cpu" and _compiled_for("CPU"):
            return torch.ops.fastjac
        if device.type == "cuda" and _compiled_for("CUDA"):
            return torch.ops.fastjac
    return _reference


def _rows(t: Tensor) -> int:
    return 1 if t.dim() == 0 else t.shape[0]


def _stat_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastjac::perturb", mutates_args=())
def _perturb_op(x: Tensor, sigma: Tensor, seed: int, offset: int, distribution: int) -> Tensor:
    return kernels(x.device).perturb_fwd(x.contiguous(), sigma.contiguous(), seed, offset, distribution)


@_perturb_op.register_fake
def _(x, sigma, seed, offset, distribution):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("fastjac::noise_dot", mutates_args=())
def _noise_dot_op(g: Tensor, seed: int, offset: int, distribution: int) -> Tensor:
    return kernels(g.device).noise_row_dot(g.contiguous(), seed, offset, distribution)


@_noise_dot_op.register_fake
def _(g, seed, offset, distribution):
    return g.new_empty((_rows(g),), dtype=_stat_dtype(g))


# --- perturb: nothing saved but metadata -------------------------------------------------------------------
def _save_perturb(ctx, inputs, output):
    x, sigma, ctx.seed, ctx.offset, ctx.distribution = inputs
    ctx.sigma_meta = (sigma.shape, sigma.dtype)
    ctx.x_meta = (x.shape, x.dtype, x.device)
    ctx.save_for_backward()


def _perturb_vjp(ctx, grad):
    if grad is None:
        return (None,) * 5
    g_sigma = None
    if ctx.needs_input_grad[1]:
        shape, dtype = ctx.sigma_meta
        g_sigma = _noise_dot(grad.contiguous(), ctx.seed, ctx.offset, ctx.distribution)
        g_sigma = (g_sigma.sum() if len(shape) == 0 else g_sigma).to(dtype)
    return (grad if ctx.needs_input_grad[0] else None), g_sigma, None, None, None


def _perturb_jvp(ctx, tx, tsigma, *_):
    if tsigma is None:
        return tx
    shape, dtype, device = ctx.x_meta
    base = torch.zeros(shape, dtype=dtype, device=device) if tx is None else tx.contiguous()
    return _perturb(base, tsigma.contiguous(), ctx.seed, ctx.offset, ctx.distribution)


# --- noise_dot: per-row <g, z>, linear in g ------------------------------------------------------------------
def _save_noise_dot(ctx, inputs, output):
    g, ctx.seed, ctx.offset, ctx.distribution = inputs
    ctx.g_meta = (g.shape, g.dtype, g.device)
    ctx.save_for_backward()


def _noise_dot_vjp(ctx, grad):
    if grad is None:
        return None, None, None, None
    shape, dtype, device = ctx.g_meta
    zeros = torch.zeros(shape, dtype=dtype, device=device)
    return _perturb(zeros, grad.contiguous(), ctx.seed, ctx.offset, ctx.distribution), None, None, None


def _noise_dot_jvp(ctx, tg, *_):
    return _noise_dot(tg.contiguous(), ctx.seed, ctx.offset, ctx.distribution)


# --- vmap: every batch member sees the same noise (it is a function of the position in one member) -----------------
def _member_noise(x: Tensor, seed, offset, distribution) -> Tensor:
    """The noise ``z`` of one batch member of ``x`` (batch first)."""
    zeros = torch.zeros(x.shape[1:], dtype=x.dtype, device=x.device)
    return _perturb(zeros, torch.ones((), dtype=torch.float64, device=x.device), seed, offset, distribution)


def _perturb_vmap(apply, info, in_dims, x, sigma, seed, offset, distribution):
    """``x + sigma[row] z`` for every member at once, ``z`` generated once."""
    x, sigma = batch_first(x, in_dims[0], info.batch_size), batch_first(sigma, in_dims[1], info.batch_size)
    scale = sigma.reshape(*sigma.shape, *(1,) * (x.dim() - sigma.dim()))
    return x + (scale * _member_noise(x, seed, offset, distribution)).to(x.dtype), 0


def _noise_dot_vmap(apply, info, in_dims, g, seed, offset, distribution):
    """Per member and row ``<g[r], z[r]>``, ``z`` generated once."""
    g = batch_first(g, in_dims[0], info.batch_size)
    dtype = _stat_dtype(g)
    prod = g.to(dtype) * _member_noise(g, seed, offset, distribution).to(dtype)
    return prod.reshape(g.shape[0], _rows(g[0]), -1).sum(-1), 0


_perturb = differentiable(
    _perturb_op, setup_context=_save_perturb, backward=_perturb_vjp, jvp=_perturb_jvp, vmap=_perturb_vmap
)
_noise_dot = differentiable(
    _noise_dot_op, setup_context=_save_noise_dot, backward=_noise_dot_vjp, jvp=_noise_dot_jvp, vmap=_noise_dot_vmap
)


# --- public API -----------------------------------------------------------------------------------------------
def _stream_args(op: str, seed, offset, distribution):
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(1 << 63) <= seed < _U64:
        raise ValueError(f"fastjac.ops.{op}: seed must be an int in [-2**63, 2**64), got {seed!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < (1 << 62):
        raise ValueError(f"fastjac.ops.{op}: offset must be an int in [0, 2**62), got {offset!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"fastjac.ops.{op}: distribution must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}"
        )
    signed = seed - _U64 if seed >= (1 << 63) else seed  # the schema's int is int64: same 64 bits
    return signed, offset, DISTRIBUTIONS[distribution]


def perturb(
    x: Tensor, sigma: Union[float, Tensor], seed: int, offset: int = 0, distribution: str = "gaussian"
) -> Tensor:
    """``x + sigma * z``, ``z`` the counter-based noise of ``(seed, offset)`` (Gaussian N(0, 1) or Rademacher
    +-1 per element), regenerated for the backward instead of saved.

    ``sigma``: a float, or a tensor of shape ``()`` or ``(x.shape[0],)`` (one scale per row), differentiable:
    ``d/dsigma = <grad, z>`` (per row). The same ``(seed, offset)`` always gives the same ``z``; ``x`` of
    ``n`` elements uses stream elements ``offset .. offset + n - 1``.
    """
    check_float_tensor(x, "x", "perturb")
    seed, offset, code = _stream_args("perturb", seed, offset, distribution)
    if not isinstance(sigma, Tensor):
        sigma = torch.tensor(float(sigma), dtype=torch.float64, device=x.device)
    check_float_tensor(sigma, "sigma", "perturb")
    if not (sigma.dim() == 0 or sigma.shape == (_rows(x),)):
        raise ValueError(
            f"fastjac.ops.perturb: sigma must have shape () or ({_rows(x)},) (one per row of x), got {tuple(sigma.shape)}"
        )
    if sigma.device != x.device:
        raise ValueError(f"fastjac.ops.perturb: sigma is on {sigma.device} but x is on {x.device}")
    return _perturb(x.contiguous(), sigma.contiguous(), seed, offset, code)


def noise_dot(g: Tensor, seed: int, offset: int = 0, distribution: str = "gaussian") -> Tensor:
    """Per row ``r`` (along dim 0): ``<g[r], z[r]>`` with the noise ``z`` of :func:`perturb` for a tensor shaped
    like ``g``, without materialising ``z``; shape ``(g.shape[0],)``, float64 for float64 ``g`` else float32.
    Differentiable in ``g`` (its VJP regenerates ``z``)."""
    check_float_tensor(g, "g", "noise_dot")
    seed, offset, code = _stream_args("noise_dot", seed, offset, distribution)
    return _noise_dot(g.contiguous(), seed, offset, code)


def noise(like: Tensor, seed: int, offset: int = 0, distribution: str = "gaussian") -> Tensor:
    """The noise ``z`` of :func:`perturb` for a tensor shaped like ``like`` (its dtype and device), materialised."""
    return perturb(torch.zeros_like(like), 1.0, seed, offset, distribution)


def philox_words(like: Tensor, seed: int, offset: int = 0) -> Tensor:
    """The raw 32-bit Philox-4x32-10 words behind the noise, one per element of ``like``, as int64 in [0, 2**32)."""
    seed, offset, _ = _stream_args("philox_words", seed, offset, "gaussian")
    return kernels(like.device).philox_words(like, seed, offset)
