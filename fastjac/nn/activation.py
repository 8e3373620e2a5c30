"""Drop-in activation modules backed by the fused ops of :mod:`fastjac.ops`."""
from __future__ import annotations

from torch import Tensor, nn

from .. import ops

__all__ = ["ReLU", "Softplus"]


class ReLU(nn.ReLU):
    """``nn.ReLU`` computed by :func:`fastjac.ops.relu` (saves a 1-bit mask for backward).

    ``inplace`` is accepted (and kept as an attribute) only for signature and ``repr`` compatibility with
    ``nn.ReLU``: the fused op is functional and always returns a new tensor, the input is never modified.
    """

    def forward(self, input: Tensor) -> Tensor:
        return ops.relu(input)


class Softplus(nn.Softplus):
    """``nn.Softplus(beta, threshold)`` computed by :func:`fastjac.ops.softplus`."""

    def forward(self, input: Tensor) -> Tensor:
        return ops.softplus(input, self.beta, self.threshold)
