"""One-pass frozen input gradients (fastjac.ops.FrozenBackward) against the two-pass route they replace:
the recorded statistics replayed in a second pass (fastjac.record_batch_norm_stats(differentiable=True))."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastjac
from fastjac.ops import FrozenBackward
from fastjac.training.models import build_model

pytestmark = [
    pytest.mark.skipif(not fastjac.backends()["cpu"], reason="fastjac._C is not built"),
    pytest.mark.usefixtures("single_thread"),
]

MODELS = {  # VGG: conv -> fused BatchNorm+ReLU; ResNet: fused BatchNorm, residual add, ReLU
    "vgg4-bnrelu": dict(arch="vgg4", num_classes=5, in_channels=2, width=0.125),
    "resnet18": dict(arch="resnet18", num_classes=5, in_channels=2),
}


def _model(name):
    torch.manual_seed(0)
    model = build_model(MODELS[name]).double().train()
    for module in model.modules():  # non-trivial affine parameters
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)
    return model


def _batch():
    torch.manual_seed(1)
    return torch.randn(6, 2, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 0])


def _frozen_rows(model, x, y):
    """(logits, j): the clean pass recorded with a switch, and its frozen input gradient (with create_graph)."""
    x = x.clone().requires_grad_()
    switch = FrozenBackward()
    with switch.recording():
        logits = model(x)
    with switch.frozen():
        (j,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), x, create_graph=True)
    return logits, j


def _one_pass(model, x, y, lam):
    logits, j = _frozen_rows(model, x, y)
    loss = F.cross_entropy(logits, y) + lam * j.pow(2).flatten(1).sum(1).mean()
    return j, loss, torch.autograd.grad(loss, list(model.parameters()))


def _two_pass(model, x, y, lam):
    with fastjac.record_batch_norm_stats(model, differentiable=True) as stats:
        logits = model(x)
    xf = x.clone().requires_grad_()
    with stats.frozen(differentiable=True):
        out = model(xf)
    (j,) = torch.autograd.grad(out.gather(1, y[:, None]).sum(), xf, create_graph=True)
    loss = F.cross_entropy(logits, y) + lam * j.pow(2).flatten(1).sum(1).mean()
    return j, loss, torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("name", list(MODELS))
def test_one_pass_equals_two_pass(name):
    model = _model(name)
    twin = copy.deepcopy(model)
    x, y = _batch()
    j1, loss1, grads1 = _one_pass(model, x, y, lam=0.7)
    j2, loss2, grads2 = _two_pass(twin, x, y, lam=0.7)
    torch.testing.assert_close(j1, j2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss1, loss2, rtol=1e-12, atol=0)
    names = [n for n, _ in model.named_parameters()]
    for n, a, b in zip(names, grads1, grads2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"gradient of {n}")
    for (n, a), b in zip(model.named_buffers(), twin.buffers()):  # running statistics: updated once each
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0, msg=n)


def test_rows_are_per_sample_and_differ_from_live():
    """Frozen rows do not depend on the other samples; the live (plain double backprop) rows do."""
    model = _model("vgg4-bnrelu")
    x, y = _batch()
    j, _, _ = _one_pass(model, x, y, lam=0.0)
    x2 = x.clone()
    x2[1:] = torch.randn_like(x2[1:])  # other samples change, so do the statistics
    switch = FrozenBackward()
    xr = x2.clone().requires_grad_()
    with switch.recording():
        logits = model(xr)
    with switch.frozen():
        (j2,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), xr)
    # Row 0 with the batch statistics of the second batch, frozen, equals the per-sample Jacobian of the
    # network whose BatchNorms use those statistics as constants: check against the two-pass route there.
    with fastjac.record_batch_norm_stats(model) as stats:
        model(x2)
    xf = x2.clone().requires_grad_()
    with stats.frozen():
        (ref,) = torch.autograd.grad(model(xf).gather(1, y[:, None]).sum(), xf)
    torch.testing.assert_close(j2, ref, rtol=1e-10, atol=1e-12)
    xl = x2.clone().requires_grad_()
    (live,) = torch.autograd.grad(model(xl).gather(1, y[:, None]).sum(), xl)
    assert (live - ref).abs().max() > 1e-6  # live mixes in the other samples through the statistics
    assert not torch.allclose(j[0], j2[0])  # and the statistics did change


def test_switch_is_per_graph_and_off_outside_frozen():
    """Outside frozen() the recorded graph gives the training-mode (live) gradient; graphs recorded without the
    switch are unaffected by it."""
    model = _model("vgg4-bnrelu")
    x, y = _batch()
    switch = FrozenBackward()
    xa = x.clone().requires_grad_()
    with switch.recording():
        out_a = model(xa)
    xb = x.clone().requires_grad_()
    out_b = model(xb)  # not recorded
    with switch.frozen():
        (frozen,) = torch.autograd.grad(out_a.gather(1, y[:, None]).sum(), xa, retain_graph=True)
        (plain,) = torch.autograd.grad(out_b.gather(1, y[:, None]).sum(), xb)
    (live,) = torch.autograd.grad(out_a.gather(1, y[:, None]).sum(), xa)
    torch.testing.assert_close(live, plain, rtol=1e-10, atol=1e-12)
    assert (frozen - live).abs().max() > 1e-6


def test_recording_needs_the_cpp_chain():
    model = _model("vgg4-bnrelu")
    x, _ = _batch()
    with fastjac.use_backend("reference"), FrozenBackward().recording(), \
            pytest.raises(RuntimeError, match="needs the C\\+\\+ chain"):
        model(x)


def test_third_derivative_through_the_frozen_link_is_refused():
    model = _model("resnet18")
    x, y = _batch()
    _, j = _frozen_rows(model, x, y)
    penalty = j.pow(2).sum()
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(penalty, params, create_graph=True, allow_unused=True)
    second = sum(g.sum() for g in grads if g is not None and g.requires_grad)
    with pytest.raises(RuntimeError, match="third derivatives through a FrozenBackward graph"):
        torch.autograd.grad(second, params, allow_unused=True)
