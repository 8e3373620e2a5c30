"""``torch.func`` on converted models and fused ops (issue 16): ``jacrev``, ``jacfwd``, ``hessian``, ``vmap`` and
per-sample gradients give what they give on the unconverted model, on every backend, in float64 to 1e-10; under
``vmap`` a fused op is one kernel call over the batched tensor (the batching rules of ``fastjac/ops/_vmap.py``);
training-mode BatchNorm under ``vmap`` behaves as PyTorch's (per-member statistics, batched running statistics
updated once, an error for unbatched ones).
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import fastjac
from _kernel_cases import KERNEL_BACKENDS

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = dict(rtol=1e-10, atol=1e-10)
DT = torch.float64


def _backends():
    """(backend, device) pairs: the reference, and every kernel backend with a device it serves here."""
    return [("reference", "cpu")] + [(kb.name, kb.device) for kb in KERNEL_BACKENDS]


@pytest.fixture(params=_backends(), ids=lambda p: f"{p[0]}@{p[1]}")
def on(request):
    name, device = request.param
    with fastjac.use_backend(name):
        yield device


def _randomise_batch_norms(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model


def _net(kind):
    """A small model per fused op; 3 x 3 x 3 = 27 values per sample reach the activation (not a multiple of 8: the
    ReLU mask rows are padded)."""
    conv = [nn.Conv2d(2, 3, 3)]
    head = [nn.Flatten(), nn.Linear(27, 4)]
    layers = {
        "relu": conv + [nn.ReLU()] + head,
        "softplus": conv + [nn.Softplus(beta=2.0, threshold=1.0)] + head,
        "bn": conv + [nn.BatchNorm2d(3), nn.Softplus()] + head,
        "bn_relu": conv + [nn.BatchNorm2d(3), nn.ReLU()] + head,
        "bn1d_relu": [nn.Flatten(), nn.Linear(50, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4)],
    }[kind]
    return _randomise_batch_norms(nn.Sequential(*layers)).to(DT).eval()


KINDS = ["relu", "softplus", "bn", "bn_relu", "bn1d_relu"]


def _pair(kind, device):
    plain = _net(kind).to(device)
    converted = fastjac.convert(copy.deepcopy(plain)).eval()
    assert not any(isinstance(m, (nn.ReLU, nn.Softplus, nn.BatchNorm2d, nn.BatchNorm1d))
                   and type(m).__module__.startswith("torch.") for m in converted.modules()), "not converted"
    return plain, converted


def _close(actual, expected):
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for k in expected:
            torch.testing.assert_close(actual[k], expected[k], **TOL, msg=lambda m: f"{k}: {m}")
        return
    torch.testing.assert_close(actual, expected, **TOL)


TRANSFORMS = {
    "jacrev": lambda f, x: jacrev(f)(x),
    "jacfwd": lambda f, x: jacfwd(f)(x),
    "hessian": lambda f, x: hessian(lambda t: f(t).square().sum())(x),
    "vmap": lambda f, x: vmap(lambda t: f(t[None])[0])(x),
    "vmap_vjp": lambda f, x: vmap(lambda v: vjp(f, x)[1](v)[0])(torch.randn(3, *f(x).shape, dtype=x.dtype, device=x.device)),
    "vmap_jvp": lambda f, x: vmap(lambda t: jvp(f, (x,), (t,))[1])(torch.randn(3, *x.shape, dtype=x.dtype, device=x.device)),
    "nested_vmap": lambda f, x: vmap(vmap(lambda t: f(t[None])[0]))(x.unsqueeze(0).expand(2, *x.shape)),
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("kind", KINDS)
def test_transform_of_a_converted_model_matches_the_unconverted(on, kind, transform):
    plain, converted = _pair(kind, on)
    x = torch.randn(2, 2, 5, 5, dtype=DT, device=on)
    torch.manual_seed(1)
    expected = TRANSFORMS[transform](plain, x)
    torch.manual_seed(1)
    _close(TRANSFORMS[transform](converted, x), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_gradients_match(on, kind):
    """``vmap(grad(loss))`` over samples with ``functional_call``: the per-sample gradient of every parameter."""
    plain, converted = _pair(kind, on)
    x, target = torch.randn(5, 2, 5, 5, dtype=DT, device=on), torch.randint(0, 4, (5,), device=on)

    def per_sample(model):
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = dict(model.named_buffers())

        def loss(p, xb, tb):
            return F.cross_entropy(functional_call(model, (p, buffers), (xb[None],)), tb[None])

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)

    _close(per_sample(converted), per_sample(plain))


def test_jacrev_of_the_parameters_matches(on):
    """``jacrev`` w.r.t. the parameters (weight and bias of the fused BatchNorm batched in its backward links)."""
    plain, converted = _pair("bn_relu", on)
    x = torch.randn(3, 2, 5, 5, dtype=DT, device=on)

    def jac(model):
        params = {k: v.detach() for k, v in model.named_parameters()}
        return jacrev(lambda p: functional_call(model, (p, dict(model.named_buffers())), (x,)))(params)

    expected, actual = jac(plain), jac(converted)
    assert expected.keys() == actual.keys()
    for k in expected:
        _close(actual[k], expected[k])


# --- one kernel call per fused op under vmap ----------------------------------------------------------------------
def _kernel_calls(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key.split("::")[1]: e.count for e in prof.key_averages() if e.key.startswith("fastjac::")}


@pytest.mark.skipif(not fastjac.backends()["cpu"], reason="needs the compiled cpu backend")
@pytest.mark.parametrize("op, kernels", [
    (fastjac.ops.relu, {"relu_fwd": 1}),
    (fastjac.ops.softplus, {"softplus_fwd": 1}),
    (lambda t: fastjac.ops.batch_norm(t, torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT)), {"bn_fwd": 1}),
    (lambda t: fastjac.ops.batch_norm_relu(t, None, None, training=True), {"bn_fwd": 1}),
], ids=["relu", "softplus", "batch_norm_eval", "batch_norm_relu_train"])
def test_vmap_is_one_kernel_call_over_the_batch(op, kernels):
    x = torch.randn(7, 4, 3, 5, 5, dtype=DT)  # 7 members of 4 x 3 x 5 x 5
    with fastjac.use_backend("cpu"):
        calls = _kernel_calls(lambda: vmap(op)(x))
        assert {k: calls.get(k, 0) for k in kernels} == kernels, calls
        calls = _kernel_calls(lambda: jacrev(op)(x[0]))  # the forward once, one backward over the 300 basis rows
    backward = {k: n for k, n in calls.items() if k.endswith("_bwd")}
    assert list(backward.values()) == [1] and calls[next(iter(kernels))] == 1, calls


# --- training-mode BatchNorm under vmap: PyTorch's semantics -------------------------------------------------------
@pytest.mark.parametrize("relu", [False, True])
def test_training_batch_norm_under_vmap_without_running_stats(on, relu):
    """Each member normalised with its own batch statistics; gradients through vmap(grad) too."""
    x = torch.randn(4, 6, 3, 2, 2, dtype=DT, device=on)  # 4 members, each N=6 x C=3 x 2 x 2
    weight, bias = torch.randn(3, dtype=DT, device=on), torch.randn(3, dtype=DT, device=on)
    ours = fastjac.ops.batch_norm_relu if relu else fastjac.ops.batch_norm
    act = F.relu if relu else (lambda t: t)

    def theirs(t, w, b):
        return act(F.batch_norm(t, None, None, w, b, training=True))

    def fused(t, w, b):
        return ours(t, None, None, w, b, training=True)

    _close(vmap(fused, in_dims=(0, None, None))(x, weight, bias), vmap(theirs, in_dims=(0, None, None))(x, weight, bias))
    loss = lambda f: lambda t, w, b: f(t, w, b).sin().sum()  # noqa: E731
    for argnums in (0, 1, 2):
        expected = vmap(grad(loss(theirs), argnums=argnums), in_dims=(0, None, None))(x, weight, bias)
        _close(vmap(grad(loss(fused), argnums=argnums), in_dims=(0, None, None))(x, weight, bias), expected)
    # batched weight and bias (in_dims 0 everywhere)
    w4, b4 = weight.expand(4, 3).clone(), bias.expand(4, 3).clone()
    _close(vmap(fused)(x, w4, b4), vmap(theirs)(x, w4, b4))


@pytest.mark.parametrize("mean_dim", [0, 1])
def test_training_batch_norm_updates_batched_running_stats_once(on, mean_dim):
    """Running statistics of their own per member, each updated once as PyTorch does. With the members of the
    running mean along dim 1 (``mean_dim=1``: its folded copy is written back) the expected values are PyTorch's with
    the members along dim 0: PyTorch itself (2.14) leaves a running mean batched along dim 1 unchanged."""
    x = torch.randn(4, 6, 3, 5, dtype=DT, device=on)
    mean0, var0 = torch.randn(4, 3, dtype=DT, device=on), torch.rand(4, 3, dtype=DT, device=on) + 0.5

    def run(f, rm, rv, dim):
        return vmap(lambda t, m, v: f(t, m, v, None, None, True, 0.3, 1e-5), in_dims=(0, dim, 0))(x, rm, rv)

    rm, rv = mean0.clone(), var0.clone()
    expected = (run(F.batch_norm, rm, rv, 0), rm, rv)
    rm, rv = mean0.clone() if mean_dim == 0 else mean0.t().clone(), var0.clone()
    actual = (run(fastjac.ops.batch_norm, rm, rv, mean_dim), rm if mean_dim == 0 else rm.t(), rv)
    for a, e in zip(actual, expected):
        _close(a, e)
    assert not torch.equal(expected[1], mean0)


def test_training_batch_norm_with_unbatched_running_stats_raises_like_pytorch():
    x = torch.randn(4, 6, 3, dtype=DT)
    rm, rv = torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT)
    with pytest.raises(RuntimeError):
        vmap(lambda t: F.batch_norm(t, rm, rv, training=True))(x)
    with pytest.raises(RuntimeError, match="running_mean / running_var are not"):
        vmap(lambda t: fastjac.ops.batch_norm(t, rm, rv, training=True))(x)
    assert torch.equal(rm, torch.zeros(3, dtype=DT)), "the running statistics must be left alone"


def test_training_module_under_vmap_after_replace_all_batch_norm_modules(on):
    """PyTorch's recipe for per-sample gradients of a training-mode BatchNorm model works on a converted one."""
    plain = _net("bn_relu").to(on).train()
    converted = fastjac.convert(copy.deepcopy(plain)).train()
    for m in (plain, converted):
        torch.func.replace_all_batch_norm_modules_(m)
    x = torch.randn(5, 3, 2, 5, 5, dtype=DT, device=on)  # 5 members of 3 samples
    _close(vmap(converted)(x), vmap(plain)(x))


# --- perturbations under vmap: every member sees the same noise ---------------------------------------------------
def test_perturb_under_vmap_is_the_same_noise_per_member(on):
    x = torch.randn(5, 3, 4, dtype=DT, device=on)
    sigma = torch.rand(5, 3, dtype=DT, device=on)
    each = torch.stack([fastjac.ops.perturb(x[b], sigma[b], seed=7, offset=11) for b in range(5)])
    _close(vmap(lambda t, s: fastjac.ops.perturb(t, s, seed=7, offset=11))(x, sigma), each)
    dots = torch.stack([fastjac.ops.noise_dot(x[b], seed=7, offset=11) for b in range(5)])
    _close(vmap(lambda t: fastjac.ops.noise_dot(t, seed=7, offset=11))(x), dots)
    g = vmap(grad(lambda s, t: fastjac.ops.perturb(t, s, seed=7).square().sum()))(sigma, x)
    members = [sigma[b].clone().requires_grad_() for b in range(5)]
    _close(g, torch.stack([torch.autograd.grad(fastjac.ops.perturb(x[b], s, seed=7).square().sum(), s)[0]
                           for b, s in enumerate(members)]))
