"""fastjac.ops.conv and fastjac.nn.Conv1d/2d/3d against PyTorch's convolutions.

The op runs PyTorch's kernels with its own double backward (``csrc/autograd/conv.cpp``): outputs and first
derivatives are PyTorch's bit for bit, second derivatives agree to rounding, every order is exact (float64
gradcheck to the third order), and every call the C++ chain does not serve is PyTorch's own F.conv*d.
"""
import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import fastjac
import fastjac.nn as fnn

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.skipif(not fastjac.backends()["cpu"], reason="fastjac._C is not built"),
]

TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
# (spatial dims, in channels, out channels, kernel, stride, padding, dilation, groups, bias)
GEOMETRIES = [
    (2, 3, 4, (3, 3), 1, 1, 1, 1, True),
    (2, 3, 4, (3, 2), (2, 1), (1, 0), (1, 2), 1, False),
    (2, 4, 6, (3, 3), 2, 0, 1, 2, True),
    (2, 4, 4, (3, 3), 1, 1, 1, 4, False),  # depthwise
    (1, 4, 6, (3,), 1, 1, 1, 2, True),
    (3, 2, 3, (2, 2, 2), 1, 1, 1, 1, True),
]
#: input sizes per dimension: every geometry's output plane is above the 16 elements at which the CPU double
#: backward takes another route (test_the_double_backward_takes_the_route_the_rule_names)
SPATIAL = {1: (19,), 2: (11, 10), 3: (7, 6, 5)}
IDS = [f"{g[0]}d-k{g[3]}-s{g[4]}-p{g[5]}-d{g[6]}-g{g[7]}-{'b' if g[8] else 'nob'}" for g in GEOMETRIES]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def _case(geometry, dtype, batch=2, requires_grad=True):
    dims, cin, cout, kernel, stride, padding, dilation, groups, has_bias = geometry
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, *SPATIAL[dims], dtype=dtype, generator=g).requires_grad_(requires_grad)
    w = torch.randn(cout, cin // groups, *kernel, dtype=dtype, generator=g).requires_grad_(requires_grad)
    b = torch.randn(cout, dtype=dtype, generator=g).requires_grad_(requires_grad) if has_bias else None

    def ours(x, w, b=None):
        return fastjac.ops.conv(x, w, b, stride, padding, dilation, groups)

    def theirs(x, w, b=None):
        return TORCH_CONV[dims](x, w, b, stride, padding, dilation, groups)

    return (x, w) if b is None else (x, w, b), ours, theirs


def _jacobian_loss_grads(fn, inputs):
    """Gradients of a Jacobian-norm loss of ``fn``: ‖∂⟨sin y, 1⟩/∂x‖² + Σ y², w.r.t. every input."""
    x = inputs[0]
    y = fn(*inputs)
    (gx,) = torch.autograd.grad(y.sin().sum(), x, create_graph=True)
    return torch.autograd.grad(gx.pow(2).sum() + y.pow(2).sum(), inputs)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_output_and_first_derivatives_are_pytorchs(geometry, dtype):
    inputs, ours, theirs = _case(geometry, dtype)
    y, want = ours(*inputs), theirs(*inputs)
    assert y.grad_fn.name() == "torch::autograd::CppNode<fastjac::autograd::ConvForward>"
    assert torch.equal(y, want)
    g = torch.randn_like(y)
    for got, expected in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(want, inputs, g)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_second_derivatives_match_pytorch(geometry, dtype):
    inputs, ours, theirs = _case(geometry, dtype)
    for got, want in zip(_jacobian_loss_grads(ours, inputs), _jacobian_loss_grads(theirs, inputs)):
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_gradcheck_to_third_order(geometry):
    inputs, ours, _ = _case(geometry, torch.float64, batch=2)
    assert gradcheck(ours, inputs)
    assert gradgradcheck(ours, inputs)

    def input_gradient(*args):  # its second derivatives are the op's third
        y = ours(*args)
        return torch.autograd.grad(y.pow(2).sum(), args[0], create_graph=True)[0]

    gx = input_gradient(*inputs)
    assert gx.grad_fn.name() == "torch::autograd::CppNode<fastjac::autograd::ConvBackwardInput>"
    assert gradgradcheck(input_gradient, inputs)


@pytest.mark.parametrize("wanted", ["x", "w", "b", "x,w", "w,b"])
def test_only_the_wanted_gradients(wanted):
    """Each subset of inputs requiring grad gets PyTorch's gradients, at first and second order."""
    inputs, ours, theirs = _case(GEOMETRIES[0], torch.float64, requires_grad=False)
    names = dict(zip("xwb", inputs))
    for name in wanted.split(","):
        names[name].requires_grad_(True)
    chosen = [names[n] for n in wanted.split(",")]
    y, want = ours(*inputs), theirs(*inputs)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, chosen, g), torch.autograd.grad(want, chosen, g)):
        assert torch.equal(a, b)
    if names["x"].requires_grad:
        def loss(fn):
            (gx,) = torch.autograd.grad(fn(*inputs).sin().sum(), names["x"], create_graph=True)
            return gx.pow(2).sum()
        for a, b in zip(torch.autograd.grad(loss(ours), chosen), torch.autograd.grad(loss(theirs), chosen)):
            torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_nan_inf_and_empty_batch_as_pytorch():
    inputs, ours, theirs = _case(GEOMETRIES[0], torch.float64)
    x = inputs[0].detach().clone()
    x[0, 0, 1, 1], x[1, 2, 3, 3] = float("nan"), float("inf")
    x.requires_grad_(True)
    args = (x, *inputs[1:])
    torch.testing.assert_close(ours(*args), theirs(*args), equal_nan=True)
    for a, b in zip(_jacobian_loss_grads(ours, args), _jacobian_loss_grads(theirs, args)):
        torch.testing.assert_close(a, b, equal_nan=True)
    empty = (inputs[0].detach()[:0].requires_grad_(True), *inputs[1:])
    y, want = ours(*empty), theirs(*empty)
    assert y.shape == want.shape
    for a, b in zip(torch.autograd.grad(y.sum(), empty), torch.autograd.grad(want.sum(), empty)):
        assert torch.equal(a, b)


def test_calls_the_cpp_chain_does_not_serve_are_pytorchs():
    inputs, ours, theirs = _case(GEOMETRIES[0], torch.float32)
    x, w, b = inputs
    torch_node = theirs(*inputs).grad_fn.name()
    with fastjac.use_backend("reference"):
        assert ours(*inputs).grad_fn.name() == torch_node
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(*inputs)
        assert y.dtype == torch.bfloat16 and torch.equal(y, theirs(*inputs))
    assert torch.equal(fastjac.ops.conv(x[0], w, b, 1, 1), F.conv2d(x[0], w, b, 1, 1))  # unbatched
    assert torch.equal(fastjac.ops.conv(x, w, b, 1, "same"), F.conv2d(x, w, b, 1, "same"))
    # forward-mode AD and torch.func transforms
    t = torch.randn_like(x)
    _, jvp = torch.func.jvp(lambda v: ours(v, w, b), (x.detach(),), (t,))
    _, want = torch.func.jvp(lambda v: theirs(v, w, b), (x.detach(),), (t,))
    torch.testing.assert_close(jvp, want)
    per_sample = torch.func.vmap(torch.func.grad(lambda v: ours(v[None], w, b).pow(2).sum()))(x.detach())
    want = torch.func.vmap(torch.func.grad(lambda v: theirs(v[None], w, b).pow(2).sum()))(x.detach())
    torch.testing.assert_close(per_sample, want)


def test_saved_tensors_hooks_see_what_pytorch_saves():
    inputs, ours, theirs = _case(GEOMETRIES[0], torch.float32)

    def packed(fn):
        seen = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t.shape) or t, lambda t: t):
            y = fn(*inputs)
        torch.autograd.grad(y.sum(), inputs)
        return sorted(seen)

    assert packed(ours) == packed(theirs)


@pytest.mark.parametrize("cls,torch_cls,shape", [
    (fnn.Conv1d, nn.Conv1d, (2, 4, 9)), (fnn.Conv2d, nn.Conv2d, (2, 4, 7, 6)), (fnn.Conv3d, nn.Conv3d, (2, 4, 5, 4, 4)),
])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular", "replicate"])
def test_modules_are_drop_in(cls, torch_cls, shape, padding_mode):
    torch.manual_seed(0)
    ref = torch_cls(4, 6, 3, stride=1, padding=1, groups=2, padding_mode=padding_mode).double()
    mod = cls(4, 6, 3, stride=1, padding=1, groups=2, padding_mode=padding_mode).double()
    mod.load_state_dict(ref.state_dict())
    assert repr(mod) == repr(ref) and mod.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.equal(mod(x), ref(x))
    assert "ConvForward" in mod(x).grad_fn.name()
    for a, b in zip(_jacobian_loss_grads(lambda v: mod(v), (x,)), _jacobian_loss_grads(lambda v: ref(v), (x,))):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_convert_swaps_exact_convolution_types_only():
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 3), MyConv(4, 4, 1), nn.ConvTranspose2d(4, 2, 2), nn.Conv1d(1, 1, 1))
    fastjac.convert(model)
    assert [type(m) for m in model] == [fnn.Conv2d, MyConv, nn.ConvTranspose2d, fnn.Conv1d]
    plain = fastjac.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), conv=False)
    assert [type(m) for m in plain] == [nn.Conv2d, fnn.ReLU]


def test_converted_vgg_jacobian_step_matches_pytorch():
    """A converted VGG's Jacobian-norm loss gradients (all parameters) equal the plain model's (float64)."""
    from fastjac.training.models import build_model

    torch.manual_seed(0)
    plain = build_model({"arch": "vgg4", "num_classes": 10, "in_channels": 1, "width": 0.25, "fused": False}).double()
    converted = fastjac.convert(build_model({"arch": "vgg4", "num_classes": 10, "in_channels": 1, "width": 0.25,
                                             "fused": False}).double())
    converted.load_state_dict(plain.state_dict())
    assert any(type(m) is fnn.Conv2d for m in converted.modules())
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64)

    def grads(model):
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        (gx,) = torch.autograd.grad(out.log_softmax(1)[:, 0].sum(), xi, create_graph=True)
        loss = F.cross_entropy(out, torch.arange(6) % 10) + gx.pow(2).sum()
        return torch.autograd.grad(loss, list(model.parameters()))

    for a, b in zip(grads(converted), grads(plain)):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("geometry", GEOMETRIES[:3], ids=IDS[:3])
def test_cuda_matches_pytorch(geometry):
    inputs, ours, theirs = _case(geometry, torch.float64)
    inputs = tuple(t.detach().cuda().requires_grad_(True) for t in inputs)
    assert "ConvForward" in ours(*inputs).grad_fn.name()
    torch.testing.assert_close(ours(*inputs), theirs(*inputs), **TOL[torch.float64])
    for a, b in zip(_jacobian_loss_grads(ours, inputs), _jacobian_loss_grads(theirs, inputs)):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


SMALL_PLANES = [  # (input spatial, kernel, padding, stride, groups): output planes of at most 16 elements
    ((2, 2), (3, 3), 1, 1, 1), ((4, 4), (3, 3), 1, 1, 1), ((3, 4), (2, 3), (0, 1), 1, 1), ((5,), (3,), 0, 1, 1),
    ((2, 2, 2), (3, 3, 3), 1, 1, 1), ((4, 4), (3, 3), 0, 1, 1),  # ... weight_part_swapped
    ((1, 1), (3, 3), 1, 1, 2), ((4, 4), (3, 3), 1, 1, 2), ((5, 5), (3, 3), 1, 2, 1),  # ... PyTorch's own
]


@pytest.mark.parametrize("spatial,kernel,padding,stride,groups", SMALL_PLANES)
def test_small_output_planes(spatial, kernel, padding, stride, groups):
    """Output planes of at most 16 elements on CPU: the weight part from one convolution of the transposed
    tensors (stride 1, one group), else PyTorch's own double backward (csrc/autograd/conv.cpp): PyTorch's
    derivatives to the third order."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, *spatial, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 4 // groups, *kernel, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    ours = lambda x, w, b: fastjac.ops.conv(x, w, b, stride, padding, 1, groups)
    theirs = lambda x, w, b: TORCH_CONV[len(spatial)](x, w, b, stride, padding, 1, groups)
    for a, c in zip(_jacobian_loss_grads(ours, (x, w, b)), _jacobian_loss_grads(theirs, (x, w, b))):
        torch.testing.assert_close(a, c, **TOL[torch.float64])

    def input_gradient(x, w, b):
        return torch.autograd.grad(ours(x, w, b).pow(2).sum(), x, create_graph=True)[0]

    assert gradgradcheck(input_gradient, (x, w, b))


def _double_backward_ops(fn, inputs) -> collections.Counter:
    """How often each operator runs in the gradient, w.r.t. the weight (and bias), of ‖∂‖fn‖²/∂x‖²: the
    forward's backward (one convolution_backward) and the input gradient's VJP."""
    x = inputs[0]
    gx = torch.autograd.grad(fn(*inputs).pow(2).sum(), x, create_graph=True)[0]
    with torch.profiler.profile() as prof:
        torch.autograd.grad(gx.pow(2).sum(), inputs[1:])
    return collections.Counter(e.name for e in prof.events())


def _route(ops: collections.Counter) -> str:
    if ops["aten::_convolution_double_backward"]:
        return "pytorch"
    if ops["aten::flip"] and ops["aten::convolution_backward"] == 1:
        return "swapped"
    return "split" if ops["aten::convolution_backward"] == 2 else f"unknown: {sorted(ops)}"


@pytest.mark.parametrize("spatial,groups,route", [((5, 4), 1, "split"), ((4, 4), 1, "swapped"), ((2, 2), 1, "swapped"),
                                                  ((4, 4), 3, "pytorch")])
def test_the_double_backward_takes_the_route_the_rule_names(spatial, groups, route):
    """The input gradient's VJP on CPU: above 16 output elements per plane the weight part from ATen's
    weight-gradient kernel (convolution_backward); at or below, one flipped convolution of the transposed tensors
    (weight_part_swapped) where it applies, else PyTorch's own double backward (csrc/autograd/conv.cpp)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, *spatial, generator=g, requires_grad=True)
    w = torch.randn(3, 3 // groups, 3, 3, generator=g, requires_grad=True)
    ops = _double_backward_ops(lambda x, w: fastjac.ops.conv(x, w, None, 1, 1, 1, groups), (x, w))
    assert _route(ops) == route


def test_the_parity_cases_cover_every_route():
    """The parity tests above exercise the split (GEOMETRIES), test_small_output_planes the other two routes."""
    for geometry, name in zip(GEOMETRIES, IDS):
        inputs, ours, _ = _case(geometry, torch.float32)
        assert _route(_double_backward_ops(ours, inputs)) == "split", name
    for spatial, kernel, padding, stride, groups in SMALL_PLANES:
        x = torch.randn(1, 4, *spatial, requires_grad=True)
        w = torch.randn(6, 4 // groups, *kernel, requires_grad=True)
        ops = _double_backward_ops(lambda x, w: fastjac.ops.conv(x, w, None, stride, padding, 1, groups), (x, w))
        assert _route(ops) == ("swapped" if stride == 1 and groups == 1 else "pytorch"), (spatial, kernel)
