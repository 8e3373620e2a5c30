"""Benchmark models (temporary home; a later change moves models into the package)."""
from __future__ import annotations

import torch
from torch import nn

#: VGG-9: 8 conv3x3-BN-ReLU blocks ("M" = 2x2 max pool) + global average pool + Linear.
VGG9_CONFIG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """Plain-PyTorch VGG with BatchNorm: ``conv3x3 -> BatchNorm2d -> ReLU`` blocks, GAP, Linear."""

    def __init__(self, config=VGG9_CONFIG, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def vgg9_bn(num_classes: int = 100) -> VGG:
    """VGG-9 with BatchNorm for 3x32x32 inputs (CIFAR-100 head by default)."""
    return VGG(VGG9_CONFIG, num_classes)
