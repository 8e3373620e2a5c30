"""Image grids of saliency maps (thesis §3.5.3, Fig. 3.3): one row per image, the input then one map per method."""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .postprocess import rescale_unit

__all__ = ["display_images", "save_saliency_grid"]


def display_images(images: Tensor, mean: Optional[Sequence[float]] = None,
                   std: Optional[Sequence[float]] = None) -> Tensor:
    """``(N, C, H, W)`` images as ``(N, H, W, C)`` values in [0, 1] for display: ``x · std + mean`` clipped to
    [0, 1] when ``mean`` and ``std`` (per channel) are given, else each image min–max rescaled."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images: expected a tensor of shape (N, C, H, W), got "
                         f"{tuple(getattr(images, 'shape', ())) or type(images).__name__}")
    x = images.detach().to("cpu", torch.float64)
    if (mean is None) != (std is None):
        raise ValueError("mean, std: give both (per-channel normalisation to undo) or neither (min-max display)")
    if mean is not None:
        c = x.shape[1]
        m = torch.as_tensor(mean, dtype=x.dtype).reshape(-1)
        s = torch.as_tensor(std, dtype=x.dtype).reshape(-1)
        if m.numel() not in (1, c) or s.numel() not in (1, c):
            raise ValueError(f"mean, std: expected 1 or {c} values each, got {m.numel()} and {s.numel()}")
        x = (x * s.view(1, -1, 1, 1) + m.view(1, -1, 1, 1)).clamp(0, 1)
    else:
        x = rescale_unit(x, dims=(1, 2, 3))
    return x.permute(0, 2, 3, 1)


def save_saliency_grid(images: Tensor, maps: Mapping[str, Tensor], path: Union[str, os.PathLike], *,
                       mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                       cmap: str = "inferno", cell_size: float = 1.6, dpi: int = 100) -> str:
    """Save a PNG grid: rows = images, columns = the input then ``maps[name]`` ``(N, H, W)`` per method.

    Inputs are shown un-normalised (:func:`display_images`; RGB when ``C = 3``, else gray: the channel mean);
    each map is min–max rescaled per image and shown
    with ``cmap``. Returns the written path (parent folders are created).
    """
    x = display_images(images, mean, std)
    n = x.shape[0]
    if not isinstance(maps, Mapping) or not maps:
        raise ValueError("maps: expected a non-empty mapping method name -> (N, H, W) tensor")
    for name, m in maps.items():
        if not isinstance(m, Tensor) or m.dim() != 3 or m.shape[0] != n:
            raise ValueError(f"maps[{name!r}]: expected a tensor of shape ({n}, H, W), got "
                             f"{tuple(getattr(m, 'shape', ())) or type(m).__name__}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = 1 + len(maps)
    fig = Figure(figsize=(cell_size * cols, cell_size * n))  # Agg canvas: no pyplot, no global backend change
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, cols, squeeze=False)
    for i in range(n):
        image = x[i].numpy()
        if image.shape[-1] != 3:  # gray; other channel counts are shown as their channel mean
            image = image.mean(-1)
        axes[i][0].imshow(image, cmap="gray", vmin=0, vmax=1)
        for j, m in enumerate(maps.values(), start=1):
            shown = rescale_unit(m[i].detach().to("cpu", torch.float64), dims=(0, 1))
            axes[i][j].imshow(shown.numpy(), cmap=cmap, vmin=0, vmax=1)
    for j, title in enumerate(["input"] + list(maps)):
        axes[0][j].set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
