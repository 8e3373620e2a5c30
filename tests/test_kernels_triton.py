"""Triton-specific kernel checks: several blocks per tensor and several partial reductions per BatchNorm channel
(block sizes shrunk, so small shapes cover tails, loops and the merge of partials), deterministic results,
and backend dispatch (CPU tensors only under the interpreter, clear errors otherwise).

The shared checks against the reference are in tests/test_kernels.py (``triton@cpu`` under the interpreter,
``triton@cuda`` on a GPU).
"""
import pytest
import torch

import fastjac
from _kernel_cases import (KERNEL_BACKENDS, bn_case, check_bn_backward, check_bn_forward, per_backend,
                           randn)
from fastjac import _backend
from fastjac import reference as ref

TRITON = [kb for kb in KERNEL_BACKENDS if kb.name == "triton"]
pytestmark = pytest.mark.skipif(not TRITON, reason="the Triton backend is not usable here")


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 elements (8 mask bytes), reductions of 16 lanes over chunks of 32 elements per program,
    per-channel kernels over 2 channels per program."""
    from fastjac.triton import _launch

    monkeypatch.setattr(_launch, "CHANNEL_BLOCK", 2)
    monkeypatch.setattr(_launch, "BLOCK", 64)
    monkeypatch.setattr(_launch, "REDUCE_BLOCK", 16)
    monkeypatch.setattr(_launch, "REDUCE_CHUNK", 32)


@per_backend("numel", [1, 63, 64, 65, 200, 1001], backends=TRITON)
def test_relu_and_softplus_several_blocks(kb, small_blocks, numel):
    x = randn(numel, dtype=torch.float32, scale=3.0, device=kb.device)
    x[::9] = 0.0
    y, mask = kb.ops.relu_fwd(x)
    y_ref, mask_ref = ref.relu_fwd(x)
    assert torch.equal(mask, mask_ref) and torch.equal(y, y_ref)
    g = torch.randn_like(x)
    assert torch.equal(kb.ops.relu_bwd(g, mask), ref.relu_bwd(g, mask_ref))
    torch.testing.assert_close(kb.ops.softplus_fwd(x, 2.0, 3.0), ref.softplus_fwd(x, 2.0, 3.0))
    torch.testing.assert_close(kb.ops.softplus_dbwd(g, g, x, 2.0, 3.0), ref.softplus_dbwd(g, g, x, 2.0, 3.0))


# (3, 2, 5, 7): M = 105 per channel = 4 chunks (the last one partial) of 2 loop steps; numel 210 = 4 blocks.
# (70, 3): 1-D, channel elements strided by C, M = 70 = 3 chunks; 3 channels = 2 programs of the per-channel kernels.
# Every subset of optional inputs in one case; the two extreme subsets in the others; one with 64-bit index math.
@per_backend("shape,dtype,training,relu,subsets,idx64",
             [((3, 2, 5, 7), torch.float32, True, True, None, False),
              ((3, 2, 5, 7), torch.float32, False, False, "few", False),
              ((3, 2, 5, 7), torch.float64, True, False, "few", False),
              ((70, 3), torch.float32, True, True, "few", False),
              ((3, 2, 5, 7), torch.float32, True, True, "few", True)],
             backends=TRITON)
def test_bn_several_blocks_and_chunks(kb, small_blocks, monkeypatch, shape, dtype, training, relu, subsets, idx64):
    if idx64:  # the path of tensors with 2**31 elements or more (divisions in int64)
        from fastjac.triton import _launch

        monkeypatch.setattr(_launch, "index32", lambda x: False)
    case = bn_case(shape, dtype, True, training, relu, kb.device)
    check_bn_forward(kb.ops, case, training, relu, dtype)
    check_bn_backward(kb.ops, case, training, relu, dtype,
                      subsets=[(True, True, True), (False, False, False)] if subsets else None)


@per_backend("", backends=TRITON)
def test_bn_deterministic(kb):
    case = bn_case((4, 3, 6, 5), torch.float32, True, True, True, kb.device)
    x, w, b, (_, mean, invstd) = case["x"], case["w"], case["b"], case["fwd"]
    g, u = torch.randn_like(x), torch.randn_like(x)

    def run():
        return (*kb.ops.bn_fwd(x, w, b, None, None, True, 0.1, 1e-5, True),
                *kb.ops.bn_dbwd(u, w, b, g, x, mean, invstd, w, b, True, True))

    for a, c in zip(run(), run()):
        assert torch.equal(a, c)


def test_dispatch_to_triton():
    x = torch.randn(5)
    assert fastjac.backends()["triton"]
    with fastjac.use_backend("triton"):
        device = torch.device(TRITON[0].device)
        assert _backend.backend_name(device) == "triton"
        assert _backend.kernels(device) is TRITON[0].ops
    with fastjac.use_backend("auto"):  # auto never picks triton for CPU tensors
        assert _backend.backend_name(torch.device("cpu")) in ("cpu", "reference")
    if _backend._triton_interpreted():
        with fastjac.use_backend("triton"):
            torch.testing.assert_close(fastjac.ops.softplus(x), torch.nn.functional.softplus(x))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    from fastjac.triton import _launch

    monkeypatch.setattr(_backend, "_triton_interpreted", lambda: False)
    monkeypatch.setattr(_launch, "INTERPRETED", False)
    with fastjac.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fastjac.ops.relu(torch.randn(3))
    with pytest.raises(RuntimeError, match="expected x on a CUDA device"):
        fastjac.triton.relu_fwd(torch.randn(3))


def test_without_gpu_or_interpreter_triton_is_unavailable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(_backend, "_interpret_requested", lambda: False)
    monkeypatch.setattr(_backend, "_triton_state", _backend._load_triton())
    assert not fastjac.backends()["triton"]
    with fastjac.use_backend("triton"), pytest.raises(RuntimeError, match="not available.*TRITON_INTERPRET=1"):
        fastjac.ops.relu(torch.randn(3))
