"""Drop-in BatchNorm (and fused BatchNorm+ReLU) modules backed by :mod:`fastjac.ops`.

Each class subclasses the matching ``torch.nn.BatchNormNd`` and overrides only ``forward``: constructor
arguments, parameters/buffers (hence ``state_dict`` keys and checkpoint versioning), input-dimension checks
and ``repr`` are torch's own, so checkpoints load both ways. The ``BatchNormReLUNd`` classes compute
``relu(bn(x))`` in one fused op; they are ``BatchNormNd`` subclasses too (same state).
"""
from __future__ import annotations

from torch import Tensor, nn

from .. import ops

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d",
]


class _FusedBatchNormForward:
    """Mixin holding the one ``forward`` shared by all fastjac BatchNorm modules.

    It mirrors ``torch.nn.modules.batchnorm._BatchNorm.forward`` line for line (``num_batches_tracked``
    increment, cumulative average when ``momentum is None``, batch statistics in eval mode when the running
    ones are None, running statistics passed only when they are used or updated), calling
    :func:`fastjac.ops.batch_norm` or, when ``_fuse_relu``, :func:`fastjac.ops.batch_norm_relu`.
    """

    _fuse_relu = False

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)

        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:  # exponential moving average
                    exponential_average_factor = self.momentum

        # Batch statistics in training mode, and in eval mode when there are no running buffers.
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)

        # Running buffers are passed only when they are updated (training and tracked) or used (eval).
        use_buffers = not self.training or self.track_running_stats
        op = ops.batch_norm_relu if self._fuse_relu else ops.batch_norm
        return op(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            bn_training,
            float(exponential_average_factor),
            self.eps,
        )


class BatchNorm1d(_FusedBatchNormForward, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` (N x C or N x C x L input) computed by :func:`fastjac.ops.batch_norm`."""


class BatchNorm2d(_FusedBatchNormForward, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (N x C x H x W input) computed by :func:`fastjac.ops.batch_norm`."""


class BatchNorm3d(_FusedBatchNormForward, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` (N x C x D x H x W input) computed by :func:`fastjac.ops.batch_norm`."""


class BatchNormReLU1d(BatchNorm1d):
    """``relu(nn.BatchNorm1d(x))`` fused (:func:`fastjac.ops.batch_norm_relu`); same args and state."""

    _fuse_relu = True


class BatchNormReLU2d(BatchNorm2d):
    """``relu(nn.BatchNorm2d(x))`` fused (:func:`fastjac.ops.batch_norm_relu`); same args and state."""

    _fuse_relu = True


class BatchNormReLU3d(BatchNorm3d):
    """``relu(nn.BatchNorm3d(x))`` fused (:func:`fastjac.ops.batch_norm_relu`); same args and state."""

    _fuse_relu = True
