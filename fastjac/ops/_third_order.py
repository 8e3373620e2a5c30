"""The third-order links of the C++ chain: the VJP of each double-backward kernel, from the reference formulas.

``csrc/fastjac.cpp`` declares ``fastjac::softplus_dbwd_backward`` and ``fastjac::bn_dbwd_backward``; the C++
double-backward links (``csrc/autograd/``) call them when a third derivative is asked for. They are registered
here as ``CompositeImplicitAutograd`` kernels built on :func:`fastjac._autograd.reference_vjp`, so the
reference formulas stay the one source of the higher orders, and every order beyond stays exact (autograd
records the reference's ATen ops).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .. import _backend
from .._autograd import reference_vjp

_LIBRARY = torch.library.Library("fastjac", "IMPL") if _backend._C is not None else None


def register_reference_vjp(name: str, fn: Callable, *, num_grads: int, differentiable: Sequence[int]) -> None:
    """Implement ``fastjac::<name>(grads..., inputs..., output_mask)`` as the VJP of the reference ``fn``.

    The op's arguments are the ``num_grads`` cotangents of ``fn``'s outputs (None = zero), then ``fn``'s own
    inputs, then ``output_mask``, one flag per input position in ``differentiable``; it returns the
    gradients of the flagged inputs, in order."""
    if _LIBRARY is None:
        return

    def vjp(*args):
        grads, inputs, mask = args[:num_grads], args[num_grads:-1], args[-1]
        needs = [False] * len(inputs)
        for position, wanted in zip(differentiable, mask):
            needs[position] = bool(wanted)
        result = reference_vjp(fn, inputs, needs, grads)
        return [
            torch.zeros_like(inputs[p]) if result[p] is None else result[p]
            for p, wanted in zip(differentiable, mask) if wanted
        ]

    _LIBRARY.impl(name, vjp, "CompositeImplicitAutograd")
