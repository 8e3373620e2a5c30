"""Triton ReLU kernels: ``relu_fwd(x) = (relu(x), mask relu_on(x))`` and ``relu_bwd(g, mask) = m ? g : 0``
(``relu_on``: ``x > 0`` or NaN, csrc/KERNELS.md "ReLU and NaN").

The mask is packed (csrc/KERNELS.md, "Conventions"): ``ceil(numel / 8)`` uint8 bytes, element ``i`` is bit
``i % 8`` of byte ``i // 8``; padding bits of the last byte are zero. Each program handles ``BLOCK // 8``
whole mask bytes as a ``[bytes, 8]`` tile of elements, so no byte is shared between programs.
"""
import torch
import triton
import triton.language as tl

from . import _launch
from ._jit import mask_byte_tile, relu_on, select


@triton.jit
def _relu_fwd_kernel(x_ptr, y_ptr, mask_ptr, numel, nbytes, BYTES: tl.constexpr):
    byte, bit, offs, inside = mask_byte_tile(BYTES, numel)
    x = tl.load(x_ptr + offs, mask=inside, other=0)
    on = relu_on(x)  # -0.0 is off, NaN is on
    tl.store(y_ptr + offs, select(on, x), mask=inside)
    bits = tl.where(on & inside, 1, 0) << bit[None, :]
    tl.store(mask_ptr + byte, tl.sum(bits, axis=1).to(tl.uint8), mask=byte < nbytes)


@triton.jit
def _relu_bwd_kernel(g_ptr, mask_ptr, out_ptr, numel, nbytes, BYTES: tl.constexpr):
    byte, bit, offs, inside = mask_byte_tile(BYTES, numel)
    packed = tl.load(mask_ptr + byte, mask=byte < nbytes, other=0).to(tl.int32)
    on = ((packed[:, None] >> bit[None, :]) & 1) != 0
    g = tl.load(g_ptr + offs, mask=inside, other=0)
    tl.store(out_ptr + offs, select(on, g), mask=inside)


def _grid(numel):
    return (triton.cdiv(numel, _launch.BLOCK),)


def relu_fwd(x: torch.Tensor):
    """``(relu(x), packed mask relu_on(x))``: NaN stays NaN with its bit set."""
    op = "fastjac.triton.relu_fwd"
    _launch.check_float(x, op, "x")
    x = x.contiguous()
    y = torch.empty_like(x)
    numel = x.numel()
    mask = torch.empty(((numel + 7) // 8,), dtype=torch.uint8, device=x.device)
    if numel:
        with _launch.device_guard(x):
            _relu_fwd_kernel[_grid(numel)](x, y, mask, numel, mask.numel(), BYTES=_launch.BLOCK // 8)
    return y, mask


def relu_bwd(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``grad * m`` with ``m`` the packed mask of :func:`relu_fwd` (a selection: 0 where ``m`` is off)."""
    op = "fastjac.triton.relu_bwd"
    _launch.check_float(grad, op, "grad")
    _launch.check_mask(mask, grad.numel(), grad.device, op)
    g, mask = grad.contiguous(), mask.contiguous()
    out = torch.empty_like(g)
    if g.numel():
        with _launch.device_guard(g):
            _relu_bwd_kernel[_grid(g.numel())](g, mask, out, g.numel(), mask.numel(), BYTES=_launch.BLOCK // 8)
    return out
