"""Swap ``torch.nn`` ReLU / Softplus / BatchNorm / convolution modules of a model for their :mod:`fastjac.nn` versions."""
from __future__ import annotations

from collections import Counter

from torch import nn

from . import nn as fnn

__all__ = ["convert"]

# Exact types only: a subclass may override forward (or anything else) with its own behaviour, and
# SyncBatchNorm / LazyBatchNormNd are not BatchNormNd, so none of these is ever touched.
_REPLACEMENTS = {
    nn.ReLU: fnn.ReLU,
    nn.Softplus: fnn.Softplus,
    nn.BatchNorm1d: fnn.BatchNorm1d,
    nn.BatchNorm2d: fnn.BatchNorm2d,
    nn.BatchNorm3d: fnn.BatchNorm3d,
}
_CONVS = {nn.Conv1d: fnn.Conv1d, nn.Conv2d: fnn.Conv2d, nn.Conv3d: fnn.Conv3d}
_FUSED = {
    nn.BatchNorm1d: fnn.BatchNormReLU1d,
    nn.BatchNorm2d: fnn.BatchNormReLU2d,
    nn.BatchNorm3d: fnn.BatchNormReLU3d,
    fnn.BatchNorm1d: fnn.BatchNormReLU1d,
    fnn.BatchNorm2d: fnn.BatchNormReLU2d,
    fnn.BatchNorm3d: fnn.BatchNormReLU3d,
}
_RELUS = (nn.ReLU, fnn.ReLU)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in _HOOKS)


def _runs_in_order(module: nn.Module) -> bool:
    """An ``nn.Sequential`` whose forward is Sequential's own, so children run one after the other."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _fuse_sequential(seq: nn.Sequential, references: Counter) -> None:
    items = list(seq._modules.items())
    i = 0
    while i + 1 < len(items):
        bn, (relu_name, relu) = items[i][1], items[i + 1]
        if (
            type(bn) in _FUSED
            and type(relu) in _RELUS
            and references[id(bn)] == 1  # a BN used elsewhere too must stay a plain BN
            and not _has_hooks(bn)  # hooks would see the post-ReLU output / lose their module
            and not _has_hooks(relu)
        ):
            bn.__class__ = _FUSED[type(bn)]
            identity = nn.Identity()
            identity.train(relu.training)
            seq._modules[relu_name] = identity
            i += 2
        else:
            i += 1


def convert(model: nn.Module, fuse: bool = True, conv: bool = True) -> nn.Module:
    """Convert ``model`` in place to fastjac modules and return it.

    Every module whose type is exactly ``nn.ReLU``, ``nn.Softplus`` or ``nn.BatchNorm1d/2d/3d``, at any
    depth, becomes the :mod:`fastjac.nn` class of the same name. The module object itself is kept (its
    class is switched), so parameters, buffers, hooks, train/eval mode and every reference to it
    (optimizers, shared modules, the root when ``model`` is itself such a module) stay valid.
    Subclasses, ``SyncBatchNorm`` and lazy BatchNorms are left alone.

    With ``fuse=True``, a BatchNorm immediately followed by a ReLU inside an ``nn.Sequential`` (one that
    does not override ``forward``) becomes a ``BatchNormReLUNd`` in the BatchNorm's slot and the ReLU's
    slot an ``nn.Identity``: indices and ``state_dict`` keys are unchanged. A pair is not fused when the
    BatchNorm is also referenced from another parent or either module has hooks.

    With ``conv=True``, modules of type exactly ``nn.Conv1d/2d/3d`` become :mod:`fastjac.nn` convolutions: the
    same function and kernels, with a cheaper double backward (:func:`fastjac.ops.conv`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastjac.convert: model must be a torch.nn.Module, got {type(model).__name__}")
    if fuse:
        references = Counter(id(child) for m in model.modules() for child in m._modules.values() if child is not None)
        for module in list(model.modules()):
            if _runs_in_order(module):
                _fuse_sequential(module, references)
    replacements = {**_REPLACEMENTS, **_CONVS} if conv else _REPLACEMENTS
    for module in model.modules():
        replacement = replacements.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
    return model
