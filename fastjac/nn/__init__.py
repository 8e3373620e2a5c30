"""Drop-in ``torch.nn`` modules computed by the fused ops of :mod:`fastjac.ops`.

Every module subclasses its ``torch.nn`` counterpart and overrides only ``forward`` (the convolutions:
``_conv_forward``), so constructor arguments, ``state_dict`` keys and ``repr`` are unchanged. :func:`fastjac.convert` swaps them into a model.
"""
from .activation import ReLU, Softplus
from .batch_norm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormReLU1d,
    BatchNormReLU2d,
    BatchNormReLU3d,
)
from .conv import Conv1d, Conv2d, Conv3d
from .one_pass import why_not_one_pass

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d",
    "Conv1d", "Conv2d", "Conv3d", "ReLU", "Softplus", "why_not_one_pass",
]
