"""The CUDA backend (``csrc/cuda/``): registration, and every CUDA kernel against the reference on a GPU.

Without a GPU only the registration tests run (every kernel op has a CUDA kernel exactly when ``fastjac._C`` was
built with CUDA; ``backends()`` reports ``cuda_compiled`` separately from ``cuda``). With one, every kernel of
csrc/KERNELS.md runs on CUDA tensors against the reference kernels (``fastjac.reference``): float64 and float32
against the float64 reference with tight tolerances; float16 / bfloat16 within a bound set by the error of the same
reference computation done by PyTorch at that precision (both measured against the float64 reference, on the same
inputs). Also: packed masks bit for bit, the fused ReLU's recomputed mask, running statistics updated once,
bit-identical repeated runs (no atomics in the reductions), absent optional inputs, empty inputs, and autograd-level
gradcheck / gradgradcheck in float64 with the CUDA backend forced.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import fastjac
from fastjac import reference as ref

from _op_cases import BN_SETUPS, POINTWISE

KERNELS = ["relu_fwd", "relu_bwd", "softplus_fwd", "softplus_bwd", "softplus_dbwd", "bn_fwd", "bn_bwd", "bn_dbwd",
           "bn_jvp"]
BACKENDS = fastjac.backends()

# ---------------------------------------------------------------------------------------------------------
# Registration (runs everywhere the extension is built)


@pytest.mark.skipif(not BACKENDS["cpu"], reason="fastjac._C is not built")
@pytest.mark.parametrize("name", KERNELS)
def test_cuda_kernel_registered_iff_compiled(name):
    has = torch._C._dispatch_has_kernel_for_dispatch_key(f"fastjac::{name}", "CUDA")
    assert has == BACKENDS["cuda_compiled"]
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastjac::{name}", "CPU")


def test_backends_report_compiled_and_usable_separately():
    b = fastjac.backends()
    assert isinstance(b["cuda_compiled"], bool)
    assert b["cuda"] == (b["cuda_compiled"] and torch.cuda.is_available())
    if BACKENDS["cpu"]:
        from fastjac import _C

        assert b["cuda_compiled"] == _C.compiled_with_cuda()


# ---------------------------------------------------------------------------------------------------------
# GPU tests

gpu = pytest.mark.skipif(not BACKENDS["cuda"], reason="needs fastjac._C built with CUDA and a GPU")
ops = torch.ops.fastjac
DEV = "cuda"
FLOATS = [torch.float64, torch.float32]
HALFS = [torch.float16, torch.bfloat16]
TIGHT = {torch.float64: 1e-12, torch.float32: 1e-5}  # max abs error / max(1, max |float64 reference|)
EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randn(*shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, dtype=torch.float64, device=DEV) * scale + shift).to(dtype)


def up(v):
    """Tensors (nested in tuples) as float64; everything else unchanged."""
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.double()
    if isinstance(v, (tuple, list)):
        return type(v)(up(a) for a in v)
    return v


def check(actual, at_dtype, exact, dtype, what=""):
    """``actual`` (the CUDA kernel) against ``exact`` (the float64 reference on the same inputs): tight for float64
    and float32; for half types at most max(4 x the error of ``at_dtype`` (the reference computed at that
    precision), 2 eps x scale)."""
    if isinstance(exact, (tuple, list)):
        assert len(actual) == len(exact), what
        for i, (a, t, e) in enumerate(zip(actual, at_dtype, exact)):
            check(a, t, e, dtype, f"{what}[{i}]")
        return
    assert actual.device.type == "cuda" and actual.shape == exact.shape, what
    if exact.dtype == torch.uint8:
        assert torch.equal(actual, exact), f"{what}: packed masks differ"
        return
    if exact.numel() == 0:
        return
    a, t, e = actual.double(), at_dtype.double(), exact.double()
    scale = max(1.0, e.abs().max().item())
    err = (a - e).abs().max().item()
    if dtype in TIGHT:
        bound = TIGHT[dtype] * scale
    else:
        bound = max(4 * (t - e).abs().max().item(), 2 * EPS[dtype] * scale)
    assert err <= bound, f"{what}: max abs error {err:.3e} > {bound:.3e} (scale {scale:.3g})"


def compare(name, *args, what=None):
    """Kernel ``name`` on ``args`` against the reference at the inputs' precision and in float64."""
    dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
    out = getattr(ops, name)(*args)
    check(out, getattr(ref, name)(*args), getattr(ref, name)(*up(args)), dtype, what or name)
    return out


# --- ReLU ------------------------------------------------------------------------------------------------

RELU_SHAPES = [(0,), (1,), (13,), (31,), (33,), (3, 5, 7, 11), (4, 1000), (70001,)]


@gpu
@pytest.mark.parametrize("dtype", FLOATS + HALFS)
@pytest.mark.parametrize("shape", RELU_SHAPES, ids=str)
def test_relu(shape, dtype):
    x = randn(*shape, dtype=dtype)
    flat = x.view(-1)
    flat[::5] = 0.0
    flat[1::7] = -0.0
    flat[3::11] = float("nan")
    y, mask = ops.relu_fwd(x)
    y_ref, mask_ref = ref.relu_fwd(x)
    assert mask.dtype == torch.uint8 and torch.equal(mask, mask_ref)  # padding bits included
    assert torch.equal(y, y_ref)
    g = randn(*shape, dtype=dtype)
    g.view(-1)[2::9] = float("inf")  # masked infinities give 0
    assert torch.equal(ops.relu_bwd(g, mask), ref.relu_bwd(g, mask_ref))


@gpu
def test_relu_noncontiguous_and_bad_mask():
    x = randn(6, 9, dtype=torch.float32).t()
    y, mask = ops.relu_fwd(x)
    assert torch.equal(y, ref.relu_fwd(x)[0]) and torch.equal(mask, ref.relu_fwd(x)[1])
    padded = torch.zeros(2 * mask.numel(), dtype=torch.uint8, device=DEV)[::2]
    padded.copy_(mask)
    g = randn(9, 6, dtype=torch.float32)
    assert torch.equal(ops.relu_bwd(g, padded), ref.relu_bwd(g, mask))
    with pytest.raises(RuntimeError, match="mask"):
        ops.relu_bwd(g, mask[:-1])
    with pytest.raises(RuntimeError, match="mask"):
        ops.relu_bwd(g, mask.cpu())


# --- Softplus --------------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("dtype", FLOATS + HALFS)
@pytest.mark.parametrize("beta,threshold", [(1.0, 20.0), (2.5, 1.0), (3.0, -1.0)])
@pytest.mark.parametrize("shape", [(3,), (3, 5, 7, 11), (257, 130)], ids=str)
def test_softplus(shape, beta, threshold, dtype):
    x = randn(*shape, dtype=dtype, scale=4.0)
    g, gg = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    # The kernels compute beta x in float for half types (like F.softplus): compare where both branches agree.
    same = ((x.float() * beta > threshold) == (x * beta > threshold)) & (
        (x.double() * beta > threshold) == (x * beta > threshold))
    for name, args in [("softplus_fwd", (x,)), ("softplus_bwd", (g, x)), ("softplus_dbwd", (gg, g, x))]:
        args = (*args, beta, threshold)
        out = getattr(ops, name)(*args)
        outs = out if isinstance(out, tuple) else (out,)
        at_dtype, exact = getattr(ref, name)(*args), getattr(ref, name)(*up(args))
        at_dtype = at_dtype if isinstance(at_dtype, tuple) else (at_dtype,)
        exact = exact if isinstance(exact, tuple) else (exact,)
        for o, t, e in zip(outs, at_dtype, exact):
            assert o.dtype == dtype
            check(o[same], t[same], e[same], dtype, name)


# --- BatchNorm -------------------------------------------------------------------------------------------

BN_SHAPES = [
    (2, 1),  # M = 2
    (3, 5, 7, 11),  # primes; spatial 77: rows
    (16, 4),  # N x C: columns, S = 1
    (2, 3, 2, 3, 5),  # 3-D spatial, S = 30: columns
    (4, 3, 17),  # numel not a multiple of 8 or 32
    (6, 40, 5),  # columns across channel boundaries
]
LARGE_BN_SHAPES = [
    (5000, 40),  # columns, many row splits
    (3, 2, 130, 301),  # rows, one channel split across blocks, rows not multiples of the block
    (64, 37, 7, 7),  # rows (S = 49 < block), many channels
]
MODES = list(itertools.product([True, False], [True, False], [False, True]))  # training, affine, relu


def bn_inputs(shape, dtype, affine):
    C = shape[1]
    x = randn(*shape, dtype=dtype, scale=2.0, shift=0.5)
    w = randn(C, dtype=dtype) + 1.5 if affine else None
    b = randn(C, dtype=dtype) if affine else None
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    rm, rv = randn(C, dtype=stat), torch.rand(C, dtype=stat, device=DEV) + 0.5
    return x, w, b, rm, rv


def check_bn(shape, dtype, training, affine, relu):
    x, w, b, rm, rv = bn_inputs(shape, dtype, affine)
    rm_k, rv_k, rm_t, rv_t, rm_e, rv_e = rm.clone(), rv.clone(), rm.clone(), rv.clone(), rm.double(), rv.double()
    out = ops.bn_fwd(x, w, b, rm_k, rv_k, training, 0.1, 1e-5, relu)
    at_dtype = ref.bn_fwd(x, w, b, rm_t, rv_t, training, 0.1, 1e-5, relu)
    exact = ref.bn_fwd(*up((x, w, b)), rm_e, rv_e, training, 0.1, 1e-5, relu)
    check(out, at_dtype, exact, dtype, "bn_fwd")
    assert out[1].dtype == out[2].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    check((rm_k, rv_k), (rm_t, rv_t), (rm_e, rv_e), dtype, "running stats")
    if not training:
        assert torch.equal(rm_k, rm) and torch.equal(rv_k, rv)
    _, mean, invstd = out  # the backward kernels all get the kernel's own statistics
    C = shape[1]
    g, u = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    p, q = randn(C, dtype=dtype), randn(C, dtype=dtype)
    tail = (x, mean, invstd, w, b, training, relu)
    gx, gw, gb = compare("bn_bwd", g, *tail)
    assert gx.dtype == dtype and gw.dtype == gb.dtype == mean.dtype
    for present in itertools.product([False, True], repeat=3):
        ggx, ggw, ggb = (t if keep else None for t, keep in zip((u, p, q), present))
        compare("bn_dbwd", ggx, ggw, ggb, g, *tail, what=f"bn_dbwd{present}")
        compare("bn_jvp", ggx, ggw, ggb, *tail, what=f"bn_jvp{present}")


@gpu
@pytest.mark.parametrize("training,affine,relu", MODES)
@pytest.mark.parametrize("dtype", FLOATS + HALFS)
@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
def test_bn(shape, dtype, training, affine, relu):
    check_bn(shape, dtype, training, affine, relu)


@gpu
@pytest.mark.parametrize("training,relu", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", LARGE_BN_SHAPES, ids=str)
def test_bn_large(shape, dtype, training, relu):
    check_bn(shape, dtype, training, True, relu)


@gpu
@pytest.mark.parametrize("training,affine", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("dtype", FLOATS + HALFS)
@pytest.mark.parametrize("shape", [(3, 5, 7, 11), (6, 40, 30), (300, 1100), (2, 3, 64, 65)], ids=str)
def test_bn_relu_mask_recomputed_exactly(shape, dtype, training, affine):
    """The CUDA kernels after bn_fwd recompute the fused ReLU's mask bit for bit: bn_jvp with tb = 1 and bn_dbwd
    with ggb = 1 give the forward's y > 0, bn_bwd with g = 1 gives its count per channel as gb."""
    x, w, b, rm, rv = bn_inputs(shape, dtype, affine)
    C = shape[1]
    y, mean, invstd = ops.bn_fwd(x, w, b, rm, rv, training, 0.1, 1e-5, True)
    on = y > 0
    one = torch.ones(C, dtype=dtype, device=DEV)
    assert torch.equal(ops.bn_jvp(None, None, one, x, mean, invstd, w, b, training, True), on.to(dtype))
    ggrad, _, _ = ops.bn_dbwd(None, None, one, x, x, mean, invstd, w, b, training, True)
    assert torch.equal(ggrad, on.to(dtype))
    _, _, gb = ops.bn_bwd(torch.ones_like(x), x, mean, invstd, w, b, training, True)
    assert torch.equal(gb, on.sum([0] + list(range(2, x.dim()))).to(gb.dtype))


@gpu
def test_bn_matches_cpu_kernels_in_float64():
    """Same formulas, same per-channel coefficient code: CUDA and CPU agree to rounding in float64."""
    x, w, b, rm, rv = bn_inputs((5, 6, 9, 10), torch.float64, True)
    g, u = torch.randn_like(x), torch.randn_like(x)
    cuda_out = ops.bn_fwd(x, w, b, None, None, True, 0.1, 1e-5, True)
    cpu_out = ops.bn_fwd(x.cpu(), w.cpu(), b.cpu(), None, None, True, 0.1, 1e-5, True)
    _, mean, invstd = cpu_out
    args = (x, mean.to(DEV), invstd.to(DEV), w, b, True, True)
    cuda_out += ops.bn_dbwd(u, w, b, g, *args) + (ops.bn_jvp(u, w, b, *args),)
    cpu_args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    cpu_out += ops.bn_dbwd(u.cpu(), w.cpu(), b.cpu(), g.cpu(), *cpu_args) + (ops.bn_jvp(u.cpu(), w.cpu(), b.cpu(),
                                                                                         *cpu_args),)
    for a, e in zip(cuda_out, cpu_out):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-12, atol=1e-12)


@gpu
@pytest.mark.parametrize("shape", [(64, 32, 28, 28), (20000, 48), (512, 16, 3, 3)], ids=str)
@pytest.mark.parametrize("relu", [False, True])
def test_bn_deterministic(shape, relu):
    """Two runs of every BatchNorm kernel give bit-identical results (fixed-order reductions, no atomics)."""
    x, w, b, rm, rv = bn_inputs(shape, torch.float32, True)
    g, u = torch.randn_like(x), torch.randn_like(x)
    p = torch.randn_like(w)

    def run():
        y, mean, invstd = ops.bn_fwd(x, w, b, rm.clone(), rv.clone(), True, 0.1, 1e-5, relu)
        tail = (x, mean, invstd, w, b, True, relu)
        return (y, mean, invstd, *ops.bn_bwd(g, *tail), *ops.bn_dbwd(u, p, p, g, *tail), ops.bn_jvp(u, p, p, *tail))

    for a, c in zip(run(), run()):
        assert torch.equal(a, c)


@gpu
@pytest.mark.parametrize("relu", [False, True])
def test_bn_running_stats_updated_once(relu):
    """Through the autograd op (forward, backward, double backward) the running statistics see exactly one update,
    the one of F.batch_norm."""
    x, w, b, rm, rv = bn_inputs((8, 5, 6, 7), torch.float32, True)
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    rm_t, rv_t = rm.clone(), rv.clone()
    op = fastjac.ops.batch_norm_relu if relu else fastjac.ops.batch_norm
    with fastjac.use_backend("cuda"):
        y = op(x, rm, rv, w, b, True, 0.1, 1e-5)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        gx.square().sum().backward()
    F.batch_norm(x.detach(), rm_t, rv_t, None, None, True, 0.1, 1e-5)
    torch.testing.assert_close(rm, rm_t, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rv, rv_t, rtol=1e-6, atol=1e-7)


@gpu
@pytest.mark.parametrize("training", [True, False])
def test_bn_without_running_stats_and_optional_inputs(training):
    x, w, b, rm, rv = bn_inputs((4, 3, 5), torch.float32, True)
    if training:
        out = compare("bn_fwd", x, None, None, None, None, True, 0.1, 1e-5, True)
    else:
        with pytest.raises(RuntimeError, match="running_mean"):
            ops.bn_fwd(x, None, None, None, None, False, 0.1, 1e-5, False)
        out = compare("bn_fwd", x, None, b, rm, rv, False, 0.1, 1e-5, True)
    _, mean, invstd = out
    g = torch.randn_like(x)
    # all second-order inputs absent: ggrad = 0 (masked), gx = 0, gw = 0
    ggrad, gx, gw = compare("bn_dbwd", None, None, None, g, x, mean, invstd, w, b, training, True)
    assert not ggrad.any() and not gx.any() and not gw.any()
    assert not compare("bn_jvp", None, None, None, x, mean, invstd, None, None, training, False).any()


@gpu
def test_bn_empty():
    for shape in [(0, 3, 4), (4, 3, 0), (2, 0, 5)]:
        x = torch.randn(*shape, device=DEV)
        C = shape[1]
        y, mean, invstd = ops.bn_fwd(x, None, None, torch.zeros(C, device=DEV), torch.ones(C, device=DEV), False,
                                     0.1, 1e-5, True)
        assert y.shape == x.shape
        gx, gw, gb = ops.bn_bwd(x, x, mean, invstd, None, None, False, True)
        assert gx.shape == x.shape and not gw.any() and not gb.any()
        ggrad, gx, gw = ops.bn_dbwd(x, None, None, x, x, mean, invstd, None, None, False, True)
        assert ggrad.shape == gx.shape == x.shape and gw.shape == (C,)
    with pytest.raises(RuntimeError, match="Expected more than 1 value per channel"):
        ops.bn_fwd(torch.randn(1, 3, device=DEV), None, None, None, None, True, 0.1, 1e-5, False)


@gpu
def test_bn_argument_checks():
    x = torch.randn(4, 3, 5, device=DEV)
    _, mean, invstd = ops.bn_fwd(x, None, None, None, None, True, 0.1, 1e-5, True)
    with pytest.raises(RuntimeError, match="weight"):
        ops.bn_bwd(x, x, mean, invstd, torch.ones(3), None, True, True)  # on the CPU
    with pytest.raises(RuntimeError, match="bias"):
        ops.bn_bwd(x, x, mean, invstd, None, torch.zeros(4, device=DEV), True, True)
    with pytest.raises(RuntimeError, match="invstd"):
        ops.bn_bwd(x, x, mean, invstd.double(), None, None, True, True)
    with pytest.raises(RuntimeError, match="grad"):
        ops.bn_bwd(torch.randn(4, 3, 6, device=DEV), x, mean, invstd, None, None, True, True)


@gpu
def test_bn_noncontiguous():
    dtype = torch.float64
    x = randn(5, 4, 3, 6, dtype=dtype).permute(1, 2, 0, 3)
    g = randn(4, 5, 3, 6, dtype=dtype).transpose(1, 2)
    w, b = randn(6, dtype=dtype)[::2], randn(6, dtype=dtype)[1::2]
    rm, rv = torch.zeros(6, dtype=dtype, device=DEV)[::2], torch.ones(9, dtype=dtype, device=DEV)[::3]
    rm_ref, rv_ref = rm.clone(), rv.clone()
    out = ops.bn_fwd(x, w, b, rm, rv, True, 0.1, 1e-5, True)
    check(out, out, ref.bn_fwd(x, w, b, rm_ref, rv_ref, True, 0.1, 1e-5, True), dtype, "bn_fwd")
    check((rm, rv), (rm, rv), (rm_ref, rv_ref), dtype, "running stats")
    compare("bn_bwd", g, x, out[1], out[2], w, b, True, True)
    compare("bn_dbwd", g, w, b, g, x, out[1], out[2], w, b, True, True)


# --- Autograd with the CUDA backend forced ----------------------------------------------------------------


def _x(shape):
    x = torch.randn(*shape, dtype=torch.float64, device=DEV)
    x[x.abs() < 1e-3] = 0.5  # keep ReLU kinks away from the finite-difference stencil
    return x.requires_grad_()


@gpu
@pytest.mark.parametrize("case", POINTWISE, ids=str)
def test_pointwise_gradcheck_cuda(case):
    x = (_x((3, 4, 5)) * 2).detach().requires_grad_()
    with fastjac.use_backend("cuda"):
        assert gradcheck(case.fj, (x,), check_forward_ad=True, check_batched_grad=False)
        assert gradgradcheck(case.fj, (x,), gen_non_contig_grad_outputs=True, check_fwd_over_rev=True,
                             check_batched_grad=False)


@gpu
@pytest.mark.parametrize("setup", [s for s in BN_SETUPS if s.shape != (3, 5, 7, 11)], ids=str)
def test_batch_norm_gradcheck_cuda(setup):
    x = _x(setup.shape)
    rm, rv, w, b = (None if t is None else t.detach().to(DEV) for t in setup.make(torch.float64))
    w = None if w is None else w.requires_grad_()
    b = None if b is None else b.requires_grad_()
    fj, _, _ = setup.fns(rm, rv)
    inputs = (x, w, b) if setup.affine else (x,)
    with fastjac.use_backend("cuda"):
        assert fastjac._backend.backend_name(x.device) == "cuda"
        assert gradcheck(fj, inputs, check_forward_ad=True, check_batched_grad=False)
        assert gradgradcheck(fj, inputs, gen_non_contig_grad_outputs=True, check_fwd_over_rev=True,
                             check_batched_grad=False)
