"""The CPU output pool (csrc/cpu/output_pool.h, fastjac.memory): large kernel outputs reuse the pages of freed
ones, the results do not depend on what a reused block held, the memory rule (a miss releases kept blocks of at
least its size first; kept bytes bounded), the profiler's memory events, resizing, the environment variable and
fork."""
import multiprocessing
import os
import subprocess
import sys

import pytest
import torch

import fastjac

pytestmark = pytest.mark.skipif(not fastjac.backends()["cpu"], reason="needs the compiled CPU kernels")

MIB = 1 << 20
SHAPE = (8, 16, 64, 64)  # 2 MiB of float32: a pool-sized output


@pytest.fixture(autouse=True)
def _empty_pool():
    fastjac.empty_cache()
    yield
    fastjac.empty_cache()


def _stats():
    return fastjac.cpu_pool_stats()


def test_freed_output_block_is_reused():
    x = torch.randn(SHAPE)
    y = fastjac.ops.relu(x)
    ptr, before = y.data_ptr(), _stats()
    assert before["live_bytes"] >= y.nbytes
    del y
    kept = _stats()
    assert kept["cached_bytes"] == before["cached_bytes"] + 2 * MIB
    y = fastjac.ops.relu(x)
    after = _stats()
    assert y.data_ptr() == ptr and after["hits"] == kept["hits"] + 1 and after["cached_bytes"] == before["cached_bytes"]


def test_small_outputs_bypass_the_pool():
    before = _stats()
    y = fastjac.ops.relu(torch.randn(4, 8, 16, 16))  # 32 KiB
    assert _stats()["live_bytes"] == before["live_bytes"] and _stats()["misses"] == before["misses"]
    del y


OPS = {
    "relu": lambda x, p: fastjac.ops.relu(x),
    "softplus": lambda x, p: fastjac.ops.softplus(x, beta=1.5, threshold=3.0),
    "batch_norm": lambda x, p: fastjac.ops.batch_norm(x, None, None, p["w"], p["b"], training=True),
    "batch_norm_relu": lambda x, p: fastjac.ops.batch_norm_relu(x, None, None, p["w"], p["b"], training=True),
}


def _second_order(op, x, p, v, u):
    """Forward, input gradient with create_graph, double backward w.r.t. (x, v, weight)."""
    x = x.detach().requires_grad_()
    v = v.detach().requires_grad_()
    y = OPS[op](x, p)
    (gx,) = torch.autograd.grad(y, x, v, create_graph=True)
    grads = torch.autograd.grad(gx, [x, v, p["w"]], u, allow_unused=True)
    return [y.detach(), gx.detach()] + [g for g in grads]


@pytest.mark.parametrize("op", sorted(OPS))
def test_results_do_not_depend_on_what_a_reused_block_held(op):
    gen = torch.Generator().manual_seed(0)
    x, v, u = (torch.randn(SHAPE, generator=gen, dtype=torch.float64) for _ in range(3))
    c = SHAPE[1]
    p = {"w": (1 + 0.1 * torch.randn(c, generator=gen, dtype=torch.float64)).requires_grad_(),
         "b": 0.1 * torch.randn(c, generator=gen, dtype=torch.float64)}
    with fastjac.use_backend("reference"):
        want = _second_order(op, x, p, v, u)
    first = _second_order(op, x, p, v, u)
    for t in first:  # poison every block before it goes back to the pool
        if t is not None and t.nbytes >= MIB:
            t.fill_(float("nan"))
    hits = _stats()["hits"]
    del first
    got = _second_order(op, x, p, v, u)
    assert _stats()["hits"] > hits, "the second run should have reused the first run's blocks"
    for a, b in zip(want, got):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any())
            continue
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_a_miss_releases_kept_blocks_of_at_least_its_size_first():
    small = fastjac.ops.relu(torch.randn(SHAPE))  # 2 MiB
    del small
    assert _stats()["cached_bytes"] == 2 * MIB
    big = fastjac.ops.relu(torch.randn(2, *SHAPE))  # 4 MiB: no kept block of its size
    s = _stats()
    assert s["cached_bytes"] == 0 and s["released_blocks"] >= 1
    del big


def test_limit_bounds_the_kept_bytes_and_zero_turns_keeping_off():
    limit = _stats()["limit_bytes"]
    try:
        fastjac.set_cpu_pool_limit(3 * MIB)
        a, b = fastjac.ops.relu(torch.randn(SHAPE)), fastjac.ops.relu(torch.randn(SHAPE))
        del a, b
        assert _stats()["cached_bytes"] == 2 * MIB  # the second 2 MiB block would exceed 3 MiB
        fastjac.set_cpu_pool_limit(0)
        assert _stats()["cached_bytes"] == 0
        y = fastjac.ops.relu(torch.randn(SHAPE))
        del y
        assert _stats()["cached_bytes"] == 0
    finally:
        fastjac.set_cpu_pool_limit(limit)
    with pytest.raises(ValueError, match="nbytes must be an int >= 0"):
        fastjac.set_cpu_pool_limit(-1)


def test_pool_tensors_resize_like_any_cpu_tensor():
    y = fastjac.ops.relu(torch.randn(SHAPE))
    head = y.flatten()[:10].clone()
    y.resize_(16, 16, 64, 64)  # larger: a new block, contents copied
    torch.testing.assert_close(y.flatten()[:10], head)
    y.resize_(2, 3)
    assert y.shape == (2, 3)


def test_profiler_sees_the_pool_allocations():
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(SHAPE)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = fastjac.ops.relu(x)
        del y
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert 2 * MIB in sizes and -2 * MIB in sizes


def _child_relu(queue):
    torch.set_num_threads(1)  # as DataLoader workers do: libgomp's threads do not survive fork (torch.relu hangs too)
    y = fastjac.ops.relu(torch.ones(SHAPE))
    queue.put(float(y.sum()))


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
def test_a_forked_child_can_allocate():
    keep = fastjac.ops.relu(torch.randn(SHAPE))  # the parent's pool holds state when it forks
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_relu, args=(queue,))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0 and queue.get(timeout=5) == float(torch.ones(SHAPE).sum())
    del keep


def _run_with_env(value: str, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FASTJAC_CPU_POOL_MB=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_environment_variable_sets_the_limit_and_bad_values_are_named():
    code = ("import torch, fastjac; y = fastjac.ops.relu(torch.randn(8, 16, 64, 64)); del y; "
            "s = fastjac.cpu_pool_stats(); print(s['limit_bytes'], s['cached_bytes'])")
    assert _run_with_env("0", code).stdout.split() == ["0", "0"]
    assert _run_with_env("16", code).stdout.split() == [str(16 * MIB), str(2 * MIB)]
    bad = _run_with_env("lots", code)
    assert bad.returncode != 0 and "FASTJAC_CPU_POOL_MB must be a whole number of MiB" in bad.stderr


def test_the_reference_backend_does_not_use_the_pool():
    """The pool serves the compiled kernels only: the reference backend's outputs come from PyTorch."""
    before = _stats()
    with fastjac.use_backend("reference"):
        y = fastjac.ops.relu(torch.randn(SHAPE))
    after = _stats()
    assert (after["misses"], after["hits"], after["live_bytes"]) == (before["misses"], before["hits"], before["live_bytes"])
    del y
