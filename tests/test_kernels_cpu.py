"""CPU-specific checks of the C++ kernels (``torch.ops.fastjac.*`` from ``fastjac._C``); the checks shared by
every backend against the reference are in tests/test_kernels.py.

Large shapes (rows split across tasks, several blocks of channels, per-position sums flushed many times) and
independence of the thread count.
"""
import pytest
import torch

_C = pytest.importorskip("fastjac._C", reason="the C++ extension fastjac._C is not built")
from _kernel_cases import FLOATS, bn_case, check_bn_backward, check_bn_forward, randn  # noqa: E402

ops = torch.ops.fastjac


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_compiled_with_cuda_is_bool():
    assert isinstance(_C.compiled_with_cuda(), bool)


LARGE_BN_SHAPES = [
    (5000, 40),  # 1-D: rows split across tasks, per-position sums flushed many times
    (300, 1100),  # 1-D, several blocks of channels
    (2, 2, 130, 300),  # long rows, split across tasks inside a row
    (40, 70, 4, 4),  # short rows of 16 (column mode, constants broadcast per channel), a partial block of channels
    (33, 20, 15),  # short rows of 15 (column mode, constants per position)
]


@pytest.mark.parametrize("training,relu", [(True, True), (False, False)])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", LARGE_BN_SHAPES, ids=str)
def test_bn_large(shape, dtype, training, relu):
    case = bn_case(shape, dtype, True, training, relu)
    check_bn_forward(ops, case, training, relu, dtype)
    check_bn_backward(ops, case, training, relu, dtype)


def test_bn_independent_of_thread_count():
    case = bn_case((8, 4, 64, 64), torch.float32, True, True, True)
    x, w, b, (_, mean, invstd) = case["x"], case["w"], case["b"], case["fwd"]
    g, u = torch.randn_like(x), torch.randn_like(x)
    threads = torch.get_num_threads()

    def run():
        return (ops.bn_fwd(x, w, case["b"], None, None, True, 0.1, 1e-5, True)
                + ops.bn_dbwd(u, w, w, g, x, mean, invstd, w, b, True, True))

    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        many = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# Softplus: the kernels run on SIMD vectors of float / double (csrc/cpu/softplus.cpp), float16 / bfloat16 converted.

# (beta, threshold): F.softplus's default, a power-of-two beta (beta x == threshold exactly reachable), others,
# negative betas (the op accepts any beta != 0) and a large threshold (smooth up to b = 80, below float32's exp
# overflow at 88.7: test_softplus_threshold_beyond_exp_overflow).
SOFTPLUS_EDGE_PARAMS = [(1.0, 20.0), (2.0, 3.0), (2.5, 1.0), (0.5, -1.0), (3.0, 0.0), (-1.0, 20.0), (-2.0, 3.0),
                        (-0.7, -2.0), (1.0, 80.0)]
SOFTPLUS_TAILS = [-1e4, -200.0, -110.0, -104.0, -100.0, -90.0, -88.0, -80.0, -30.0, -1e-30, 0.0, -0.0, 1e-30, 30.0,
                  80.0, 88.0, 90.0, 1e4, float("inf"), float("-inf"), float("nan")]
_MANT = {torch.float32: 24, torch.float64: 53}
_MIN_EXP = {torch.float32: -149, torch.float64: -1074}  # exponent of the smallest subnormal


def _ulp(e, dtype):
    """Spacing of `dtype` numbers at the float64 values `e` (the smallest subnormal at 0)."""
    _, ex = torch.frexp(e)
    return torch.ldexp(torch.ones_like(e), (ex.long() - _MANT[dtype]).clamp(min=_MIN_EXP[dtype]))


def _softplus_exact(x, g, gg, beta, threshold):
    """float64 values of (fwd, bwd, dbwd[0], dbwd[1]) at b = beta x rounded like the kernel (in x's dtype): what
    the kernels approximate, with the branch decided in that dtype as the kernels (and F.softplus) do."""
    beta_t = torch.tensor(beta, dtype=x.dtype)
    b_rounded = x * beta_t
    linear = b_rounded > torch.tensor(threshold, dtype=x.dtype)
    b, xd, gd, ggd, beta = b_rounded.double(), x.double(), g.double(), gg.double(), float(beta_t)
    s = torch.sigmoid(b)
    d1 = torch.where(linear, torch.ones_like(s), s)
    d2 = torch.where(linear, torch.zeros_like(s), beta * s * (1 - s))
    y = torch.where(linear, xd, torch.log1p(torch.exp(b)) / beta)
    return [y, gd * d1, ggd * d1, ggd * gd * d2], linear


def _softplus_kernels(x, g, gg, beta, threshold):
    return [ops.softplus_fwd(x, beta, threshold), ops.softplus_bwd(g, x, beta, threshold),
            *ops.softplus_dbwd(gg, g, x, beta, threshold)]


def _check_softplus_exact(x, g, gg, beta, threshold, outs=None):
    """Every output vs :func:`_softplus_exact`: float64 within 1e-12 relative, float32 within 4 ulp. Allowed
    besides: below the smallest normal number an absolute error of it (the shared formula 1 / (1 + exp(-b))
    flushes sigmoid(b) to 0 once exp(-b) overflows, b < -88.7 in float32), and for gg g d2 an absolute
    2^-(mantissa - 1) |gg g beta| (1 - s rounds s first: the relative accuracy of d2 is lost where s -> 1, in
    every form of the formula, F.softplus's double backward included)."""
    dtype = x.dtype
    outs = _softplus_kernels(x, g, gg, beta, threshold) if outs is None else outs
    exact, _ = _softplus_exact(x, g, gg, beta, threshold)
    tiny = torch.finfo(dtype).tiny
    for k, (name, out, e) in enumerate(zip(["fwd", "bwd", "dbwd[0]", "dbwd[1]"], outs, exact)):
        assert out.dtype == dtype and out.shape == x.shape, name
        a = out.double()
        finite = torch.isfinite(e)
        # inf / nan wherever the exact value is (both signs of inf; nan stays nan)
        assert torch.equal(torch.isnan(a), torch.isnan(e)), name
        assert torch.equal(a[~finite & ~torch.isnan(e)], e[~finite & ~torch.isnan(e)]), name
        a, e = a[finite], e[finite]
        tol = (1e-12 * e.abs() if dtype == torch.float64 else 4 * _ulp(e, dtype)) + tiny * (e.abs() < tiny)
        if k == 3:
            tol = tol + 2.0 ** (1 - _MANT[dtype]) * (gg.double() * g.double() * beta).abs()[finite]
        bad = (a - e).abs() > tol
        assert not bad.any(), (f"{name}: {int(bad.sum())} elements off, e.g. x={x[finite][bad][:4].tolist()} "
                               f"got {a[bad][:4].tolist()} expected {e[bad][:4].tolist()}")


def _near(v, dtype, steps=3):
    """v rounded to dtype and its `steps` neighbours on each side."""
    t = torch.tensor([v], dtype=dtype)
    out = [t]
    for direction in (float("inf"), float("-inf")):
        u = t
        for _ in range(steps):
            u = torch.nextafter(u, torch.tensor([direction], dtype=dtype))
            out.append(u)
    return torch.cat(out)


def _softplus_edge_inputs(dtype, beta, threshold):
    """Both sides of and exactly at the threshold, the tails, nan / inf and a spread of ordinary values."""
    parts = [_near(threshold / beta, dtype), torch.tensor(SOFTPLUS_TAILS, dtype=dtype),
             torch.tensor(SOFTPLUS_TAILS, dtype=dtype) / abs(beta), randn(37, dtype=dtype, scale=6.0)]
    return torch.cat(parts)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("beta,threshold", SOFTPLUS_EDGE_PARAMS)
def test_softplus_edges(dtype, beta, threshold):
    x = _softplus_edge_inputs(dtype, beta, threshold)
    g, gg = randn(*x.shape, dtype=dtype), randn(*x.shape, dtype=dtype)
    outs = _softplus_kernels(x, g, gg, beta, threshold)
    _check_softplus_exact(x, g, gg, beta, threshold, outs)
    _, linear = _softplus_exact(x, g, gg, beta, threshold)
    # the threshold branch of F.softplus: exactly x, 1, 0 where beta x > threshold in the compute dtype
    assert torch.equal(outs[0][linear], x[linear]) and torch.equal(outs[1][linear], g[linear])
    assert torch.equal(outs[2][linear], gg[linear]) and not outs[3][linear].any()
    b = x * torch.tensor(beta, dtype=dtype)
    thr = torch.tensor(threshold, dtype=dtype)
    if beta in (1.0, 2.0, 0.5):  # powers of two: beta x == threshold is hit, and is the smooth branch
        at = b == thr
        assert at.any() and not linear[at].any()
    assert linear[b > thr].all() and (b > thr).any() and (b < thr).any()
    # F.softplus (and its autograd) agree to a few ulp where PyTorch's formulas are finite
    xr = x.clone().requires_grad_()
    y = torch.nn.functional.softplus(xr, beta, threshold)
    (gx,) = torch.autograd.grad(y, xr, g, create_graph=True)
    for name, out, r in zip(["fwd vs F.softplus", "bwd vs F.softplus"], outs, [y.detach(), gx.detach()]):
        ok = torch.isfinite(r) | torch.isnan(x)
        assert torch.equal(torch.isnan(out[ok]), torch.isnan(r[ok])), name
        fin = torch.isfinite(r)
        err = (out[fin].double() - r[fin].double()).abs()
        scale = r[fin].double().abs()
        tol = (1e-12 * scale if dtype == torch.float64 else 8 * _ulp(scale, dtype)) + 4 * torch.finfo(dtype).tiny
        assert (err <= tol).all(), f"{name}: max error {err.max().item():.3e}"


# Lengths around the vector widths (16 / 8 lanes with AVX-512, 8 / 4 with AVX2), one chunk (1024), several
# chunks and threads.
SOFTPLUS_LENGTHS = [1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 1023, 1024, 1025, 70001]


@pytest.mark.parametrize("dtype", FLOATS + [torch.float16, torch.bfloat16])
def test_softplus_lengths_and_positions(dtype):
    """Every element goes through the same vector code (full vectors, then one partial vector with masked loads and
    stores): a prefix of the input gives bit for bit the prefix of the whole input's results."""
    beta, threshold = 1.5, 4.0
    n = max(SOFTPLUS_LENGTHS)
    x, g, gg = (randn(n, dtype=dtype, scale=s) for s in (5.0, 1.0, 1.0))
    full = _softplus_kernels(x, g, gg, beta, threshold)
    if dtype in FLOATS:
        _check_softplus_exact(x, g, gg, beta, threshold, full)
    for length in SOFTPLUS_LENGTHS:
        for start in (0, 1, 5):  # unaligned starts
            sl = slice(start, start + length)
            part = _softplus_kernels(x[sl].clone(), g[sl].clone(), gg[sl].clone(), beta, threshold)
            for a, b in zip(part, full):
                assert torch.equal(a, b[sl]), (length, start)


@pytest.mark.parametrize("dtype", FLOATS + [torch.float16, torch.bfloat16])
def test_softplus_noncontiguous_and_empty(dtype):
    beta, threshold = -1.25, 2.0
    base = randn(9, 40, dtype=dtype, scale=5.0)
    x = base.t()[::2]  # 20 x 9, neither contiguous nor dense
    g, gg = randn(9, 20, dtype=dtype).t(), randn(20, 18, dtype=dtype)[:, ::2]
    outs = _softplus_kernels(x, g, gg, beta, threshold)
    dense = _softplus_kernels(x.contiguous(), g.contiguous(), gg.contiguous(), beta, threshold)
    for a, b in zip(outs, dense):
        assert a.is_contiguous() and a.shape == x.shape and torch.equal(a, b)
    if dtype in FLOATS:
        _check_softplus_exact(x, g, gg, beta, threshold, outs)
    for shape in [(0,), (3, 0, 5)]:
        e = torch.empty(shape, dtype=dtype)
        for out in _softplus_kernels(e, e, e, beta, threshold):
            assert out.shape == shape and out.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("beta,threshold", [(1.0, 20.0), (2.0, 3.0), (-2.0, 3.0)])
def test_softplus_half_edges(dtype, beta, threshold):
    """float16 / bfloat16 run the float vectors: bit for bit the float32 kernels' results on the same values,
    rounded to the dtype (nan / inf and both sides of the threshold included), at every position."""
    x = torch.cat([_softplus_edge_inputs(dtype, beta, threshold), randn(1000, dtype=dtype, scale=8.0)])
    g, gg = randn(*x.shape, dtype=dtype), randn(*x.shape, dtype=dtype)
    outs = _softplus_kernels(x, g, gg, beta, threshold)
    ref32 = _softplus_kernels(x.float(), g.float(), gg.float(), beta, threshold)
    for name, out, r in zip(["fwd", "bwd", "dbwd[0]", "dbwd[1]"], outs, ref32):
        assert out.dtype == dtype, name
        assert torch.equal(torch.isnan(out), torch.isnan(r)), name
        ok = ~torch.isnan(r)
        assert torch.equal(out[ok], r.to(dtype)[ok]), name


def test_softplus_threshold_beyond_exp_overflow():
    """A threshold above 88.7 lets float32 exp(b) overflow on the smooth branch: the value is inf there, as
    F.softplus's (the same formula), while d1 = 1 / (1 + exp(-b)) stays exact (PyTorch's exp(b) / (exp(b) + 1)
    gives nan)."""
    x = torch.tensor([85.0, 89.0, 95.0, 99.0, 100.0, 101.0, -95.0])
    g, gg = torch.ones_like(x), torch.ones_like(x)
    y, gx, (og, ox) = ops.softplus_fwd(x, 1.0, 100.0), ops.softplus_bwd(g, x, 1.0, 100.0), \
        ops.softplus_dbwd(gg, g, x, 1.0, 100.0)
    assert torch.equal(y, torch.nn.functional.softplus(x, 1.0, 100.0))
    assert torch.isinf(y[1:5]).all() and y[5] == 101.0
    assert torch.equal(gx[:6], torch.ones(6)) and torch.equal(og, gx)
    assert 0 <= gx[6] < 1e-40  # sigmoid(-95) may flush to 0 (see _check_softplus_exact)
    assert (ox[:6] >= 0).all() and (ox[:6] < 1e-36).all()
