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
