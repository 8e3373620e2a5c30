"""The few collective operations an experiment needs under ``torchrun`` (no-ops in one process).

BatchNorm running statistics under DDP: each rank updates its own from its share of every batch (DDP runs with
``broadcast_buffers=False``), and :func:`average_batch_norm_stats` replaces them, on every rank, with their mean
over the ranks at the end of each epoch, before the test evaluation and the checkpoint. The running mean and
variance are exponential moving averages, linear in the batch statistics, so the result is the moving average
of the batch statistics averaged over ranks (the same whether averaged every step or once per epoch); the
saved ``model.pt`` holds these averaged statistics, identical on every rank, not rank 0's own.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``: ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait until every rank gets here (so that what rank 0 wrote is there for the others)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


@torch.no_grad()
def average_batch_norm_stats(model: nn.Module) -> None:
    """Every BatchNorm layer's ``running_mean`` / ``running_var``: their mean over the ranks, on every rank."""
    world = rank_and_world()[1]
    if world == 1:
        return
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats and module.running_mean is not None:
            for buf in (module.running_mean, module.running_var):
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                buf.div_(world)
