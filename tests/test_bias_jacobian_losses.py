"""fastjac.losses bias-Jacobian matching (thesis Eq. 4.3) and norm (001 Prop. 3): values, gradients, errors."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastjac
from fastjac.losses import bias_jacobian_map, bias_jacobian_matching, bias_jacobian_norm
from _bias_jacobian_models import effective_bias, randomize, tiny_vgg

pytestmark = pytest.mark.usefixtures("single_thread")


def _maps(n=2, c=3, size=4):
    return torch.randn(n, c, size, size, dtype=torch.float64)


# --- values -------------------------------------------------------------------------------------------------

def test_matching_invariants():
    s = _maps()
    same_sum = torch.cat([s, torch.zeros_like(s[:, :1])], 1)  # extra zero channel: same channel sum
    assert bias_jacobian_matching({"a": s}, {"b": same_sum}, [("a", "b")]).item() == pytest.approx(0, abs=1e-12)
    assert bias_jacobian_matching({"a": 3.5 * s}, {"b": s}, {"a": "b"}).item() == pytest.approx(0, abs=1e-12)
    assert bias_jacobian_matching({"a": s}, {"b": -s}, [("a", "b")]).item() == pytest.approx(4.0)
    # Orthogonal maps (disjoint supports): squared distance of two orthogonal unit vectors is 2.
    left, right = s.clone(), s.clone()
    left[..., 2:], right[..., :2] = 0, 0
    assert bias_jacobian_matching({"a": left}, {"b": right}, [("a", "b")]).item() == pytest.approx(2.0)


def test_matching_resizes_the_smaller_map_and_sums_pairs():
    small = _maps(size=4)
    # A teacher map that is exactly the bilinear upsampling of the student's channel sum: loss 0.
    up = F.interpolate(bias_jacobian_map(small)[:, None], size=(8, 8), mode="bilinear", align_corners=False)
    teacher = {"t8": up.expand(-1, 5, -1, -1) / 5, "t4": _maps(c=2, size=4)}
    assert bias_jacobian_matching({"s": small}, teacher, [("s", "t8")]).item() == pytest.approx(0, abs=1e-12)
    # Explicit common size: both resized to 6 x 6, then compared.
    expected = (F.normalize(F.interpolate(bias_jacobian_map(small)[:, None], size=(6, 6), mode="bilinear").flatten(1))
                - F.normalize(F.interpolate(up, size=(6, 6), mode="bilinear").flatten(1))).pow(2).sum(1).mean()
    torch.testing.assert_close(bias_jacobian_matching({"s": small}, teacher, [("s", "t8")], size=6), expected)
    # Several pairs add up per sample; reductions.
    one = bias_jacobian_matching({"s": small}, teacher, [("s", "t4")], reduction="none")
    both = bias_jacobian_matching({"s": small}, teacher, [("s", "t8"), ("s", "t4")], reduction="none")
    assert one.shape == (2,)
    torch.testing.assert_close(both, one, rtol=0, atol=1e-12)
    total = bias_jacobian_matching({"s": small}, teacher, [("s", "t4")], reduction="sum")
    torch.testing.assert_close(total, one.sum())


def test_zero_map_has_finite_value_and_gradient():
    teacher = {"t": _maps()}
    student = torch.zeros(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    loss = bias_jacobian_matching({"s": student}, teacher, [("s", "t")])
    assert loss.item() == pytest.approx(1.0)  # ‖0 − unit vector‖²
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(grad).all()
    both_zero = bias_jacobian_matching({"s": student}, {"t": torch.zeros(2, 3, 4, 4)}, [("s", "t")])
    assert both_zero.item() == 0.0
    (grad,) = torch.autograd.grad(both_zero, student)
    assert torch.isfinite(grad).all()
    norm = bias_jacobian_norm({"s": student})
    assert norm.item() == 0.0 and torch.isfinite(torch.autograd.grad(norm, student)[0]).all()


def test_norm_value_and_layer_choice():
    maps = {"a": _maps(), "b": torch.randn(2, 6, dtype=torch.float64)}
    per_sample = maps["a"].pow(2).sum((1, 2, 3)) + maps["b"].pow(2).sum(1)
    torch.testing.assert_close(bias_jacobian_norm(maps, reduction="none"), per_sample)
    torch.testing.assert_close(bias_jacobian_norm(maps), per_sample.mean())
    torch.testing.assert_close(bias_jacobian_norm(maps, ["b"], reduction="sum"), maps["b"].pow(2).sum())


# --- on networks --------------------------------------------------------------------------------------------

def _student():
    return randomize(nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    )).eval()


def _teacher():
    return randomize(nn.Sequential(
        nn.Conv2d(2, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
        nn.Conv2d(5, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(3, 3),
    )).eval()


PAIRS = [("1", "1"), ("5", "1"), ("4", "4")]  # 6x6 vs 6x6, 3x3 vs 6x6 (resized), conv 3x3 vs BN 3x3


class _Functional(nn.Module):
    """``net`` with the parameters named in ``params`` replaced (for gradcheck w.r.t. parameters)."""

    def __init__(self, net, params):
        super().__init__()
        self.net, self.params = net, params

    def forward(self, x):
        return torch.func.functional_call(self.net, self.params, (x,))


def _loss(student, x, target, teacher_result):
    result = fastjac.full_jacobian(student, x, target, create_graph=True)
    pairs = [("net." + s if isinstance(student, _Functional) else s, t) for s, t in PAIRS]
    norm_layers = [pairs[0][0], pairs[2][0]]
    return bias_jacobian_matching(result, teacher_result, pairs) + 0.1 * bias_jacobian_norm(result, norm_layers)


@pytest.mark.parametrize("convert", [False, True], ids=["plain", "converted"])
def test_losses_gradcheck_wrt_student_parameters(convert):
    torch.manual_seed(1)
    student, teacher = _student(), _teacher()
    if convert:
        student = fastjac.convert(student)
    x, target = torch.randn(2, 2, 6, 6, dtype=torch.float64), torch.tensor([0, 2])
    teacher_result = fastjac.full_jacobian(teacher, x, target, create_graph=False)
    names = ["0.weight", "0.bias", "1.weight", "1.bias", "5.weight", "9.weight"]
    params = dict(student.named_parameters())

    def fn(*values):
        return _loss(_Functional(student, dict(zip(names, values))), x, target, teacher_result)

    inputs = tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_losses_train_the_same_plain_and_converted(backend):
    torch.manual_seed(2)
    student, teacher = _student(), _teacher()
    converted = fastjac.convert(copy.deepcopy(student))
    x, target = torch.randn(2, 2, 6, 6, dtype=torch.float64), torch.tensor([1, 0])
    teacher_result = fastjac.full_jacobian(teacher, x, target, create_graph=False)
    losses, grads = [], []
    for model in (student, converted):
        loss = _loss(model, x, target, teacher_result)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, list(model.parameters()), materialize_grads=True))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert all(torch.isfinite(g).all() for g in grads[0])
    assert sum(g.abs().sum() for g in grads[0]) > 0


def test_norm_is_the_bias_noise_sensitivity_prop3():
    """001 Prop. 3: E[(f(x; b ⊙ ξ) − f(x; b))²] ≈ σ² ‖f^b‖², ξ ~ N(1, σ²) at every position a bias is added.

    f is piecewise linear in the biases and σ is small, so the change is Gaussian with variance σ²‖f^b‖²
    except for rare ReLU flips; the Monte-Carlo mean of M squared Gaussians has relative std sqrt(2/M) = 2.2 %
    (M = 4000); the tolerance of 12 % is over 5 standard deviations.
    """
    torch.manual_seed(3)
    model = tiny_vgg().eval()
    x, target = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1])
    layers = ["0", "1", "5", "9"]
    result = fastjac.full_jacobian(model, x, target, create_graph=False)
    expected = bias_jacobian_norm(result, layers, reduction="none")

    sigma, draws = 1e-3, 4000
    modules = dict(model.named_modules())

    def noise_hook(module, args, out):
        bias = effective_bias(module).reshape([1, -1] + [1] * (out.dim() - 2))
        return out + sigma * torch.randn_like(out) * bias

    hooks = [modules[name].register_forward_hook(noise_hook) for name in layers]
    try:
        with torch.no_grad():
            noisy = model(x.repeat(draws, 1, 1, 1)).gather(1, target.repeat(draws)[:, None]).view(draws, 2)
    finally:
        for h in hooks:
            h.remove()
    measured = (noisy - result.value).pow(2).mean(0) / sigma**2
    assert math.sqrt(2 / draws) < 0.025
    torch.testing.assert_close(measured, expected, rtol=0.12, atol=0)


# --- errors -------------------------------------------------------------------------------------------------

def test_bad_layers_and_arguments_raise_named_errors():
    maps = {"conv": _maps(), "fc": torch.randn(2, 5, dtype=torch.float64)}
    with pytest.raises(ValueError, match="student layer 'nope'"):
        bias_jacobian_matching(maps, maps, [("nope", "conv")])
    with pytest.raises(ValueError, match="teacher layer 'gone'"):
        bias_jacobian_matching(maps, maps, {"conv": "gone"})
    with pytest.raises(ValueError, match="student layer 'fc'.*convolutional"):
        bias_jacobian_matching(maps, maps, [("fc", "conv")])
    with pytest.raises(ValueError, match="layer_pairs is empty"):
        bias_jacobian_matching(maps, maps, [])
    with pytest.raises(ValueError, match="batch sizes differ"):
        bias_jacobian_matching(maps, {"t": _maps(n=3)}, [("conv", "t")])
    with pytest.raises(ValueError, match="spatial dimensions differ"):
        bias_jacobian_matching(maps, {"t": torch.randn(2, 3, 4)}, [("conv", "t")])
    with pytest.raises(ValueError, match="reduction"):
        bias_jacobian_norm(maps, reduction="avg")
    with pytest.raises(ValueError, match="bias_jacobian_norm layer 'x'"):
        bias_jacobian_norm(maps, ["x"])
    with pytest.raises(TypeError, match="student must be"):
        bias_jacobian_matching([1], maps, [("conv", "conv")])
