"""Drop-in convolution modules computed by :func:`fastjac.ops.conv` (PyTorch's kernels, a cheaper double backward).

Each class subclasses the matching ``torch.nn.ConvNd`` and overrides only ``_conv_forward`` (what ``forward``
calls with ``self.weight`` and ``self.bias``, so weight parametrizations still apply): constructor arguments,
parameters, ``state_dict`` keys and ``repr`` are torch's own. A non-``zeros`` ``padding_mode`` pads first, as
torch does.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops

__all__ = ["Conv1d", "Conv2d", "Conv3d"]


class _FastjacConvForward:
    """Mixin holding the one ``_conv_forward`` of the fastjac convolutions (mirrors ``torch.nn.ConvNd``'s)."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return ops.conv(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return ops.conv(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class Conv1d(_FastjacConvForward, nn.Conv1d):
    """``nn.Conv1d`` computed by :func:`fastjac.ops.conv`."""


class Conv2d(_FastjacConvForward, nn.Conv2d):
    """``nn.Conv2d`` computed by :func:`fastjac.ops.conv`."""


class Conv3d(_FastjacConvForward, nn.Conv3d):
    """``nn.Conv3d`` computed by :func:`fastjac.ops.conv`."""
