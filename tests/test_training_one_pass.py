"""The trainer's `frozen` input gradients from the clean pass (fastjac.ops.FrozenBackward) where the student
allows it, and the two-pass route otherwise: same terms, same gradients, running statistics updated once."""
import copy

import pytest
import torch

import fastjac
from fastjac.training import terms
from fastjac.training.models import build_model

pytestmark = [
    pytest.mark.skipif(not fastjac.backends()["cpu"], reason="fastjac._C is not built"),
    pytest.mark.usefixtures("single_thread"),
]


def _student(**spec):
    torch.manual_seed(0)
    model = build_model({"arch": "vgg4", "num_classes": 5, "in_channels": 1, "width": 0.25, **spec}).double()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 1, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 5, (6,), generator=g)


LOSSES = {
    "jacobian_norm": {"ce": 1.0, "jacobian_norm": {"weight": 0.5, "form": "cross_entropy"}},
    "jacobian_matching": {"ce": 1.0, "jacobian_matching": {"weight": 0.5, "normalize": True}},
    "gradient_norm+activation_matching": {"ce": 1.0, "gradient_norm": 0.5, "activation_matching": 0.1},
}


def _step(student, teacher, x, y, loss_cfg):
    parsed = terms.parse(loss_cfg)
    ctx = terms.context(student, teacher, x.clone(), y, parsed)
    loss = sum(w * terms.TERMS[n].fn(ctx, **o) for n, w, o in parsed)
    return ctx, loss, torch.autograd.grad(loss, list(student.parameters()))


@pytest.mark.parametrize("name", list(LOSSES))
def test_one_pass_step_equals_two_pass_step(name, monkeypatch):
    student = _student()
    teacher = _student().eval()
    twin = copy.deepcopy(student)
    x, y = _batch()
    ctx, loss, grads = _step(student, teacher, x, y, LOSSES[name])
    assert ctx.switch is not None and ctx.bn_stats is None  # one pass, nothing recorded
    monkeypatch.setattr(terms, "why_not_one_pass", lambda model, x: "forced two-pass route")
    ctx2, loss2, grads2 = _step(twin, teacher, x, y, LOSSES[name])
    assert ctx2.switch is None and ctx2.bn_stats
    torch.testing.assert_close(loss, loss2, rtol=1e-11, atol=0)
    for (n, _), a, b in zip(student.named_parameters(), grads, grads2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=n)
    for (n, a), b in zip(student.named_buffers(), twin.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{n}: running statistics updated once on both routes")


@pytest.mark.parametrize(
    "spec,loss_cfg,why",
    [
        ({"fused": False}, {"jacobian_norm": 1.0}, "torch BatchNorm"),
        ({"activation": "softplus"}, {"jacobian_norm": 1.0}, "not known to be piecewise linear"),
        ({}, {"jacobian_norm": 1.0, "score_matching": 1.0}, None),  # a trace term differentiates in x again
        ({}, {"jacobian_norm": {"weight": 1.0, "batch_norm": "live"}}, None),
    ],
)
def test_two_pass_route_where_one_pass_would_differ(spec, loss_cfg, why):
    student = _student(**spec)
    x, y = _batch()
    if why:
        assert why in fastjac.nn.why_not_one_pass(student, x)
    ctx = terms.context(student, None, x.clone(), y, terms.parse(loss_cfg))
    assert ctx.switch is None


def test_one_pass_is_taken_for_a_fused_piecewise_linear_student():
    student = _student()
    x, y = _batch()
    assert fastjac.nn.why_not_one_pass(student, x) is None
    ctx = terms.context(student, None, x.clone(), y, terms.parse({"ce": 1.0, "jacobian_norm": 1.0}))
    assert ctx.switch is not None
    with fastjac.use_backend("reference"):
        assert "Python chain" in fastjac.nn.why_not_one_pass(student, x)
