"""Loss terms of the trainer: values against the library functions, BatchNorm semantics (running statistics
updated once per step, frozen per-sample Jacobians), fused and plain models agree."""
import copy

import pytest
import torch
import torch.nn.functional as F
from _training_config import ALL_TERMS, term_batch, term_models

import fastjac
from fastjac.training import terms
from fastjac.training.models import build_model

pytestmark = pytest.mark.usefixtures("single_thread")


def _value(term, options, student, teacher, x, y):
    term = term.removesuffix("_cv")  # a second option set of the same term
    parsed = terms.parse({term: {"weight": 1.0, **options}})
    ctx = terms.context(student, teacher, x.clone(), y, parsed)
    torch.manual_seed(123)  # the trace estimators draw their seeds from torch's generator
    value = terms.TERMS[term].fn(ctx, **options)
    ctx.logits  # noqa: B018 - the step's clean forward (the trainer's CE term always has one)
    return value


@pytest.mark.parametrize("term", sorted(ALL_TERMS))
def test_running_stats_updated_once_and_gradients_flow(term):
    student, teacher = term_models()
    x, y = term_batch()
    value = _value(term, ALL_TERMS[term], student, teacher, x, y)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    ref = copy.deepcopy(term_models()[0])
    ref(x)  # one ordinary training forward
    for (name, a), b in zip(student.named_buffers(), ref.buffers()):
        assert torch.equal(a, b), f"{term}: buffer {name} differs from one forward's update"


@pytest.mark.parametrize("term", sorted(ALL_TERMS))
def test_fused_and_plain_models_give_the_same_term_and_gradients(term):
    """In float64, so that the finite-difference trace estimators (rounding amplified by 1/sigma^2) compare
    the two implementations and not float32 rounding."""
    x, y = term_batch()
    x = x.double()
    results = []
    for fused in (False, True):
        student, teacher = (m.double() for m in term_models(fused))
        value = _value(term, ALL_TERMS[term], student, teacher, x, y)
        value.backward()
        results.append((value.detach(), [p.grad.clone() if p.grad is not None else None for p in student.parameters()]))
    (v0, g0), (v1, g1) = results
    torch.testing.assert_close(v1, v0, rtol=1e-9, atol=1e-10)
    for a, b in zip(g0, g1):
        if a is None:
            assert b is None or b.abs().max() == 0
        else:
            torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-9)


def test_frozen_rows_are_per_sample_jacobians_and_live_rows_are_not():
    """Training-mode BatchNorm: the default rows equal the Jacobian of each sample's own function with the
    batch's statistics held fixed; batch_norm: live rows are those of the batch sum (cross-sample terms)."""
    torch.manual_seed(0)
    student = build_model({"arch": "vgg4", "num_classes": 5, "in_channels": 1, "fused": False}).double()
    x, y = term_batch()
    x = x.double()
    ctx = terms.context(student, None, x.clone(), y, terms.parse({"jacobian_norm": 1.0}))
    frozen = ctx.input_grad("logits", "label", "frozen")
    live = ctx.input_grad("logits", "label", "live")
    # brute force: eval mode with the batch statistics as running statistics
    probe = copy.deepcopy(student)
    with fastjac.record_batch_norm_stats(probe) as stats:
        probe(x)
    def row(n):
        with stats.frozen():  # one frozen context per pass
            return torch.autograd.functional.jacobian(lambda z: probe(z[None])[0, y[n]], x[n])

    rows = [row(n) for n in range(len(x))]
    torch.testing.assert_close(frozen, torch.stack(rows))
    assert (live - frozen).norm() > 1e-3 * frozen.norm()


def test_term_values_match_the_library_in_eval_mode():
    student, teacher = term_models()
    student.eval()
    x, y = term_batch()
    # Jacobian matching: label rows, Prop. 1 squared error
    xs = x.clone().requires_grad_()
    (js,) = torch.autograd.grad(student(xs).gather(1, y[:, None]).sum(), xs)
    xt = x.clone().requires_grad_()
    (jt,) = torch.autograd.grad(teacher(xt).gather(1, y[:, None]).sum(), xt)
    expected = (js - jt).pow(2).flatten(1).sum(1).mean()
    got = _value("jacobian_matching", {}, student, teacher, x, y)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    # Jacobian norm, cross-entropy form (000 Eq. 3)
    xs = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(F.log_softmax(student(xs), 1).gather(1, y[:, None]).sum(), xs)
    got = _value("jacobian_norm", {"form": "cross_entropy"}, student, teacher, x, y)
    torch.testing.assert_close(got, g.pow(2).flatten(1).sum(1).mean(), rtol=1e-5, atol=1e-7)
    # activation matching
    got = _value("activation_matching", {}, student, teacher, x, y)
    torch.testing.assert_close(got, (student(x) - teacher(x)).pow(2).sum(1).mean())


def test_unknown_options_and_layers_are_named():
    with pytest.raises(ValueError, match="loss.jacobian_norm: unknown option"):
        terms.parse({"jacobian_norm": {"weight": 1.0, "froms": "x"}})
    student, teacher = term_models()
    x, y = term_batch()
    with pytest.raises(Exception, match="features.99"):
        _value("attention_matching", {"student_layer": "features.99", "teacher_layer": "features.3"}, student, teacher, x, y)
    with pytest.raises(ValueError, match="batch_norm"):
        _value("jacobian_norm", {"batch_norm": "sometimes"}, student, teacher, x, y)


def _penalty(student, x, y, batch_norm):
    ctx = terms.context(student, None, x, y, terms.parse({"jacobian_norm": {"weight": 1.0, "batch_norm": batch_norm}}))
    return terms.TERMS["jacobian_norm"].fn(ctx, batch_norm=batch_norm)


@pytest.mark.parametrize("fused", [False, True])
def test_frozen_penalty_is_differentiated_through_the_statistics(fused):
    """``frozen``: the parameter gradient of the penalty is the derivative of the penalty as a function of the
    parameters, the batch statistics recomputed from them (checked against central finite differences, float64),
    so BatchNorm's scale invariance holds: scaling the convolution before a BatchNorm leaves the penalty
    unchanged and its gradient has no component along that convolution's weights. ``frozen_constant`` (the
    statistics a stop-gradient) has the same value but misses that dependence."""
    student = term_models(fused=fused)[0].double().train()
    x, y = term_batch()
    x = x.double()
    params = [p for p in student.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(7)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    norm = torch.sqrt(sum(d.pow(2).sum() for d in direction))
    direction = [d / norm for d in direction]   # a unit step: h moves no pre-activation across a ReLU kink

    def at(t):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(t * d)
        try:
            return _penalty(student, x.clone(), y, "frozen").detach()
        finally:
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.sub_(t * d)

    h = 1e-6
    fd = (at(h) - at(-h)) / (2 * h)
    grads = {}
    for mode in ("frozen", "frozen_constant"):
        value = _penalty(student, x.clone(), y, mode)
        raw = torch.autograd.grad(value, params, allow_unused=True)   # the last bias does not move a Jacobian
        grads[mode] = [torch.zeros_like(p) if gr is None else gr for gr, p in zip(raw, params)]
        if mode == "frozen":
            reference_value = value.detach()
        else:
            torch.testing.assert_close(value.detach(), reference_value, rtol=1e-12, atol=0)
    directional = {m: sum((gr * d).sum() for gr, d in zip(gs, direction)) for m, gs in grads.items()}
    torch.testing.assert_close(directional["frozen"], fd, rtol=1e-5, atol=1e-9)
    assert (directional["frozen_constant"] - fd).abs() > 1e-3 * fd.abs()
    conv = next(i for i, p in enumerate(params) if p.dim() == 4)   # the first convolution, followed by BatchNorm
    radial = {m: float((gs[conv] * params[conv].detach()).sum() / (gs[conv].norm() * params[conv].detach().norm()))
              for m, gs in ((m, [gr.detach() for gr in gs]) for m, gs in grads.items())}
    assert abs(radial["frozen"]) < 1e-3 < abs(radial["frozen_constant"])


def test_frozen_needs_differentiable_statistics():
    student = term_models()[0].train()
    with fastjac.record_batch_norm_stats(student) as stats:
        student(term_batch()[0])
    with pytest.raises(ValueError, match="differentiable=True"):
        with stats.frozen(differentiable=True):
            pass
