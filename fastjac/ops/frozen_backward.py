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
Jacobian rows, loss and every parameter gradient (tests/test_frozen_backward.py);
:func:`fastjac.nn.why_not_one_pass` says whether a model is such a network. With smooth activations
they are not (the activation's second derivative sees the statistics' input dependence): use the two-pass
route there.

The switch is a property of the graph, not of a thread: ``recording()`` hands its flag tensor to every fused
BatchNorm forward it sees, whose autograd node keeps it; ``frozen()`` sets the flag, and the autograd engine's
worker threads (one per device) read that same tensor. Graphs recorded with other switches, or none, are
unaffected; under DDP the one ``loss.backward()`` carries both gradients. Only the C++ chain supports it
(:mod:`fastjac.ops._paths`): a fused BatchNorm that would take the Python chain inside ``recording()`` raises.
First and second derivatives are exact; a third derivative through a frozen link raises (use the two-pass
route for it).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from ._scoped import ScopedSetting

_RECORDING: ScopedSetting["FrozenBackward"] = ScopedSetting("fastjac_frozen_backward")


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
