"""CPU-specific checks of the C++ kernels (``torch.ops.fastjac.*`` from ``fastjac._C``); the checks shared by
every backend against the reference are in tests/test_kernels.py.

Large shapes (rows split across tasks, several blocks of channels, per-position sums flushed many times) and
independence of the thread count.
"""
import pytest
import torch

_C = pytest.importorskip("fastjac._C", reason="the C++ extension fastjac._C is not built")
from _kernel_cases import FLOATS, bn_case, check_bn_backward, check_bn_forward  # noqa: E402

ops = torch.ops.fastjac


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_compiled_with_cuda_is_bool():
    assert isinstance(_C.compiled_with_cuda(), bool)


LARGE_BN_SHAPES = [
    (5000, 40),  # 1-D: rows split across tasks, per-position sums flushed many times
    (300, 1100),  # 1-D, several blocks of channels
    (2, 2, 130, 300),  # long rows, split across tasks inside a row
]


@pytest.mark.parametrize("training,relu", [(True, True), (False, False)])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", LARGE_BN_SHAPES, ids=str)
def test_bn_large(shape, dtype, training, relu):
    case = bn_case(shape, dtype, True, training, relu)
    check_bn_forward(ops, case, training, relu, dtype)
    check_bn_backward(ops, case, training, relu, dtype)


def test_bn_independent_of_thread_count():
    case = bn_case((8, 4, 64, 64), torch.float32, True, True, True)
    x, w, b, (_, mean, invstd) = case["x"], case["w"], case["b"], case["fwd"]
    g, u = torch.randn_like(x), torch.randn_like(x)
    threads = torch.get_num_threads()

    def run():
        return (ops.bn_fwd(x, w, case["b"], None, None, True, 0.1, 1e-5, True)
                + ops.bn_dbwd(u, w, w, g, x, mean, invstd, w, b, True, True))

    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        many = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)
