"""Score-matching losses (thesis Eq. 5.4, anti-score-matching, gradient norm): values against a brute-force
computation from torch.autograd.functional, differentiability w.r.t. parameters, clamping, errors."""
import pytest
import torch
from torch import nn

from fastjac.losses import (
    AntiScoreMatchingLoss,
    GradientNormLoss,
    ScoreMatchingLoss,
    anti_score_matching,
    gradient_norm,
    score_matching,
)

F64 = torch.float64


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.Softplus(beta=2.0), nn.Flatten(), nn.Linear(3 * 2 * 2, 4)
    ).to(F64)


def _data():
    torch.manual_seed(1)
    return torch.randn(3, 1, 4, 4, dtype=F64), torch.tensor([0, 3, 1])


def _brute_force(model, x, target):
    """Per-sample trace of the label logit's Hessian and squared gradient norm."""
    traces, norms = [], []
    for i in range(x.shape[0]):
        f = lambda v: model(v.view(1, *x.shape[1:]))[0, target[i]]  # noqa: E731
        v = x[i].reshape(-1)
        traces.append(torch.autograd.functional.hessian(f, v).trace())
        norms.append(torch.autograd.functional.jacobian(f, v).pow(2).sum())
    return torch.stack(traces), torch.stack(norms)


def test_objectives_are_their_equations():
    h, g2 = torch.tensor([1.0, -2.0, 30.0]), torch.tensor([0.5, 4.0, 1.0])
    torch.testing.assert_close(score_matching(h, g2, mu=0.1), (h + 0.5 * g2 + 0.1 * h * h).mean())
    torch.testing.assert_close(score_matching(h, g2, mu=0.1, reduction="none"), h + 0.5 * g2 + 0.1 * h * h)
    torch.testing.assert_close(anti_score_matching(h, tau=10.0, reduction="sum"), -(1.0 - 2.0 + 10.0) * torch.ones(()))
    torch.testing.assert_close(gradient_norm(g2), g2.mean())


@pytest.mark.parametrize("method", ["exact", "hutchinson", "antithetic", "taylor"])
def test_score_matching_module_matches_brute_force(method):
    """With the exact trace the loss equals Eq. 5.4 on brute-force terms; the stochastic methods equal the same
    expression on their own trace estimate, and their estimate is the one hessian_trace gives for that seed."""
    model, (x, y) = _model(), _data()
    trace, norm = _brute_force(model, x, y)
    terms = ScoreMatchingLoss(mu=0.3, method=method, sigma=1e-3)(model, x, y, seed=5)
    torch.testing.assert_close(terms.logits, model(x))
    torch.testing.assert_close(terms.grad_norm_sq, norm)
    if method == "exact":
        torch.testing.assert_close(terms.trace, trace)
    else:
        from fastjac import hessian_trace

        fn = lambda z: model(z).gather(1, y[:, None]).squeeze(1)  # noqa: E731
        torch.testing.assert_close(terms.trace, hessian_trace(fn, x, method, sigma=1e-3, seed=5), rtol=1e-6, atol=1e-6)
    h = terms.trace
    torch.testing.assert_close(terms.loss, (h + 0.5 * norm + 0.3 * h * h).mean())


def test_gradient_norm_module():
    model, (x, y) = _model(), _data()
    _, norm = _brute_force(model, x, y)
    terms = GradientNormLoss(reduction="sum")(model, x, y)
    torch.testing.assert_close(terms.loss, norm.sum())
    assert terms.trace is None


@pytest.mark.parametrize(
    "loss", [ScoreMatchingLoss(), ScoreMatchingLoss(method="hutchinson", distribution="rademacher"),
             ScoreMatchingLoss(control_variate=True), AntiScoreMatchingLoss(tau=1e6), GradientNormLoss()],
    ids=lambda m: repr(m),
)
def test_losses_differentiable_wrt_parameters(loss):
    """A training step: cross-entropy + lambda * regulariser back-propagates finite gradients into every weight,
    and the regulariser's own gradient is not zero."""
    model, (x, y) = _model(), _data()
    terms = loss(model, x, y, **({} if isinstance(loss, GradientNormLoss) else {"seed": 1}))
    (torch.nn.functional.cross_entropy(terms.logits, y) + 1e-3 * terms.loss).backward()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    assert all(w.grad is not None and torch.isfinite(w.grad).all() for w in weights)
    model.zero_grad()
    loss(model, x, y, **({} if isinstance(loss, GradientNormLoss) else {"seed": 1})).loss.backward()
    assert model[0].weight.grad.abs().sum() > 0


def test_score_matching_gradcheck_wrt_weight():
    """Eq. 5.4 is differentiable: gradcheck through trace (Hutchinson, fixed probe), gradient norm and mu h^2."""
    model, (x, y) = _model(), _data()
    w0 = model[0].weight.detach().clone().requires_grad_()

    def loss_of(w):
        def fwd(z):
            return model[3](model[2](model[1](nn.functional.conv2d(z, w, model[0].bias))))

        class Wrapped(nn.Module):
            def forward(self, z):
                return fwd(z)

        return ScoreMatchingLoss(mu=0.1, method="hutchinson")(Wrapped(), x, y, seed=2).loss

    assert torch.autograd.gradcheck(loss_of, (w0,))


def test_anti_score_matching_clamps():
    """Minimising -min(h, tau) pushes h up while h < tau and stops (zero gradient) once h >= tau."""
    model, (x, y) = _model(), _data()
    trace, _ = _brute_force(model, x, y)
    low = float(trace.min()) - 1.0
    model.zero_grad()
    AntiScoreMatchingLoss(tau=low, method="exact")(model, x, y).loss.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters())
    terms = AntiScoreMatchingLoss(tau=1e9, method="exact")(model, x, y)
    torch.testing.assert_close(terms.loss, -trace.mean())
    model.zero_grad()
    terms.loss.backward()
    assert model[0].weight.grad.abs().sum() > 0


def test_reproducible_under_seed():
    model, (x, y) = _model(), _data()
    loss = ScoreMatchingLoss()
    assert torch.equal(loss(model, x, y, seed=3).loss, loss(model, x, y, seed=3).loss)
    torch.manual_seed(7)
    a = loss(model, x, y).loss
    torch.manual_seed(7)
    assert torch.equal(a, loss(model, x, y).loss)


def test_bad_arguments_raise_named_errors():
    model, (x, y) = _model(), _data()
    with pytest.raises(ValueError, match="method"):
        ScoreMatchingLoss(method="svd")
    with pytest.raises(ValueError, match="reduction"):
        GradientNormLoss(reduction="avg")
    with pytest.raises(ValueError, match="distribution"):
        AntiScoreMatchingLoss(distribution="cauchy")
    with pytest.raises(ValueError, match="target"):
        ScoreMatchingLoss()(model, x, y[:2])
    with pytest.raises(ValueError, match="target"):
        ScoreMatchingLoss()(model, x, y.double())
    with pytest.raises(ValueError, match=r"model\(x\) must return logits"):
        GradientNormLoss()(lambda z: model(z).sum(1), x, y)
    with pytest.raises(ValueError, match="mu"):
        score_matching(torch.ones(3), torch.ones(3), mu=-1.0)
    with pytest.raises(ValueError, match="grad_norm_sq"):
        score_matching(torch.ones(3), torch.ones(2))
