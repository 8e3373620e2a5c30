"""Tiny models and brute-force references shared by the Jacobian / loss tests (float64, CPU)."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import fastjac

D = torch.float64


def conv_net(act: str = "relu", classes: int = 5, seed: int = 0) -> nn.Module:
    """Conv -> BN -> act -> Conv(stride 2) -> BN -> act -> flatten -> Linear, on N x 2 x 4 x 4 inputs."""
    torch.manual_seed(seed)
    make = {"relu": nn.ReLU, "softplus": lambda: nn.Softplus(beta=2.0)}[act]
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), make(),
        nn.Conv2d(4, 3, 3, padding=1, stride=2), nn.BatchNorm2d(3), make(),
        nn.Flatten(), nn.Linear(3 * 2 * 2, classes),
    ).to(D)
    randomize_bn_(net, seed)
    return net


def mlp(widths=(6, 8, 8, 4), act=nn.ReLU, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(D)


def randomize_bn_(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed + 100)
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen, dtype=D))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen, dtype=D))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen, dtype=D))
                m.running_var.copy_(1 + 0.2 * torch.rand(m.running_var.shape, generator=gen, dtype=D))
    return module


def converted(model: nn.Module) -> nn.Module:
    return fastjac.convert(copy.deepcopy(model))


def frozen_reference(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """An eval-mode copy whose BatchNorms normalise with the batch statistics of ``x`` (biased variance),
    computed independently of fastjac: the per-sample function that the "frozen" semantics defines."""
    ref = copy.deepcopy(model)
    stats = {}

    def grab(module, args):
        dims = [d for d in range(args[0].dim()) if d != 1]
        stats[module] = (args[0].mean(dims), args[0].var(dims, unbiased=False))

    handles = [m.register_forward_pre_hook(grab) for m in ref.modules() if isinstance(m, _BatchNorm)]
    with torch.no_grad():
        ref(x)
    for h in handles:
        h.remove()
    for m, (mean, var) in stats.items():
        m.eval()
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
    return ref


def per_sample_jacobian(fn, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """N x K x (input shape): diagonal blocks of ``torch.autograd.functional.jacobian`` of a per-sample fn."""
    full = torch.autograd.functional.jacobian(fn, x, create_graph=create_graph)
    return torch.stack([full[n, :, n] for n in range(x.shape[0])])
