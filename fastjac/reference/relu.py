"""Reference ReLU kernels; derivative at exactly 0 is 0 (PyTorch's convention)."""
import torch

from .bitmask import pack_mask, unpack_mask


def relu_fwd(x: torch.Tensor):
    """``(max(x, 0), packed mask of x > 0)``."""
    positive = x > 0
    return torch.where(positive, x, torch.zeros_like(x)), pack_mask(positive)


def relu_bwd(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Vector-Jacobian product ``grad * 1[x > 0]``; also the JVP and its own derivative in ``grad``."""
    m = unpack_mask(mask, grad.shape)
    return torch.where(m, grad, torch.zeros_like(grad))
