"""Per-call cost of a fused op on a tiny tensor (the host-side overhead), fastjac vs PyTorch autograd.

On a tiny input the kernels do almost nothing, so the time is the Python/dispatcher cost of one call:
forward only, then forward + backward + double backward. This is what made the fused ops CPU-bound on an H100
(``benchmarks/RESULTS.md``); each group compares ``torch`` with ``fastjac`` for one op on one device.
"""
import pytest
import torch

import fastjac

from ._common import sync
from .conftest import rounds

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
OPS = {"relu": (torch.relu, fastjac.ops.relu), "softplus": (torch.nn.functional.softplus, fastjac.ops.softplus)}
CALLS = 200  # calls per timed round


def _workload(op: str, impl: str, device: str, order: int):
    fn = OPS[op][0 if impl == "torch" else 1]
    x = torch.randn(8, 8, device=device, requires_grad=True)
    v, u = torch.randn_like(x).requires_grad_(), torch.randn_like(x)

    def once():
        y = fn(x)
        if order == 0:
            return y
        (gx,) = torch.autograd.grad(y, x, v, create_graph=True)
        # w.r.t. x and v: ReLU's second derivative w.r.t. x is absent in fastjac (exact zero, never built)
        return torch.autograd.grad(gx, (x, v), u, allow_unused=True)[1]

    def run():
        for _ in range(CALLS):
            out = once()
        sync(device)
        return out

    return run


@pytest.mark.parametrize("order", [0, 2], ids=["forward", "fwd+bwd+dbwd"])
@pytest.mark.parametrize("impl", ["torch", "fastjac"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("device", DEVICES)
def test_call_overhead(benchmark, device, op, impl, order):
    benchmark.group = f"call overhead {op} {device} order {order} (8x8, {CALLS} calls)"
    run = _workload(op, impl, device, order)
    out = benchmark.pedantic(run, rounds=rounds(5), warmup_rounds=1, iterations=1)
    assert out is None or torch.isfinite(out).all()
