"""fastjac.full_jacobian: completeness (001 Prop. 2), bias-Jacobians against brute force, reported residuals."""
import copy

import pytest
import torch
from torch import nn

import fastjac
from _bias_jacobian_models import (
    VGG9, effective_bias, randomize, scaled_channel_bias, target_outputs, tiny_plain_cnn, tiny_resnet,
    tiny_vgg, vgg,
)

pytestmark = pytest.mark.usefixtures("single_thread")

# Completeness in float64: each term is a sum of O(100) products of O(1) numbers, so rounding stays far
# below 1e-12 relative to the size of the terms (observed ~1e-16).
COMPLETE_RTOL = 1e-12
# Central differences of a piecewise-linear function: exact up to rounding, ~1e-16 / h = 1e-11 with h=1e-5.
FD_STEP, FD_ATOL = 1e-5, 1e-8


def _x(n=3, size=8):
    return torch.randn(n, 3, size, size, dtype=torch.float64)


def _converted(model):
    return fastjac.convert(copy.deepcopy(model))


def _assert_complete(result):
    assert result.complete
    assert result.relative_residual().max().item() < COMPLETE_RTOL, result.summary()


def _assert_same_decomposition(a, b, **tol):
    assert a.bias_jacobians.keys() == b.bias_jacobians.keys()
    torch.testing.assert_close(a.input_jacobian, b.input_jacobian, **tol)
    for name in a.bias_jacobians:
        torch.testing.assert_close(a.bias_jacobians[name], b.bias_jacobians[name], **tol, msg=name)


@pytest.mark.parametrize("make", [tiny_vgg, tiny_resnet], ids=["vgg", "resnet"])
def test_complete_for_relu_networks_in_eval_mode_plain_and_converted(make, backend):
    model = make().eval()
    x, target = _x(), torch.tensor([0, 2, 1])
    plain = fastjac.full_jacobian(model, x, target)
    _assert_complete(plain)
    converted_model = _converted(model)
    assert any(isinstance(m, fastjac.nn.BatchNormReLU2d) for m in converted_model.modules())  # fused path used
    converted = fastjac.full_jacobian(converted_model, x, target)
    _assert_complete(converted)
    _assert_same_decomposition(plain, converted, rtol=1e-10, atol=1e-12)
    fused = {n for n, t in converted.layer_types.items() if t == "batch_norm_relu"}
    assert fused and all(plain.layer_types[n] == "batch_norm" for n in fused)


def test_complete_for_a_network_without_batch_norm():
    model = tiny_plain_cnn()
    result = fastjac.full_jacobian(model, _x(), torch.tensor([0, 1, 2]))
    _assert_complete(result)
    assert set(result.layer_types.values()) == {"conv", "linear"}


@pytest.mark.parametrize("make", [lambda: vgg(VGG9), lambda: __import__("torchvision").models.resnet18(num_classes=10)],
                         ids=["vgg9", "resnet18"])
def test_complete_to_1e_4_in_float32(make):
    """Issue 3's acceptance bound: completeness to 1e-4 relative in float32, plain and converted."""
    pytest.importorskip("torchvision")
    model = randomize(make()).float().eval()
    x = torch.randn(2, 3, 32, 32)
    for m in (model, _converted(model)):
        result = fastjac.full_jacobian(m, x, create_graph=False)
        assert result.relative_residual().max().item() < 1e-4, result.summary()


@pytest.mark.parametrize("depth", [18, 34])
def test_complete_for_torchvision_resnet_plain_and_converted(depth):
    torchvision = pytest.importorskip("torchvision")
    model = randomize(getattr(torchvision.models, f"resnet{depth}")(num_classes=5)).eval()
    x = _x(n=2, size=32)
    plain = fastjac.full_jacobian(model, x, create_graph=False)
    _assert_complete(plain)
    # Every conv is bias-free in torchvision's ResNets: the BNs and the final linear layer carry the biases.
    assert sum(t == "batch_norm" for t in plain.layer_types.values()) == (20 if depth == 18 else 36)
    converted = fastjac.full_jacobian(_converted(model), x, create_graph=False)
    _assert_complete(converted)
    _assert_same_decomposition(plain, converted, rtol=1e-9, atol=1e-12)


def _channel_brute_force(model, name, x, target):
    """d/dt f_n with layer ``name``'s channel-c bias scaled by (1 + t), per channel: ``(N, C)``."""
    module = dict(model.named_modules())[name]
    columns = []
    for c in range(effective_bias(module).numel()):
        with scaled_channel_bias(module, c, 1 + FD_STEP):
            up = target_outputs(model, x, target)
        with scaled_channel_bias(module, c, 1 - FD_STEP):
            down = target_outputs(model, x, target)
        columns.append((up - down) / (2 * FD_STEP))
    return torch.stack(columns, 1)


def _channel_sums(bias_jacobian, kind):
    """Sum over every dimension but batch and channel (dim 1, or the last dim for a Linear)."""
    if kind == "linear":
        return bias_jacobian if bias_jacobian.dim() == 2 else bias_jacobian.flatten(1, -2).sum(1)
    return bias_jacobian.reshape(*bias_jacobian.shape[:2], -1).sum(2)


@pytest.mark.parametrize("convert", [False, True], ids=["plain", "converted"])
@pytest.mark.parametrize("make", [tiny_vgg, tiny_resnet], ids=["vgg", "resnet"])
def test_bias_jacobian_channel_sums_equal_bias_sensitivity(make, convert):
    """Σ_positions f^b[n, c] = d f_n / d t at t = 0 when channel c's bias becomes b_c (1 + t).

    For Conv/Linear that is the bias parameter; for an eval-mode BN the effective bias β − μγ/σ, scaled by
    scaling both β_c and the running mean μ_c. Forward passes only: independent of the hooks and of autograd.
    """
    model = make().eval()
    if convert:
        model = _converted(model)
    x, target = _x(), torch.tensor([1, 0, 2])
    result = fastjac.full_jacobian(model, x, target, create_graph=False)
    assert len(result.bias_jacobians) >= 4
    for name, kind in result.layer_types.items():
        expected = _channel_brute_force(model, name, x, target)
        torch.testing.assert_close(_channel_sums(result.bias_jacobians[name], kind), expected,
                                   rtol=0, atol=FD_ATOL, msg=name)


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_conv3d_and_transposed_conv(dims):
    """Conv of any dimension (transposed too) and BatchNorm1d/3d: complete, plain = converted, brute force."""
    if dims == 1:
        model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.ConvTranspose1d(4, 2, 3, stride=2),
                              nn.ReLU(), nn.Flatten(), nn.Linear(34, 3))
        x = torch.randn(2, 3, 10, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4), nn.ReLU(), nn.AdaptiveAvgPool3d(1),
                              nn.Flatten(), nn.Linear(4, 3))
        x = torch.randn(2, 3, 5, 5, 5, dtype=torch.float64)
    model = randomize(model).eval()
    target = torch.tensor([0, 2])
    plain = fastjac.full_jacobian(model, x, target, create_graph=False)
    _assert_complete(plain)
    converted_model = _converted(model)
    converted = fastjac.full_jacobian(converted_model, x, target, create_graph=False)
    assert converted.layer_types["1"] == "batch_norm_relu"
    _assert_same_decomposition(plain, converted, rtol=1e-10, atol=1e-12)
    for name, kind in plain.layer_types.items():
        torch.testing.assert_close(_channel_sums(plain.bias_jacobians[name], kind),
                                   _channel_brute_force(model, name, x, target), rtol=0, atol=FD_ATOL, msg=name)


def _perturb_output(module, direction, t):
    """Forward hook adding ``t · b ⊙ direction`` to the module's output (per-position bias noise)."""
    bias = effective_bias(module)
    dim = direction.dim() - 1 if isinstance(module, nn.Linear) else 1
    shape = [1] * direction.dim()
    shape[dim] = -1
    return module.register_forward_hook(lambda m, a, out: out + t * bias.reshape(shape) * direction)


@pytest.mark.parametrize("make", [tiny_vgg, tiny_resnet, tiny_plain_cnn], ids=["vgg", "resnet", "no-bn"])
def test_bias_jacobian_per_position_equals_directional_derivative(make):
    """⟨f^b, u⟩ = d/dt f(z + t b ⊙ u) for a random direction u over the layer's output positions."""
    model = make().eval()
    x, target = _x(), torch.tensor([2, 2, 0])
    result = fastjac.full_jacobian(model, x, target, create_graph=False)
    modules = dict(model.named_modules())
    for name, bias_jacobian in result.bias_jacobians.items():
        u = torch.randn_like(bias_jacobian)
        values = []
        for t in (FD_STEP, -FD_STEP):
            handle = _perturb_output(modules[name], u, t)
            try:
                values.append(target_outputs(model, x, target))
            finally:
                handle.remove()
        expected = (values[0] - values[1]) / (2 * FD_STEP)
        torch.testing.assert_close((bias_jacobian * u).flatten(1).sum(1), expected, rtol=0, atol=FD_ATOL, msg=name)


def test_input_jacobian_is_the_gradient_of_the_target_output():
    model = tiny_resnet().eval()
    x, target = _x(), torch.tensor([0, 1, 2])
    result = fastjac.full_jacobian(model, x, target, create_graph=False)
    xr = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(model(xr).gather(1, target[:, None]).sum(), xr)
    torch.testing.assert_close(result.input_jacobian, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(result.value, target_outputs(model, x, target), rtol=1e-12, atol=1e-14)


def _softplus_intercepts(model, x, target):
    """Σ over Softplus units of ∂f/∂a · (a − σ'(z) z): the activation intercepts (001 §3.2) per sample."""
    records = []
    hooks = [m.register_forward_hook(lambda m, a, out: records.append((a[0], out)))
             for m in model.modules() if isinstance(m, nn.Softplus)]
    try:
        xr = x.clone().requires_grad_(True)
        f = model(xr).gather(1, target[:, None]).sum()
    finally:
        for h in hooks:
            h.remove()
    grads = torch.autograd.grad(f, [out for _, out in records])
    total = 0
    for (z, a), g in zip(records, grads):
        slope = torch.sigmoid(z)  # Softplus(beta=1)'
        total = total + (g * (a - slope * z)).flatten(1).sum(1)
    return total.detach()


def test_softplus_residual_is_reported_and_equals_the_activation_intercepts():
    model = tiny_vgg(activation=nn.Softplus).eval()
    x, target = _x(), torch.tensor([0, 1, 2])
    result = fastjac.full_jacobian(model, x, target, create_graph=False)
    residual = result.residual()
    assert residual.shape == (3,)
    assert residual.abs().min().item() > 1e-3  # clearly not complete
    assert "max |residual|" in result.summary()
    # The residual is exactly the implicit biases of the Softplus units, which the decomposition leaves out.
    torch.testing.assert_close(residual, _softplus_intercepts(model, x, target), rtol=1e-10, atol=1e-12)


def test_batch_norm_training_mode_uses_batch_statistics_and_reports_residual(backend):
    model = tiny_vgg()  # training mode
    x, target = _x(n=4), torch.tensor([0, 1, 2, 0])
    converted = _converted(model)
    plain_result = fastjac.full_jacobian(model, x, target)
    converted_result = fastjac.full_jacobian(converted, x, target)
    _assert_same_decomposition(plain_result, converted_result, rtol=1e-9, atol=1e-12)
    for m, c in zip(model.modules(), converted.modules()):  # one forward each: same running-stat update
        if isinstance(m, nn.BatchNorm2d):
            torch.testing.assert_close(m.running_mean, c.running_mean)
    residual = plain_result.residual()
    assert torch.isfinite(residual).all() and residual.abs().max().item() > 1e-3
    # With the batch statistics frozen (eval mode with running stats := batch stats) the network is piecewise
    # linear again: same output, complete decomposition.
    frozen = copy.deepcopy(model)
    stats = {}
    hooks = [m.register_forward_hook(lambda m, a, out: stats.__setitem__(m, a[0]))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for (m, inp), fm in zip(stats.items(), (f for f in frozen.modules() if isinstance(f, nn.BatchNorm2d))):
        fm.running_mean.copy_(inp.mean((0, 2, 3)))
        fm.running_var.copy_(inp.var((0, 2, 3), unbiased=False))
    frozen_result = fastjac.full_jacobian(frozen.eval(), x, target)
    _assert_complete(frozen_result)
    torch.testing.assert_close(frozen_result.value, plain_result.value)
    # Effective bias from the batch statistics: Σ_{n,positions} f^b[c] = (β − μγ/σ)_c · ∂(Σ_n f_n)/∂β_c.
    names = {m: n for n, m in model.named_modules()}
    bns = list(stats)
    f = model(x).gather(1, target[:, None]).sum()
    beta_grads = torch.autograd.grad(f, [m.bias for m in bns])
    for m, beta_grad in zip(bns, beta_grads):
        inp = stats[m]
        sigma = (inp.var((0, 2, 3), unbiased=False) + m.eps).sqrt()
        b = (m.bias - inp.mean((0, 2, 3)) * m.weight / sigma).detach()
        torch.testing.assert_close(plain_result.bias_jacobians[names[m]].detach().sum((0, 2, 3)), b * beta_grad,
                                   rtol=1e-10, atol=1e-12)


def test_batch_norm_without_running_statistics_uses_batch_statistics_in_eval_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                          nn.Flatten(), nn.Linear(144, 2)).double()
    x = _x()
    train = fastjac.full_jacobian(model.train(), x, 0)
    evaluated = fastjac.full_jacobian(model.eval(), x, 0)
    _assert_same_decomposition(train, evaluated, rtol=1e-12, atol=1e-14)
    assert train.residual().abs().max().item() > 1e-6


def test_in_place_op_on_a_view_output_is_decomposed_correctly():
    class ViewLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x)[:, :]  # a view of the linear output

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = ViewLinear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = self.a(x)
            h[:, :2] += x[:, :2]  # in place on the view
            return self.b(torch.relu(h))

    result = fastjac.full_jacobian(Net().double(), torch.randn(5, 4, dtype=torch.float64))
    _assert_complete(result)


def test_module_called_twice_gets_one_entry_per_call():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(4, 2)).double()
    result = fastjac.full_jacobian(model, torch.randn(3, 4, dtype=torch.float64))
    assert set(result.bias_jacobians) == {"0", "0#1", "4"}
    _assert_complete(result)


def test_unmodelled_bias_is_listed_and_in_the_residual():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)).double()
    with torch.no_grad():
        model[1].bias.normal_()
    result = fastjac.full_jacobian(model, _x())
    assert result.unmodelled == ("1",)
    assert result.residual().abs().max().item() > 1e-6
    assert "unmodelled" in result.summary()


def test_target_forms_and_graph():
    model = tiny_vgg().eval()
    x = _x()
    top = fastjac.full_jacobian(model, x)  # None: each sample's own top class
    assert torch.equal(top.target, top.output.argmax(1))
    same = fastjac.full_jacobian(model, x, int(top.target[0]))
    assert torch.equal(same.target, torch.full((3,), int(top.target[0])))
    assert top.input_jacobian.requires_grad and all(b.requires_grad for b in top.bias_jacobians.values())
    detached = fastjac.full_jacobian(model, x, create_graph=False)
    assert not detached.input_jacobian.requires_grad
    assert not any(b.requires_grad for b in detached.bias_jacobians.values())
    # A frozen teacher under no_grad: same values.
    teacher = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        frozen = fastjac.full_jacobian(teacher, x, create_graph=False)
    _assert_same_decomposition(frozen, detached, rtol=0, atol=0)


def test_layer_subset_and_named_errors():
    model = tiny_vgg().eval()
    x = _x()
    subset = fastjac.full_jacobian(model, x, layers=["1", "9"])
    assert set(subset.bias_jacobians) == {"1", "9"}
    full = fastjac.full_jacobian(model, x)
    torch.testing.assert_close(subset.bias_jacobians["1"], full.bias_jacobians["1"])
    with pytest.raises(ValueError, match="only the layers passed"):
        subset.residual()
    with pytest.raises(ValueError, match="'features.3' not found"):
        fastjac.full_jacobian(model, x, layers=["features.3"])
    with pytest.raises(ValueError, match=r"'4' \(Conv2d\) has no bias"):
        fastjac.full_jacobian(model, x, layers=["4"])
    with pytest.raises(ValueError, match=r"'2' \(ReLU\) has no bias"):
        fastjac.full_jacobian(model, x, layers="2")


def test_bad_arguments_raise_named_errors():
    model = tiny_vgg().eval()
    x = _x()
    with pytest.raises(TypeError, match="model"):
        fastjac.full_jacobian(lambda t: t, x)
    with pytest.raises(TypeError, match="x must be"):
        fastjac.full_jacobian(model, torch.ones(3, 3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="target must have shape"):
        fastjac.full_jacobian(model, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target classes"):
        fastjac.full_jacobian(model, x, torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="output must be a tensor of shape"):
        fastjac.full_jacobian(nn.Sequential(nn.Conv2d(3, 2, 1)).double(), x)
