"""The C++ CPU kernels (``torch.ops.fastjac.*`` from ``fastjac._C``) against the reference kernels.

Every kernel of csrc/KERNELS.md is compared with ``fastjac.reference`` on float64 (tight), float32 and the
half types (tolerances in ``TOL``, relative to the largest reference value), including packed masks (exact)
and running-statistics updates. The fused BatchNorm+ReLU kernels recompute the ReLU mask from x, mean, invstd,
weight and bias; ``test_bn_relu_mask_recomputed_exactly`` checks that it is the forward's ``y > 0`` bit for bit.
"""
import itertools

import pytest
import torch

_C = pytest.importorskip("fastjac._C", reason="the C++ extension fastjac._C is not built")
from fastjac import reference as ref  # noqa: E402

ops = torch.ops.fastjac

# Max abs error allowed, relative to max(1, max |reference|).
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
FLOATS = [torch.float64, torch.float32]
HALFS = [torch.float16, torch.bfloat16]


def assert_close(actual, expected, dtype, what=""):
    if isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected)
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, dtype, f"{what}[{i}]")
        return
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.dtype == torch.uint8:
        assert torch.equal(actual, expected), f"{what}: packed masks differ"
        return
    if expected.numel() == 0:
        return
    a, e = actual.double(), expected.double()
    scale = max(1.0, e.abs().max().item())
    err = (a - e).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max abs error {err:.3e} > {TOL[dtype]:.0e} x {scale:.3g}"


def randn(*shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale + shift).to(dtype)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_compiled_with_cuda_is_bool():
    assert isinstance(_C.compiled_with_cuda(), bool)


# ---------------------------------------------------------------------------------------------------------
# ReLU

RELU_SHAPES = [(0,), (1,), (2,), (8,), (13,), (3, 5, 7, 11), (4, 1000), (70001,)]


@pytest.mark.parametrize("dtype", FLOATS + HALFS)
@pytest.mark.parametrize("shape", RELU_SHAPES, ids=str)
def test_relu(shape, dtype):
    x = randn(*shape, dtype=dtype)
    flat = x.view(-1)
    flat[::5] = 0.0  # exactly 0: output 0, bit cleared
    flat[1::7] = -0.0
    y, mask = ops.relu_fwd(x)
    y_ref, mask_ref = ref.relu_fwd(x)
    assert mask.dtype == torch.uint8 and mask.numel() == (x.numel() + 7) // 8
    assert torch.equal(mask, mask_ref)  # includes zero padding bits
    assert torch.equal(y, y_ref)
    g = randn(*shape, dtype=dtype)
    assert torch.equal(ops.relu_bwd(g, mask), ref.relu_bwd(g, mask_ref))


def test_relu_nan_and_noncontiguous():
    x = torch.randn(6, 9, dtype=torch.float64).t()  # 9 x 6, not contiguous
    x[0, 0], x[1, 1] = float("nan"), float("inf")
    y, mask = ops.relu_fwd(x)
    y_ref, mask_ref = ref.relu_fwd(x)
    assert torch.equal(mask, mask_ref) and torch.equal(y, y_ref)
    g = torch.randn(6, 9, dtype=torch.float64).t()
    g[2, 2] = float("inf")
    padded = torch.zeros(2 * mask.numel(), dtype=torch.uint8)[::2]
    padded.copy_(mask)  # non-contiguous mask
    assert torch.equal(ops.relu_bwd(g, padded), ref.relu_bwd(g, mask_ref))


def test_relu_bad_mask():
    g = torch.randn(17)
    with pytest.raises(RuntimeError, match="mask"):
        ops.relu_bwd(g, torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="uint8"):
        ops.relu_bwd(g, torch.zeros(3, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------------------
# Softplus

SOFTPLUS_PARAMS = [(1.0, 20.0), (2.5, 1.0), (0.5, 3.0), (3.0, -1.0)]


def softplus_inputs(shape, dtype, beta, threshold):
    x = randn(*shape, dtype=dtype, scale=4.0)
    flat = x.view(-1)
    flat[: flat.numel() // 2] = torch.linspace(-2 * abs(threshold) / beta - 5, 2 * abs(threshold) / beta + 5,
                                               flat.numel() // 2, dtype=torch.float64).to(dtype)
    flat[-1] = threshold / beta  # beta x == threshold: smooth branch
    return x


@pytest.mark.parametrize("dtype", FLOATS + HALFS)
@pytest.mark.parametrize("beta,threshold", SOFTPLUS_PARAMS)
@pytest.mark.parametrize("shape", [(3,), (3, 5, 7, 11), (64, 130)], ids=str)
def test_softplus(shape, beta, threshold, dtype):
    x = softplus_inputs(shape, dtype, beta, threshold)
    linear = x.double() * beta > threshold
    if x.numel() > 10:
        assert linear.any() and not linear.all()  # both sides of the threshold
    g, gg = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    # The kernels compute beta * x in float for float16 / bfloat16 (like F.softplus), the reference in the
    # input dtype: compare where both take the same branch.
    same = (x.float() * beta > threshold) == (x * beta > threshold)
    outs = [ops.softplus_fwd(x, beta, threshold), ops.softplus_bwd(g, x, beta, threshold),
            *ops.softplus_dbwd(gg, g, x, beta, threshold)]
    refs = [ref.softplus_fwd(x, beta, threshold), ref.softplus_bwd(g, x, beta, threshold),
            *ref.softplus_dbwd(gg, g, x, beta, threshold)]
    for name, out, expected in zip(["fwd", "bwd", "dbwd[0]", "dbwd[1]"], outs, refs):
        assert out.dtype == dtype
        assert_close(out[same], expected[same], dtype, name)


def test_softplus_noncontiguous():
    x = randn(7, 12, dtype=torch.float64, scale=5.0).t()
    g = randn(12, 7, dtype=torch.float64)[:, :]
    gg = randn(7, 12, dtype=torch.float64).t()
    assert_close(ops.softplus_fwd(x, 1.5, 4.0), ref.softplus_fwd(x, 1.5, 4.0), torch.float64)
    assert_close(ops.softplus_bwd(g, x, 1.5, 4.0), ref.softplus_bwd(g, x, 1.5, 4.0), torch.float64)
    assert_close(ops.softplus_dbwd(gg, g, x, 1.5, 4.0), ref.softplus_dbwd(gg, g, x, 1.5, 4.0), torch.float64)


def test_softplus_shape_mismatch():
    with pytest.raises(RuntimeError, match="grad"):
        ops.softplus_bwd(torch.randn(3), torch.randn(4), 1.0, 20.0)


# ---------------------------------------------------------------------------------------------------------
# BatchNorm

BN_SHAPES = [
    (2, 1),  # M = 2 (tiny)
    (1, 3, 2),  # N = 1, M = 2
    (3, 5, 7, 11),  # odd / prime sizes, spatial 77 (tiles)
    (16, 4),  # 1-D input (N x C)
    (2, 3, 2, 3, 5),  # 3-D spatial
    (4, 3, 17),  # numel 204, not a multiple of 8
    (2, 3, 20, 20),  # spatial 400: rows read in place
    (3, 4, 17, 19),  # spatial 323: rows not aligned to mask bytes
    (6, 40, 30),  # short rows: several blocks of channels ("columns")
]
LARGE_BN_SHAPES = [
    (5000, 40),  # 1-D: rows split across tasks, per-position sums flushed many times
    (300, 1100),  # 1-D, several blocks of channels
    (2, 2, 130, 300),  # long rows, split across tasks inside a row
]


def bn_case(shape, dtype, affine, training, relu, constant_channel=False):
    """Inputs and reference forward outputs of one BatchNorm configuration."""
    C = shape[1]
    x = randn(*shape, dtype=dtype, scale=2.0, shift=0.5)
    if constant_channel:
        x[:, C // 2] = 1.25  # var = 0
    w = randn(C, dtype=dtype) if affine else None
    b = randn(C, dtype=dtype) if affine else None
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    rm, rv = randn(C, dtype=stat), torch.rand(C, dtype=stat) + 0.5
    return dict(x=x, w=w, b=b, rm=rm, rv=rv, fwd=ref.bn_fwd(x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5,
                                                                relu))


def check_bn_backward(case, training, relu, dtype):
    x, w, b = case["x"], case["w"], case["b"]
    _, mean, invstd = case["fwd"]
    C = x.shape[1]
    g, u = randn(*x.shape, dtype=dtype), randn(*x.shape, dtype=dtype)
    p, q = randn(C, dtype=dtype), randn(C, dtype=dtype)
    args = (x, mean, invstd, w, b, training, relu)
    assert_close(ops.bn_bwd(g, *args), ref.bn_bwd(g, *args), dtype, "bn_bwd")
    for present in itertools.product([False, True], repeat=3):
        ggx, ggw, ggb = (t if keep else None for t, keep in zip((u, p, q), present))
        assert_close(ops.bn_dbwd(ggx, ggw, ggb, g, *args), ref.bn_dbwd(ggx, ggw, ggb, g, *args), dtype,
                     f"bn_dbwd{present}")
        assert_close(ops.bn_jvp(ggx, ggw, ggb, *args), ref.bn_jvp(ggx, ggw, ggb, *args), dtype, f"bn_jvp{present}")


def check_bn_forward(case, training, relu, dtype):
    x, w, b, rm, rv = case["x"], case["w"], case["b"], case["rm"], case["rv"]
    rm0, rv0 = rm.clone(), rv.clone()
    out = ops.bn_fwd(x, w, b, rm, rv, training, 0.1, 1e-5, relu)
    assert_close(out, case["fwd"], dtype, "bn_fwd")
    if training:  # the reference updates copies of the same initial values
        rm_ref, rv_ref = rm0.clone(), rv0.clone()
        ref.bn_fwd(x, w, b, rm_ref, rv_ref, training, 0.1, 1e-5, relu)
        assert_close(rm, rm_ref, dtype, "running_mean")
        assert_close(rv, rv_ref, dtype, "running_var")
    else:
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    assert len(out) == 3


MODES = list(itertools.product([True, False], [True, False], [False, True]))  # training, affine, relu


@pytest.mark.parametrize("training,affine,relu", MODES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
def test_bn(shape, dtype, training, affine, relu):
    case = bn_case(shape, dtype, affine, training, relu)
    check_bn_forward(case, training, relu, dtype)
    check_bn_backward(case, training, relu, dtype)


@pytest.mark.parametrize("training,relu", [(True, True), (False, False)])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", LARGE_BN_SHAPES, ids=str)
def test_bn_large(shape, dtype, training, relu):
    case = bn_case(shape, dtype, True, training, relu)
    check_bn_forward(case, training, relu, dtype)
    check_bn_backward(case, training, relu, dtype)


@pytest.mark.parametrize("training,relu", [(True, False), (True, True), (False, True)])
@pytest.mark.parametrize("dtype", HALFS)
@pytest.mark.parametrize("shape", [(3, 5, 7, 11), (16, 4), (2, 3, 20, 20)], ids=str)
def test_bn_half(shape, dtype, training, relu):
    case = bn_case(shape, dtype, True, training, relu)
    y, mean, invstd = ops.bn_fwd(case["x"], case["w"], case["b"], case["rm"].clone(), case["rv"].clone(),
                                 training, 0.1, 1e-5, relu)
    assert y.dtype == dtype and mean.dtype == invstd.dtype == torch.float32
    check_bn_forward(case, training, relu, dtype)
    check_bn_backward(case, training, relu, dtype)


@pytest.mark.parametrize("training,relu", [(True, False), (True, True), (False, True)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_bn_constant_channel(dtype, training, relu):
    case = bn_case((4, 3, 5, 6), dtype, True, training, relu, constant_channel=True)
    check_bn_forward(case, training, relu, dtype)
    check_bn_backward(case, training, relu, dtype)
    if training:
        _, mean, invstd = ops.bn_fwd(case["x"], None, None, None, None, True, 0.1, 1e-5, relu)
        assert mean[1].item() == 1.25 and invstd[1].item() == pytest.approx(1e-5 ** -0.5, rel=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_bn_without_running_stats(training):
    x = randn(4, 3, 5, dtype=torch.float64)
    if training:
        assert_close(ops.bn_fwd(x, None, None, None, None, True, 0.1, 1e-5, True),
                     ref.bn_fwd(x, None, None, None, None, True, 0.1, 1e-5, True), torch.float64)
    else:
        with pytest.raises(RuntimeError, match="running_mean"):
            ops.bn_fwd(x, None, None, None, None, False, 0.1, 1e-5, False)


@pytest.mark.parametrize("training", [True, False])
def test_bn_noncontiguous(training):
    dtype, C = torch.float64, 3
    x = randn(5, 4, C, 6, dtype=dtype).permute(1, 2, 0, 3)  # 4 x 3 x 5 x 6, not contiguous
    g = randn(4, 5, C, 6, dtype=dtype).transpose(1, 2)
    u = randn(6, 5, C, 4, dtype=dtype).permute(3, 2, 1, 0)
    w, b = randn(2 * C, dtype=dtype)[::2], randn(2 * C, dtype=dtype)[1::2]
    rm, rv = torch.zeros(2 * C, dtype=dtype)[::2], torch.ones(3 * C, dtype=dtype)[::3]
    rm_ref, rv_ref = rm.clone(), rv.clone()
    out = ops.bn_fwd(x, w, b, rm, rv, training, 0.1, 1e-5, True)
    out_ref = ref.bn_fwd(x, w, b, rm_ref, rv_ref, training, 0.1, 1e-5, True)
    assert_close(out, out_ref, dtype, "bn_fwd")
    assert_close(rm, rm_ref, dtype, "running_mean")
    assert_close(rv, rv_ref, dtype, "running_var")
    _, mean, invstd = out_ref
    mean2 = torch.zeros(2 * C, dtype=dtype)[::2]
    mean2.copy_(mean)
    args = (x, mean2, invstd, w, b, training, True)
    assert_close(ops.bn_bwd(g, *args), ref.bn_bwd(g, *args), dtype, "bn_bwd")
    assert_close(ops.bn_dbwd(u, w, b, g, *args), ref.bn_dbwd(u, w, b, g, *args), dtype, "bn_dbwd")
    assert_close(ops.bn_jvp(u, w, b, *args), ref.bn_jvp(u, w, b, *args), dtype, "bn_jvp")


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1, 1), (1, 2, 1)], ids=str)
def test_bn_single_value_per_channel(shape):
    x = torch.randn(*shape)
    with pytest.raises(RuntimeError, match="Expected more than 1 value per channel when training"):
        ops.bn_fwd(x, None, None, torch.zeros(shape[1]), torch.ones(shape[1]), True, 0.1, 1e-5, False)
    # eval mode is fine with a single value
    assert_close(ops.bn_fwd(x, None, None, torch.zeros(shape[1]), torch.ones(shape[1]), False, 0.1, 1e-5, False),
                 ref.bn_fwd(x, None, None, torch.zeros(shape[1]), torch.ones(shape[1]), False, 0.1, 1e-5, False),
                 torch.float32)


def test_bn_empty_batch_eval():
    x = torch.randn(0, 3, 4)
    y, mean, invstd = ops.bn_fwd(x, None, None, torch.zeros(3), torch.ones(3), False, 0.1, 1e-5, True)
    assert y.shape == x.shape
    gx, gw, gb = ops.bn_bwd(x, x, mean, invstd, None, None, False, True)
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros(3)) and torch.equal(gb, torch.zeros(3))


def test_bn_argument_checks():
    x = torch.randn(4, 3, 5)
    _, mean, invstd = ops.bn_fwd(x, None, None, None, None, True, 0.1, 1e-5, True)
    with pytest.raises(RuntimeError, match="grad"):
        ops.bn_bwd(torch.randn(4, 3, 6), x, mean, invstd, None, None, True, True)
    with pytest.raises(RuntimeError, match="bias"):
        ops.bn_bwd(x, x, mean, invstd, None, torch.zeros(4), True, True)
    with pytest.raises(RuntimeError, match="bias"):
        ops.bn_jvp(None, None, None, x, mean, invstd, None, torch.zeros(2), True, True)
    ops.bn_bwd(x, x, mean, invstd, None, torch.zeros(4), True, False)  # bias is only read with relu
    with pytest.raises(RuntimeError, match="invstd"):
        ops.bn_bwd(x, x, mean, invstd.double(), None, None, True, True)
    with pytest.raises(RuntimeError, match="weight"):
        ops.bn_bwd(x, x, mean, invstd, torch.ones(4), None, True, True)
    with pytest.raises(RuntimeError, match="N x C"):
        ops.bn_fwd(torch.randn(5), None, None, None, None, True, 0.1, 1e-5, False)


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


@pytest.mark.parametrize("training,affine", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("dtype", FLOATS + HALFS)
@pytest.mark.parametrize("shape", [(3, 5, 7, 11), (6, 40, 30), (2, 3, 20, 20), (300, 1100)], ids=str)
def test_bn_relu_mask_recomputed_exactly(shape, dtype, training, affine):
    """Every kernel after bn_fwd recomputes the fused ReLU's mask from x with the forward's own z: bn_bwd with
    g = 1 gives gb = the count of y > 0 per channel, and bn_jvp with tb = 1 gives the mask itself, bit for bit
    (also at elements where z is within rounding of 0, which a different formula would misclassify)."""
    C = shape[1]
    x = randn(*shape, dtype=dtype, scale=2.0, shift=0.5)
    w = randn(C, dtype=dtype) if affine else None
    b = randn(C, dtype=dtype) if affine else None
    rm, rv = torch.zeros(C), torch.ones(C) + 0.5
    if dtype == torch.float64:
        rm, rv = rm.double(), rv.double()
    y, mean, invstd = ops.bn_fwd(x, w, b, rm, rv, training, 0.1, 1e-5, True)
    on = y > 0
    m = ops.bn_jvp(None, None, torch.ones(C, dtype=dtype), x, mean, invstd, w, b, training, True)
    assert torch.equal(m, on.to(dtype))
    _, _, gb = ops.bn_bwd(torch.ones_like(x), x, mean, invstd, w, b, training, True)
    dims = [0] + list(range(2, x.dim()))
    assert torch.equal(gb, on.sum(dims).to(gb.dtype))
    ggrad, _, _ = ops.bn_dbwd(None, None, torch.ones(C, dtype=dtype), x, x, mean, invstd, w, b, training, True)
    assert torch.equal(ggrad, on.to(dtype))
    # the reference recomputes its own mask the same way: its forward's y > 0
    y_ref, mean_ref, invstd_ref = ref.bn_fwd(x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5, True)
    m_ref = ref.bn_jvp(None, None, torch.ones(C, dtype=dtype), x, mean_ref, invstd_ref, w, b, training, True)
    assert torch.equal(m_ref, (y_ref > 0).to(dtype))
