"""Which of the two autograd chains serves a fused-op call.

Every fused op has its forward, backward and double backward as dispatcher ops (``torch.ops.fastjac.*``,
``csrc/KERNELS.md``), reached through one of two chains that compute the same derivatives:

- the **C++ chain** (``csrc/autograd/``): a C++ autograd function per link registered for the ``Autograd``
  dispatch key, whose backward calls the next link through the dispatcher, so first, second and third
  derivatives run with no Python after the forward call. It serves the compiled backends (``cpu``, ``cuda``)
  in plain eager mode: this is the path training takes.
- the **Python chain** (``torch.library.custom_op`` + ``autograd.Function`` in each op module): it serves the
  Python-kernel backends (``reference``, ``triton``) and everything PyTorch does not support for C++
  autograd functions or that must see the registered Python ops: forward-mode AD (dual tensors,
  ``torch.func.jvp``), ``torch.func`` transforms (``grad``, ``vjp``, ``vmap``...: each link's ``autograd.Function``
  carries a batching rule, :mod:`fastjac.ops._vmap`), ``torch.compile`` tracing, dispatch modes (``FakeTensorMode``,
  ``opcheck``) and tensor subclasses. (PyTorch refuses C++ autograd functions under ``torch.func``. Autograd's own
  ``is_grads_batched`` uses its legacy ``vmap``, which neither chain's rules reach: on the C++ chain it runs
  PyTorch's per-member fallback, correct and slower.)

The convolution (:mod:`fastjac.ops.conv`) has only the C++ chain: its Python path is PyTorch's own ``F.conv*d``.

:func:`use_cpp_chain` decides per call, in well under a microsecond.
"""
from __future__ import annotations

import torch
from torch.autograd import forward_ad

from .. import _backend

_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_transform = torch._C._functorch.peek_interpreter_stack


def cpp_entry(name: str):
    """``fastjac._C.<name>``, the C++ chain's Python entry of a fused op (``csrc/autograd/entries.cpp``), or None
    when the extension is not built."""
    return None if _backend._C is None else getattr(_backend._C, name)


def use_cpp_chain(x: torch.Tensor) -> bool:
    """True when the call on ``x`` (a plain ``torch.Tensor``) may take the C++ chain (module docstring)."""
    return (
        type(x) is torch.Tensor
        and not _is_compiling()
        and _backend.compiled_serves(x)
        and forward_ad._current_level < 0
        and not _dispatch_modes()
        and _functorch_transform() is None
    )
