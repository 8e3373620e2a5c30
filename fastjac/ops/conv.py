"""Convolution with a cheaper double backward: ATen's kernels, fastjac's derivatives.

``conv(x, W, b) = W ⋆ x + b`` (the cross-correlation of ``F.conv1d/2d/3d``). Its input gradient
``gx = Wᵀ ⋆ g`` is what a Jacobian loss differentiates again; PyTorch's generic convolution double backward
takes the weight part of that, ``∂⟨gg, gx⟩/∂W = corr(gg, g)``, as a convolution of transposed tensors (batch as
channels), on the project's CPU slower than the weight-gradient kernel of an ordinary backward. The C++
chain (``fastjac::conv_fwd -> fastjac::conv_bwd_input``, ``csrc/autograd/conv.cpp``) takes it from
``convolution_backward``'s weight-gradient kernel instead, and the ``g`` part as a forward convolution (the next
link): that VJP is 1.1–3.7× faster at VGG-9's layer shapes of 8×8 and more (``python -m
benchmarks.conv_double_backward``). On CPU at output planes of ≤ 16 elements, where oneDNN's weight-gradient kernel
is slow on some hosts, the weight part is one convolution of the batch-transposed tensors, as PyTorch's, but with
the roles swapped and flipped so that the gradient comes in the weight's own layout (PyTorch's comes transposed,
and every later add or copy of it is a strided transpose); with stride ≠ 1, dilation ≠ 1 or groups, PyTorch's own
double backward there. Every other derivative, and every order, is
PyTorch's own, so all orders are exact.

There is no Python chain: where the C++ chain does not serve a call (:func:`fastjac.ops._paths.use_cpp_chain`:
forward-mode AD, ``torch.func``, ``torch.compile``, dispatch modes, subclasses, the Python-kernel backends; also
autocast, string ``padding`` and unbatched input), the call is PyTorch's own ``F.conv*d``, which supports all of
them.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._paths import cpp_entry, use_cpp_chain

_cpp_conv = cpp_entry("conv")
_TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_Size = Union[int, Sequence[int]]


def _per_dim(value: _Size, dims: int) -> list[int]:
    return [int(value)] * dims if isinstance(value, int) else [int(v) for v in value]


def conv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: _Size = 1, padding: Union[_Size, str] = 0,
         dilation: _Size = 1, groups: int = 1) -> Tensor:
    """``F.conv{1,2,3}d(x, weight, bias, stride, padding, dilation, groups)`` (the spatial rank from ``weight``),
    with the double backward of the module docstring on the C++ chain; the same function and derivatives."""
    dims = weight.dim() - 2
    if (
        _cpp_conv is not None
        and x.dim() == dims + 2  # batched (F.conv*d also takes unbatched input)
        and not isinstance(padding, str)
        and use_cpp_chain(x)
        and not torch.is_autocast_enabled(x.device.type)
    ):
        return _cpp_conv(x, weight, bias, _per_dim(stride, dims), _per_dim(padding, dims), _per_dim(dilation, dims),
                         groups)
    return _TORCH_CONV[dims](x, weight, bias, stride, padding, dilation, groups)
