"""fastjac.input_jacobian against brute-force Jacobians (torch.autograd.functional.jacobian), float64.

Covers every mode x estimator, eval and training-mode BatchNorm (frozen and live semantics), Softplus and
ReLU, plain and converted models, teacher (no-graph) calls, gradients for training, statistical checks
of the random-probe estimators, and argument errors.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastjac
from _jacobian_helpers import D, conv_net, converted, frozen_reference, mlp, per_sample_jacobian

pytestmark = pytest.mark.usefixtures("single_thread")

N, K = 4, 5


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 2, 4, 4, generator=gen, dtype=D)
    y = torch.randint(0, K, (N,), generator=gen)
    return x, y


def make(act, training, convert):
    net = conv_net(act)
    net.train(training)
    return converted(net) if convert else net


def grads(loss, net):
    """Parameter gradients (zeros for parameters the loss does not depend on, e.g. the last bias of a Jacobian)."""
    return torch.autograd.grad(loss, list(net.parameters()), allow_unused=True, materialize_grads=True)


def reference_rows(net, x, training, output="logits"):
    """Brute-force per-sample K x D Jacobian of the frozen-statistics (train) or eval network."""
    ref = frozen_reference(net, x) if training else copy.deepcopy(net)
    transform = {"logits": lambda o: o, "log_softmax": lambda o: F.log_softmax(o, 1), "softmax": lambda o: F.softmax(o, 1)}[output]
    return per_sample_jacobian(lambda xx: transform(ref(xx)), x)


def pick(rows, target):
    return rows[torch.arange(len(target)), target]


CASES = [("relu", False), ("softplus", False), ("relu", True), ("softplus", True)]


@pytest.mark.parametrize("convert", [False, True], ids=["plain", "converted"])
@pytest.mark.parametrize("act,training", CASES)
def test_exact_modes_match_brute_force(act, training, convert):
    net = make(act, training, convert)
    x, y = inputs()
    rows = reference_rows(net, x, training)
    result = fastjac.input_jacobian(net, x, y)
    out, jac = result
    assert result[0] is out and result[1] is jac and len(result) == 2
    torch.testing.assert_close(jac, pick(rows, y))
    top = fastjac.input_jacobian(net, x, mode="top")
    torch.testing.assert_close(top.target, out.detach().argmax(1))
    torch.testing.assert_close(top.jacobian, pick(rows, top.target))
    torch.testing.assert_close(fastjac.input_jacobian(net, x, mode="all").jacobian, rows)
    v = torch.randn(N, 3, K, dtype=D)
    proj = fastjac.input_jacobian(net, x, mode="projection", samples=3, output_probes=v)
    torch.testing.assert_close(proj.jacobian, torch.einsum("nsk,nk...->ns...", v, rows) / math.sqrt(3))
    assert proj.output_probes is v


@pytest.mark.parametrize("output", ["log_softmax", "softmax"])
def test_output_transforms(output):
    net = make("softplus", False, False)
    x, y = inputs(1)
    result = fastjac.input_jacobian(net, x, y, output=output)
    torch.testing.assert_close(result.jacobian, pick(reference_rows(net, x, False, output), y))
    expected = F.log_softmax(net(x), 1) if output == "log_softmax" else F.softmax(net(x), 1)
    torch.testing.assert_close(result.outputs, expected)


def test_plain_and_converted_give_same_values_and_parameter_gradients():
    x, y = inputs(2)
    results = []
    for convert in (False, True):
        net = make("relu", True, convert)
        out, jac = fastjac.input_jacobian(net, x, y)
        loss = F.cross_entropy(out, y) + jac.pow(2).sum() / N
        grads = torch.autograd.grad(loss, list(net.parameters()))
        results.append((out, jac, grads, [b.clone() for b in net.buffers()]))
    for a, b in zip(results[0][:2], results[1][:2]):
        torch.testing.assert_close(a, b)
    for a, b in zip(results[0][2] + tuple(results[0][3]), results[1][2] + tuple(results[1][3])):
        torch.testing.assert_close(a, b)


def test_training_gradient_matches_brute_force_double_backward():
    """d/dtheta of sum_n ||J_n,c||^2 (eval mode) against autograd.functional.jacobian(create_graph=True)."""
    net = make("softplus", False, False)
    x, y = inputs(3)
    _, jac = fastjac.input_jacobian(net, x, y)
    got = grads(jac.pow(2).sum(), net)
    rows = per_sample_jacobian(net, x, create_graph=True)
    want = grads(pick(rows, y).pow(2).sum(), net)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_live_batch_norm_differentiates_the_clean_pass():
    """batch_norm="live": row n = d(sum_m f_m[c_m])/dx_n of the training-mode batch function."""
    net = make("softplus", True, False)
    x, y = inputs(4)
    ref = copy.deepcopy(net)
    full = torch.autograd.functional.jacobian(ref, x)  # N x K x N x ...
    want = torch.stack([sum(full[m, y[m], n] for m in range(N)) for n in range(N)])
    _, jac = fastjac.input_jacobian(net, x, y, batch_norm="live")
    torch.testing.assert_close(jac, want)
    frozen = fastjac.input_jacobian(copy.deepcopy(ref), x, y).jacobian
    assert (frozen - want).abs().max() > 1e-3  # the two semantics really differ in training mode


def test_frozen_semantics_approaches_the_per_sample_jacobian_of_the_training_batch():
    """The documented reason for the default: with N = 32 the frozen Jacobian is within 10 % of the diagonal
    block d f_n / d x_n of the training-mode batch function (through the statistics: an O(1/N) share),
    and closer to it than the live one (which adds the cross-sample sum)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).to(D).train()
    x, y = torch.randn(32, 2, 4, 4, dtype=D), torch.randint(0, 3, (32,))
    full = torch.autograd.functional.jacobian(copy.deepcopy(net), x)
    block = torch.stack([full[n, y[n], n] for n in range(32)])

    def error(jac):
        return ((jac - block).flatten(1).norm(dim=1) / block.flatten(1).norm(dim=1)).mean()

    frozen = fastjac.input_jacobian(copy.deepcopy(net), x, y).jacobian
    live = fastjac.input_jacobian(copy.deepcopy(net), x, y, batch_norm="live").jacobian
    assert error(frozen) < 0.1 and error(frozen) < error(live)


@pytest.mark.parametrize("convert", [False, True], ids=["plain", "converted"])
@pytest.mark.parametrize("act,training", CASES)
@pytest.mark.parametrize("mode", ["target", "all", "projection"])
def test_directional_estimators_along_given_probes(act, training, convert, mode):
    """jvp equals J z exactly (rounding); central differences within their O(sigma^2) bias."""
    net = make(act, training, convert)
    x, y = inputs(5)
    rows = reference_rows(net, x, training)
    s = 2
    z = torch.randn(N, s, 2, 4, 4, dtype=D)
    v = torch.randn(N, s, K, dtype=D)
    directional = torch.einsum("nk...,ns...->nks", rows, z)  # N x K x S: (J z_s)_k
    want = {
        "target": pick(directional, y),
        "all": directional,
        "projection": torch.einsum("nks,nsk->ns", directional, v),
    }[mode] / math.sqrt(s)
    kwargs = {"target": dict(target=y), "all": {}, "projection": dict(output_probes=v)}[mode]
    jvp = fastjac.input_jacobian(net, x, mode=mode, estimator="jvp", samples=s, probes=z, **kwargs)
    torch.testing.assert_close(jvp.jacobian, want)
    # sigma = 1e-4: Softplus(beta=2) third derivatives are O(1) here, so the bias is ~1e-8 * |z|^3 ~ 1e-6;
    # ReLU nets are exactly linear unless a kink lies within 1e-4 * |z| (rounding ~1e-16 / 1e-4 = 1e-12).
    fd = fastjac.input_jacobian(net, x, mode=mode, estimator="finite_difference", samples=s, probes=z, sigma=1e-4, **kwargs)
    torch.testing.assert_close(fd.jacobian, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert jvp.kind == fd.kind == "directional"
    for estimator, reference in (("jvp", jvp.jacobian), ("finite_difference", fd.jacobian)):
        batched = fastjac.input_jacobian(net, x, mode=mode, estimator=estimator, samples=s, probes=z, sigma=1e-4,
                                         vectorize=True, **kwargs)
        torch.testing.assert_close(batched.jacobian, reference)


@pytest.mark.parametrize("convert", [False, True], ids=["plain", "converted"])
@pytest.mark.parametrize("estimator", ["jvp", "finite_difference"])
def test_directional_estimators_are_differentiable_for_training(estimator, convert):
    """Parameter gradients through the jvp (reverse over forward) and finite-difference passes equal those of
    the same quantity built from exact rows (training-mode BatchNorm, frozen statistics)."""
    net = make("softplus", True, convert)
    x, y = inputs(6)
    z = torch.randn(N, 3, 2, 4, 4, dtype=D)
    est = fastjac.input_jacobian(net, x, y, estimator=estimator, samples=3, probes=z, sigma=1e-4).jacobian
    exact = torch.einsum("nchw,nschw->ns", fastjac.input_jacobian(net, x, y).jacobian, z) / math.sqrt(3)
    got, want = grads(est.pow(2).sum(), net), grads(exact.pow(2).sum(), net)
    tol = dict(rtol=1e-9, atol=1e-9) if estimator == "jvp" else dict(rtol=1e-4, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_projection_estimates_squared_frobenius_norm_without_bias(probe):
    """Each of S projections ||v_s^T J||^2 is an unbiased estimate of ||J||_F^2: the mean of S = 4000 lies
    within 4 standard errors (empirical) of the exact value (two-sided p ~ 6e-5 for a fixed seed)."""
    net = make("softplus", False, False)
    x, _ = inputs(7)
    exact = reference_rows(net, x, False).pow(2).flatten(1).sum(1)  # N
    s = 4000
    proj = fastjac.input_jacobian(net, x, mode="projection", samples=s, probe=probe, create_graph=False,
                                  generator=torch.Generator().manual_seed(0)).jacobian
    each = proj.pow(2).flatten(2).sum(2) * s  # N x S single-probe estimates
    torch.testing.assert_close(proj.pow(2).flatten(1).sum(1), each.mean(1))
    se = each.std(1) / math.sqrt(s)
    assert ((each.mean(1) - exact).abs() < 4 * se).all(), (each.mean(1), exact, se)
    assert (se < 0.1 * exact).all()  # the check has power


def test_jvp_squared_norm_and_row_sketch_are_unbiased():
    """sum_s d_s^2 estimates ||row||^2 and rows() estimates the row; 4-standard-error bounds, fixed seed."""
    net = mlp(seed=3)
    x, y = torch.randn(3, 6, dtype=D), torch.tensor([0, 1, 3])
    row = fastjac.input_jacobian(net, x, y).jacobian.detach()
    torch.testing.assert_close(row, pick(per_sample_jacobian(net, x), y))
    s = 1000
    est = fastjac.input_jacobian(net, x, y, estimator="jvp", samples=s, probe="gaussian",
                                 generator=torch.Generator().manual_seed(1))
    each = est.jacobian.detach().pow(2) * s
    norm2 = row.pow(2).sum(1)
    se = each.std(1) / math.sqrt(s)
    assert ((each.mean(1) - norm2).abs() < 4 * se).all() and (se < 0.1 * norm2).all()
    # rows(): coordinate-wise mean of (row . z) z; its per-coordinate variance is ||row||^2 + row_i^2 (Gaussian).
    sketch = est.rows().detach()
    bound = 4 * ((norm2[:, None] + row.pow(2)) / s).sqrt()
    assert ((sketch - row).abs() < bound).all()


def test_dropout_masks_are_replayed_in_extra_passes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Softplus(), nn.Dropout(0.5), nn.Linear(8, 3)).to(D).train()
    x = torch.randn(5, 6, dtype=D)
    y = torch.tensor([0, 1, 2, 0, 1])
    z = torch.randn(5, 1, 6, dtype=D)
    torch.manual_seed(123)
    exact = fastjac.input_jacobian(net, x, y).jacobian
    torch.manual_seed(123)
    jvp = fastjac.input_jacobian(net, x, y, estimator="jvp", probes=z).jacobian
    torch.testing.assert_close(jvp[:, 0], (exact * z[:, 0]).sum(1))


def test_teacher_call_needs_no_graph_and_touches_no_parameter_gradient():
    x, y = inputs(9)
    for estimator in ("exact", "jvp", "finite_difference"):
        for mode in ("target", "all"):
            net = make("relu", True, True)
            result = fastjac.input_jacobian(net, x, y if mode == "target" else None, mode=mode, estimator=estimator,
                                            create_graph=False)
            assert not result.outputs.requires_grad and not result.jacobian.requires_grad
            assert result.outputs.grad_fn is None and result.jacobian.grad_fn is None
            assert all(p.grad is None for p in net.parameters())
    xg = x.clone().requires_grad_(True)
    fastjac.input_jacobian(make("relu", False, False), xg, y, create_graph=False)
    assert xg.grad is None


def reaches_parameters(tensor, params):
    """Whether the autograd graph of ``tensor`` has an AccumulateGrad node for one of ``params``."""
    ids, seen, stack = {id(p) for p in params}, set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if id(getattr(node, "variable", None)) in ids:
            return True
        stack.extend(n for n, _ in node.next_functions)
    return False


@pytest.mark.parametrize("create_graph", [False, True])
def test_teacher_graph_never_reaches_the_parameters(create_graph):
    net = make("softplus", True, True)
    seen = []
    net[-1].register_forward_hook(lambda module, args, out: seen.append(out))
    x, y = inputs(13)
    fastjac.input_jacobian(net, x, y, create_graph=create_graph)
    assert len(seen) == 2  # the clean pass and the frozen pass differentiated by "exact"
    assert reaches_parameters(seen[-1], list(net.parameters())) == create_graph


@pytest.mark.parametrize("create_graph", [True, False], ids=["student", "teacher"])
@pytest.mark.parametrize("convert", [False, True], ids=["plain", "converted"])
@pytest.mark.parametrize("estimator,vectorize", [("exact", False), ("jvp", False), ("jvp", True),
                                                 ("finite_difference", False), ("finite_difference", True)])
def test_training_mode_batch_norm_updates_running_stats_once(estimator, vectorize, convert, create_graph):
    net = make("relu", True, convert)
    ref = copy.deepcopy(net)
    x, y = inputs(10)
    with torch.no_grad():
        ref(x)  # one ordinary training-mode forward
    fastjac.input_jacobian(net, x, y, estimator=estimator, samples=3, create_graph=create_graph, vectorize=vectorize)
    for (name, got), want in zip(net.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(got, want, msg=name)
    assert all(m.training for m in net.modules())


def test_extra_passes_use_the_clean_batch_statistics():
    """A perturbed pass normalises with the clean batch's statistics: finite differences with a large step
    (0.5, exact for ReLU only without kinks, so compare against the same step on the reference) equal those of
    the frozen-statistics reference, not those of a network re-normalising the perturbed batch."""
    net = make("relu", True, False)
    x, y = inputs(11)
    z = torch.randn(N, 1, 2, 4, 4, dtype=D)
    ref = frozen_reference(net, x)
    sigma = 0.5
    want = ((ref(x + sigma * z[:, 0]) - ref(x - sigma * z[:, 0])) / (2 * sigma)).gather(1, y[:, None])[:, 0]
    got = fastjac.input_jacobian(net, x, y, estimator="finite_difference", probes=z, sigma=sigma).jacobian[:, 0]
    torch.testing.assert_close(got, want)
    mixed_net = copy.deepcopy(net)
    mixed = ((mixed_net(x + sigma * z[:, 0]) - mixed_net(x - sigma * z[:, 0])) / (2 * sigma)).gather(1, y[:, None])[:, 0]
    assert (mixed - want).abs().max() > 1e-3


def test_record_and_frozen_context_manager():
    net = make("softplus", True, True)  # fastjac BatchNormReLU / BatchNorm modules after conversion
    x, _ = inputs(12)
    x2 = torch.randn_like(x)
    before = copy.deepcopy(net.state_dict())
    with fastjac.record_batch_norm_stats(net) as stats:
        net(x)
    after_clean = copy.deepcopy(net.state_dict())
    assert stats and len(stats.modules) == 2 and all(len(v) == 1 for v in stats.stats.values())
    with stats.frozen():
        out = net(x2)
    torch.testing.assert_close(out, frozen_reference(make("softplus", True, False), x)(x2))
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, after_clean[key])
    assert any(not torch.equal(after_clean[k], before[k]) for k in before)
    assert all(m.training for m in net.modules())
    with stats.frozen(), pytest.raises(RuntimeError, match="called 2 times"):
        net[0:3](net[0:3](x)[:, :2])  # a third BatchNorm call beyond the recorded ones
    assert all(m.training for m in net.modules())
    with pytest.raises(RuntimeError, match="no statistics were recorded"):
        with fastjac.record_batch_norm_stats(net) as unused:
            pass
        with unused.frozen():
            net(x)


@pytest.mark.skipif(not fastjac.backends()["cpu"], reason="needs the compiled cpu backend (the C++ chain)")
@pytest.mark.parametrize("differentiable", [False, True])
def test_recorded_statistics_are_the_fused_batch_norms_own(differentiable, monkeypatch):
    """A fused BatchNorm on the C++ chain hands its (mean, invstd) to the recording (no var_mean of its input): the
    same statistics as torch's BatchNorm measured with var_mean, differentiable in the parameters when asked."""
    plain = make("softplus", True, False)
    fused = converted(copy.deepcopy(plain))
    x, _ = inputs(12)
    with fastjac.record_batch_norm_stats(plain, differentiable=differentiable) as expected:
        plain(x)
    var_mean, calls = torch.var_mean, []
    monkeypatch.setattr(torch, "var_mean", lambda *a, **k: calls.append(1) or var_mean(*a, **k))
    with fastjac.use_backend("cpu"), fastjac.record_batch_norm_stats(fused, differentiable=differentiable) as got:
        fused(x)
    assert not calls, "the recording measured a fused BatchNorm's input again"
    pairs = list(zip(expected.modules, got.modules))
    assert len(pairs) == 2
    for mp, mf in pairs:
        for (mean_p, var_p), (mean_f, var_f) in zip(expected.stats[mp], got.stats[mf], strict=True):
            torch.testing.assert_close(mean_f, mean_p, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(var_f, var_p, rtol=1e-10, atol=1e-12)
            assert var_f.requires_grad == differentiable and mean_f.requires_grad == differentiable
    if differentiable:  # d(sum of the recorded variances) / d(first conv weight), through the statistics
        (gp,) = torch.autograd.grad(sum(v.sum() for m in expected.modules for _, v in expected.stats[m]),
                                    plain[0].weight)
        (gf,) = torch.autograd.grad(sum(v.sum() for m in got.modules for _, v in got.stats[m]), fused[0].weight)
        torch.testing.assert_close(gf, gp, rtol=1e-9, atol=1e-12)


def test_eval_mode_batch_norm_needs_no_record():
    net = make("relu", False, False)
    with fastjac.record_batch_norm_stats(net) as stats:
        net(inputs()[0])
    assert not stats
    assert fastjac.uses_batch_stats(nn.BatchNorm1d(3, track_running_stats=False).eval())


def test_bad_arguments_raise_named_errors():
    net = make("relu", False, False)
    x, y = inputs()
    cases = [
        (dict(mode="rows"), "mode must be one of"),
        (dict(estimator="fd"), "estimator must be one of"),
        (dict(output="probs"), "output must be one of"),
        (dict(probe="sphere", estimator="jvp"), "probe must be one of"),
        (dict(batch_norm="batch"), "batch_norm must be one of"),
        (dict(samples=0), "samples must be a positive int"),
        (dict(sigma=0.0, estimator="finite_difference"), "sigma must be a positive float"),
        (dict(probes=torch.zeros(N, 2, 2, 4, 4, dtype=D), estimator="jvp"), "probes must have shape"),
        (dict(probes=torch.zeros(N, 1, 2, 4, 4, dtype=D)), "probes .input-space. are only used"),
        (dict(output_probes=torch.zeros(N, 1, K, dtype=D)), "output_probes are only used"),
        (dict(vectorize=True), "vectorize=True is only used"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            fastjac.input_jacobian(net, x, y, **kwargs)
    with pytest.raises(ValueError, match="needs target"):
        fastjac.input_jacobian(net, x)
    with pytest.raises(ValueError, match="target is only used with mode='target'"):
        fastjac.input_jacobian(net, x, y, mode="top")
    with pytest.raises(ValueError, match="target must be a LongTensor of shape"):
        fastjac.input_jacobian(net, x, y.float())
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 5\)"):
        fastjac.input_jacobian(net, x, y + K)
    with pytest.raises(ValueError, match="must return an N x K tensor"):
        fastjac.input_jacobian(nn.Identity(), x, y)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        fastjac.input_jacobian(net, x.long(), y)
    with pytest.raises(ValueError, match="batch_norm='live' is only defined for estimator='exact'"):
        fastjac.input_jacobian(make("relu", True, False), x, y, batch_norm="live", estimator="jvp")


def test_constant_model_gives_zero_jacobian():
    net = nn.Sequential(nn.Flatten(), nn.Linear(32, K)).to(D)
    with torch.no_grad():
        net[1].weight.zero_()
    x, y = inputs()
    for estimator in ("exact", "jvp", "finite_difference"):
        _, jac = fastjac.input_jacobian(net, x, y, estimator=estimator)
        assert torch.count_nonzero(jac) == 0


@pytest.mark.skipif(not fastjac.backends()["cpu"], reason="fastjac._C is not built")
@pytest.mark.parametrize("mode", ["target", "all"])
def test_frozen_exact_rows_come_from_the_clean_pass_when_the_model_allows(mode):
    """A piecewise-linear converted model in training mode: one forward (FrozenBackward), the extra pass's rows."""
    net = make("relu", True, True)
    assert fastjac.nn.why_not_one_pass(net, inputs()[0]) is None
    x, y = inputs()
    calls = []
    hook = net.register_forward_hook(lambda *a: calls.append(1))
    target = y if mode == "target" else None
    _, rows = fastjac.input_jacobian(net, x, target, mode=mode, create_graph=False)
    hook.remove()
    assert len(calls) == 1
    expected = reference_rows(net, x, training=True)
    torch.testing.assert_close(rows, pick(expected, y) if mode == "target" else expected)
