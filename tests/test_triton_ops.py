"""The fused ops (autograd level) with the Triton backend forced: float64 gradcheck / gradgradcheck (first and
second derivatives, forward-over-reverse), forward-mode JVP, float32 parity of first and second derivatives
with ``torch.nn.functional``, running statistics updated exactly once.

Without a GPU the Triton kernels run under the interpreter on CPU tensors (tests/conftest.py sets
``TRITON_INTERPRET=1``), hence the small shapes; with a GPU they run on CUDA tensors.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import fastjac
from _kernel_cases import KERNEL_BACKENDS
from _op_cases import POINTWISE, BNSetup

TRITON = [kb for kb in KERNEL_BACKENDS if kb.name == "triton"]
pytestmark = pytest.mark.skipif(not TRITON, reason="the Triton backend is not usable here")
DEVICE = TRITON[0].device if TRITON else "cpu"
D = torch.float64


@pytest.fixture(autouse=True)
def triton_backend():
    torch.manual_seed(0)
    with fastjac.use_backend("triton"):
        yield


def _x(shape, dtype=D):
    x = torch.randn(*shape, dtype=dtype)
    x[x.abs() < 1e-3] = 0.5  # keep ReLU kinks away from the finite-difference stencil
    return x.to(DEVICE).requires_grad_()


def _setup(setup, dtype=D, requires_grad=True):
    """``(fastjac, torch)`` callables and parameters of a BNSetup on the test device."""
    rm, rv, w, b = (None if t is None else t.detach().to(DEVICE) for t in setup.make(dtype))
    if w is not None and requires_grad:
        w, b = w.requires_grad_(), b.requires_grad_()
    fj, ref, running = setup.fns(rm, rv)
    return fj, ref, (w, b), (rm, rv), running


@pytest.mark.parametrize("case", POINTWISE, ids=str)
def test_pointwise_gradcheck(case):
    x = (_x((2, 5)) * 2).detach().requires_grad_()
    assert gradcheck(case.fj, (x,), check_forward_ad=True, check_batched_grad=False, fast_mode=True)
    assert gradgradcheck(case.fj, (x,), gen_non_contig_grad_outputs=True, check_fwd_over_rev=True,
                         check_batched_grad=False, fast_mode=True)


BN_GRADCHECK = [BNSetup((3, 2, 2), training=t, relu=r) for t in (True, False) for r in (False, True)]


@pytest.mark.parametrize("setup", BN_GRADCHECK, ids=str)
def test_batch_norm_gradcheck(setup):
    fj, _, (w, b), _, _ = _setup(setup)
    inputs = (_x(setup.shape), w, b)
    assert gradcheck(fj, inputs, check_forward_ad=True, check_batched_grad=False, fast_mode=True)
    assert gradgradcheck(fj, inputs, check_fwd_over_rev=True, check_batched_grad=False, fast_mode=True)


@pytest.mark.parametrize("setup", [BNSetup((4, 3, 5), training=t, relu=r) for t, r in [(True, True), (False, False)]],
                         ids=str)
def test_batch_norm_forward_mode_matches_torch(setup):
    fj, ref, (w, b), _, _ = _setup(setup, requires_grad=False)
    primals = (torch.randn(*setup.shape, dtype=D, device=DEVICE), w, b)
    tangents = tuple(torch.randn_like(p) for p in primals)
    out, jvp = torch.func.jvp(fj, primals, tangents)
    out_ref, jvp_ref = torch.func.jvp(ref, primals, tangents)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(jvp, jvp_ref)


def _first_and_second(fn, inputs, g, probe):
    y = fn(*inputs)
    first = torch.autograd.grad(y, inputs, g, create_graph=True)
    second = torch.autograd.grad(first, (*inputs, g), probe, allow_unused=True)
    return y, first, second


@pytest.mark.parametrize("setup", [BNSetup((3, 4, 5, 3), training=t, relu=r) for t, r in [(True, True), (False, True),
                                                                                           (True, False)]], ids=str)
def test_batch_norm_float32_matches_torch(setup):
    """Output, first derivatives and second derivatives (w.r.t. x, weight, bias and the incoming gradient) in
    float32 against F.batch_norm (+ F.relu); running statistics updated like PyTorch's."""
    fj, ref, (w, b), (rm, rv), (rm_t, rv_t) = _setup(setup, torch.float32)
    x = (_x(setup.shape, torch.float32) * 3 + 1).detach().requires_grad_()
    g = torch.randn_like(x, requires_grad=True)
    probe = [torch.randn_like(t) for t in (x, w, b)]
    mine, theirs = _first_and_second(fj, (x, w, b), g, probe), _first_and_second(ref, (x, w, b), g, probe)
    for a, e in zip([mine[0], *mine[1], *mine[2]], [theirs[0], *theirs[1], *theirs[2]]):
        if a is None or e is None:  # an absent derivative must be an exactly-zero one in PyTorch
            assert (e if a is None else a) is None or torch.count_nonzero(e if a is None else a) == 0
        else:
            torch.testing.assert_close(a, e, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(rm, rm_t)
    torch.testing.assert_close(rv, rv_t)


@pytest.mark.parametrize("relu", [False, True])
def test_running_stats_updated_once_per_forward(relu):
    setup = BNSetup((6, 4, 3), training=True, relu=relu)
    fj, ref, (w, b), (rm, rv), (rm_t, rv_t) = _setup(setup)
    for _ in range(2):
        x = torch.randn(*setup.shape, dtype=D, device=DEVICE, requires_grad=True)
        (gx,) = torch.autograd.grad(fj(x, w, b).pow(2).sum(), x, create_graph=True)
        gx.pow(2).sum().backward()
        ref(x.detach(), w.detach(), b.detach())
    torch.testing.assert_close(rm, rm_t)
    torch.testing.assert_close(rv, rv_t)


def test_hessian_vector_product_forward_over_reverse():
    """torch.func.jvp of a gradient through BatchNorm and softplus (bn_dbwd / softplus_dbwd under forward mode)."""
    setup = BNSetup((4, 3, 5))
    _, _, (w, b), (rm, rv), _ = _setup(setup, requires_grad=False)

    def f(bn, act):
        return lambda x: act(bn(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5)).pow(2).sum()

    x, t = (torch.randn(*setup.shape, dtype=D, device=DEVICE) for _ in range(2))
    mine = f(fastjac.ops.batch_norm, lambda y: fastjac.ops.softplus(y, beta=2.0))
    ref = f(F.batch_norm, lambda y: F.softplus(y, beta=2.0))
    hvp = torch.func.jvp(torch.func.grad(mine), (x,), (t,))[1]
    torch.testing.assert_close(hvp, torch.func.jvp(torch.func.grad(ref), (x,), (t,))[1])
