"""pytest-benchmark of the convolution's double backward per VGG-9 layer shape (``benchmarks/conv_double_backward.py``):
PyTorch's against fastjac's, grouped per layer."""
import pytest
import torch

from .conftest import rounds
from .conv_double_backward import VARIANTS, VGG9_LAYERS, _double_backward


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layer", VGG9_LAYERS, ids=lambda l: f"{l[0]}to{l[1]}@{l[2]}")
def test_conv_double_backward(benchmark, layer, variant):
    cin, cout, size = layer
    benchmark.group = f"conv double backward {cin}→{cout} @ {size}×{size}, batch 64"
    x = torch.randn(64, cin, size, size, requires_grad=True)
    w = torch.randn(cout, cin, 3, 3, requires_grad=True)
    v = torch.randn(64, cout, size, size, requires_grad=True)
    prepare, run = _double_backward(VARIANTS[variant], x, w, v, torch.randn_like(x))
    benchmark.pedantic(run, setup=lambda: ((prepare(),), {}), rounds=rounds(5), warmup_rounds=1)
