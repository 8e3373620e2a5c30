"""The C++ autograd chain (csrc/autograd/, fastjac/ops/_paths.py): which calls take it, that it computes what the
Python chain computes to every order, and that nothing of fastjac runs in Python after the forward call."""
import copy
import sys

import pytest
import torch
from torch.autograd import forward_ad

import fastjac
from fastjac.ops import _paths

pytestmark = [
    pytest.mark.skipif(not fastjac.backends()["cpu"], reason="fastjac._C is not built"),
    pytest.mark.usefixtures("single_thread"),
]

OPS = ["relu", "softplus", "bn-train", "bn-eval", "bnrelu-train", "bnrelu-eval", "bn-train-plain"]


def _op(name):
    """(f(x, w, b), needs_params) for one case; BatchNorm cases get fresh running statistics per call."""
    if name == "relu":
        return (lambda x, w, b: fastjac.ops.relu(x)), False
    if name == "softplus":
        return (lambda x, w, b: fastjac.ops.softplus(x, 2.0, 3.0)), False
    fn = fastjac.ops.batch_norm_relu if name.startswith("bnrelu") else fastjac.ops.batch_norm
    training = "train" in name
    plain = name.endswith("plain")

    def bn(x, w, b):
        c = x.shape[1]
        rm = torch.linspace(-0.2, 0.2, c, dtype=x.dtype)
        rv = torch.linspace(0.5, 1.5, c, dtype=x.dtype)
        return fn(x, rm, rv, None if plain else w, None if plain else b, training, 0.1, 1e-5)

    return bn, not plain


def _inputs():
    x = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    return x, w, b


def _three_orders(fn, x, w, b):
    """Value, then first, second and third derivatives (w.r.t. x, and w, b where used) of a scalar of fn."""
    params = [x, w, b]
    y = fn(x, w, b)
    v = torch.randn_like(y)
    loss = (y * v).sum() + (y * y).sum()
    g1 = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    s1 = sum((g * g).sum() for g in g1 if g is not None)
    g2 = torch.autograd.grad(s1, params, create_graph=True, allow_unused=True)
    s2 = sum((g * g.detach().sin()).sum() for g in g2 if g is not None and g.requires_grad)
    g3 = torch.autograd.grad(s2, params, allow_unused=True) if torch.is_tensor(s2) else (None,) * 3
    return [y, *g1, *g2, *g3]


def _python_chain(monkeypatch):
    monkeypatch.setattr(_paths, "use_cpp_chain", lambda x: False)
    for module in ("relu", "softplus", "batch_norm"):
        monkeypatch.setattr(sys.modules[f"fastjac.ops.{module}"], "use_cpp_chain", lambda x: False)


@pytest.mark.parametrize("name", OPS)
def test_cpp_chain_matches_python_chain_to_third_order(name, monkeypatch):
    fn, _ = _op(name)
    x, w, b = _inputs()
    torch.manual_seed(1)
    assert "CppNode" in fn(x, w, b).grad_fn.name()
    cpp = _three_orders(fn, x, w, b)
    _python_chain(monkeypatch)
    assert "CppNode" not in fn(x, w, b).grad_fn.name()
    torch.manual_seed(1)
    python = _three_orders(fn, x, w, b)
    assert len(cpp) == len(python)
    for i, (a, e) in enumerate(zip(cpp, python)):
        assert (a is None) == (e is None), f"result {i}: one chain gives no gradient"
        if a is not None:
            torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-12, msg=f"result {i}")


@pytest.mark.parametrize("name", OPS)
def test_cpp_chain_gradgradcheck(name):
    fn, with_params = _op(name)
    x, w, b = _inputs()
    inputs = (x, w, b) if with_params else (x,)

    def f(*args):
        return fn(*args, *([None] * (3 - len(args))))

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def _fastjac_python_calls(run):
    """The fastjac Python functions called while ``run()`` runs."""
    calls = set()
    root = fastjac.__file__.rsplit("/", 1)[0]

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(root):
            calls.add(f"{frame.f_code.co_filename[len(root):]}:{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return calls


@pytest.mark.parametrize("name", OPS)
def test_no_python_after_the_forward_call(name):
    """First and second derivatives run in C++ only: the autograd engine calls no fastjac Python function."""
    fn, _ = _op(name)
    x, w, b = _inputs()
    y = fn(x, w, b)
    v = torch.randn_like(y).requires_grad_()

    def backward_twice():
        g = torch.autograd.grad(y, x, v, create_graph=True)[0]
        torch.autograd.grad((g * g).sum(), [x, v], allow_unused=True)

    assert _fastjac_python_calls(backward_twice) == set()


def test_third_order_reaches_the_reference_link():
    """Beyond the fused double backward, the C++ chain calls the Python reference VJP (fastjac/ops/_third_order.py)."""
    fn, _ = _op("softplus")
    x, w, b = _inputs()

    def third():
        y = fn(x, w, b)
        g = torch.autograd.grad(y.sum(), x, create_graph=True)[0]
        h = torch.autograd.grad((g * g).sum(), x, create_graph=True)[0]
        torch.autograd.grad(h.sum(), x)

    calls = _fastjac_python_calls(third)
    assert any(call.endswith("_third_order.py:vjp") for call in calls), calls


def test_running_statistics_updated_once_with_version_bump():
    x = torch.randn(5, 3, 4, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    versions = rm._version, rv._version
    y = fastjac.ops.batch_norm(x, rm, rv, None, None, True, 0.25, 1e-5)
    assert "CppNode" in y.grad_fn.name()
    assert rm._version > versions[0] and rv._version > versions[1]
    g = torch.autograd.grad((y * y).sum(), x, create_graph=True)[0]
    g.sum().backward()
    mean, var = x.detach().mean((0, 2)), x.detach().var((0, 2), unbiased=True)
    torch.testing.assert_close(rm, 0.25 * mean)
    torch.testing.assert_close(rv, 0.75 + 0.25 * var)


def test_python_chain_serves_what_cpp_functions_cannot():
    x = torch.randn(4, 3, 2, requires_grad=True)
    assert _paths.use_cpp_chain(x)
    with fastjac.use_backend("reference"):
        assert not _paths.use_cpp_chain(x)
    with forward_ad.dual_level():
        assert not _paths.use_cpp_chain(x)
        dual = forward_ad.make_dual(x.detach(), torch.ones_like(x))
        assert forward_ad.unpack_dual(fastjac.ops.relu(dual)).tangent is not None
    seen = []
    torch.func.grad(lambda t: (seen.append(_paths.use_cpp_chain(t)), fastjac.ops.softplus(t).sum())[1])(x)
    assert seen == [False]
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert not _paths.use_cpp_chain(fake)


def test_saved_tensor_hooks_see_the_cpp_chain():
    x = torch.randn(4, 3, 2, requires_grad=True)
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fastjac.ops.batch_norm_relu(x, None, None, None, None, True)
    assert "CppNode" in y.grad_fn.name()
    assert torch.Size([4, 3, 2]) in packed  # x, saved by the forward link
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda x: fastjac.ops.batch_norm(x, None, None, torch.ones(4), None, True), ValueError, r"weight must have shape \(3,\)"),
        (lambda x: fastjac.ops.batch_norm(x, None, None, None, None, True, 0.1, 0.0), ValueError, "eps must be positive"),
        (lambda x: fastjac.ops.batch_norm_relu(x, torch.zeros(3), None), ValueError, "both be given or both be None"),
        (lambda x: fastjac.ops.batch_norm(x, None, None, torch.ones(3, dtype=torch.long), None, True), TypeError,
         "weight must have a floating-point dtype"),
    ],
)
def test_cpp_chain_checks_name_the_argument(call, error, match):
    x = torch.randn(4, 3, 2, requires_grad=True)
    assert _paths.use_cpp_chain(x)
    with pytest.raises(error, match=match):
        call(x)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_of_a_converted_model_matches_eager(backend):
    """torch.compile traces the Python chain (registered custom ops with fake kernels); forward and backward
    agree with the eager run on the C++ chain, and the running statistics are updated once per call."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 5 * 5, 3), torch.nn.Softplus())
    eager = fastjac.convert(net).train()
    compiled_model = fastjac.convert(copy.deepcopy(net)).train()
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)  # one graph: no break around the ops
    x = torch.randn(6, 2, 5, 5)
    outs, grads = [], []
    for model in (eager, compiled):
        xi = x.clone().requires_grad_()
        y = model(xi)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in (eager if model is eager else compiled_model).parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(compiled_model.buffers(), eager.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
