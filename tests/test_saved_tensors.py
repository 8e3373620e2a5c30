"""What the fused BatchNorm(+ReLU) saves for backward: x, weight, bias, mean and invstd, nothing else (the fused
ReLU's mask is recomputed from them, csrc/KERNELS.md "Fused ReLU"), and its derivatives still match
``F.relu(F.batch_norm(...))`` (also covered by tests/test_ops_parity.py for every backend)."""
import pytest
import torch
import torch.nn.functional as F

import fastjac
from _saved import packed_tensors


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_batch_norm_saves_only_x_weight_bias_and_statistics(backend, relu, training):
    C = 4
    x = torch.randn(3, C, 5, 6, requires_grad=True)
    w = (torch.rand(C) + 0.5).requires_grad_()
    b = torch.randn(C).requires_grad_()
    rm, rv = torch.zeros(C), torch.ones(C)
    op = fastjac.ops.batch_norm_relu if relu else fastjac.ops.batch_norm
    packed, y = packed_tensors(lambda: op(x, rm, rv, w, b, training, 0.1, 1e-5))
    ids = {id(t) for t in packed}
    # x, weight and bias are saved as themselves (no copies); the rest are two C-element statistics
    assert id(x) in ids and id(w) in ids
    assert (id(b) in ids) == relu  # bias only feeds the recomputed mask
    others = [t for t in packed if id(t) not in (id(x), id(w), id(b))]
    assert len(others) == 2 and all(t.shape == (C,) and t.dtype == torch.float32 for t in others), [
        (tuple(t.shape), t.dtype) for t in others
    ]
    assert not any(t.dtype == torch.uint8 for t in packed)  # no packed ReLU mask
    assert sum(t.numel() for t in packed if t.shape == x.shape) == x.numel()  # nothing x-sized but x
    # the statistics saved are the forward's: the backward works from them
    y.backward(torch.randn_like(y))
    assert x.grad is not None and w.grad is not None and b.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_fused_relu_derivatives_match_torch(backend, dtype, training):
    """First and second derivatives of the fused op w.r.t. x, weight, bias and the incoming gradient, and a
    forward-mode JVP, against F.relu(F.batch_norm(...))."""
    C = 5
    x = (torch.randn(4, C, 6, 7, dtype=dtype) * 2 + 0.3).requires_grad_()
    w = (torch.rand(C, dtype=dtype) + 0.5).requires_grad_()
    b = torch.randn(C, dtype=dtype).requires_grad_()
    rm, rv = torch.randn(C, dtype=dtype) * 0.1, torch.rand(C, dtype=dtype) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)

    def mine(x, w, b):
        return fastjac.ops.batch_norm_relu(x, rm, rv, w, b, training, 0.1, 1e-5)

    def ref(x, w, b):
        return F.relu(F.batch_norm(x, rm_t, rv_t, w, b, training, 0.1, 1e-5))

    g = torch.randn_like(x, requires_grad=True)
    probe = [torch.randn_like(t) for t in (x, w, b)]
    results = []
    for fn in (mine, ref):
        y = fn(x, w, b)
        first = torch.autograd.grad(y, (x, w, b), g, create_graph=True)
        second = torch.autograd.grad(first, (x, w, b, g), probe, allow_unused=True)
        results.append((y, first, second))
    (y, first, second), (y_t, first_t, second_t) = results
    torch.testing.assert_close(y, y_t, **tol)
    for a, e in zip(first, first_t):
        torch.testing.assert_close(a, e, **tol)
    for a, e in zip(second, second_t):
        if a is None or e is None:  # absent means exactly zero on the other side
            assert (a if e is None else e).count_nonzero() == 0
        else:
            torch.testing.assert_close(a, e, **tol)
    tangents = tuple(torch.randn_like(t) for t in (x, w, b))
    primals = tuple(t.detach() for t in (x, w, b))
    jvp = torch.func.jvp(mine, primals, tangents)[1]
    jvp_t = torch.func.jvp(ref, primals, tangents)[1]
    torch.testing.assert_close(jvp, jvp_t, **tol)
