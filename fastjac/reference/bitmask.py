"""Packed 1-bit-per-element masks: bit ``i % 8`` of byte ``i // 8`` is element ``i`` (row-major)."""
import torch

_BIT_WEIGHTS = {}


def _weights(device: torch.device) -> torch.Tensor:
    w = _BIT_WEIGHTS.get(device)
    if w is None:
        w = _BIT_WEIGHTS[device] = (2 ** torch.arange(8, device=device)).to(torch.uint8)
    return w


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor into ``ceil(numel / 8)`` bytes."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _weights(mask.device)).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: a boolean tensor of ``shape``."""
    numel = 1
    for s in shape:
        numel *= s
    bits = (packed.view(-1, 1) & _weights(packed.device)) != 0
    return bits.reshape(-1)[:numel].reshape(shape)
