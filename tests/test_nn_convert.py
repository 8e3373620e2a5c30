"""fastjac.nn modules and fastjac.convert against torch.nn.

Values, derivatives to second order, forward mode, running statistics, state_dict compatibility,
conversion rules, and a Jacobian-norm training step on a small VGG and a ResNet-18.
"""
import copy
import inspect
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad as fwAD

import fastjac
import fastjac.nn as fnn

pytestmark = pytest.mark.usefixtures("single_thread")

BACKENDS = [
    pytest.param(name, marks=pytest.mark.skipif(not fastjac.backends()[name], reason=f"fastjac backend {name!r} unavailable"))
    for name in ("reference", "cpu")
]
DTYPES = [torch.float32, torch.float64]
RTOL = {torch.float32: 1e-4, torch.float64: 1e-9}


@pytest.fixture(params=BACKENDS)
def backend(request):
    with fastjac.use_backend(request.param):
        yield request.param


def assert_close(got, want, dtype, rtol=None, scale=None):
    """Elementwise relative tolerance, absolute floor relative to ``scale`` (default: the tensor's)."""
    rtol = RTOL[dtype] if rtol is None else rtol
    if scale is None:
        scale = want.detach().abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, 1e-3))


def assert_same_in_both_modes(net, ref, x):
    """Train and eval mode: same loss, first- and second-order parameter gradients and state as ``ref``."""
    for training in (True, False):
        net.train(training), ref.train(training)
        (out, grads), (ref_out, ref_grads) = loss_and_grads(net, x), loss_and_grads(ref, x)
        assert_close(out, ref_out, torch.float64)
        for g, w in zip(grads, ref_grads):
            assert_close(g, w, torch.float64)
        assert_state_equal(net, ref, torch.float64)


def assert_state_equal(got: nn.Module, want: nn.Module, dtype):
    gs, ws = got.state_dict(), want.state_dict()
    assert list(gs) == list(ws)
    for key in ws:
        if ws[key].is_floating_point():
            assert_close(gs[key], ws[key], dtype)
        else:
            assert torch.equal(gs[key], ws[key]), key


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Non-trivial affine parameters and running statistics in every BatchNorm of ``module``."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                if m.weight is not None:
                    m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=gen))
                if m.bias is not None:
                    m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=gen))
                if m.running_mean is not None:
                    m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=gen))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return module


def derivatives(module: nn.Module, x: torch.Tensor, v: torch.Tensor):
    """``[y, d<v,y>/d(x, params)..., d J/d(x, v, params)...]`` with ``J`` the squared norm of all first
    derivatives; also checks the buffers are not touched by the backward and double backward."""
    x, v = x.clone().requires_grad_(), v.clone().requires_grad_()
    params = list(module.parameters())
    y = module(x)
    after_forward = [b.clone() for b in module.buffers()]
    first = torch.autograd.grad(y, [x, *params], v, create_graph=True, materialize_grads=True)
    jac_norm = sum(g.pow(2).sum() for g in first)
    second = torch.autograd.grad(jac_norm, [x, v, *params], materialize_grads=True)
    for b, snapshot in zip(module.buffers(), after_forward):
        assert torch.equal(b, snapshot), "backward or double backward changed a buffer"
    return [y.detach(), *(g.detach() for g in first), *second]


# --- activations --------------------------------------------------------------------------------------
ACTIVATIONS = {
    "relu": (lambda: fnn.ReLU(), lambda: nn.ReLU()),
    "relu-inplace": (lambda: fnn.ReLU(inplace=True), lambda: nn.ReLU()),
    "softplus": (lambda: fnn.Softplus(), lambda: nn.Softplus()),
    "softplus-beta-threshold": (lambda: fnn.Softplus(beta=2.0, threshold=3.0), lambda: nn.Softplus(2.0, 3.0)),
    "softplus-negative-beta": (lambda: fnn.Softplus(beta=-0.5), lambda: nn.Softplus(beta=-0.5)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_matches_torch(backend, name, dtype):
    make_fj, make_torch = ACTIVATIONS[name]
    fj, ref = make_fj(), make_torch()
    assert isinstance(fj, type(ref)) and (fj.extra_repr() == ref.extra_repr() or "inplace" in name)
    gen = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(4, 5, 6, generator=gen, dtype=dtype)
    v = torch.randn(4, 5, 6, generator=gen, dtype=dtype)
    x_before = x.clone()
    for got, want in zip(derivatives(fj, x, v), derivatives(ref, x, v)):
        assert_close(got, want, dtype)
    y = fj(x)  # never in place, whatever ``inplace`` says
    assert torch.equal(x, x_before) and y.data_ptr() != x.data_ptr()


# --- BatchNorm ----------------------------------------------------------------------------------------
BN_SHAPES = {  # torch class, fastjac class, fused fastjac class, input shape
    "1d-NC": (nn.BatchNorm1d, fnn.BatchNorm1d, fnn.BatchNormReLU1d, (8, 4)),
    "1d-NCL": (nn.BatchNorm1d, fnn.BatchNorm1d, fnn.BatchNormReLU1d, (5, 4, 3)),
    "2d": (nn.BatchNorm2d, fnn.BatchNorm2d, fnn.BatchNormReLU2d, (3, 4, 3, 5)),
    "3d": (nn.BatchNorm3d, fnn.BatchNorm3d, fnn.BatchNormReLU3d, (2, 4, 3, 2, 3)),
}
BN_CONFIGS = {
    "default": {},
    "no-affine": dict(affine=False),
    "no-bias": dict(bias=False),
    "untracked": dict(track_running_stats=False),
    "untracked-no-affine": dict(track_running_stats=False, affine=False),
    "cumulative": dict(momentum=None),
    "momentum-eps": dict(momentum=0.3, eps=1e-3),
}
MODES = {"train": [True, True, True, False], "eval": [False, False]}  # training flag per step


def bn_pair(shape_name, config, relu, dtype):
    tcls, fcls, fused_cls, shape = BN_SHAPES[shape_name]
    if "bias" in BN_CONFIGS[config] and "bias" not in inspect.signature(nn.BatchNorm1d).parameters:
        pytest.skip(f"torch {torch.__version__}'s BatchNorm has no 'bias' argument (no reference to compare with)")
    torch_bn = randomize_(tcls(shape[1], **BN_CONFIGS[config]).to(dtype), seed=2)
    fj = (fused_cls if relu else fcls)(shape[1], **BN_CONFIGS[config]).to(dtype)
    fj.load_state_dict(torch_bn.state_dict(), strict=True)
    ref = nn.Sequential(torch_bn, nn.ReLU()) if relu else torch_bn
    return fj, ref, torch_bn, shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("config", list(BN_CONFIGS))
@pytest.mark.parametrize("shape_name", list(BN_SHAPES))
def test_batch_norm_matches_torch(backend, shape_name, config, relu, mode, dtype):
    fj, ref, torch_bn, shape = bn_pair(shape_name, config, relu, dtype)
    gen = torch.Generator().manual_seed(3)
    for training in MODES[mode]:
        fj.train(training), ref.train(training)
        x = (1.5 * torch.randn(shape, generator=gen) + 0.4).to(dtype)
        v = torch.randn(shape, generator=gen).to(dtype)
        got, want = derivatives(fj, x, v), derivatives(ref, x, v)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_close(g, w, dtype)
        assert_state_equal(fj, torch_bn, dtype)
    if fj.num_batches_tracked is not None:
        assert fj.num_batches_tracked.item() == sum(MODES[mode])


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
def test_batch_norm_tracking_disabled_after_construction(backend, relu):
    """``track_running_stats = False`` set on a module that has buffers: training must neither update nor
    count, eval still normalizes with the buffers (torch passes the buffers only when they are used)."""
    dtype = torch.float64
    fj, ref, torch_bn, shape = bn_pair("2d", "default", relu, dtype)
    fj.track_running_stats = torch_bn.track_running_stats = False
    before = copy.deepcopy(torch_bn.state_dict())
    gen = torch.Generator().manual_seed(17)
    for training in (True, True, False):
        fj.train(training), ref.train(training)
        x, v = torch.randn(shape, generator=gen, dtype=dtype), torch.randn(shape, generator=gen, dtype=dtype)
        for g, w in zip(derivatives(fj, x, v), derivatives(ref, x, v)):
            assert_close(g, w, dtype)
        assert_state_equal(fj, torch_bn, dtype)
    for key, value in before.items():
        assert torch.equal(fj.state_dict()[key], value), key


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torch's own jvp decomps
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
def test_batch_norm_forward_mode_matches_torch(backend, relu):
    dtype = torch.float64
    gen = torch.Generator().manual_seed(4)
    for training in (True, False):
        fj, ref, torch_bn, shape = bn_pair("1d-NCL", "default", relu, dtype)
        x, tx = torch.randn(shape, generator=gen, dtype=dtype), torch.randn(shape, generator=gen, dtype=dtype)
        fj.train(training), ref.train(training)
        tangents = []
        for module in (fj, ref):
            with fwAD.dual_level():
                tangents.append(fwAD.unpack_dual(module(fwAD.make_dual(x, tx))).tangent)
        assert_close(tangents[0], tangents[1], dtype)
        assert_state_equal(fj, torch_bn, dtype)


def test_batch_norm_input_dim_checks_match_torch():
    for tcls, fcls, fused_cls, shape in BN_SHAPES.values():
        bad = torch.randn(*shape, 2, 2)  # too many dims for every class
        messages = []
        for cls in (tcls, fcls, fused_cls):
            with pytest.raises(ValueError, match="expected") as info:
                cls(shape[1])(bad)
            messages.append(str(info.value))
        assert messages[0] == messages[1] == messages[2]


@pytest.mark.parametrize("config", ["default", "no-affine", "untracked", "cumulative"])
@pytest.mark.parametrize("shape_name", ["1d-NCL", "2d", "3d"])
def test_state_dict_round_trips(shape_name, config):
    tcls, fcls, fused_cls, shape = BN_SHAPES[shape_name]
    kwargs = BN_CONFIGS[config]
    torch_bn = randomize_(tcls(shape[1], **kwargs), seed=5)
    torch_bn(torch.randn(shape))  # bump num_batches_tracked
    for cls in (fcls, fused_cls):
        fj = cls(shape[1], **kwargs)
        fj.load_state_dict(torch_bn.state_dict(), strict=True)  # torch -> fastjac
        assert_state_equal(fj, torch_bn, torch.float32)
        assert fj.state_dict()._metadata[""] == torch_bn.state_dict()._metadata[""]
        fj(torch.randn(shape))  # change fastjac's state, then fastjac -> torch
        back = tcls(shape[1], **kwargs)
        back.load_state_dict(fj.state_dict(), strict=True)
        assert_state_equal(back, fj, torch.float32)
        assert repr(fj) == repr(torch_bn).replace(tcls.__name__, cls.__name__)


def test_version1_checkpoint_without_num_batches_tracked_loads():
    old = fnn.BatchNorm2d(3).state_dict()
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1
    fj = fnn.BatchNormReLU2d(3)
    fj.load_state_dict(old, strict=True)
    assert fj.num_batches_tracked.item() == 0


# --- convert ------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c),
        )
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.body(x) + x)


class Net(nn.Module):
    """Nested custom modules, a ModuleList and a ModuleDict, 1d/2d/3d BatchNorms, ReLU and Softplus."""

    def __init__(self, c=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.ModuleList([Block(c), Block(c)])
        self.volume = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.BatchNorm3d(2), nn.ReLU())
        self.heads = nn.ModuleDict({
            "soft": nn.Sequential(nn.Linear(c + 2, 6), nn.BatchNorm1d(6), nn.Softplus(beta=2.0)),
            "relu": nn.Sequential(nn.Linear(c + 2, 6), nn.BatchNorm1d(6), nn.ReLU()),
        })
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        vol = self.volume(h[:, None, :2])  # N x 1 x 2 x H x W
        h = torch.cat([h.mean((2, 3)), vol.mean((2, 3, 4))], 1)
        return self.out(torch.cat([self.heads["soft"](h), self.heads["relu"](h)], 1))


TORCH_TYPES = (nn.ReLU, nn.Softplus, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def make_net(dtype=torch.float64):
    torch.manual_seed(6)
    return randomize_(Net(), seed=7).to(dtype)


def loss_and_grads(model, x):
    model.zero_grad()
    out = model(x)
    out.pow(2).mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def test_convert_fuses_and_converts_nested(backend):
    net = make_net()
    ref = copy.deepcopy(net)
    params, buffers = dict(net.named_parameters()), dict(net.named_buffers())
    keys = list(net.state_dict())
    assert fastjac.convert(net) is net

    for block in (net.stem, net.volume, net.heads["relu"], *(b.body for b in net.blocks)):
        assert type(block[1]) in (fnn.BatchNormReLU1d, fnn.BatchNormReLU2d, fnn.BatchNormReLU3d)
        assert type(block[2]) is nn.Identity
    assert type(net.volume[1]) is fnn.BatchNormReLU3d and type(net.heads["relu"][1]) is fnn.BatchNormReLU1d
    for b in net.blocks:
        assert type(b.body[4]) is fnn.BatchNorm2d and type(b.act) is fnn.ReLU
    assert type(net.heads["soft"][1]) is fnn.BatchNorm1d
    assert type(net.heads["soft"][2]) is fnn.Softplus and net.heads["soft"][2].beta == 2.0
    assert not any(type(m) in TORCH_TYPES for m in net.modules())

    assert list(net.state_dict()) == keys
    assert all(p is params[k] for k, p in net.named_parameters()) and len(params) == len(list(net.parameters()))
    assert all(b is buffers[k] for k, b in net.named_buffers()) and len(buffers) == len(list(net.buffers()))
    assert [type(m) for m in pickle.loads(pickle.dumps(net)).modules()] == [type(m) for m in net.modules()]

    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    assert_same_in_both_modes(net, ref, x)


def test_convert_fuse_false_keeps_modules_separate_then_fuses():
    net = fastjac.convert(make_net(), fuse=False)
    assert type(net.stem[1]) is fnn.BatchNorm2d and type(net.stem[2]) is fnn.ReLU
    assert type(net.volume[1]) is fnn.BatchNorm3d and type(net.heads["relu"][2]) is fnn.ReLU
    assert not any(isinstance(m, nn.Identity) for m in net.modules())
    fastjac.convert(net)  # converting again fuses the already converted pairs
    assert type(net.stem[1]) is fnn.BatchNormReLU2d and type(net.stem[2]) is nn.Identity


def test_convert_preserves_train_eval_modes():
    net = make_net().eval()
    net.blocks[1].train()
    net.heads["relu"][2].train()  # a ReLU in train mode next to an eval BatchNorm
    modes = {name: m.training for name, m in net.named_modules()}
    fastjac.convert(net)
    assert {name: m.training for name, m in net.named_modules()} == modes


def test_convert_state_dict_loads_both_ways(backend):
    x = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    plain = make_net()
    plain(x)  # non-default running statistics and num_batches_tracked
    converted = fastjac.convert(randomize_(Net().double(), seed=10))
    converted.load_state_dict(plain.state_dict(), strict=True)
    assert_state_equal(converted, plain, torch.float64)
    plain.eval(), converted.eval()
    assert_close(converted(x), plain(x), torch.float64)

    converted.train()
    converted(x)
    fresh = Net().double()
    fresh.load_state_dict(converted.state_dict(), strict=True)
    assert_state_equal(fresh, converted, torch.float64)


def test_optimizer_built_before_conversion_keeps_working(backend):
    net, ref = make_net(), make_net()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (net, ref)]
    fastjac.convert(net)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    for _ in range(2):
        for model, opt in zip((net, ref), opts):
            loss_and_grads(model, x)
            opt.step()
    assert_state_equal(net, ref, torch.float64)
    assert not torch.equal(net.out.weight, make_net().out.weight)  # the steps did move the parameters


class LeakyReLU(nn.ReLU):
    def forward(self, x):
        return F.leaky_relu(x, 0.1)


class ScaledBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return 2 * super().forward(x)


class Reversed(nn.Sequential):
    def forward(self, x):
        for m in reversed(self):
            x = m(x)
        return x


def test_convert_leaves_subclasses_syncbn_and_custom_sequentials_alone():
    model = nn.Sequential(
        nn.Sequential(ScaledBatchNorm(3), nn.ReLU()),
        nn.Sequential(nn.SyncBatchNorm(3), nn.ReLU()),
        nn.Sequential(nn.BatchNorm2d(3), LeakyReLU()),
        Reversed(nn.ReLU(), nn.BatchNorm2d(3)),
        Reversed(nn.BatchNorm2d(3), nn.ReLU()),
    )
    fastjac.convert(model)
    assert type(model[0][0]) is ScaledBatchNorm and type(model[0][1]) is fnn.ReLU
    assert type(model[1][0]) is nn.SyncBatchNorm and type(model[1][1]) is fnn.ReLU
    assert type(model[2][0]) is fnn.BatchNorm2d and type(model[2][1]) is LeakyReLU
    assert type(model[3][0]) is fnn.ReLU and type(model[3][1]) is fnn.BatchNorm2d
    assert type(model[4][0]) is fnn.BatchNorm2d and type(model[4][1]) is fnn.ReLU


def test_convert_does_not_fuse_shared_or_hooked_modules():
    shared = nn.BatchNorm2d(3)
    hooked_relu = nn.ReLU()
    hooked_relu.register_forward_hook(lambda m, i, o: None)
    model = nn.ModuleDict({
        "a": nn.Sequential(shared, nn.ReLU()),
        "b": nn.Sequential(shared, nn.Conv2d(3, 3, 1)),
        "c": nn.Sequential(nn.BatchNorm2d(3), hooked_relu),
    })
    fastjac.convert(model)
    assert type(shared) is fnn.BatchNorm2d and type(model["a"][1]) is fnn.ReLU
    assert type(model["c"][0]) is fnn.BatchNorm2d and model["c"][1] is hooked_relu
    assert type(hooked_relu) is fnn.ReLU and len(hooked_relu._forward_hooks) == 1


def test_convert_root_module_in_place():
    bn = nn.BatchNorm1d(3, momentum=None).eval()
    weight = bn.weight
    assert fastjac.convert(bn) is bn and type(bn) is fnn.BatchNorm1d
    assert bn.weight is weight and not bn.training and bn.momentum is None
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fastjac.convert(lambda x: x)


def test_convert_resnet18_matches(backend):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(12)
    ref = randomize_(torchvision.models.resnet18(weights=None, num_classes=10), seed=13).double()
    net = fastjac.convert(copy.deepcopy(ref))
    types = [type(m) for m in net.modules()]
    assert types.count(fnn.ReLU) == 9 and types.count(fnn.BatchNorm2d) == 20  # converted, nothing fused
    assert not any(type(m) in TORCH_TYPES or isinstance(m, nn.Identity) for m in net.modules())
    assert type(net.layer1[0].relu) is fnn.ReLU and type(net.layer1[0].bn1) is fnn.BatchNorm2d
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    assert_same_in_both_modes(net, ref, x)


# --- Jacobian-norm training on a small VGG -----------------------------------------------------------
def small_vgg(dtype):
    torch.manual_seed(15)
    layers, c_in = [], 3
    for c in (8, 16, 16):
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        c_in = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10)).to(dtype)


def jacobian_norm_step(model, opt, x, target, lam=0.1):
    """One SGD step on CE + lam * ||d logit_target / dx||^2; returns the loss and parameter gradients."""
    x = x.clone().requires_grad_()
    opt.zero_grad()
    logits = model(x)
    (grad_x,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x, create_graph=True)
    loss = F.cross_entropy(logits, target) + lam * grad_x.pow(2).sum() / x.shape[0]
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    return loss.detach(), grads


@pytest.mark.parametrize("dtype", DTYPES)
def test_vgg_jacobian_norm_training_matches(backend, dtype):
    ref = small_vgg(dtype)
    net = fastjac.convert(copy.deepcopy(ref))
    assert [type(m) for m in net[1:12:4]] == [fnn.BatchNormReLU2d] * 3
    assert [type(m) for m in net[2:12:4]] == [nn.Identity] * 3
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (net, ref)]
    gen = torch.Generator().manual_seed(16)
    rtol = None  # RTOL[dtype]: 1e-4 in float32, 1e-9 in float64
    for _ in range(4):
        x = torch.randn(8, 3, 16, 16, generator=gen).to(dtype)
        target = torch.randint(0, 10, (8,), generator=gen)
        (loss, grads), (ref_loss, ref_grads) = jacobian_norm_step(net, opts[0], x, target), jacobian_norm_step(
            ref, opts[1], x, target
        )
        assert_close(loss, ref_loss, dtype, rtol)
        scale = max(w.abs().max().item() for w in ref_grads)  # conv biases before a BN have ~0 gradients
        for g, w in zip(grads, ref_grads):
            assert_close(g, w, dtype, rtol, scale)
    assert_state_equal(net, ref, dtype)  # running statistics, num_batches_tracked and parameters
    assert all(m.num_batches_tracked.item() == 4 for m in net[1:12:4])
    net.eval(), ref.eval()
    assert_close(net(x), ref(x), dtype, rtol)
