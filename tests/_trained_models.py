"""Small models trained on scikit-learn's digits inside the test session (cached), for evaluation tests.

``digits_data()`` gives normalised 16×16 single-channel images; ``trained_digits_model()`` a VGG-4 (fused ops,
ReLU or Softplus) trained with Adam to ~90 %+ test accuracy in a few seconds on this machine.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fastjac.training.data import load_digits, normalize
from fastjac.training.models import build_model

IMAGE_SIZE = 16


@functools.lru_cache(maxsize=None)
def digits_data(image_size: int = IMAGE_SIZE):
    """``(train_x, train_y, test_x, test_y)``: normalised digits ``(N, 1, s, s)``, the package's fixed split."""
    train = load_digits("train", image_size=image_size, channels=1)
    test = load_digits("test", image_size=image_size, channels=1)
    return (normalize(train.float_images(), "digits"), train.labels,
            normalize(test.float_images(), "digits"), test.labels)


@functools.lru_cache(maxsize=None)
def _train(activation: str, epochs: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = build_model({"arch": "vgg4", "num_classes": 10, "in_channels": 1, "activation": activation})
    train_x, train_y, _, _ = digits_data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(train_y), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(train_x[idx]), train_y[idx]).backward()
            opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained_digits_model(activation: str = "relu", epochs: int = 3, seed: int = 0) -> torch.nn.Module:
    """A fresh copy (eval mode) of a VGG-4 trained on digits; the training is done once per session."""
    model = build_model({"arch": "vgg4", "num_classes": 10, "in_channels": 1, "activation": activation})
    model.load_state_dict(_train(activation, epochs, seed))
    return model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * float((model(x).argmax(1) == y).float().mean())
