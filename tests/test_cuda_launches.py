"""CUDA kernel launches of one forward + backward + double backward per fused op (torch.profiler), on a GPU.

Issue 12's targets: at most 3 launches for ReLU and Softplus (one kernel per link of the C++ chain), at most 8 for
BatchNorm and BatchNorm+ReLU in training mode. The CUDA BatchNorm kernels launch one kernel per pass, with the
statistics, invstd, running-statistics update and coefficients folded into the passes' finishing steps: 2 per link,
6 for the chain (tests/test_cuda_emulation.py counts them without a GPU; the C++ chain adds no kernel of its own).
"""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fastjac

pytestmark = pytest.mark.skipif(not fastjac.backends()["cuda"], reason="needs fastjac._C built with CUDA and a GPU")


def _chain(op: str):
    x = torch.randn(32, 16, 8, 8, device="cuda", requires_grad=True)
    w = (torch.rand(16, device="cuda") + 0.5).requires_grad_()
    b = torch.randn(16, device="cuda", requires_grad=True)
    rm, rv = torch.zeros(16, device="cuda"), torch.ones(16, device="cuda")
    fns = {
        "relu": lambda: fastjac.ops.relu(x),
        "softplus": lambda: fastjac.ops.softplus(x),
        "batch_norm": lambda: fastjac.ops.batch_norm(x, rm, rv, w, b, True),
        "batch_norm_relu": lambda: fastjac.ops.batch_norm_relu(x, rm, rv, w, b, True),
    }
    v = torch.randn_like(x).requires_grad_()
    u = torch.randn_like(x)

    def run():
        y = fns[op]()
        (gx,) = torch.autograd.grad(y, x, v, create_graph=True)
        torch.autograd.grad(gx, (x, v), u, allow_unused=True)

    return run, (v, u)


def launches(op: str) -> int:
    """CUDA kernels launched by one forward + backward(create_graph) + double backward of ``op``, after warm-up
    (the incoming gradients are made before profiling, so their fills do not count)."""
    run, _ = _chain(op)
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@pytest.mark.parametrize("op", ["relu", "softplus"])
def test_pointwise_chain_is_one_kernel_per_link(op):
    assert launches(op) <= 3


@pytest.mark.parametrize("op", ["batch_norm", "batch_norm_relu"])
def test_batch_norm_chain_launches_at_most_8_kernels(op):
    assert launches(op) <= 8
