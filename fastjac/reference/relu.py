"""Reference ReLU kernels with PyTorch's semantics (csrc/KERNELS.md, "ReLU and NaN"): the derivative at exactly 0
is 0, and a NaN input sets the mask bit, so ``relu(NaN) = NaN`` and the gradient passes through it."""
import torch

from .bitmask import pack_mask, unpack_mask


def relu_on(x: torch.Tensor) -> torch.Tensor:
    """The mask bit: ``!(x <= 0)``, i.e. ``x > 0`` or ``x`` is NaN (``threshold_backward``'s test on the output)."""
    return ~(x <= 0)


def relu_fwd(x: torch.Tensor):
    """``(relu(x), packed mask relu_on(x))``: NaN stays NaN with its bit set."""
    on = relu_on(x)
    return torch.where(on, x, torch.zeros_like(x)), pack_mask(on)


def relu_bwd(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Vector-Jacobian product ``m ? grad : 0``; also the JVP and its own derivative in ``grad``."""
    m = unpack_mask(mask, grad.shape)
    return torch.where(m, grad, torch.zeros_like(grad))
