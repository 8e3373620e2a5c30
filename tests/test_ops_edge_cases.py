"""PyTorch's semantics at the edges, on every backend and both autograd chains (issue 16): NaN / inf through ReLU
and BatchNorm (+ReLU), empty batches in training and eval, ``eps = 0`` in eval, and the dtype of forward-mode
tangents of float16 / bfloat16 BatchNorm. Each case compares values, first and second derivatives and running
statistics with ``torch.nn.functional`` (NaN where PyTorch has NaN, csrc/KERNELS.md "ReLU and NaN",
"Non-finite values and empty batches").

Backends: ``reference``, ``cpu`` (its C++ chain, and its Python chain forced by an open ``forward_ad`` level,
``fastjac/ops/_paths.py``), ``triton`` (interpreted on CPU tensors without a GPU) and, with a GPU, ``cuda``.
"""
import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import fastjac
from _op_cases import BNSetup, OpPath as Path, op_paths as _paths

NAN, INF = float("nan"), float("inf")
FLOATS = [torch.float64, torch.float32]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-4)}


@pytest.fixture(params=_paths(), ids=lambda p: f"{p[0]}-{p[1]}")
def path(request):
    torch.manual_seed(0)
    return Path(*request.param)


def _close(actual, expected, dtype):
    """Equal to PyTorch within the dtype's tolerance, NaN exactly where PyTorch has NaN; an absent derivative must
    be an exactly-zero one on the other side."""
    if actual is None or expected is None:
        other = expected if actual is None else actual
        assert other is None or torch.count_nonzero(other) == 0
        return
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.cpu(), expected.cpu(), equal_nan=True, **TOL[dtype])


def _derivatives(fn, inputs, grad_out, probes):
    """``(y, first, second)``: the output, its VJP with ``grad_out`` w.r.t. ``inputs``, and the VJP of those with
    ``probes`` w.r.t. ``inputs`` and ``grad_out``."""
    y = fn(*inputs)
    first = torch.autograd.grad(y, inputs, grad_out, create_graph=True, allow_unused=True)
    live = [(f, p) for f, p in zip(first, probes) if f is not None and f.requires_grad]
    second = (None,) * (len(inputs) + 1)
    if live:
        second = torch.autograd.grad([f for f, _ in live], (*inputs, grad_out), [p for _, p in live],
                                     allow_unused=True)
    return y, first, second


def _compare(mine, theirs, dtype):
    y, first, second = mine
    y_t, first_t, second_t = theirs
    _close(y, y_t, dtype)
    for a, b in zip(first + second, first_t + second_t):
        _close(a, b, dtype)


def _leaf(t, device, requires_grad=True):
    return None if t is None else t.detach().to(device).requires_grad_(requires_grad)


# --- ReLU: NaN and inf ------------------------------------------------------------------------------------
SPECIAL = [NAN, -1.5, 0.0, -0.0, 2.0, INF, -INF, NAN, 3.0]  # 9 values: the mask's bytes are not aligned to them


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_relu_nan_and_inf_match_torch(path, dtype):
    x = torch.tensor(SPECIAL * 3, dtype=dtype, device=path.device).requires_grad_()
    g = torch.randn(x.shape, dtype=dtype, device=path.device).requires_grad_()
    probe = [torch.randn_like(x)]
    with path():
        mine = _derivatives(fastjac.ops.relu, (x,), g, probe)
    theirs = _derivatives(torch.relu, (x,), g, probe)
    _compare(mine, theirs, dtype)
    nan = torch.isnan(x.detach())
    assert torch.isnan(mine[0].detach()[nan]).all()  # relu(NaN) = NaN, not 0
    assert torch.equal(mine[1][0].detach()[nan], g.detach()[nan])  # the gradient passes at NaN


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_relu_nan_forward_mode_matches_torch(path, dtype):
    x = torch.tensor(SPECIAL * 3, dtype=dtype, device=path.device)
    t = torch.randn(x.shape, dtype=dtype, device=path.device)
    with fwAD.dual_level(), path():
        mine = fwAD.unpack_dual(fastjac.ops.relu(fwAD.make_dual(x, t)))
    with fwAD.dual_level():
        theirs = fwAD.unpack_dual(torch.relu(fwAD.make_dual(x, t)))
    _close(mine.primal, theirs.primal, dtype)
    _close(mine.tangent, theirs.tangent, dtype)


# --- BatchNorm (+ReLU) with non-finite inputs --------------------------------------------------------------
def _bn(path, setup, dtype, eps=1e-5, rv=None):
    """``(fastjac fn, torch fn, (w, b), fastjac running stats, torch running stats)`` for a BNSetup on the path's
    device."""
    rm, rv_made, w, b = setup.make(dtype)
    rm, rv = rm.to(path.device), (rv_made if rv is None else rv.to(dtype)).to(path.device)
    w, b = _leaf(w, path.device), _leaf(b, path.device)
    rm_t, rv_t = rm.clone(), rv.clone()
    op = fastjac.ops.batch_norm_relu if setup.relu else fastjac.ops.batch_norm

    def fj(x, w=None, b=None):
        with path():
            return op(x, rm, rv, w, b, setup.training, 0.1, eps)

    def ref(x, w=None, b=None):
        y = F.batch_norm(x, rm_t, rv_t, w, b, setup.training, 0.1, eps)
        return F.relu(y) if setup.relu else y

    return fj, ref, (w, b), (rm, rv), (rm_t, rv_t)


def _nonfinite_x(shape, dtype, device):
    x = torch.randn(*shape, dtype=dtype) * 2
    x[0, 0, 1], x[2, 1, 3], x[1, 2, 0], x[3, 2, 4] = NAN, INF, -INF, INF
    return x.to(device).requires_grad_()


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bnrelu"])
def test_batch_norm_eval_nonfinite_input_matches_torch(path, relu, dtype):
    """Eval mode: gx = γ r g~ does not depend on x, so it is finite where PyTorch's is (also at a NaN / inf x);
    NaN / inf reach y, gw and the second derivatives exactly where they reach PyTorch's."""
    setup = BNSetup((4, 3, 5), training=False, relu=relu)
    fj, ref, (w, b), (_, rv), _ = _bn(path, setup, dtype)
    x = _nonfinite_x(setup.shape, dtype, path.device)
    g = torch.randn_like(x).requires_grad_()
    probes = [torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)]
    with path():
        mine = _derivatives(fj, (x, w, b), g, probes)
    theirs = _derivatives(ref, (x, w, b), g, probes)
    if relu:
        # The second derivative w.r.t. weight is r Σ u g~ (u: the probe of gx; gw, gb do not depend on weight). In
        # PyTorch's composition relu(batch_norm(...)) autograd also sends threshold_backward's zero derivative
        # w.r.t. its input back through batch_norm's backward, whose 0 * xh is NaN at a NaN x: fastjac keeps the
        # finite value (and no derivative w.r.t. bias, PyTorch's is that zero).
        y_t = theirs[0].detach()
        g_masked = torch.where(~(y_t <= 0), g.detach(), torch.zeros_like(y_t))
        d2w = ((rv + 1e-5).rsqrt()[None, :, None] * probes[0] * g_masked).sum((0, 2))
        assert torch.isnan(theirs[2][1][0])  # what this works around
        theirs = (theirs[0], theirs[1], (theirs[2][0], d2w, torch.zeros_like(d2w), theirs[2][3]))
        assert torch.isnan(mine[0].detach()[0, 0, 1])  # a NaN z is not masked: NaN in y, the gradient passed
    _compare(mine, theirs, dtype)
    assert torch.isfinite(mine[1][0]).all()


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bnrelu"])
def test_batch_norm_eval_nonfinite_input_derivatives_without_weight_probe(path, relu, dtype):
    """Eval second derivatives probed through gx only (no ggw): ggrad = m γ r u + ggb has no xh term, finite at a
    non-finite x as PyTorch's."""
    setup = BNSetup((4, 3, 5), training=False, relu=relu)
    fj, ref, (w, b), _, _ = _bn(path, setup, dtype)
    x = _nonfinite_x(setup.shape, dtype, path.device)
    g = torch.randn_like(x).requires_grad_()
    probes = [torch.randn_like(x)]
    with path():
        mine = _derivatives(fj, (x,), g, probes)
    _compare(mine, _derivatives(ref, (x,), g, probes), dtype)
    assert torch.isfinite(mine[2][1]).all()


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bnrelu"])
def test_batch_norm_eval_nonfinite_input_forward_mode_matches_torch(path, relu, dtype):
    setup = BNSetup((4, 3, 5), training=False, relu=relu)
    fj, ref, (w, b), _, _ = _bn(path, setup, dtype)
    x = _nonfinite_x(setup.shape, dtype, path.device).detach()
    tx = torch.randn_like(x)
    outs = []
    for fn in (fj, ref):
        with fwAD.dual_level():
            outs.append(fwAD.unpack_dual(fn(fwAD.make_dual(x, tx), w.detach(), b.detach())))
    (mine, theirs) = outs
    _close(mine.primal, theirs.primal, dtype)
    _close(mine.tangent, theirs.tangent, dtype)
    assert torch.isfinite(mine.tangent).all()  # eval, tx only: γ r tx [m]


# Channels of the training-mode inputs: 0 holds a NaN, 1 a +inf as its first value (the CPU column mode's shift),
# 2 two +inf later on, 3 both infinities, 4 a -inf, 5 only finite values.
def _train_nonfinite_x(shape, dtype, device):
    x = torch.randn(*shape, dtype=torch.float64)
    n, s = shape[0], shape[2]
    x[n // 2, 0, s // 3] = NAN
    x[0, 1, 0] = INF
    x[n // 3, 2, s // 2] = x[n - 1, 2, s - 1] = INF
    x[0, 3, s - 1], x[n - 1, 3, 0] = INF, -INF
    x[n // 2, 4, s // 2] = -INF
    return x.to(dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", [(6, 6, 300), (200, 6, 3)], ids=["rows", "columns"])
def test_batch_norm_training_nonfinite_running_stats_match_torch(path, shape, dtype):
    """A channel holding +inf gets PyTorch's running mean +inf (sum / M, where Welford's update gives NaN) and a NaN
    running variance; a channel holding NaN or both infinities NaN; the finite channel its usual statistics."""
    if path.backend == "triton" and path.device == "cpu" and dtype == torch.float64:
        pytest.skip("interpreted Triton: float32 covers the kernels")
    setup = BNSetup(shape, training=True, relu=False)
    fj, ref, (w, b), (rm, rv), (rm_t, rv_t) = _bn(path, setup, dtype)
    x = _train_nonfinite_x(shape, dtype, path.device)
    with torch.no_grad():
        y, y_t = fj(x, w, b), ref(x, w, b)
    _close(rm, rm_t, dtype)
    _close(rv, rv_t, dtype)
    _close(y, y_t, dtype)
    assert rm[1] == INF and rm[2] == INF and rm[4] == -INF and torch.isnan(rm[[0, 3]]).all()
    assert torch.isnan(rv[:5]).all() and torch.isfinite(rm[5]) and torch.isfinite(rv[5])


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bnrelu"])
def test_batch_norm_training_nan_channel_derivatives_match_torch(path, relu):
    """Training: a channel holding NaN is NaN throughout (values, first and second derivatives), the others are
    unaffected, as in PyTorch."""
    dtype = torch.float64
    setup = BNSetup((4, 3, 5), training=True, relu=relu)
    fj, ref, (w, b), (rm, rv), (rm_t, rv_t) = _bn(path, setup, dtype)
    x = torch.randn(4, 3, 5, dtype=dtype)
    x[1, 2, 3] = NAN
    x = x.to(path.device).requires_grad_()
    g = torch.randn_like(x).requires_grad_()
    probes = [torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)]
    with path():
        mine = _derivatives(fj, (x, w, b), g, probes)
    _compare(mine, _derivatives(ref, (x, w, b), g, probes), dtype)
    _close(rm, rm_t, dtype)
    _close(rv, rv_t, dtype)


# --- empty batches --------------------------------------------------------------------------------------------
EMPTY_SHAPES = [(0, 3, 4), (2, 3, 0), (0, 3)]


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bnrelu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_batch_norm_empty_batch_matches_torch(path, shape, training, relu):
    """An empty batch (N = 0 or an empty spatial size): an empty output, zero gw and gb, zero (not NaN) second
    derivatives, and in training the running statistics left alone, as PyTorch does."""
    dtype = torch.float64
    setup = BNSetup(shape, training=training, relu=relu)
    fj, ref, (w, b), (rm, rv), (rm_t, rv_t) = _bn(path, setup, dtype)
    before = rm.clone(), rv.clone()
    x = torch.randn(*shape, dtype=dtype, device=path.device).requires_grad_()
    g = torch.randn_like(x).requires_grad_()
    probes = [torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)]
    with path():
        mine = _derivatives(fj, (x, w, b), g, probes)
    _compare(mine, _derivatives(ref, (x, w, b), g, probes), dtype)
    for d in mine[1] + mine[2]:
        assert d is None or torch.count_nonzero(d) == 0  # sums over nothing: 0, never NaN
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
    assert torch.equal(rm_t, before[0]) and torch.equal(rv_t, before[1])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_empty_batch_forward_mode(path, training):
    x = torch.randn(0, 3, 4, dtype=torch.float64, device=path.device)
    setup = BNSetup(tuple(x.shape), training=training)
    fj, _, (w, b), (rm, rv), _ = _bn(path, setup, torch.float64)
    before = rm.clone()
    with fwAD.dual_level():
        w_dual = fwAD.make_dual(w.detach(), torch.ones_like(w))
        out = fwAD.unpack_dual(fj(fwAD.make_dual(x, torch.randn_like(x)), w_dual, b.detach()))
    assert out.primal.shape == x.shape and out.tangent.shape == x.shape
    assert torch.equal(rm, before)


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bnrelu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_one_dim_empty_input_matches_torch(path, training, relu):
    """The 1-D empty input of PyTorch's OpInfo samples for F.batch_norm (running statistics of shape (0,))."""
    x = torch.randn(0, dtype=torch.float64, device=path.device).requires_grad_()
    rm, rv = torch.zeros(0, dtype=torch.float64, device=path.device), torch.ones(0, dtype=torch.float64,
                                                                                  device=path.device)
    op = fastjac.ops.batch_norm_relu if relu else fastjac.ops.batch_norm
    for stats in ((rm, rv), (None, None)) if training else ((rm, rv),):
        with path():
            y = op(x, *stats, None, None, training)
            (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        _close(y, F.batch_norm(x, *stats, None, None, training), torch.float64)
        assert gx.shape == x.shape


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_module_zero_batch_matches_torch(path, training):
    """nn.BatchNorm1d's ModuleInfo sample ``zero_batch`` (a (0, 5, 9) input): the converted module gives PyTorch's
    empty output and gradients, counts the batch, and leaves its running statistics alone."""
    ref = torch.nn.BatchNorm1d(5, 1e-3, 0.3, affine=False).double().train(training).to(path.device)
    mine = fastjac.convert(copy.deepcopy(ref))  # in place: a copy
    assert type(mine) is not type(ref)
    x = torch.randn(0, 5, 9, dtype=torch.float64, device=path.device, requires_grad=True)
    with path():
        y = mine(x)
        (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    y_t = ref(x)
    _close(y, y_t, torch.float64)
    _close(gx, torch.autograd.grad(y_t, x, torch.ones_like(y_t))[0], torch.float64)
    for name, buf in ref.named_buffers():
        assert torch.equal(dict(mine.named_buffers())[name], buf), name


def test_batch_norm_one_value_per_channel_in_training_still_raises(path):
    with path(), pytest.raises(ValueError, match="more than 1 value per channel"):
        fastjac.ops.batch_norm(torch.randn(1, 3, 1, device=path.device), None, None, training=True)


# --- eps = 0 ----------------------------------------------------------------------------------------------
def _torch_accepts_eval_eps_zero() -> bool:
    try:
        F.batch_norm(torch.randn(2, 3), torch.zeros(3), torch.ones(3), training=False, eps=0.0)
    except ValueError:
        return False
    return True


# torch 2.11 rejects eps = 0 in eval mode too ("batch_norm eps must be positive"), so it has nothing to compare with;
# fastjac follows the later versions, which accept it (test_batch_norm_eps_checks_follow_torch still runs).
needs_eval_eps_zero = pytest.mark.skipif(not _torch_accepts_eval_eps_zero(),
                                         reason=f"torch {torch.__version__} rejects eps = 0 in eval mode")


@needs_eval_eps_zero
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bnrelu"])
def test_batch_norm_eval_eps_zero_matches_torch(path, relu, dtype):
    setup = BNSetup((4, 3, 5), training=False, relu=relu)
    fj, ref, (w, b), _, _ = _bn(path, setup, dtype, eps=0.0)
    x = (torch.randn(*setup.shape, dtype=dtype) * 2).to(path.device).requires_grad_()
    g = torch.randn_like(x).requires_grad_()
    probes = [torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)]
    with path():
        mine = _derivatives(fj, (x, w, b), g, probes)
    _compare(mine, _derivatives(ref, (x, w, b), g, probes), dtype)


@needs_eval_eps_zero
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bnrelu"])
def test_batch_norm_eval_eps_zero_zero_variance_matches_torch(path, relu):
    """eps = 0 and a zero running variance: invstd = inf in that channel, inf / NaN values where PyTorch's are."""
    dtype = torch.float64
    setup = BNSetup((4, 3, 5), training=False, relu=relu)
    fj, ref, (w, b), _, _ = _bn(path, setup, dtype, eps=0.0, rv=torch.tensor([1.5, 0.0, 0.7]))
    x = (torch.randn(*setup.shape, dtype=dtype) * 2).to(path.device).requires_grad_()
    g = torch.randn_like(x)
    with path():
        y = fj(x, w, b)
        gx = torch.autograd.grad(y, x, g)[0]
    y_t = ref(x, w, b)
    _close(y, y_t, dtype)
    _close(gx, torch.autograd.grad(y_t, x, g)[0], dtype)
    assert not torch.isfinite(y.detach()[:, 1]).all() and torch.isfinite(y.detach()[:, [0, 2]]).all()


def test_batch_norm_eps_checks_follow_torch(path):
    x = torch.randn(4, 3, 5, device=path.device)
    rm, rv = torch.zeros(3, device=path.device), torch.ones(3, device=path.device)
    with path():
        with pytest.raises(ValueError, match="eps must be positive in training mode"):
            fastjac.ops.batch_norm(x, rm, rv, training=True, eps=0.0)
        with pytest.raises(ValueError, match="eps must be non-negative"):
            fastjac.ops.batch_norm_relu(x, rm, rv, training=False, eps=-1e-3)
        fastjac.ops.batch_norm(x, rm, rv, training=False, eps=0.0)
    for training, eps in ((True, 0.0), (False, -1e-3)):  # PyTorch raises there too
        with pytest.raises(ValueError):
            F.batch_norm(x, rm, rv, training=training, eps=eps)


# --- forward-mode tangents of float16 / bfloat16 ----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bnrelu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_half_tangents_have_the_input_dtype(path, training, relu, dtype):
    """Forward-mode tangents (x, weight and bias tangents) come back in x's dtype, as PyTorch's, with its values."""
    setup = BNSetup((4, 3, 5), training=training, relu=relu)
    fj, ref, (w, b), (rm, rv), (rm_t, rv_t) = _bn(path, setup, dtype)
    x = torch.randn(*setup.shape, device=path.device).to(dtype)
    w, b = w.detach(), b.detach()
    tx, tw, tb = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    outs = []
    for fn in (fj, ref):
        with fwAD.dual_level():
            outs.append(fwAD.unpack_dual(fn(fwAD.make_dual(x, tx), fwAD.make_dual(w, tw), fwAD.make_dual(b, tb))))
    mine, theirs = outs
    assert mine.primal.dtype == dtype and mine.tangent.dtype == dtype == theirs.tangent.dtype
    tol = dict(rtol=4e-2, atol=4e-2) if dtype == torch.bfloat16 else dict(rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(mine.tangent.float().cpu(), theirs.tangent.float().cpu(), **tol)
    torch.testing.assert_close(mine.primal.float().cpu(), theirs.primal.float().cpu(), **tol)
    torch.testing.assert_close(rm.float(), rm_t.float(), **tol)
    torch.testing.assert_close(rv.float(), rv_t.float(), **tol)
