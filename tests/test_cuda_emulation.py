"""The CUDA kernels run on the CPU by the emulation of tests/_cuda_emulation.py (tests/test_kernels.py runs them
against the reference with the other backends): for BatchNorm, what that file cannot reach with its small shapes
(a channel split across several blocks in both layouts, tiles holding several channels), races within a block
(threads in reverse order), and what each call launches (issue 12 item 3: a training-mode
BatchNorm forward + backward + double backward in at most 8 kernels; here 2 per call, with the statistics,
invstd, running-statistics update and coefficients folded into the passes' finishing steps, and no ATen kernel).

The launch counts are exact properties of the host code (the emulation counts every launch the CUDA build would
make); tests/test_cuda_launches.py counts the same on a GPU with the profiler, chain included.
"""
import itertools

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from _cuda_emulation import launches, ops, reversed_schedule
from _kernel_cases import assert_close, bn_case, check_bn_backward, check_bn_forward, randn
from fastjac import reference as ref

# (shape, what it covers); the layout rules are BnLayout's (rows when prod(spatial) >= 32; blocks of at least
# 4096 elements, about 1024 blocks per pass).
SPLIT_SHAPES = [
    ((4, 2, 64, 64), "rows, 4 blocks per channel"),
    ((3, 3, 40, 50), "rows, 2 blocks per channel, a block's range starting mid-row"),
    ((2048, 3), "columns (N x C), 2 blocks of rows"),
    ((1024, 3, 5), "columns, 3 channels of 5 positions in one 16-wide tile, 4 blocks of rows"),
    ((96, 7, 3, 3), "columns, a channel straddling two 32-wide tiles"),
]


@pytest.mark.parametrize("shape", [s for s, _ in SPLIT_SHAPES], ids=[w for _, w in SPLIT_SHAPES])
@pytest.mark.parametrize("training,relu", [(True, False), (True, True), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_split_across_blocks(shape, training, relu, dtype):
    case = bn_case(shape, dtype, True, training, relu)
    check_bn_forward(ops(), case, training, relu, dtype)
    check_bn_backward(ops(), case, training, relu, dtype, subsets=[(True, True, True), (True, False, False)])


@pytest.mark.parametrize("shape", [(4, 2, 64, 64), (1024, 3, 5), (96, 7, 3, 3)], ids=["rows", "columns", "straddling"])
@pytest.mark.parametrize("relu", [False, True])
def test_reversed_schedule(shape, relu):
    """The same results with each block's threads run in reverse order between barriers: no kernel reads what
    another thread of its block writes without a barrier between (a race would give different values)."""
    case = bn_case(shape, torch.float64, True, True, relu)
    with reversed_schedule():
        check_bn_forward(ops(), case, True, relu, torch.float64)
        check_bn_backward(ops(), case, True, relu, torch.float64, subsets=[(True, True, True)])
        x = randn(4, 1000, dtype=torch.float64, shift=0.1)
        y, mask = ops().relu_fwd(x)
        y_ref, mask_ref = ref.relu_fwd(x)
        assert torch.equal(y, y_ref) and torch.equal(mask, mask_ref)


def _args(shape=(8, 4, 6, 7), dtype=torch.float32, training=True, relu=False):
    x = randn(*shape, dtype=dtype)
    C = shape[1]
    w, b = randn(C, dtype=dtype) + 1.5, randn(C, dtype=dtype)
    rm, rv = torch.zeros(C), torch.ones(C)
    _, mean, invstd = ref.bn_fwd(x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5, relu)
    g, u = torch.randn_like(x), torch.randn_like(x)
    return dict(x=x, w=w, b=b, rm=rm, rv=rv, mean=mean, invstd=invstd, g=g, u=u, training=training, relu=relu)


def _calls(a):
    """The four kernels on the arguments ``a``, as the autograd chain calls them (bn_dbwd with ggx only: the
    double backward of an input-gradient)."""
    o, t, r = ops(), a["training"], a["relu"]
    after = (a["x"], a["mean"], a["invstd"], a["w"], a["b"], t, r)
    return {
        "bn_fwd": lambda: o.bn_fwd(a["x"], a["w"], a["b"], a["rm"], a["rv"], t, 0.1, 1e-5, r),
        "bn_bwd": lambda: o.bn_bwd(a["g"], *after),
        "bn_dbwd": lambda: o.bn_dbwd(a["u"], None, None, a["g"], *after),
        "bn_jvp": lambda: o.bn_jvp(a["u"], None, None, *after),
    }


# Kernels per call: one per pass; eval's summing single pass (bn_bwd's gw, gb; bn_dbwd's gw) adds the finishing
# step alone. Training: 2 each, so forward + backward + double backward = 6 (issue 12's target: at most 8).
LAUNCHES = {True: {"bn_fwd": 2, "bn_bwd": 2, "bn_dbwd": 2, "bn_jvp": 2},
            False: {"bn_fwd": 1, "bn_bwd": 2, "bn_dbwd": 2, "bn_jvp": 1}}


@pytest.mark.parametrize("training,relu", list(itertools.product([True, False], [False, True])))
@pytest.mark.parametrize("shape", [(8, 4, 6, 7), (64, 5)], ids=["rows", "columns"])
def test_launches_per_call(shape, training, relu):
    calls = _calls(_args(shape, training=training, relu=relu))
    assert {k: launches(f) for k, f in calls.items()} == LAUNCHES[training]


def test_pointwise_kernels_launch_once():
    """ReLU and Softplus: one kernel per call, so a forward + backward + double backward chain launches 3 at most
    (ReLU's double backward is relu_bwd again; issue 12's target: at most 3)."""
    x, g = randn(4, 1000, dtype=torch.float32), randn(4, 1000, dtype=torch.float32)
    o = ops()
    _, mask = o.relu_fwd(x)
    for f in (lambda: o.relu_fwd(x), lambda: o.relu_bwd(g, mask), lambda: o.softplus_fwd(x, 1.0, 20.0),
              lambda: o.softplus_bwd(g, x, 1.0, 20.0), lambda: o.softplus_dbwd(g, g, x, 1.0, 20.0)):
        assert launches(f) == 1


def test_training_chain_in_six_launches():
    calls = _calls(_args())
    assert sum(launches(calls[k]) for k in ("bn_fwd", "bn_bwd", "bn_dbwd")) == 6


# ATen operators that launch no kernel on a GPU (allocation, views, no-op conversions).
NO_KERNEL = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::to", "aten::contiguous",
             "aten::view", "aten::as_strided", "aten::detach", "aten::lift_fresh", "aten::resize_"}


@pytest.mark.parametrize("training", [True, False])
def test_no_aten_kernels_inside(training):
    """The statistics, invstd, running-statistics update and coefficients are the kernels' own finishing steps:
    no ATen operator that would launch a kernel runs inside a call (float32 parameters, as in a float32 model)."""
    for name, f in _calls(_args(training=training)).items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            f()
        aten = {e.name for e in prof.events() if e.name.startswith("aten::")}
        assert aten <= NO_KERNEL, f"{name} runs {sorted(aten - NO_KERNEL)}"


def test_running_statistics_updated_exactly_once():
    """Only the one writer thread per channel updates them, whatever the number of blocks per channel."""
    for shape in [(4, 2, 64, 64), (2048, 3), (1024, 3, 5)]:
        a = _args(shape, dtype=torch.float64)
        rm, rv = a["rm"].double() + 0.25, a["rv"].double() * 2
        rm_ref, rv_ref = rm.clone(), rv.clone()
        ops().bn_fwd(a["x"], a["w"], a["b"], rm, rv, True, 0.1, 1e-5, False)
        ref.bn_fwd(a["x"], a["w"], a["b"], rm_ref, rv_ref, True, 0.1, 1e-5, False)
        assert_close(rm, rm_ref, torch.float64, "running_mean")
        assert_close(rv, rv_ref, torch.float64, "running_var")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("stat", [torch.float16, torch.bfloat16, torch.float64])
def test_running_statistics_of_another_dtype(stat, training):
    """Running statistics whose dtype is not the statistics dtype (a half module's) are read (eval) and written
    (training) in their own dtype, as on the CPU backend (strided ones: test_kernels.py's test_bn_noncontiguous)."""
    x = randn(6, 3, 5, 7, dtype=torch.float32)
    rm, rv = torch.full((3,), 0.5, dtype=stat), torch.full((3,), 1.5, dtype=stat)
    out = {}
    for name, o in [("emulated", ops()), ("cpu", torch.ops.fastjac)]:
        m, v = rm.clone(), rv.clone()
        y, mean, invstd = o.bn_fwd(x, None, None, m, v, training, 0.1, 1e-5, False)
        out[name] = (y, mean, invstd, m, v)
        assert m.dtype == stat and v.dtype == stat
    for a, b in zip(out["emulated"], out["cpu"]):  # float32 data, summed in another order: float32's tolerance
        assert a.dtype == b.dtype
        assert_close(a, b, torch.float32 if stat != torch.bfloat16 else torch.bfloat16)


def test_empty_batch():
    """No element: no pass runs; the finishing step alone gives the statistics (training: mean 0, invstd of
    var 0, running statistics untouched) and zero weight / bias gradients."""
    x = torch.randn(0, 3, 4)
    rm, rv = torch.full((3,), 0.5), torch.full((3,), 2.0)
    y, mean, invstd = ops().bn_fwd(x, None, None, rm, rv, True, 0.1, 1e-5, True)
    assert y.shape == x.shape and torch.equal(mean, torch.zeros(3))
    assert torch.allclose(invstd, torch.full((3,), 1e-5 ** -0.5))
    assert torch.equal(rm, torch.full((3,), 0.5)) and torch.equal(rv, torch.full((3,), 2.0))
    _, gw, gb = ops().bn_bwd(x, x, mean, invstd, torch.ones(3), torch.zeros(3), True, True)
    assert torch.equal(gw, torch.zeros(3)) and torch.equal(gb, torch.zeros(3))


@pytest.mark.parametrize("op", ["batch_norm", "batch_norm_relu"])
def test_chain_adds_no_kernels(op):
    """The C++ autograd chain around the kernels (the same code on every device) runs no ATen operator that would
    launch a kernel: on a GPU the chain's launches are the kernels' own (6 above). Checked on the CPU backend."""
    import fastjac

    x = torch.randn(8, 4, 6, 7, requires_grad=True)
    w, b = (torch.rand(4) + 0.5).requires_grad_(), torch.randn(4, requires_grad=True)
    rm, rv = torch.zeros(4), torch.ones(4)
    v, u = torch.randn_like(x).requires_grad_(), torch.randn_like(x)
    fn = getattr(fastjac.ops, op)

    def run():
        (gx,) = torch.autograd.grad(fn(x, rm, rv, w, b, True), x, v, create_graph=True)
        torch.autograd.grad(gx, (x, v), u, allow_unused=True)

    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    names = [e.name for e in prof.events()]
    assert sorted(n for n in names if n.startswith("fastjac::")) == ["fastjac::bn_bwd", "fastjac::bn_dbwd",
                                                                     "fastjac::bn_fwd"]
    aten = {n for n in names if n.startswith("aten::")}
    assert aten <= NO_KERNEL, f"the chain runs {sorted(aten - NO_KERNEL)}"
