"""FullGrad saliency (thesis §3.4.2, Eq. 3.2) from the full-gradient decomposition (thesis §3.4, Eq. 3.3).

``S(x) = ψ(∇ₓf ⊙ x) + Σ_{l ∈ L} Σ_{c ∈ c_l} ψ(f^b(x)_c)`` with ``ψ = bilinearUpsample(rescale(abs(·)))``.

Choices the thesis leaves open, stated here:

- **Bias-gradient channels** (``rescale="channel"``, the default, as Eq. 3.2 is written): ψ is applied to each
  channel map ``f^b(x)_c`` of each sample separately — ``|·|``, then a min–max rescale of that ``h × w`` map to
  [0, 1] — and the rescaled channel maps are summed, so every neuron votes with weight at most 1 ("neuron-wise
  maps vote independently", §3.4.2). ``rescale="layer"`` instead rescales a layer's ``C × h × w`` absolute
  bias-gradients of a sample jointly before summing the channels (what the authors' released code does).
- **Input term**: ``∇ₓf ⊙ x`` is reduced over input channels as ``Σ_c |·|`` first (the channel reduction of the
  other gradient maps, ``input_x_gradient``), then rescaled to [0, 1] as one map: ψ in Eq. 3.2 is written on
  the whole input-gradient without a channel sum, and gives one map.
- **Which layers**: only bias-gradients with a spatial layout ``(N, C, h, w)`` (Conv2d biases, BatchNorm2d
  effective biases, fused BatchNorm+ReLU) enter the map; fully connected layers are left out (§3.4.2: "we can
  obtain spatial maps for only the convolutional layers"). :func:`full_gradient_maps` keeps them all.
- **Resize**: bilinear, ``align_corners=False``. Bilinear resizing is linear, so the channel maps of a layer are
  summed before one resize (equal to resizing each and summing).
- A constant map (zero range, including a 1×1 map) rescales to 0, never NaN.

Rescaling is per sample, so FullGrad maps of a batch equal those of each image alone (in eval mode).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..full_jacobian import full_jacobian
from .registry import register
from .postprocess import rescale_unit, upsample_to

__all__ = ["full_gradient_maps", "fullgrad_aggregate", "fullgrad"]

_RESCALES = ("channel", "layer")


def _check_rescale(rescale) -> None:
    if rescale not in _RESCALES:
        raise ValueError(f"rescale: expected one of {list(_RESCALES)}, got {rescale!r}")


def full_gradient_maps(model: nn.Module, x: Tensor, target=None, *,
                       layers: Optional[Iterable[str]] = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The raw (signed, un-post-processed) full-gradients of thesis Eq. 3.3: ``(∇ₓf ⊙ x, {layer: f^b_l})``.

    The input term is shaped like ``x``; each bias-gradient ``f^b_l = ∇_{z_l} f ⊙ b_l`` like its layer's output
    (:func:`fastjac.full_jacobian`, which also lists the layer names and the biases it models). With
    ``layers=None``, a ReLU network and eval-mode BatchNorm, everything sums to the target output per sample:
    ``Σ input term + Σ_l Σ f^b_l = f_target(x)`` (completeness, thesis §3.4.1). Call it with the model in eval
    mode for per-sample maps (:func:`fastjac.saliency` does). Results are detached.
    """
    fj = full_jacobian(model, x, target, layers=layers, create_graph=False)
    return fj.input_jacobian * fj.input.detach(), fj.bias_jacobians


def fullgrad_aggregate(input_term: Tensor, bias_gradients: dict[str, Tensor], rescale: str = "channel") -> Tensor:
    """Eq. 3.2: ψ of the input term plus ψ of every spatial bias-gradient channel, summed; ``(N, H, W)``.

    ``input_term`` is ``∇ₓf ⊙ x`` ``(N, C, H, W)``; non-spatial (not 4-D) bias-gradients are skipped. See the
    module docstring for the channel handling of ``rescale`` (``"channel"`` or ``"layer"``).
    """
    _check_rescale(rescale)
    size = input_term.shape[-2:]
    total = rescale_unit(input_term.abs().sum(1, keepdim=True), dims=(2, 3))
    dims = (2, 3) if rescale == "channel" else (1, 2, 3)
    for bias_gradient in bias_gradients.values():
        if bias_gradient.dim() != 4:
            continue
        layer_map = rescale_unit(bias_gradient.abs(), dims=dims).sum(1, keepdim=True)
        total = total + upsample_to(layer_map.to(total.dtype), size)
    return total.squeeze(1)


def _layer_names(layers: Union[str, Sequence[str]]) -> list[str]:
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"layers: expected None or a non-empty list of layer names, got {layers!r}")
    return names


@register("fullgrad")
def fullgrad(model: nn.Module, x: Tensor, target: Tensor, layers: Optional[Sequence[str]] = None,
             rescale: str = "channel") -> Tensor:
    """FullGrad saliency, thesis Eq. 3.2 (module docstring: channel handling, layers, resize).

    Options: ``layers`` — names (``model.named_modules()``) of the biased layers whose bias-gradients enter the
    map (default: all with a spatial output); ``rescale`` — ``"channel"`` (Eq. 3.2) or ``"layer"``.
    """
    _check_rescale(rescale)
    if layers is not None:
        layers = _layer_names(layers)
        try:
            input_term, bias_gradients = full_gradient_maps(model, x, target, layers=layers)
        except ValueError as err:
            raise ValueError(f"layers: {err}") from None
        flat = sorted(n for n, g in bias_gradients.items() if g.dim() != 4)
        if flat:
            raise ValueError(f"layers: {flat} have no spatial (N, C, h, w) output; FullGrad maps only take "
                             "convolutional / 2-D BatchNorm layers")
    else:
        input_term, bias_gradients = full_gradient_maps(model, x, target)
    with torch.no_grad():
        return fullgrad_aggregate(input_term, bias_gradients, rescale)
