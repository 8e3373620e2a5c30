"""Per-call cost of a fused op on a tiny tensor (the host-side overhead), fastjac vs PyTorch autograd.

On a tiny input the kernels do almost nothing, so the time is the Python/dispatcher/autograd cost of one call:
forward only, then forward + backward + double backward (:mod:`benchmarks.call_overhead`, which the report
also runs with the targets). This is what made the fused ops host-bound on an H100 (``benchmarks/RESULTS.md``);
each group compares ``torch`` with ``fastjac`` for one op on one device.
"""
import pytest
import torch

from .call_overhead import CALLS, OPS, ORDERS, SHAPE, workload
from .conftest import rounds

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("impl", ["torch", "fastjac"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device", DEVICES)
def test_call_overhead(benchmark, one_thread, device, op, impl, order):
    benchmark.group = f"call overhead {op} {device} {order} ({'x'.join(map(str, SHAPE))}, {CALLS} calls)"
    run = workload(op, impl, order, device)
    out = benchmark.pedantic(run, rounds=rounds(5), warmup_rounds=1, iterations=1)
    assert out is None or torch.isfinite(out).all()
