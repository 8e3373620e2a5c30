"""Shared fixtures: the backends to test and per-dtype tolerances.

Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors. Triton reads
``TRITON_INTERPRET`` when it decorates a kernel, i.e. when fastjac first loads its Triton kernels (lazily, on
the first ``fastjac.backends()``), so it is set here, before anything of fastjac runs (``import torch`` does
not import triton). Nothing else in the suite uses triton. The interpreted kernels are slow: the generic
``backend`` fixture serves CPU tensors with ``reference`` and ``cpu`` only; the Triton kernels have their own
reduced test lists (tests/test_kernels.py, tests/test_kernels_triton.py, tests/test_triton_ops.py).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastjac  # noqa: E402

TESTED_BACKENDS = [name for name in ("reference", "cpu") if fastjac.backends()[name]]


def _triton_interpreter_failure() -> str | None:
    """Why the Triton interpreter cannot run fastjac's kernels here, or None (also None when Triton compiles).

    Triton 3.6's interpreter turns a loop bound passed at run time into an int through a one-element NumPy array,
    which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"); every BatchNorm kernel
    has such a loop. Later Triton versions work. A GPU machine compiles the kernels and is not affected."""
    if not (fastjac.backends()["triton"] and os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def loop_to(out_ptr, n, BLOCK: tl.constexpr):
        acc = tl.zeros([BLOCK], tl.float32)
        for _ in range(0, n, BLOCK):
            acc += 1.0
        tl.store(out_ptr + tl.arange(0, BLOCK), acc)

    out = torch.empty(4)
    try:
        loop_to[(1,)](out, 8, BLOCK=4)
    except Exception as e:  # the interpreter wraps the NumPy error in its own
        return f"the Triton {triton.__version__} interpreter fails with NumPy {numpy.__version__}: {e}"
    return None


_TRITON_INTERPRETER_FAILURE = _triton_interpreter_failure()


def pytest_collection_modifyitems(config, items):
    """Skip the interpreted Triton cases, saying why, where the interpreter itself is broken."""
    if _TRITON_INTERPRETER_FAILURE is None:
        return
    skip = pytest.mark.skip(reason=_TRITON_INTERPRETER_FAILURE)
    for item in items:
        if "triton" in item.nodeid:
            item.add_marker(skip)

# Tolerances for comparisons against PyTorch / the reference at each dtype.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
}


@pytest.fixture(params=TESTED_BACKENDS)
def backend(request):
    """Run the test once per available backend, with that backend forced."""
    with fastjac.use_backend(request.param):
        yield request.param


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread, for modules of tiny tensors (``pytestmark = pytest.mark.usefixtures("single_thread")``):
    on a loaded 2-core machine the thread synchronisation of 2-thread ops made such tests up to 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_close(actual, expected, dtype=None, **overrides):
    tol = dict(TOLERANCES[dtype or expected.dtype])
    tol.update(overrides)
    torch.testing.assert_close(actual, expected, **tol)
