"""Derivatives of every fused op on every available backend, in float64.

gradcheck / gradgradcheck (with non-contiguous grad outputs), forward-mode and forward-over-reverse,
third derivatives, and ``torch.library.opcheck`` on every registered op.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import fastjac
from _op_cases import BN_SETUPS, POINTWISE, BNSetup

D = torch.float64


def _x(shape):
    x = torch.randn(*shape, dtype=D)
    x[x.abs() < 1e-3] = 0.5  # keep ReLU kinks away from the finite-difference stencil
    return x.requires_grad_()


@pytest.mark.parametrize("case", POINTWISE, ids=str)
def test_pointwise_gradcheck(backend, case):
    x = _x((3, 4, 5)) * 2
    x = x.detach().requires_grad_()
    assert gradcheck(case.fj, (x,), check_forward_ad=True, check_batched_grad=False)
    assert gradgradcheck(
        case.fj, (x,), gen_non_contig_grad_outputs=True, check_fwd_over_rev=True, check_batched_grad=False
    )


@pytest.mark.parametrize("setup", [s for s in BN_SETUPS if s.shape != (3, 5, 7, 11)], ids=str)
def test_batch_norm_gradcheck(backend, setup):
    x = _x(setup.shape)
    rm, rv, w, b = setup.make(D)
    fj, _, _ = setup.fns(rm, rv)
    inputs = (x, w, b) if setup.affine else (x,)
    assert gradcheck(fj, inputs, check_forward_ad=True, check_batched_grad=False)
    assert gradgradcheck(
        fj, inputs, gen_non_contig_grad_outputs=True, check_fwd_over_rev=True, check_batched_grad=False
    )


def _third_order(fn, inputs):
    """Gradient of a scalar built from the second derivative, checked by finite differences."""

    def second(*xs):
        y = fn(*xs)
        (g,) = torch.autograd.grad((y * y).sum(), xs[0], create_graph=True)
        (h,) = torch.autograd.grad((g * g).sum(), xs[0], create_graph=True)
        return h

    return gradcheck(second, inputs, check_batched_grad=False)


@pytest.mark.parametrize("case", POINTWISE, ids=str)
def test_pointwise_third_order(backend, case):
    assert _third_order(case.fj, (_x((2, 3, 4)),))


@pytest.mark.parametrize("setup", [s for s in BN_SETUPS if s.shape == (4, 3, 5, 7)], ids=str)
def test_batch_norm_third_order(backend, setup):
    rm, rv, w, b = setup.make(D)
    fj, _, _ = setup.fns(rm, rv)
    assert _third_order(lambda x: fj(x, w, b), (_x(setup.shape),))


def test_relu_double_backward_wrt_input_is_not_allocated(backend):
    x = _x((4, 5))
    v = torch.randn(4, 5, dtype=D, requires_grad=True)
    (g,) = torch.autograd.grad(fastjac.ops.relu(x), x, v, create_graph=True)
    w = torch.randn(4, 5, dtype=D)
    gx, gv = torch.autograd.grad(g, (x, v), w, allow_unused=True)
    assert gx is None
    torch.testing.assert_close(gv, w * (x > 0))


@pytest.mark.parametrize("case", POINTWISE, ids=str)
def test_pointwise_forward_mode_matches_torch(backend, case):
    x, t = torch.randn(3, 7, dtype=D) * 3, torch.randn(3, 7, dtype=D)
    out, jvp = torch.func.jvp(case.fj, (x,), (t,))
    out_ref, jvp_ref = torch.func.jvp(case.ref, (x,), (t,))
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(jvp, jvp_ref)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, t)
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(case.fj(dual)).tangent, jvp_ref)


@pytest.mark.parametrize("setup", BN_SETUPS[:8], ids=str)
def test_batch_norm_forward_mode_matches_torch(backend, setup):
    x = torch.randn(*setup.shape, dtype=D)
    rm, rv, w, b = setup.make(D, requires_grad=False)
    fj, ref, _ = setup.fns(rm, rv)
    primals = (x, w, b) if setup.affine else (x,)
    tangents = tuple(torch.randn_like(p) for p in primals)
    out, jvp = torch.func.jvp(fj, primals, tangents)
    out_ref, jvp_ref = torch.func.jvp(ref, primals, tangents)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(jvp, jvp_ref)


def test_hessian_vector_product_forward_over_reverse(backend):
    """torch.func.jvp of a gradient (forward-over-reverse) through softplus and BatchNorm."""
    setup = BNSetup((4, 3, 5), relu=False)
    rm, rv, w, b = setup.make(D, requires_grad=False)

    def f(fj_bn, act):
        return lambda x: act(fj_bn(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5)).pow(2).sum()

    x, t = torch.randn(*setup.shape, dtype=D), torch.randn(*setup.shape, dtype=D)
    mine = f(fastjac.ops.batch_norm, lambda y: fastjac.ops.softplus(y, beta=2.0))
    ref = f(F.batch_norm, lambda y: F.softplus(y, beta=2.0))
    hvp = torch.func.jvp(torch.func.grad(mine), (x,), (t,))[1]
    hvp_ref = torch.func.jvp(torch.func.grad(ref), (x,), (t,))[1]
    torch.testing.assert_close(hvp, hvp_ref)


# --- opcheck on every registered op ---------------------------------------------------------------------
def _opcheck_cases():
    x = torch.randn(3, 4, 5, dtype=D)
    g = torch.randn(3, 4, 5, dtype=D)
    y, mask = torch.ops.fastjac.relu(x)
    w, b = torch.rand(4, dtype=D) + 0.5, torch.randn(4, dtype=D)
    rm, rv = torch.zeros(4, dtype=D), torch.ones(4, dtype=D)
    cases = [
        ("relu", (x,)),
        ("relu_backward", (g, mask)),
        ("softplus", (x, 2.0, 3.0)),
        ("softplus_backward", (g, x, 2.0, 3.0)),
        ("softplus_double_backward", (torch.randn_like(x), g, x, 2.0, 3.0)),
    ]
    for training in (True, False):
        for relu in (False, True):
            _, mean, invstd, _, _ = torch.ops.fastjac.batch_norm(x, w, b, rm, rv, training, 0.1, 1e-5, relu)
            tail = (x, mean, invstd, w, b, training, relu)
            cases += [
                ("batch_norm", (x, w, b, rm, rv, training, 0.1, 1e-5, relu)),
                ("batch_norm", (x, None, None, rm, rv, training, 0.1, 1e-5, relu)),
                ("batch_norm_backward", (g, *tail)),
                ("batch_norm_double_backward", (torch.randn_like(x), torch.randn(4, dtype=D), None, g, *tail)),
                ("batch_norm_double_backward", (None, None, torch.randn(4, dtype=D), g, *tail)),
                ("batch_norm_jvp", (torch.randn_like(x), None, torch.randn(4, dtype=D), *tail)),
            ]
    return cases


@pytest.mark.parametrize("index", range(len(_opcheck_cases())))
def test_opcheck(backend, index):
    name, args = _opcheck_cases()[index]
    args = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() > 0
            and name in ("relu", "softplus", "batch_norm") and i == 0 else a for i, a in enumerate(args)]
    torch.library.opcheck(getattr(torch.ops.fastjac, name).default, tuple(args))
