"""Tiny float64 networks and brute-force helpers shared by the full-Jacobian and bias-Jacobian loss tests."""
import contextlib

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def randomize(model: nn.Module) -> nn.Module:
    """Random BatchNorm parameters and running statistics (defaults would make every BN bias 0), float64."""
    model.double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.5)
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def tiny_vgg(activation=nn.ReLU) -> nn.Sequential:
    """conv(bias) -> BN -> act -> max-pool -> conv(no bias) -> BN -> act(in place) -> GAP -> linear."""
    inplace = dict(inplace=True) if activation is nn.ReLU else {}
    return randomize(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), activation(), nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), activation(**inplace),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    ))


def vgg(config, classes=10, batch_norm=True) -> nn.Sequential:
    """VGG-k of EXPERIMENTS.md: 3x3 conv (+ BN) + ReLU blocks, ``"M"`` = 2x2 max-pool, then GAP and a linear layer.

    Without BatchNorm the convs carry biases and are followed directly by an in-place ReLU (torchvision style).
    """
    layers, cin = [], 3
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers.append(nn.Conv2d(cin, item, 3, padding=1, bias=not batch_norm))
        layers += [nn.BatchNorm2d(item), nn.ReLU()] if batch_norm else [nn.ReLU(inplace=True)]
        cin = item
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return randomize(nn.Sequential(*layers))


VGG9 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def tiny_plain_cnn() -> nn.Sequential:
    """No BatchNorm: conv(bias) -> in-place ReLU twice, then linear."""
    with torch.no_grad():
        model = vgg([4, "M", 5], classes=3, batch_norm=False)
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.bias.normal_(0, 0.5)
    return model


class _Block(nn.Module):
    """Basic residual block with in-place ``out += identity`` and in-place ReLUs (like torchvision's)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:  # non-affine BN: effective bias -mu/sigma only
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride), nn.BatchNorm2d(cout, affine=False))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """Stem (Sequential conv-BN-ReLU, fusable), two residual blocks, head Linear-BN1d-ReLU-Linear (fusable)."""

    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.block1 = _Block(4, 4, 1)
        self.block2 = _Block(4, 6, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, classes))

    def forward(self, x):
        return self.head(self.pool(self.block2(self.block1(self.stem(x)))).flatten(1))


def tiny_resnet() -> TinyResNet:
    return randomize(TinyResNet())


def effective_bias(module: nn.Module) -> torch.Tensor:
    """The bias a layer adds per channel, written out independently of fastjac (eval-mode BatchNorm)."""
    if isinstance(module, _BatchNorm):
        scale = (module.running_var + module.eps).rsqrt()
        if module.weight is not None:
            scale = scale * module.weight
        beta = module.bias if module.bias is not None else 0.0
        return (beta - module.running_mean * scale).detach()
    return module.bias.detach()


@contextlib.contextmanager
def scaled_channel_bias(module: nn.Module, channel: int, factor: float):
    """Multiply one channel's (effective) bias by ``factor``: the bias parameter, and for an eval-mode
    BatchNorm also its running mean (``β − μγ/σ`` scales with ``(β, μ)``)."""
    tensors = [t for t in (getattr(module, "bias", None), getattr(module, "running_mean", None)) if t is not None]
    saved = [t[channel].item() for t in tensors]
    with torch.no_grad():
        for t in tensors:
            t[channel] *= factor
    try:
        yield
    finally:
        with torch.no_grad():
            for t, v in zip(tensors, saved):
                t[channel] = v


def target_outputs(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``f_n = model(x)[n, target[n]]`` without gradients."""
    with torch.no_grad():
        return model(x).gather(1, target[:, None]).squeeze(1)
