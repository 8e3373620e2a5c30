"""Saliency maps (``fastjac.saliency``): one map per image at the input's spatial size (thesis Ch. 3).

``fastjac.saliency(model, x, target=None, method="fullgrad", ...)`` dispatches to the methods registered in
:data:`METHODS` (one module per method family, each registering itself with :func:`register`, from
:mod:`.registry`). Every method
receives the model in eval mode (its mode is restored afterwards), the input ``x`` ``(N, C, H, W)``, the
target class per sample ``(N,)`` and, for random methods, a ``torch.Generator`` seeded from ``seed`` — so a
call is deterministic under a seed. It returns non-negative maps ``(N, H, W)``; larger means more salient.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor, nn

from .registry import METHODS, check_target_range, register

__all__ = ["METHODS", "check_target_range", "full_gradient_maps", "register", "resolve_target", "saliency",
           "save_saliency_grid"]

def resolve_target(model: nn.Module, x: Tensor, target) -> Tensor:
    """The class per sample: ``target`` as a ``(N,)`` long tensor (an int is broadcast), or the model's top
    class at ``x`` when ``target`` is None."""
    n = x.shape[0]
    if target is None:
        with torch.no_grad():
            return model(x).argmax(1)
    if isinstance(target, int) and not isinstance(target, bool):
        return torch.full((n,), target, dtype=torch.long, device=x.device)
    if not isinstance(target, Tensor) or target.dtype not in (torch.int32, torch.int64) or target.shape != (n,):
        raise ValueError(f"target: expected None, an int or an integer tensor of shape ({n},), got "
                         f"{getattr(target, 'dtype', type(target).__name__)} {tuple(getattr(target, 'shape', ()))}")
    return target.to(device=x.device, dtype=torch.long)


def saliency(model: nn.Module, x: Tensor, target=None, method: str = "fullgrad", *, seed: int = 0,
             batch_size: Optional[int] = None, **options) -> Tensor:
    """Saliency maps ``(N, H, W)`` of ``model`` at ``x`` for class ``target`` (default: the top class).

    Args:
        model: a classifier returning logits ``(N, K)``.
        x: images ``(N, C, H, W)``, floating point.
        target: None (top class), an int, or ``(N,)`` integer tensor of classes.
        method: one of :data:`METHODS` (``fullgrad``, ``input_gradient``, ``input_x_gradient``,
            ``integrated_gradients``, ``smoothgrad``, ``smoothgrad_squared``, ``gradcam``, ``random``).
        seed: seeds the generator of random methods (SmoothGrad noise, random maps).
        batch_size: process ``x`` in chunks of this size (the maps do not depend on it).
        **options: method options (e.g. ``steps``/``baseline`` for integrated gradients, ``layer`` for
            Grad-CAM); an option the method does not take raises a ``TypeError`` naming it.
    """
    if method not in METHODS:
        raise ValueError(f"method: unknown saliency method {method!r}; expected one of {sorted(METHODS)}")
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor of shape (N, C, H, W), got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size: expected a positive integer or None, got {batch_size!r}")
    fn = METHODS[method]
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in options if k not in params and not takes_any)
    if unknown:
        raise TypeError(f"saliency method {method!r} takes no option(s) {unknown}; its options: "
                        f"{[k for k in params if k not in ('model', 'x', 'target', 'generator')]}")
    was_training = model.training
    model.eval()
    try:
        target = resolve_target(model, x, target)
        generator = torch.Generator(device=x.device).manual_seed(seed)
        if "generator" in params:
            options = dict(options, generator=generator)
        step = batch_size or x.shape[0]
        maps = [fn(model, x[i:i + step], target[i:i + step], **options) for i in range(0, x.shape[0], step)]
    finally:
        model.train(was_training)
    out = torch.cat(maps) if maps else x.new_zeros((0,) + tuple(x.shape[2:]))
    expected = (x.shape[0],) + tuple(x.shape[2:])
    if tuple(out.shape) != expected:
        raise RuntimeError(f"saliency method {method!r} returned shape {tuple(out.shape)}, expected {expected}")
    return out.detach()


from . import gradients  # noqa: E402,F401  (registers input_gradient, input_x_gradient, random)
from . import fullgrad, gradcam, integrated_gradients, smoothgrad  # noqa: E402,F401  (register the others)
from .fullgrad import full_gradient_maps  # noqa: E402
from .grid import save_saliency_grid  # noqa: E402
