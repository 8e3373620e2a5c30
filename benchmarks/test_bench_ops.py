"""Op-level pytest-benchmark: forward + backward (create_graph=True) + double backward.

CPU: float32, PyTorch autograd vs fastjac. With a GPU also CUDA tensors in float32 and bfloat16, PyTorch
(cuDNN) vs each available fastjac GPU backend forced (``fastjac-cuda``, ``fastjac-triton``), timed with
``torch.cuda.synchronize``. Each group holds the implementations for one op, shape, device and dtype.
``extra_info`` carries the minimum-traffic bytes (:func:`benchmarks._common.floor_bytes`).
"""
import pytest
import torch

from ._common import DEVICE_DTYPES, OP_CASES, check_op_agreement, floor_bytes, impls, make_op_workload, sync
from .conftest import rounds

WORKLOADS = [
    pytest.param(case, device, dtype, impl, id=f"{case.id}-{device}-{str(dtype)[6:]}-{impl}")
    for device, dtype in DEVICE_DTYPES for case in OP_CASES for impl in impls(device)
]


def _group(case, device, dtype):
    return case.group if device == "cpu" else f"{case.group} {device} {str(dtype)[6:]}"


@pytest.mark.parametrize("case,device,dtype,impl", WORKLOADS)
def test_op(benchmark, case, device, dtype, impl):
    benchmark.group = _group(case, device, dtype)
    benchmark.extra_info["floor_bytes"] = floor_bytes(case, dtype.itemsize)
    run = make_op_workload(case, impl, device=device, dtype=dtype)

    def timed():
        out = run()
        sync(device)
        return out

    grads = benchmark.pedantic(timed, rounds=rounds(5), warmup_rounds=1, iterations=1)
    assert any(g is not None for g in grads)


@pytest.mark.parametrize("case,device,dtype,impl", [p for p in WORKLOADS if p.values[3] != "torch"])
def test_op_agreement(case, device, dtype, impl):
    """PyTorch and fastjac compute the same double-backward gradients (same work is timed)."""
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    assert check_op_agreement(case, tol, tol, device, dtype, impl) is None
