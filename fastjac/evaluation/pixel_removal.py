"""Removing pixels by saliency: the primitive of pixel perturbation (thesis §3.5.1), ROAR (§3.5.2) and
discriminative pixel perturbation (§5.5.2).

A *pixel* is one spatial position (all channels together). For a fraction ``k`` of an ``H×W`` image exactly
``round(k·H·W)`` pixels are removed (Python's ``round``: halves to even), chosen by the saliency map: the
``"least"`` or the ``"most"`` salient ones. Ties are broken deterministically by the row-major position: among
equal saliency values the pixel with the smaller flat index ``h·W + w`` is removed first (for ``least`` and
``most`` alike), so the result never depends on the sort implementation.

Removed pixels are replaced by a fill value per image and channel:

- ``"black"``: the value of a black pixel *in the images' space*: ``0`` for images in ``[0, 1]``,
  ``normalise(0) = -mean/std`` for the network's normalised input (:func:`black_pixel`);
- ``"image_mean"``: each image's per-channel mean over all its pixels (before removal);
- ``"dataset_mean"``: a given per-channel value (e.g. the training set's mean, which is ``0`` in normalised space).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..training import data as data_io

__all__ = ["WHICH", "FILLS", "removal_count", "removal_masks", "fill_values", "remove_pixels", "black_pixel"]

WHICH = ("least", "most")
FILLS = ("black", "image_mean", "dataset_mean")


def removal_count(fraction: float, height: int, width: int) -> int:
    """``round(fraction · H · W)``: the number of pixels a fraction removes (``fraction`` in [0, 1])."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"fraction: expected a number in [0, 1], got {fraction!r}")
    return int(round(fraction * height * width))


def removal_masks(saliency: Tensor, fraction: float, which: str = "least") -> Tensor:
    """Boolean masks ``(N, H, W)``, True at the ``round(fraction·H·W)`` least (or most) salient pixels of each map.

    Ties: the smaller row-major index is removed first (see the module docstring).
    """
    if which not in WHICH:
        raise ValueError(f"which: expected one of {list(WHICH)}, got {which!r}")
    if not isinstance(saliency, Tensor) or saliency.dim() != 3 or not saliency.is_floating_point():
        got = f"{getattr(saliency, 'dtype', type(saliency).__name__)} {tuple(getattr(saliency, 'shape', ()))}"
        raise ValueError(f"saliency: expected a floating-point tensor of shape (N, H, W), got {got}")
    if torch.isnan(saliency).any():
        raise ValueError("saliency: contains NaN values; removal order is undefined")
    n, h, w = saliency.shape
    count = removal_count(fraction, h, w)
    flat = saliency.reshape(n, h * w)
    # stable sort keeps row-major order among equal keys -> the documented tie rule for both directions
    order = torch.sort(flat if which == "least" else -flat, dim=1, stable=True).indices[:, :count]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, order, True)
    return mask.view(n, h, w)


def fill_values(images: Tensor, fill: str, value: Union[None, float, Sequence[float], Tensor] = None) -> Tensor:
    """The replacement value per image and channel, ``(N, C)``.

    ``fill="image_mean"`` takes each image's channel means; ``"black"`` and ``"dataset_mean"`` need ``value``
    (a number or one value per channel, in the images' space; :func:`black_pixel` gives black).
    """
    if fill not in FILLS:
        raise ValueError(f"fill: expected one of {list(FILLS)}, got {fill!r}")
    n, c = images.shape[:2]
    if fill == "image_mean":
        return images.mean(dim=(2, 3))
    if value is None:
        raise ValueError(f"value: fill {fill!r} needs the per-channel fill value (in the images' space)")
    v = torch.as_tensor(value, dtype=images.dtype, device=images.device).flatten()
    if v.numel() == 1:
        v = v.expand(c)
    if v.numel() != c:
        raise ValueError(f"value: expected 1 or {c} per-channel values for fill {fill!r}, got {v.numel()}")
    return v[None].expand(n, c)


def remove_pixels(images: Tensor, saliency: Tensor, fraction: float, which: str = "least", fill: str = "black",
                  value: Union[None, float, Sequence[float], Tensor] = None,
                  mask: Optional[Tensor] = None) -> Tensor:
    """``images`` ``(N, C, H, W)`` with the ``round(fraction·H·W)`` least/most salient pixels of each image (all
    channels) replaced by the fill (:func:`fill_values`); a new tensor. ``mask`` (from :func:`removal_masks`)
    may be given instead of recomputing it from ``saliency``."""
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images: expected a floating-point tensor of shape (N, C, H, W), got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
    n, c, h, w = images.shape
    if mask is None:
        if saliency is None or tuple(saliency.shape) != (n, h, w):
            raise ValueError(f"saliency: expected shape {(n, h, w)} to match images {tuple(images.shape)}, got "
                             f"{tuple(getattr(saliency, 'shape', ()))}")
        mask = removal_masks(saliency.to(images.device), fraction, which)
    elif tuple(mask.shape) != (n, h, w) or mask.dtype != torch.bool:
        raise ValueError(f"mask: expected a bool tensor of shape {(n, h, w)}, got {mask.dtype} {tuple(mask.shape)}")
    fills = fill_values(images, fill, value)[:, :, None, None]
    return torch.where(mask.to(images.device)[:, None], fills, images)


def black_pixel(dataset: str, channels: int, normalized: bool = True) -> Tensor:
    """The value of a black pixel per channel: ``normalise(0)`` for the network's input of ``dataset``
    (``normalized``), else ``0`` (images in [0, 1])."""
    zero = torch.zeros(1, channels, 1, 1)
    return (data_io.normalize(zero, dataset) if normalized else zero).flatten()
