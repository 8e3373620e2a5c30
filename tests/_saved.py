"""What autograd saves: the tensors packed by ``saved_tensors_hooks`` while a function runs."""
import torch


def packed_tensors(fn):
    """The tensors packed by ``saved_tensors_hooks`` while ``fn()`` runs (kept alive), and ``fn``'s result."""
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return packed, out
