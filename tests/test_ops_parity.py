"""float32/float64 parity of the fused ops with torch.nn.functional: outputs, first and second
derivatives, running statistics; edge cases and bad inputs."""
import pytest
import torch
import torch.nn.functional as F

import fastjac
from _op_cases import BN_SETUPS, POINTWISE, BNSetup
from conftest import assert_close

DTYPES = [torch.float32, torch.float64]


def _derivatives(fn, inputs, grad_out, probe):
    """Output, first derivatives (VJP with ``grad_out``) and second derivatives (VJP of the first ones
    w.r.t. inputs and ``grad_out`` with ``probe``)."""
    y = fn(*inputs)
    first = torch.autograd.grad(y, inputs, grad_out, create_graph=True)
    live = [(f, p) for f, p in zip(first, probe) if f.requires_grad]
    second = torch.autograd.grad(
        [f for f, _ in live], (*inputs, grad_out), [p for _, p in live], allow_unused=True
    )
    return y, first, second


def _compare(mine, ref, dtype, **tol):
    for a, b in zip(mine, ref):
        if isinstance(a, (tuple, list)):
            _compare(a, b, dtype, **tol)
        elif a is None or b is None:
            # an absent derivative must be an exactly-zero one in PyTorch
            other = b if a is None else a
            assert other is None or torch.count_nonzero(other) == 0
        else:
            assert_close(a, b, dtype, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", POINTWISE, ids=str)
def test_pointwise_matches_torch(backend, case, dtype):
    x = (torch.randn(5, 3, 7, dtype=dtype) * 8).requires_grad_()
    g = torch.randn_like(x, requires_grad=True)
    probe = [torch.randn_like(x)]
    _compare(_derivatives(case.fj, (x,), g, probe), _derivatives(case.ref, (x,), g, probe), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("setup", BN_SETUPS, ids=str)
def test_batch_norm_matches_torch(backend, setup, dtype):
    x = (torch.randn(*setup.shape, dtype=dtype) * 3 + 1).requires_grad_()
    rm, rv, w, b = setup.make(dtype)
    fj, ref, (rm_t, rv_t) = setup.fns(rm, rv)
    inputs = (x, w, b) if setup.affine else (x,)
    g = torch.randn_like(x, requires_grad=True)
    probe = [torch.randn_like(t) for t in inputs]
    tol = {} if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    _compare(_derivatives(fj, inputs, g, probe), _derivatives(ref, inputs, g, probe), dtype, **tol)
    # running statistics: updated exactly once (by the forward), never by backward or double backward
    assert_close(rm, rm_t, dtype)
    assert_close(rv, rv_t, dtype)


@pytest.mark.parametrize("relu", [False, True])
def test_running_stats_updated_once_per_forward(backend, relu):
    setup = BNSetup((6, 4, 3, 3), training=True, relu=relu)
    rm, rv, w, b = setup.make(torch.float64)
    fj, ref, (rm_t, rv_t) = setup.fns(rm, rv)
    for _ in range(3):
        x = torch.randn(*setup.shape, dtype=torch.float64, requires_grad=True)
        (gx,) = torch.autograd.grad(fj(x, w, b).pow(2).sum(), x, create_graph=True)
        gx.pow(2).sum().backward()
        ref(x.detach(), w.detach(), b.detach())
    assert_close(rm, rm_t)
    assert_close(rv, rv_t)


def test_eval_mode_leaves_running_stats(backend):
    setup = BNSetup((4, 3, 5), training=False)
    rm, rv, w, b = setup.make(torch.float32)
    before = rm.clone(), rv.clone()
    fj, _, _ = setup.fns(rm, rv)
    fj(torch.randn(4, 3, 5), w, b).sum().backward()
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


def test_training_without_running_stats(backend):
    x = torch.randn(4, 3, 5, requires_grad=True)
    y = fastjac.ops.batch_norm(x, None, None, training=True)
    assert_close(y, F.batch_norm(x, None, None, training=True))


# --- edge cases ----------------------------------------------------------------------------------------
def test_relu_at_zero_has_zero_derivative(backend):
    x = torch.tensor([-1.0, 0.0, 0.0, 2.0, -0.0], requires_grad=True)
    y = fastjac.ops.relu(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0]))
    assert torch.equal(y, torch.relu(x.detach()))


def test_batch_norm_relu_at_zero_has_zero_derivative(backend):
    # eval mode with mean 0, var 1, weight 1, bias 0: z == x, so x == 0 sits exactly on the kink
    x = torch.tensor([[0.0, 1.0], [0.0, -1.0]], requires_grad=True)
    y = fastjac.ops.batch_norm_relu(x, torch.zeros(2), torch.ones(2) - 1e-5, torch.ones(2), torch.zeros(2))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g[:, 0], torch.zeros(2))


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 63, 1001])
def test_relu_sizes_not_multiple_of_8(backend, numel):
    x = torch.randn(numel, requires_grad=True)
    g = torch.randn(numel)
    (gx,) = torch.autograd.grad(fastjac.ops.relu(x), x, g)
    assert torch.equal(gx, g * (x > 0))


def test_constant_channel(backend):
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    x[:, 1] = 2.5
    x.requires_grad_()
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    setup = BNSetup((4, 3, 5))
    fj, ref, _ = setup.fns(rm, rv)
    g, probe = torch.randn_like(x, requires_grad=True), [torch.randn_like(x)]
    mine, theirs = _derivatives(fj, (x,), g, probe), _derivatives(ref, (x,), g, probe)
    _compare(mine, theirs, torch.float64, rtol=1e-7, atol=1e-7)
    assert all(torch.isfinite(t).all() for t in mine[1])


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_non_contiguous_inputs(backend, layout):
    base = torch.randn(4, 6, 5, 7, dtype=torch.float64)
    x = {
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "transposed": base.transpose(2, 3),
        "sliced": base[:, ::2, :, 1:],
    }[layout].requires_grad_()
    assert not x.is_contiguous()
    c = x.shape[1]
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    w = torch.rand(c, dtype=torch.float64, requires_grad=True)
    setup = BNSetup(tuple(x.shape), relu=True)
    fj, ref, _ = setup.fns(rm, rv)
    g = torch.randn(x.shape, dtype=torch.float64).transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    probe = [torch.randn_like(x), torch.randn_like(w)]
    _compare(_derivatives(fj, (x, w), g, probe), _derivatives(ref, (x, w), g, probe), torch.float64)
    for case in POINTWISE:
        _compare(_derivatives(case.fj, (x,), g, probe[:1]), _derivatives(case.ref, (x,), g, probe[:1]), torch.float64)


# --- bad inputs ----------------------------------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    x = torch.randn(4, 3, 5)
    with pytest.raises(TypeError, match="x must have a floating-point dtype"):
        fastjac.ops.relu(torch.arange(4))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fastjac.ops.softplus([1.0, 2.0])
    with pytest.raises(ValueError, match="beta must be non-zero"):
        fastjac.ops.softplus(x, beta=0)
    with pytest.raises(ValueError, match="x must be N x C"):
        fastjac.ops.batch_norm(torch.randn(5), None, None, training=True)
    with pytest.raises(TypeError, match="x must have a floating-point dtype"):
        fastjac.ops.batch_norm(torch.ones(4, 3, dtype=torch.int64), None, None, training=True)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        fastjac.ops.batch_norm(x, None, None, torch.ones(4), training=True)
    with pytest.raises(ValueError, match=r"running_var must have shape \(3,\)"):
        fastjac.ops.batch_norm(x, torch.zeros(3), torch.ones(2))
    with pytest.raises(ValueError, match="required when training=False"):
        fastjac.ops.batch_norm_relu(x, None, None, training=False)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fastjac.ops.batch_norm(torch.randn(1, 3, 1, 1), torch.zeros(3), torch.ones(3), training=True)
    with pytest.raises(TypeError, match="momentum must be a float"):
        fastjac.ops.batch_norm(x, torch.zeros(3), torch.ones(3), training=True, momentum=None)


def test_backend_choice_errors():
    with pytest.raises(ValueError, match="backend must be one of"):
        fastjac.set_backend("tpu")
    missing = [name for name in ("cpu", "cuda", "triton") if not fastjac.backends()[name]]
    for name in missing:
        with fastjac.use_backend(name), pytest.raises(RuntimeError, match=f"backend '{name}' is not available"):
            fastjac.ops.relu(torch.randn(3))
    assert fastjac.current_backend() == "auto"


def test_backend_environment_variable_is_validated():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", "import fastjac"], env={**__import__("os").environ, "FASTJAC_BACKEND": "gpu"},
        capture_output=True, text=True,
    )
    assert proc.returncode != 0 and "FASTJAC_BACKEND must be one of" in proc.stderr


def test_backends_report():
    report = fastjac.backends()
    assert report["reference"] is True
    assert set(report) >= {"reference", "cpu", "cuda", "triton"}
