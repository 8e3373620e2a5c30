"""Op-level pytest-benchmark: forward + backward (create_graph=True) + double backward, float32.

Each group holds PyTorch autograd and fastjac for one op and shape. ``extra_info`` carries the
minimum-traffic bytes (:func:`benchmarks._common.floor_bytes`).
"""
import pytest

from ._common import IMPLS, OP_CASES, check_op_agreement, floor_bytes, make_op_workload
from .conftest import rounds


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: c.id)
def test_op(benchmark, case, impl):
    benchmark.group = case.group
    benchmark.extra_info["floor_bytes"] = floor_bytes(case)
    run = make_op_workload(case, impl)
    grads = benchmark.pedantic(run, rounds=rounds(5), warmup_rounds=1, iterations=1)
    assert any(g is not None for g in grads)


@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: c.id)
def test_op_agreement(case):
    """Both implementations compute the same double-backward gradients (same work is timed)."""
    assert check_op_agreement(case) is None
