"""Grad-CAM (Selvaraju et al. 2017), a baseline of thesis §3.5: ``ReLU(Σ_k α_k A^k)`` upsampled to the input.

``A^k`` is channel ``k`` of the ``(N, K, h, w)`` output of the layer ``layer``, ``α_k = (1/hw) Σ_ij ∂f/∂A^k_ij``
the spatially averaged gradient of the target output; the ``h × w`` map is resized bilinearly
(``align_corners=False``) to the input's ``H × W``. When the layer runs more than once in a forward pass (a
module reused, e.g. a torchvision BasicBlock's ``relu``), its last call is used.

Default layer (:func:`default_gradcam_layer`): the last module, in the order the forward pass calls them, that
has no submodules, returns a 4-D tensor, and is not a pooling layer, ``Identity``, ``Dropout`` or ``Flatten``.
That is the rectified output of the last convolutional stage: ``features.42`` (ReLU after conv5_3) of a
torchvision ``vgg16_bn``, ``layer4.1.relu`` (the last block's output) of a torchvision ResNet,
``features.<i>`` (the last fused BatchNorm+ReLU) of our VGGs and ``layer4.1.act2`` of our ResNets.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.nn.modules.pooling import (_AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _AvgPoolNd, _LPPoolNd,
                                      _MaxPoolNd)

from ..losses.features import LayerNotFoundError, get_layer
from .registry import check_target_range, register
from .postprocess import upsample_to

__all__ = ["default_gradcam_layer", "gradcam"]

_SKIPPED = (_AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _AvgPoolNd, _LPPoolNd, _MaxPoolNd, nn.Identity,
            nn.Dropout, nn.Dropout2d, nn.Flatten)


def default_gradcam_layer(model: nn.Module, x: Tensor) -> str:
    """The default Grad-CAM layer of ``model`` for inputs like ``x`` (rule in the module docstring); found by
    one forward pass of ``x[:1]`` without gradients."""
    called: list[str] = []

    def hook(name):
        def record(module, args, output):
            if isinstance(output, Tensor) and output.dim() == 4:
                called.append(name)
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()
               if name and not any(True for _ in m.children()) and not isinstance(m, _SKIPPED)]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    if not called:
        raise ValueError(f"layer: {type(model).__name__} has no layer with a 4-D (N, C, h, w) output to default "
                         "to; pass `layer` explicitly")
    return called[-1]


def _layer_activation_and_gradient(model: nn.Module, x: Tensor, target: Tensor, layer: str):
    """``(A, ∂f/∂A)`` of the last call of module ``layer``, ``f = Σ_n out[n, target[n]]``."""
    try:
        module = get_layer(model, layer, caller="saliency(method='gradcam')")
    except LayerNotFoundError as err:
        raise ValueError(f"layer: {err}") from None
    calls: list[tuple] = []

    def record(module, args, output):
        if not isinstance(output, Tensor) or output.dim() != 4:
            raise ValueError(f"layer: {layer!r} ({type(module).__name__}) returned "
                             f"{tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__}, "
                             "expected a 4-D (N, C, h, w) tensor")
        # An in-place op on a view re-routes its base's history past the view's node: hand on a copy.
        copied = output.requires_grad and output._is_view()
        if copied:
            output = output.clone()
        calls.append((output.detach().clone(), get_gradient_edge(output) if output.requires_grad else None))
        return output if copied else None

    handle = module.register_forward_hook(record)
    try:
        with torch.enable_grad():
            out = model(x.detach().requires_grad_(True))
    finally:
        handle.remove()
    if not calls:
        raise ValueError(f"layer: {layer!r} is not called in the forward pass of {type(model).__name__}")
    check_target_range(target, out)
    activation, edge = calls[-1]
    if edge is None:
        return activation, torch.zeros_like(activation)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), [edge], allow_unused=True)
    return activation, (torch.zeros_like(activation) if grad is None else grad.detach())


@register("gradcam")
def gradcam(model: nn.Module, x: Tensor, target: Tensor, layer: Optional[str] = None) -> Tensor:
    """Grad-CAM map ``ReLU(Σ_k α_k A^k)`` at the input size; option ``layer`` (a ``model.named_modules()``
    name; default :func:`default_gradcam_layer`)."""
    if layer is None:
        layer = default_gradcam_layer(model, x)
    elif not isinstance(layer, str):
        raise ValueError(f"layer: expected a module name (str) or None, got {layer!r}")
    activation, grad = _layer_activation_and_gradient(model, x, target, layer)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(1, keepdim=True))
    return upsample_to(cam, x.shape[-2:]).squeeze(1).to(x.dtype)
