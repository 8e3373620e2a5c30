"""fastjac.hessian_trace: every estimator against torch.autograd.functional.hessian on tiny Softplus models,
unbiasedness and the documented variances on quadratics (statistical bounds from the estimator's variance),
antithetic variance below Taylor's, differentiability w.r.t. parameters, argument errors."""
import math

import pytest
import torch
from torch import nn

import fastjac
from fastjac import hessian_trace
from fastjac.ops import noise

F64 = torch.float64


def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 8), nn.Softplus(beta=2.0), nn.Linear(8, 6), nn.Softplus(), nn.Linear(6, 1)).to(F64)


def _convnet():
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Softplus(beta=3.0), nn.Conv2d(3, 2, 3), nn.Softplus(),
        nn.Flatten(), nn.Linear(2 * 2 * 2, 1),
    ).to(F64)


MODELS = {"mlp": (_mlp, (4, 5)), "conv": (_convnet, (3, 2, 4, 4))}


def _scalar_fn(model):
    return lambda z: model(z).squeeze(1)


def _torch_hessians(fn, x):
    """Per-sample (D x D) Hessians and gradients of fn's i-th output w.r.t. x_i, by torch.autograd.functional."""
    hs, gs = [], []
    for i in range(x.shape[0]):
        f = lambda v: fn(v.view(1, *x.shape[1:]))[0]  # noqa: E731
        v = x[i].reshape(-1)
        hs.append(torch.autograd.functional.hessian(f, v))
        gs.append(torch.autograd.functional.jacobian(f, v))
    return torch.stack(hs), torch.stack(gs)


@pytest.fixture(params=list(MODELS), scope="module")
def model_case(request):
    make, shape = MODELS[request.param]
    model = make()
    torch.manual_seed(3)
    x = torch.randn(shape, dtype=F64)
    fn = _scalar_fn(model)
    hess, grad = _torch_hessians(fn, x)
    return model, fn, x, hess, grad


def test_exact_matches_torch_hessian(model_case):
    model, fn, x, hess, _ = model_case
    trace = hessian_trace(fn, x, "exact")
    torch.testing.assert_close(trace, torch.diagonal(hess, dim1=1, dim2=2).sum(1), rtol=1e-10, atol=1e-12)
    assert trace.abs().min() > 1e-4  # Softplus: a non-trivial Hessian (a ReLU net would give 0)


def test_exact_on_converted_model_matches(model_case):
    """Same trace through fastjac's fused Softplus (its double backward is a kernel)."""
    model, fn, x, hess, _ = model_case
    converted = fastjac.convert(model)
    assert not any(isinstance(m, nn.Softplus) and type(m) is nn.Softplus for m in converted.modules())
    trace = hessian_trace(_scalar_fn(converted), x, "exact")
    torch.testing.assert_close(trace, torch.diagonal(hess, dim1=1, dim2=2).sum(1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_each_estimator_is_its_formula_for_the_same_probe(model_case, distribution):
    """With the probe z regenerated from the same (seed, offset), per sample: hutchinson = z^T H z exactly;
    antithetic = z^T H z + O(sigma^2); taylor = 2 g^T z / sigma + z^T H z + O(sigma); taylor with the control
    variate = z^T H z + O(sigma). H, g from torch.autograd.functional."""
    model, fn, x, hess, grad = model_case
    seed, n = 77, x.shape[0]
    z = noise(x, seed=seed, offset=0, distribution=distribution).reshape(n, -1)
    zhz = torch.einsum("ni,nij,nj->n", z, hess, z)
    kw = dict(seed=seed, distribution=distribution)
    torch.testing.assert_close(hessian_trace(fn, x, "hutchinson", **kw), zhz, rtol=1e-10, atol=1e-12)
    # remainders: |third-order term| ~ sigma * |T[z,z,z]| / 3 (taylor), sigma^2 |.| / 12 (antithetic), plus
    # float64 rounding ~ 1e-16 |f| / sigma^2
    sigma = 1e-4
    torch.testing.assert_close(hessian_trace(fn, x, "antithetic", sigma=sigma, **kw), zhz, rtol=0, atol=1e-6)
    taylor = hessian_trace(fn, x, "taylor", sigma=sigma, **kw)
    torch.testing.assert_close(taylor, 2 * (grad * z).sum(1) / sigma + zhz, rtol=0, atol=1e-3)
    cv = hessian_trace(fn, x, "taylor", sigma=sigma, control_variate=True, **kw)
    torch.testing.assert_close(cv, zhz, rtol=0, atol=1e-3)


def test_samples_use_independent_probes_and_average(model_case):
    model, fn, x, hess, _ = model_case
    n = x.shape[0]
    per_draw = [
        torch.einsum("ni,nij,nj->n", z, hess, z)
        for z in (noise(x, seed=5, offset=s * x.numel()).reshape(n, -1) for s in range(3))
    ]
    torch.testing.assert_close(hessian_trace(fn, x, "hutchinson", samples=3, seed=5), sum(per_draw) / 3)
    assert not torch.allclose(per_draw[0], per_draw[1])


def test_hutchinson_unbiased_on_mlp():
    """Mean of M = 4000 independent draws (one per repeated row) within 5 estimated standard errors of the
    exact trace."""
    model = _mlp()
    fn = _scalar_fn(model)
    x0 = torch.randn(1, 5, dtype=F64)
    exact = hessian_trace(fn, x0, "exact")[0]
    est = hessian_trace(fn, x0.expand(4000, 5).contiguous(), "hutchinson", seed=3, create_graph=False)
    assert abs(est.mean() - exact) < 5 * est.std() / math.sqrt(est.numel())


# --- quadratics: f(x) = 1/2 x^T A x + b^T x + c per sample, trace A known ----------------------------------------
D = 6


def _quadratic():
    gen = torch.Generator().manual_seed(4)
    m = torch.randn(D, D, dtype=F64, generator=gen)
    a = (m + m.T) / 2 + torch.diag(torch.linspace(0.5, 2.0, D, dtype=F64))
    b = torch.randn(D, dtype=F64, generator=gen)
    x0 = torch.randn(D, dtype=F64, generator=gen)
    fn = lambda z: 0.5 * torch.einsum("ni,ij,nj->n", z, a, z) + z @ b + 3.0  # noqa: E731
    return a, b, x0, fn


def _theory(a, grad, method, distribution, sigma):
    """Per-draw variance of each estimator on a quadratic (module docstring of fastjac.hessian_trace)."""
    hutch = 2 * (a.pow(2).sum() - (a.diagonal().pow(2).sum() if distribution == "rademacher" else 0))
    return float(hutch + (4 * grad.pow(2).sum() / sigma**2 if method == "taylor" else 0))


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("method,cv", [("taylor", False), ("taylor", True), ("antithetic", False), ("hutchinson", False)])
def test_unbiased_on_quadratic_with_documented_variance(method, cv, distribution):
    """M i.i.d. draws (one per row of a batch of identical rows): the sample mean is within 5 standard errors
    of tr A, using the documented variance (exact for quadratics); and the sample variance is within 5
    standard errors of that documented variance (its standard error from the sample fourth moment)."""
    a, b, x0, fn = _quadratic()
    m, sigma = 4000, 0.5
    x = x0.expand(m, D).contiguous()
    est = hessian_trace(fn, x, method, sigma=sigma, seed=11, distribution=distribution, control_variate=cv,
                        create_graph=False)
    var = _theory(a, a @ x0 + b, "hutchinson" if cv else method, distribution, sigma)
    assert abs(est.mean().item() - a.trace().item()) < 5 * math.sqrt(var / m)
    centred = est - est.mean()
    s2, m4 = centred.pow(2).mean().item(), centred.pow(4).mean().item()
    assert abs(s2 - var) < 5 * math.sqrt((m4 - s2 * s2) / m), (s2, var)


def test_exact_on_quadratic():
    a, b, x0, fn = _quadratic()
    torch.testing.assert_close(hessian_trace(fn, x0[None], "exact"), a.trace()[None], rtol=1e-12, atol=1e-12)


def test_antithetic_variance_below_taylor():
    """On the Softplus MLP (gradient != 0), same seed, M = 2000 draws: theory says Var(taylor) exceeds
    Var(antithetic) by about 4 ||g||^2 / sigma^2; at sigma = 0.1 that is > 10x Var(antithetic) here, so
    requiring a 4x ratio leaves a wide margin for the sampling error of the two variances (~3 % each)."""
    model = _mlp()
    fn = _scalar_fn(model)
    x0 = torch.randn(1, 5, dtype=F64)
    sigma, m = 0.1, 2000
    hess, grad = _torch_hessians(fn, x0)
    expected_gap = 4 * grad.pow(2).sum().item() / sigma**2
    assert expected_gap > 10 * 2 * hess.pow(2).sum().item()  # the premise of the margin
    x = x0.expand(m, 5).contiguous()
    taylor = hessian_trace(fn, x, "taylor", sigma=sigma, seed=21, create_graph=False)
    anti = hessian_trace(fn, x, "antithetic", sigma=sigma, seed=21, create_graph=False)
    assert 4 * anti.var() < taylor.var()


@pytest.mark.parametrize("method", ["taylor", "antithetic", "hutchinson", "exact"])
def test_differentiable_wrt_parameters(method):
    """gradcheck of the (fixed-seed, hence deterministic) estimate as a function of a weight matrix."""
    torch.manual_seed(6)
    w1 = torch.randn(4, 3, dtype=F64, requires_grad=True)
    w2 = torch.randn(1, 4, dtype=F64)
    x = torch.randn(2, 3, dtype=F64)

    def trace_of(w):
        fn = lambda z: (torch.nn.functional.softplus(z @ w.T) @ w2.T).squeeze(1)  # noqa: E731
        return hessian_trace(fn, x, method, sigma=1e-2, seed=4)

    assert torch.autograd.gradcheck(trace_of, (w1,), atol=1e-6 if method in ("taylor", "antithetic") else 1e-8)


def test_training_step_gradients_and_create_graph_false(model_case):
    model, fn, x, _, _ = model_case
    for method in ("taylor", "antithetic", "hutchinson", "exact"):
        model.zero_grad()
        hessian_trace(fn, x, method, samples=2, seed=1).sum().backward()
        # the last layer's bias shifts f but not its Hessian: no gradient there; every weight gets one
        weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
        assert all(w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0 for w in weights)
        assert hessian_trace(fn, x, method, seed=1, create_graph=False).grad_fn is None


def test_reproducible_under_seed():
    model = _mlp()
    fn, x = _scalar_fn(model), torch.randn(3, 5, dtype=F64)
    a = hessian_trace(fn, x, "taylor", seed=8)
    assert torch.equal(a, hessian_trace(fn, x, "taylor", seed=8))
    assert not torch.equal(a, hessian_trace(fn, x, "taylor", seed=9))
    torch.manual_seed(123)
    b = hessian_trace(fn, x, "antithetic")
    torch.manual_seed(123)
    assert torch.equal(b, hessian_trace(fn, x, "antithetic"))


def test_perturbed_forwards_are_separate_batches():
    """Every call of fn sees exactly the N samples of one batch (clean or perturbed, never concatenated), so a
    training-mode BatchNorm normalises each batch by its own statistics."""
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Softplus(), nn.Linear(5, 1)).to(F64).train()
    sizes = []
    model[0].register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    x = torch.randn(6, 4, dtype=F64)
    for method, calls in (("taylor", 1 + 3), ("antithetic", 1 + 6)):
        sizes.clear()
        hessian_trace(_scalar_fn(model), x, method, samples=3, seed=1)
        assert sizes == [6] * calls, (method, sizes)


def test_estimators_save_no_noise():
    """The probes are regenerated from (seed, offset): the finite-difference estimators save exactly the
    x-shaped tensors the model's own forwards save (here the first Linear saves its input). In Hutchinson the
    probe z is the cotangent of the HVP backward, which the model's backward keeps when recording a graph for
    the parameter gradients (here once per draw, in the first Linear's grad-input matmul): one x-shaped tensor
    per draw, against two with a stored probe (``(g * z).sum()`` also saves z), none without a graph."""
    model = nn.Sequential(nn.Linear(5, 7), nn.Softplus(), nn.Linear(7, 1)).to(F64)
    fn, x = _scalar_fn(model), torch.randn(4, 5, dtype=F64)

    def x_shaped_saved(run):
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            run()
        return sum(t.shape == x.shape for t in packed)

    per_forward = x_shaped_saved(lambda: fn(x))
    assert per_forward == 1
    assert x_shaped_saved(lambda: hessian_trace(fn, x, "taylor", samples=3, seed=1)) == 4 * per_forward
    assert x_shaped_saved(lambda: hessian_trace(fn, x, "antithetic", samples=2, seed=1)) == 5 * per_forward
    xr = x.clone().requires_grad_()
    fx = fn(xr)
    (g,) = torch.autograd.grad(fx.sum(), xr, create_graph=True)
    kw = dict(samples=3, seed=1, fx=fx, grad_fx=g)
    assert x_shaped_saved(lambda: hessian_trace(fn, xr, "hutchinson", **kw)) == 3
    assert x_shaped_saved(lambda: hessian_trace(fn, xr, "hutchinson", create_graph=False, **kw)) == 0

    def stored_probe():
        for s in range(3):
            z = noise(x, seed=1, offset=s * x.numel())
            (hz,) = torch.autograd.grad((g * z).sum(), xr, create_graph=True, retain_graph=True)

    assert x_shaped_saved(stored_probe) == 6


def test_fx_is_reused():
    calls = []
    model = _mlp()

    def fn(z):
        calls.append(z.shape)
        return model(z).squeeze(1)

    x = torch.randn(3, 5, dtype=F64)
    fx = model(x).squeeze(1)
    hessian_trace(fn, x, "taylor", fx=fx, seed=1)
    assert len(calls) == 1  # the thesis' "one extra forward"


def test_bad_arguments_raise_named_errors():
    model = _mlp()
    fn, x = _scalar_fn(model), torch.randn(3, 5, dtype=F64)
    with pytest.raises(ValueError, match="method must be one of"):
        hessian_trace(fn, x, "lanczos")
    for bad in (lambda z: model(z), lambda z: model(z).sum(), lambda z: 3.0):
        for method in ("taylor", "hutchinson"):
            with pytest.raises(ValueError, match="one scalar per sample"):
                hessian_trace(bad, x, method, seed=1)
    with pytest.raises(ValueError, match="samples"):
        hessian_trace(fn, x, samples=0)
    with pytest.raises(ValueError, match="sigma"):
        hessian_trace(fn, x, "antithetic", sigma=0.0)
    with pytest.raises(ValueError, match="distribution"):
        hessian_trace(fn, x, "hutchinson", distribution="uniform")
    with pytest.raises(ValueError, match="max_exact_dim"):
        hessian_trace(fn, x, "exact", max_exact_dim=4)
    with pytest.raises(ValueError, match="x must be"):
        hessian_trace(fn, torch.tensor(1.0))
