"""fastjac.losses matching and norm losses: values against brute force, Prop. 1-2 by Monte Carlo,
Eq. 2-3 forms, zero-Jacobian safety, training gradients (double backward), reductions and errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastjac
from fastjac import losses
from _jacobian_helpers import D, conv_net, converted, mlp, per_sample_jacobian

pytestmark = pytest.mark.usefixtures("single_thread")


def sq(t):
    return t.pow(2).flatten(1).sum(1)


def noisy_mean(fn, x, sigma, draws, seed):
    """Monte Carlo mean over xi ~ N(0, sigma^2 I) of fn(x + xi) (per sample), with antithetic pairs
    (xi, -xi) -- a valid estimator since xi is symmetric -- and its standard error."""
    gen = torch.Generator().manual_seed(seed)
    xi = sigma * torch.randn(draws, *x.shape, generator=gen, dtype=D)
    flat = lambda t: t.reshape(-1, *x.shape[1:])  # noqa: E731
    plus = fn(flat(x + xi)).reshape(draws, x.shape[0])
    minus = fn(flat(x - xi)).reshape(draws, x.shape[0])
    pairs = (plus + minus) / 2
    return pairs.mean(0), pairs.std(0) / math.sqrt(draws)


def test_proposition_1_by_monte_carlo_on_piecewise_linear_networks():
    """E_xi sum_i (T^i(x+xi) - S^i(x+xi))^2 = activation term + sigma^2 * Jacobian term (000 Prop. 1), exact
    for ReLU nets while no kink lies within the noise: within 4 standard errors (fixed seed), and the
    Jacobian term is resolved to better than 5 %."""
    teacher, student = mlp(seed=1), mlp(seed=2)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(3), dtype=D)
    sigma = 1e-3
    mc, se = noisy_mean(lambda xx: sq(teacher(xx) - student(xx)), x, sigma, draws=20000, seed=4)
    t_out, j_t = fastjac.input_jacobian(teacher, x, mode="all", create_graph=False)
    s_out, j_s = fastjac.input_jacobian(student, x, mode="all")
    activation = losses.activation_matching(s_out, t_out, reduction="none")
    jacobian = losses.jacobian_matching(j_s, j_t, reduction="none")
    predicted = activation + sigma ** 2 * jacobian
    assert ((mc - predicted).abs() < 4 * se).all(), (mc - activation, sigma ** 2 * jacobian, se)
    assert (se < 0.05 * sigma ** 2 * jacobian).all()
    # The Jacobian term is what the noise adds: without it the prediction is off by many standard errors.
    assert ((mc - activation).abs() > 20 * se).all()


def test_proposition_2_by_monte_carlo():
    """E_xi sum_i (y^i - S^i(x+xi))^2 = sum_i (y^i - S^i(x))^2 + sigma^2 ||J_S||_F^2 (000 Prop. 2)."""
    student = mlp(seed=5)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(6), dtype=D)
    y = torch.randn(3, 4, generator=torch.Generator().manual_seed(7), dtype=D)
    sigma = 1e-3
    mc, se = noisy_mean(lambda xx: sq(y.repeat(len(xx) // 3, 1) - student(xx)), x, sigma, draws=20000, seed=8)
    out, jac = fastjac.input_jacobian(student, x, mode="all")
    predicted = sq(y - out) + sigma ** 2 * losses.jacobian_norm(jac, reduction="none")
    assert ((mc - predicted).abs() < 4 * se).all()
    assert (se < 0.05 * sigma ** 2 * sq(jac)).all()


def test_jacobian_matching_values_and_reductions():
    gen = torch.Generator().manual_seed(0)
    js, jt = torch.randn(4, 3, 5, generator=gen, dtype=D), torch.randn(4, 3, 5, generator=gen, dtype=D)
    per_sample = sq(js - jt)
    torch.testing.assert_close(losses.jacobian_matching(js, jt, reduction="none"), per_sample)
    torch.testing.assert_close(losses.jacobian_matching(js, jt), per_sample.mean())
    torch.testing.assert_close(losses.jacobian_matching(js, jt, reduction="sum"), per_sample.sum())
    normalized = sq(F.normalize(js.flatten(1), dim=1) - F.normalize(jt.flatten(1), dim=1))
    torch.testing.assert_close(losses.jacobian_matching(js, jt, normalize=True, reduction="none"), normalized)
    torch.testing.assert_close(losses.jacobian_norm(js, reduction="none"), sq(js))
    so, to = torch.randn(4, 7, generator=gen, dtype=D), torch.randn(4, 7, generator=gen, dtype=D)
    torch.testing.assert_close(losses.activation_matching(so, to), sq(so - to).mean())
    want = -(F.softmax(to / 2, 1) * F.log_softmax(so / 2, 1)).sum(1).mean()
    torch.testing.assert_close(losses.soft_cross_entropy(so, to, temperature=2.0), want)


def test_zero_jacobian_gives_finite_value_and_gradient():
    gen = torch.Generator().manual_seed(1)
    jt = torch.randn(3, 8, generator=gen, dtype=D)
    for student in (torch.zeros(3, 8, dtype=D), torch.randn(3, 8, generator=gen, dtype=D)):
        for teacher in (jt, torch.zeros(3, 8, dtype=D)):
            js = student.clone().requires_grad_(True)
            loss = losses.jacobian_matching(js, teacher, normalize=True, reduction="none")
            (grad,) = torch.autograd.grad(loss.sum(), js)
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    zero = torch.zeros(3, 8, dtype=D, requires_grad=True)
    torch.testing.assert_close(losses.jacobian_matching(zero, jt, normalize=True, reduction="none"), torch.ones(3, dtype=D))


def test_zero_jacobian_through_a_model_trains_with_finite_gradients():
    """A student whose output ignores its input (zero first layer): J_s = 0 exactly, loss and all parameter
    gradients finite through the double backward."""
    student, teacher = mlp(seed=1), mlp(seed=2)
    with torch.no_grad():
        student[0].weight.zero_()
    x = torch.randn(3, 6, dtype=D)
    y = torch.tensor([0, 1, 2])
    t_out, j_t = fastjac.input_jacobian(teacher, x, y, create_graph=False)
    s_out, j_s = fastjac.input_jacobian(student, x, y)
    assert torch.count_nonzero(j_s) == 0
    loss = losses.activation_matching(s_out, t_out) + losses.jacobian_matching(j_s, j_t, normalize=True)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())


def test_cross_entropy_forms_match_equations_2_and_3():
    """Eq. 2 term -sum_i grad T_s^i . grad S_s^i / S_s^i and Eq. 3 term sum_i y^i ||grad S_s^i||^2 / (S_s^i)^2,
    computed from brute-force Jacobians of the softmaxes."""
    teacher, student = conv_net("softplus", seed=1).eval(), conv_net("relu", seed=2).eval()
    x = torch.randn(3, 2, 4, 4, dtype=D)
    y = torch.tensor([0, 3, 1])
    soft_t = per_sample_jacobian(lambda xx: F.softmax(teacher(xx), 1), x)
    soft_s = per_sample_jacobian(lambda xx: F.softmax(student(xx), 1), x)
    probs_s = F.softmax(student(x), 1)
    eq2 = -(soft_t * soft_s).flatten(2).sum(2).div(probs_s).sum(1)
    j_t = fastjac.input_jacobian(teacher, x, mode="all", output="softmax", create_graph=False)
    j_s = fastjac.input_jacobian(student, x, mode="all", output="log_softmax")
    torch.testing.assert_close(losses.jacobian_matching(j_s, j_t, form="cross_entropy", reduction="none"), eq2)
    rows = torch.arange(3)
    eq3 = sq(soft_s[rows, y]) / probs_s[rows, y] ** 2
    out, penalty = losses.jacobian_norm_penalty(student, x, y, form="cross_entropy", reduction="none")
    torch.testing.assert_close(penalty, eq3)
    torch.testing.assert_close(out, F.log_softmax(student(x), 1))
    logit_rows = per_sample_jacobian(student, x)[rows, y]
    _, penalty = losses.jacobian_norm_penalty(student, x, y)
    torch.testing.assert_close(penalty, sq(logit_rows).mean())


def test_distillation_loss_gradient_matches_brute_force_double_backward():
    """CE + activation + (normalised) Jacobian matching: student parameter gradients equal those of the same
    loss built on autograd.functional.jacobian(create_graph=True); plain and converted agree."""
    teacher = conv_net("relu", seed=1).eval()
    student = conv_net("softplus", seed=2).eval()
    x = torch.randn(3, 2, 4, 4, dtype=D)
    y = torch.tensor([0, 3, 1])
    t_out, j_t = fastjac.input_jacobian(teacher, x, y, create_graph=False)
    params = list(student.parameters())

    def loss_from(out, j_s, normalize):
        return F.cross_entropy(out, y) + losses.activation_matching(out, t_out) + losses.jacobian_matching(j_s, j_t, normalize)

    for normalize in (False, True):
        want = torch.autograd.grad(
            loss_from(student(x), per_sample_jacobian(student, x, create_graph=True)[torch.arange(3), y], normalize), params,
            allow_unused=True, materialize_grads=True)
        for net in (student, converted(student)):
            out, j_s = fastjac.input_jacobian(net, x, y)
            got = torch.autograd.grad(loss_from(out, j_s, normalize), list(net.parameters()), allow_unused=True,
                                      materialize_grads=True)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w)


def test_directional_matching_is_unbiased_with_shared_probes():
    """sum_s (d_s - d'_s)^2 with the teacher's probes estimates ||J_s - J_t||^2 (4 standard errors). Finite
    differences (exact for these ReLU nets at sigma = 1e-3 unless a kink is that close) keep the test fast."""
    teacher, student = mlp(seed=1), mlp(seed=2)
    x = torch.randn(2, 6, dtype=D)
    y = torch.tensor([1, 2])
    exact = losses.jacobian_matching(fastjac.input_jacobian(student, x, y).jacobian,
                                     fastjac.input_jacobian(teacher, x, y).jacobian, reduction="none")
    s = 1500
    t = fastjac.input_jacobian(teacher, x, y, estimator="finite_difference", samples=s, create_graph=False,
                               generator=torch.Generator().manual_seed(2))
    st = fastjac.input_jacobian(student, x, y, estimator="finite_difference", samples=s, probes=t.probes)
    est = losses.jacobian_matching(st, t, reduction="none")
    each = (st.jacobian - t.jacobian).pow(2) * s
    torch.testing.assert_close(est, each.mean(1))
    se = each.std(1) / math.sqrt(s)
    assert ((est - exact).abs() < 4 * se).all() and (se < 0.1 * exact).all()


def test_bad_arguments_raise_named_errors():
    a, b = torch.zeros(2, 3), torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"j_student has shape \(2, 3\) but j_teacher has shape \(2, 4\)"):
        losses.jacobian_matching(a, b)
    with pytest.raises(ValueError, match="form must be one of"):
        losses.jacobian_matching(a, a, form="kl")
    with pytest.raises(ValueError, match="normalize=True is defined for form='squared_error' only"):
        losses.jacobian_matching(a, a, True, form="cross_entropy")
    with pytest.raises(ValueError, match="reduction must be one of"):
        losses.jacobian_norm(a, reduction="avg")
    with pytest.raises(ValueError, match="eps must be a positive float"):
        losses.jacobian_matching(a, a, eps=0)
    with pytest.raises(TypeError, match="student_outputs must be a floating-point tensor"):
        losses.activation_matching([1.0], a)
    with pytest.raises(ValueError, match="student_outputs has shape"):
        losses.activation_matching(a, b)
    net = mlp()
    x, y = torch.randn(2, 6, dtype=D), torch.tensor([0, 1])
    exact = fastjac.input_jacobian(net, x, y)
    jvp = fastjac.input_jacobian(net, x, y, estimator="jvp")
    with pytest.raises(ValueError, match="cannot match a 'rows' Jacobian"):
        losses.jacobian_matching(exact, fastjac.input_jacobian(net, x, y).__class__(
            exact.outputs, exact.jacobian, y, jvp.probes, None, "directional"))
    with pytest.raises(ValueError, match="output is set by form"):
        losses.jacobian_norm_penalty(net, x, y, output="softmax")
