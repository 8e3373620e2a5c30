"""Shared fixtures: the backends to test and per-dtype tolerances."""
import pytest
import torch

import fastjac

TESTED_BACKENDS = [name for name in ("reference", "cpu", "triton") if fastjac.backends()[name]]

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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_close(actual, expected, dtype=None, **overrides):
    tol = dict(TOLERANCES[dtype or expected.dtype])
    tol.update(overrides)
    torch.testing.assert_close(actual, expected, **tol)
