"""Maths of gradient fooling (thesis appendix §5.7.2, Eq. 5.7; Heo et al. 2019): the mask, the saliency map
of Eq. 5.7, the fooling loss, the in-mask energy fraction, and the fine-tuning loop.

Eq. 5.7: with the normalised unsigned saliency map ``s = |∇ₓ f_i| / (1ᵀ |∇ₓ f_i|)`` and the normalised binary
mask ``m`` (``1ᵀ m = 1``), ``L_fool = E_x ‖s − m‖²``, added to the cross-entropy: ``CE + λ L_fool``.
The thesis' saliency maps are per pixel; for colour images we sum ``|∇ₓ f_i|`` over the channels before
normalising (our choice: the map of Fig. 5.5), so ``s`` and ``m`` are ``H × W`` maps summing to one.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..input_jacobian import input_jacobian
from ..training import data as data_io
from .model_outputs import check_classes, eval_mode

__all__ = ["square_mask", "unsigned_saliency", "fooling_loss", "mask_fraction", "input_gradients", "fine_tune"]

GRADIENTS = ("logit", "loss")


def square_mask(height: int, width: int, top: float = 0.0, left: float = 0.0, size: float = 15 / 32) -> Tensor:
    """Boolean ``(H, W)`` mask of a square whose top-left corner is at fractions (``top``, ``left``) of the
    image and whose side is the fraction ``size`` of the height (rounded, at least one pixel, cropped at the
    border). Thesis Fig. 5.5a: a 15 × 15 top-left square in a 32 × 32 image (``size = 15/32``)."""
    for name, value in (("top", top), ("left", left)):
        if not 0 <= value < 1:
            raise ValueError(f"{name}: expected a fraction in [0, 1), got {value!r}")
    if not 0 < size <= 1:
        raise ValueError(f"size: expected a fraction in (0, 1], got {size!r}")
    side = max(1, round(size * height))
    r0, c0 = int(round(top * height)), int(round(left * width))
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[r0:r0 + side, c0:c0 + side] = True
    return mask


def unsigned_saliency(grad: Tensor) -> Tensor:
    """Eq. 5.7's ``s``: ``Σ_c |g|`` per pixel, divided by its sum over the image: ``(N, H, W)``, each map sums to 1
    (an all-zero gradient gives the uniform map)."""
    if grad.dim() != 4:
        raise ValueError(f"grad: expected (N, C, H, W), got {tuple(grad.shape)}")
    a = grad.abs().sum(1)
    total = a.flatten(1).sum(1).view(-1, 1, 1)
    uniform = torch.full_like(a, 1.0 / (a.shape[1] * a.shape[2]))
    return torch.where(total > 0, a / total.clamp_min(torch.finfo(a.dtype).tiny), uniform)


def _check_mask(mask: Tensor, grad: Tensor) -> Tensor:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(grad.shape[-2:]):
        raise ValueError(f"mask: expected a boolean tensor of shape {tuple(grad.shape[-2:])}, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    if not mask.any():
        raise ValueError("mask: expected at least one pixel inside the mask")
    return mask.to(grad.device)


def fooling_loss(grad: Tensor, mask: Tensor) -> Tensor:
    """Eq. 5.7: ``mean_n ‖s_n − m‖²`` with ``s`` = :func:`unsigned_saliency` of ``grad`` and ``m`` the mask
    divided by its pixel count. Differentiable in ``grad`` (a double backward when ``grad`` has a graph)."""
    mask = _check_mask(mask, grad)
    m = mask.to(grad.dtype) / mask.sum()
    return (unsigned_saliency(grad) - m).pow(2).flatten(1).sum(1).mean()


def mask_fraction(grad: Tensor, mask: Tensor, power: float = 2.0) -> Tensor:
    """Per sample, the fraction of gradient energy inside the mask: ``Σ_mask Σ_c |g|^p / Σ Σ_c |g|^p``
    (``power = 2``: energy; ``1``: the share of Eq. 5.7's unsigned map). ``(N,)``; NaN for a zero gradient."""
    mask = _check_mask(mask, grad)
    e = grad.abs().pow(power).sum(1)
    return (e * mask).flatten(1).sum(1) / e.flatten(1).sum(1)


def input_gradients(model: nn.Module, x: Tensor, y: Tensor, kind: str = "logit", temperature: float = 1.0,
                    batch_size: Optional[int] = None) -> Tensor:
    """Per-sample input-gradients in eval mode, detached: ``kind="logit"``: ``∇ₓ f_y``; ``"loss"``:
    ``∇ₓ CE(f(x)/T, y)`` (Eq. 5.6 with softmax temperature ``T``, thesis §5.7.2 uses T = 1 and T = 1000)."""
    if kind not in GRADIENTS:
        raise ValueError(f"kind: expected one of {list(GRADIENTS)}, got {kind!r}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
    y = check_classes(y, x.shape[0]).to(x.device)
    step = batch_size or max(len(x), 1)
    out = []
    with eval_mode(model), torch.enable_grad():
        for i in range(0, len(x), step):
            xi = x[i:i + step].detach().requires_grad_(True)
            logits = model(xi)
            if kind == "logit":
                scalar = logits.gather(1, y[i:i + step, None]).sum()
            else:
                scalar = F.cross_entropy(logits / temperature, y[i:i + step], reduction="sum")
            (g,) = torch.autograd.grad(scalar, xi)
            out.append(g.detach())
    return torch.cat(out) if out else torch.zeros_like(x)


def fine_tune(model: nn.Module, images: Tensor, labels: Tensor, mask: Tensor, weight: float, epochs: int,
              lr: float, batch_size: int = 128, seed: int = 0, dataset: Optional[str] = None,
              augment: bool = False, optimizer: str = "adam", batch_norm: str = "train", log=None) -> list[dict]:
    """Fine-tune ``model`` in place with ``CE + weight · L_fool`` (Eq. 5.7) on ``images`` (in [0, 1], normalised
    with ``dataset``'s statistics; or already network inputs when ``dataset`` is None) for ``epochs`` epochs.

    ``batch_norm="train"``: training mode; ``"eval"``: eval mode (BatchNorm normalises with its running
    statistics, which stay fixed: short fine-tunes on few images otherwise leave the running statistics behind
    the changed weights). The input-gradient of the label's logit comes from :func:`fastjac.input_jacobian` (exact,
    ``create_graph=True``: the loss is differentiated by a double backward), which, with BatchNorm in training
    mode, differentiates each sample's own function with the clean batch's statistics held constant. Batch order
    (and crop + flip augmentation when ``augment``) drawn from generators seeded with ``seed``. ``optimizer``:
    ``adam`` or ``sgd`` (momentum 0.9). Returns one row per epoch (mean loss, CE, fooling loss).
    """
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer: expected 'adam' or 'sgd', got {optimizer!r}")
    if batch_norm not in ("train", "eval"):
        raise ValueError(f"batch_norm: expected 'train' or 'eval', got {batch_norm!r}")
    if images.dim() != 4:
        raise ValueError(f"images: expected (N, C, H, W), got {tuple(images.shape)}")
    labels = check_classes(labels, images.shape[0])
    device = next(model.parameters()).device
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr, momentum=0.9)
    order_g = torch.Generator().manual_seed(seed)
    augment_g = torch.Generator().manual_seed(seed + 1)
    history = []
    was_training = model.training
    model.train(batch_norm == "train")
    try:
        for epoch in range(epochs):
            sums = {"loss": 0.0, "ce": 0.0, "fool": 0.0}
            steps = 0
            for idx in torch.randperm(len(labels), generator=order_g).split(batch_size):
                if len(idx) < 2:  # BatchNorm needs two samples
                    continue
                x = images[idx]
                if augment:
                    x = data_io.augment(x, augment_g)
                if dataset is not None:
                    x = data_io.normalize(x, dataset)
                x, y = x.to(device), labels[idx].to(device)
                logits, grad = input_jacobian(model, x, y, mode="target", create_graph=True)
                ce = F.cross_entropy(logits, y)
                fool = fooling_loss(grad, mask)
                loss = ce + weight * fool
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for k, v in (("loss", loss), ("ce", ce), ("fool", fool)):
                    sums[k] += float(v.detach())
                steps += 1
            row = {"epoch": epoch, **{k: v / max(steps, 1) for k, v in sums.items()}}
            history.append(row)
            if log is not None:
                log(f"  fooling epoch {epoch}: loss {row['loss']:.4f} (CE {row['ce']:.4f}, L_fool {row['fool']:.3g})")
    finally:
        model.train(was_training)
    return history
