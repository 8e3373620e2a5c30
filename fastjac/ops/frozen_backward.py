"""Per-sample input gradients of a training-mode network in one forward pass: the frozen BatchNorm backward.

Seed 000's Propositions are about each sample's own input-Jacobian ``d f(x_n) / d x_n``. In training mode a
BatchNorm normalises with the batch's statistics, so plain double backprop of the clean pass also carries the
cross-sample terms through them; the per-sample Jacobian is that of the network with the batch statistics
held constant in the input (:mod:`fastjac.batch_norm_stats`, "frozen"). Computing it used to take a second
forward pass with the recorded statistics replayed. A :class:`FrozenBackward` gets it from the clean pass:

.. code-block:: python

    switch = FrozenBackward()
    with switch.recording():                      # the fused BatchNorms of this forward are switchable
        logits = model(x)                         # training mode: batch statistics, running ones updated once
    with switch.frozen():                         # backward calls in here use the per-channel formula
        (j,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), x, create_graph=True)
    loss = F.cross_entropy(logits, y) + lam * j.pow(2).sum(1).mean()
    loss.backward()                               # CE: the training-mode backward; the penalty: see below

Inside ``frozen()`` each batch-statistics BatchNorm's input gradient is ``gx = γ r g`` per channel (``r`` the
batch's invstd; times the ReLU mask for ``batch_norm_relu``): no gradient flows to the statistics from the
input side, so row n is sample n's own Jacobian. The statistics stay differentiable functions of the
parameters: a loss on those gradients is differentiated through ``r``'s dependence on the layers before
(``dr/dx = -r^3 (x - mean) / M``), exactly as the two-pass ``frozen(differentiable=True)`` route does. In a
piecewise-linear network (conv, linear, ReLU, max/avg-pool, BatchNorm, dropout) the two routes are equal:
Jacobian rows, loss and every parameter gradient (tests/test_frozen_backward.py). With smooth activations
they are not (the activation's second derivative sees the statistics' input dependence): use the two-pass
route there.

The switch is a property of the graph, not of a thread: ``recording()`` hands its flag tensor to every fused
BatchNorm forward it sees, whose autograd node keeps it; ``frozen()`` sets the flag, and the autograd engine's
worker threads (one per device) read that same tensor. Graphs recorded with other switches, or none, are
unaffected; under DDP the one ``loss.backward()`` carries both gradients. Only the C++ chain supports it
(:mod:`fastjac.ops._paths`): a fused BatchNorm that would take the Python chain inside ``recording()`` raises.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import torch
from torch import nn

from . import _paths

_RECORDING: contextvars.ContextVar[Optional["FrozenBackward"]] = contextvars.ContextVar(
    "fastjac_frozen_backward", default=None
)


class FrozenBackward:
    """A frozen switch for the graphs recorded under :meth:`recording` (module docstring)."""

    def __init__(self) -> None:
        self.flag = torch.zeros((), dtype=torch.bool)

    @contextlib.contextmanager
    def recording(self) -> Iterator["FrozenBackward"]:
        """Forward passes in this block build switchable fused BatchNorm nodes (training mode)."""
        token = _RECORDING.set(self)
        try:
            yield self
        finally:
            _RECORDING.reset(token)

    @contextlib.contextmanager
    def frozen(self) -> Iterator["FrozenBackward"]:
        """Backward calls in this block take the recorded BatchNorms' frozen input gradient."""
        if self.flag.item():
            raise RuntimeError("FrozenBackward.frozen() is already active for this switch")
        self.flag.fill_(True)
        try:
            yield self
        finally:
            self.flag.fill_(False)


def recording_switch() -> Optional[FrozenBackward]:
    """The switch of the enclosing :meth:`FrozenBackward.recording` block, or None."""
    return _RECORDING.get()


# Leaf modules that are piecewise linear in their input (ReLU masks, pooling indices and dropout masks are
# piecewise constant), besides the fused BatchNorms themselves.
_PIECEWISE_LINEAR_LEAVES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Flatten, nn.Identity, nn.Dropout,
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def why_not_one_pass(model: nn.Module, x: torch.Tensor) -> Optional[str]:
    """None when the one-pass route equals the two-pass one for ``model`` on ``x`` (module docstring), else why
    not: a batch-statistics BatchNorm that is not a fused :mod:`fastjac.nn` one, a call that would take the
    Python chain, or a module not known to be piecewise linear. A module with its own ``forward`` counts when it
    declares ``piecewise_linear = True`` (its forward adds no smooth operation to its submodules')."""
    from ..batch_norm_stats import uses_batch_stats
    from ..nn.batch_norm import _FusedBatchNormForward

    if not _paths.use_cpp_chain(x):
        return "the call takes the Python chain (fastjac.ops._paths)"
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if uses_batch_stats(module) and not isinstance(module, _FusedBatchNormForward):
                return f"{name or 'model'} is a torch BatchNorm, not a fused fastjac one"
        elif next(module.children(), None) is None:
            if not isinstance(module, _PIECEWISE_LINEAR_LEAVES):
                return f"{name or 'model'} ({type(module).__name__}) is not known to be piecewise linear"
        elif not (isinstance(module, _CONTAINERS) or getattr(type(module), "piecewise_linear", False)):
            return f"{name or 'model'} ({type(module).__name__}) does not declare piecewise_linear = True"
    return None
