"""Images in the network's input space: the valid range of normalised pixels, de-normalisation, PNG grids."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..training import data as data_io


def _stats(dataset: str, channels: int, like: Tensor | None = None) -> tuple[Tensor, Tensor]:
    if dataset not in data_io.NORMALIZATION:
        raise ValueError(f"dataset: no normalisation for {dataset!r}; known: {sorted(data_io.NORMALIZATION)}")
    mean, std = data_io.NORMALIZATION[dataset]
    kw = {} if like is None else dict(dtype=like.dtype, device=like.device)
    rep = channels // len(mean)
    return (torch.tensor(mean * rep, **kw).view(1, channels, 1, 1), torch.tensor(std * rep, **kw).view(1, channels, 1, 1))


def valid_range(dataset: str, channels: int) -> tuple[Tensor, Tensor]:
    """``(low, high)``, each ``(1, C, 1, 1)``: the normalised values of pixel intensities 0 and 1 (the image
    range the trainer's inputs live in)."""
    mean, std = _stats(dataset, channels)
    return (0 - mean) / std, (1 - mean) / std


def denormalize(x: Tensor, dataset: str) -> Tensor:
    """Network inputs -> images in [0, 1] (clamped): the inverse of :func:`fastjac.training.data.normalize`."""
    mean, std = _stats(dataset, x.shape[1], x)
    return (x * std + mean).clamp(0, 1)


def file_stem(name: str) -> str:
    """``name`` (a method such as ``lambda=0.01, mu=1e-05``) as a safe file-name part."""
    return "".join(ch if ch.isalnum() or ch in "-=.," else "_" for ch in name)


def save_grid(images: Tensor, path: str, row_labels: Optional[Sequence[str]] = None, title: str = "") -> str:
    """PNG of ``images`` ``(rows, cols, C, H, W)`` in [0, 1] (C = 1 or 3): one row per class, say."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if images.dim() != 5 or images.shape[2] not in (1, 3):
        raise ValueError(f"images: expected (rows, cols, C, H, W) with C in (1, 3), got {tuple(images.shape)}")
    rows, cols = images.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(0.9 * cols + 0.8, 0.9 * rows + 0.4), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            img = images[r, c].detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy()
            ax = axes[r][c]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0 and row_labels is not None:
                ax.set_ylabel(str(row_labels[r]), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
