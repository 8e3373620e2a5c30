"""Fake (meta) implementations of the compiled kernel ops ``torch.ops.fastjac.*_fwd/_bwd/...``, so they
work with FakeTensor, ``torch.compile`` and ``torch.library.opcheck`` like the autograd-level ops."""
import torch


def _like(t):
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _stat(x):
    return x.new_empty((x.shape[1],), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


def _mask(x):
    return x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)


def register() -> None:
    """Register the fakes (called once, after ``fastjac._C`` has declared the ops)."""
    fakes = {
        "relu_fwd": lambda x: (_like(x), _mask(x)),
        "relu_bwd": lambda grad, mask: _like(grad),
        "softplus_fwd": lambda x, beta, threshold: _like(x),
        "softplus_bwd": lambda grad, x, beta, threshold: _like(x),
        "softplus_dbwd": lambda ggrad, grad, x, beta, threshold: (_like(x), _like(x)),
        "bn_fwd": lambda x, w, b, rm, rv, training, momentum, eps, relu: (_like(x), _stat(x), _stat(x)),
        "bn_bwd": lambda grad, x, mean, invstd, w, b, training, relu: (_like(x), _stat(x), _stat(x)),
        "bn_dbwd": lambda ggx, ggw, ggb, grad, x, mean, invstd, w, b, training, relu: (_like(x), _like(x), _stat(x)),
        "bn_jvp": lambda tx, tw, tb, x, mean, invstd, w, b, training, relu: _like(x),
        "philox_words": lambda like, seed, offset: like.new_empty(like.shape, dtype=torch.int64),
        "perturb_fwd": lambda x, sigma, seed, offset, distribution: _like(x),
        "noise_row_dot": lambda g, seed, offset, distribution: g.new_empty(
            (1 if g.dim() == 0 else g.shape[0],), dtype=torch.float64 if g.dtype == torch.float64 else torch.float32
        ),
    }
    for name, fake in fakes.items():
        torch.library.register_fake(f"fastjac::{name}", fake)
