"""Small shared helpers of the E7 evaluations: a model's class logits and input-gradients, without parameter
gradients, in evaluation mode, batched."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (BatchNorm with running statistics) for the block; its mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def check_classes(classes: Tensor, n: int, num_classes: int | None = None) -> Tensor:
    """``classes`` as a ``(n,)`` long tensor; errors name the argument."""
    if not isinstance(classes, Tensor) or classes.dtype not in (torch.int32, torch.int64) or classes.shape != (n,):
        raise ValueError(f"classes: expected an integer tensor of shape ({n},), got "
                         f"{getattr(classes, 'dtype', type(classes).__name__)} {tuple(getattr(classes, 'shape', ()))}")
    if num_classes is not None and n and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
        raise ValueError(f"classes: values must lie in [0, {num_classes}), got [{int(classes.min())}, "
                         f"{int(classes.max())}]")
    return classes.long()


@torch.no_grad()
def class_logits(model: nn.Module, x: Tensor, classes: Tensor, batch_size: int | None = None) -> Tensor:
    """``f_{classes[n]}(x[n])`` per sample ``(N,)``: the logit of the given class (thesis §5.3: the implicit
    log-density ``log p(x | y = i)`` up to the class' normaliser). Uses the model's current mode."""
    classes = check_classes(classes, x.shape[0])
    step = batch_size or max(x.shape[0], 1)
    out = [model(x[i:i + step]).gather(1, classes[i:i + step, None].to(x.device))[:, 0] for i in range(0, len(x), step)]
    return torch.cat(out) if out else x.new_zeros(0)


def class_logit_and_grad(model: nn.Module, x: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
    """``(f_i(x), ∇ₓ f_i(x))`` per sample for ``i = classes[n]``; detached, no parameter gradient is computed
    (``torch.autograd.grad`` with respect to the input only). For per-sample models (eval-mode BatchNorm) row n
    of the gradient of ``Σ_n f_{i_n}(x_n)`` is sample n's own gradient."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        logit = model(xg).gather(1, classes[:, None].to(x.device))[:, 0]
        (grad,) = torch.autograd.grad(logit.sum(), xg)
    return logit.detach(), grad.detach()
