"""Triton Softplus kernels, matching ``torch.nn.functional.softplus`` including its threshold (csrc/KERNELS.md,
``softplus_*``; the per-element math of ``csrc/common/softplus.h``).

With ``b = beta x``: linear branch where ``b > threshold`` (``y = x``, ``d1 = 1``, ``d2 = 0``), else
``y = log1p(exp(b)) / beta``, ``d1 = sigmoid(b)``, ``d2 = beta d1 (1 - d1)``. Computed in float32 for
float32 / float16 / bfloat16 (like ``F.softplus``) and float64 for float64; ``beta`` and ``threshold`` reach
the kernels as a 2-element tensor of the compute dtype, so float64 keeps them exact.
"""
import torch
import triton
import triton.language as tl

from . import _launch
from ._jit import block_offsets


@triton.jit
def _log1p(e):
    """``log(1 + e)`` accurate for small ``e`` (Goldberg: ``log(u) * e / (u - 1)`` with ``u = 1 + e``)."""
    u = 1.0 + e
    exact = u == 1.0
    return tl.where(exact, e, tl.log(u) * (e / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def _load_params(params_ptr):
    return tl.load(params_ptr), tl.load(params_ptr + 1)


@triton.jit
def _d1_d2(x, beta, threshold):
    """First and second derivatives of softplus at ``x``."""
    linear = x * beta > threshold
    s = 1.0 / (1.0 + tl.exp(-(x * beta)))
    d1 = tl.where(linear, 1.0, s)
    d2 = tl.where(linear, 0.0, beta * s * (1.0 - s))
    return d1.to(x.dtype), d2.to(x.dtype)


@triton.jit
def _softplus_fwd_kernel(x_ptr, params_ptr, y_ptr, numel, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = block_offsets(BLOCK)
    inside = offs < numel
    beta, threshold = _load_params(params_ptr)
    x = tl.load(x_ptr + offs, mask=inside, other=0).to(ACC)
    b = x * beta
    y = tl.where(b > threshold, x, _log1p(tl.exp(b)) / beta)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _softplus_bwd_kernel(g_ptr, x_ptr, params_ptr, out_ptr, numel, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = block_offsets(BLOCK)
    inside = offs < numel
    beta, threshold = _load_params(params_ptr)
    x = tl.load(x_ptr + offs, mask=inside, other=0).to(ACC)
    g = tl.load(g_ptr + offs, mask=inside, other=0).to(ACC)
    d1, _ = _d1_d2(x, beta, threshold)
    tl.store(out_ptr + offs, (g * d1).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _softplus_dbwd_kernel(gg_ptr, g_ptr, x_ptr, params_ptr, ggrad_ptr, gx_ptr, numel, ACC: tl.constexpr,
                          BLOCK: tl.constexpr):
    offs = block_offsets(BLOCK)
    inside = offs < numel
    beta, threshold = _load_params(params_ptr)
    x = tl.load(x_ptr + offs, mask=inside, other=0).to(ACC)
    g = tl.load(g_ptr + offs, mask=inside, other=0).to(ACC)
    gg = tl.load(gg_ptr + offs, mask=inside, other=0).to(ACC)
    d1, d2 = _d1_d2(x, beta, threshold)
    tl.store(ggrad_ptr + offs, (gg * d1).to(ggrad_ptr.dtype.element_ty), mask=inside)
    tl.store(gx_ptr + offs, (gg * g * d2).to(gx_ptr.dtype.element_ty), mask=inside)


def _prepare(op, x, beta, threshold, **like):
    """Checked contiguous inputs, the parameter tensor and the launch grid."""
    _launch.check_float(x, op, "x")
    for name, t in like.items():
        _launch.check_like(t, x, op, name)
    params = torch.tensor([beta, threshold], dtype=_launch.stat_dtype(x), device=x.device)
    grid = (triton.cdiv(x.numel(), _launch.BLOCK),)
    return x.contiguous(), [t.contiguous() for t in like.values()], params, grid


def _launch_kernel(kernel, grid, x, *args):
    if x.numel():
        with _launch.device_guard(x):
            kernel[grid](*args, x.numel(), ACC=_launch.acc_type(x), BLOCK=_launch.BLOCK)


def softplus_fwd(x: torch.Tensor, beta: float, threshold: float) -> torch.Tensor:
    """``x`` where ``beta x > threshold``, else ``log1p(exp(beta x)) / beta``."""
    x, _, params, grid = _prepare("fastjac.triton.softplus_fwd", x, beta, threshold)
    y = torch.empty_like(x)
    _launch_kernel(_softplus_fwd_kernel, grid, x, x, params, y)
    return y


def softplus_bwd(grad: torch.Tensor, x: torch.Tensor, beta: float, threshold: float) -> torch.Tensor:
    """``grad * d1(x)``."""
    x, (g,), params, grid = _prepare("fastjac.triton.softplus_bwd", x, beta, threshold, grad=grad)
    out = torch.empty_like(x)
    _launch_kernel(_softplus_bwd_kernel, grid, x, g, x, params, out)
    return out


def softplus_dbwd(ggrad: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, beta: float, threshold: float):
    """``(ggrad * d1(x), ggrad * grad * d2(x))``, the VJP of :func:`softplus_bwd` for ``(grad, x)``."""
    x, (gg, g), params, grid = _prepare("fastjac.triton.softplus_dbwd", x, beta, threshold, ggrad=ggrad, grad=grad)
    ggrad_out, gx = torch.empty_like(x), torch.empty_like(x)
    _launch_kernel(_softplus_dbwd_kernel, grid, x, gg, g, x, params, ggrad_out, gx)
    return ggrad_out, gx
