"""Shared by the kernel tests: the kernel backends to test (each with its device), the per-dtype tolerance,
input builders and the BatchNorm checks against ``fastjac.reference`` (csrc/KERNELS.md).

A ``KernelBackend`` is a kernel table (``torch.ops.fastjac`` for the C++ / CUDA kernels, ``fastjac.triton``)
plus the device its tensors live on. Inputs are drawn on the CPU in float64 with a fixed seed and moved, so every
backend sees the same values. Interpreted Triton (``TRITON_INTERPRET=1``, CPU tensors) is slow: ``fast`` backends
get reduced parameter lists (see :func:`per_backend`).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

import fastjac
from fastjac import _backend
from fastjac import reference as ref

# Max abs error allowed, relative to max(1, max |reference|).
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
FLOATS = [torch.float64, torch.float32]
HALFS = [torch.float16, torch.bfloat16]


@dataclass(frozen=True)
class KernelBackend:
    name: str
    device: str
    fast: bool = False  # interpreted: test with the reduced parameter lists

    @property
    def ops(self):
        if self.name == "cuda-emulated":
            from _cuda_emulation import ops

            return ops()
        return torch.ops.fastjac if self.name in ("cpu", "cuda") else _backend._triton_kernels()

    def __str__(self):
        return f"{self.name}@{self.device}"


def kernel_backends() -> list[KernelBackend]:
    """Every compiled/available kernel backend with a device it serves here."""
    found = fastjac.backends()
    out = []
    if found["cpu"]:
        out.append(KernelBackend("cpu", "cpu"))
    if found["triton"] and _backend._triton_interpreted():
        out.append(KernelBackend("triton", "cpu", fast=True))
    if torch.cuda.is_available():
        if found["cuda"]:
            out.append(KernelBackend("cuda", "cuda"))
        if found["triton"]:
            out.append(KernelBackend("triton", "cuda", fast=_backend._triton_interpreted()))
    return out


KERNEL_BACKENDS = kernel_backends()
# The CUDA ReLU, Softplus and BatchNorm kernels run on the CPU by the emulation of tests/_cuda_emulation.py (with
# the reduced parameter lists, as it runs a block's threads one by one): tests/test_kernels.py's backends.
CUDA_EMULATED = KernelBackend("cuda-emulated", "cpu", fast=True)
WITH_CUDA_EMULATED = KERNEL_BACKENDS + [CUDA_EMULATED]


def per_backend(argnames: str = "", full=((),), fast=None, backends=None):
    """``pytest.mark.parametrize`` of ``kb`` (a KernelBackend) and ``argnames`` over every backend with the
    ``full`` cases, or the ``fast`` ones (when given) for interpreted backends; no ``argnames``: ``kb`` only."""
    names = [a.strip() for a in argnames.split(",") if a.strip()]
    params = []
    for kb in KERNEL_BACKENDS if backends is None else backends:
        for case in fast if kb.fast and fast is not None else full:
            case = (case,) if len(names) == 1 else tuple(case)
            params.append(pytest.param(kb, *case, id="-".join([str(kb), *map(_id, case)])))
    return pytest.mark.parametrize(["kb", *names], params)


def _id(v):
    return str(v).replace("torch.", "").replace(" ", "")


def assert_close(actual, expected, dtype, what=""):
    if isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected)
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, dtype, f"{what}[{i}]")
        return
    assert actual.device == expected.device, f"{what}: on {actual.device}, expected {expected.device}"
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


def randn(*shape, dtype, device="cpu", scale=1.0, shift=0.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale + shift).to(dtype).to(device)


def stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def bn_case(shape, dtype, affine, training, relu, device="cpu", constant_channel=False):
    """Inputs and reference forward outputs of one BatchNorm configuration."""
    C = shape[1]
    x = randn(*shape, dtype=dtype, scale=2.0, shift=0.5)
    if constant_channel:
        x[:, C // 2] = 1.25  # var = 0
    w = randn(C, dtype=dtype) if affine else None
    b = randn(C, dtype=dtype) if affine else None
    rm, rv = randn(C, dtype=stat_dtype(dtype)), torch.rand(C, dtype=stat_dtype(dtype)) + 0.5
    x, w, b, rm, rv = (None if t is None else t.to(device) for t in (x, w, b, rm, rv))
    fwd = ref.bn_fwd(x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5, relu)
    return dict(x=x, w=w, b=b, rm=rm, rv=rv, fwd=fwd)


def check_bn_forward(ops, case, training, relu, dtype):
    x, w, b, rm, rv = case["x"], case["w"], case["b"], case["rm"], case["rv"]
    rm0, rv0 = rm.clone(), rv.clone()
    out = ops.bn_fwd(x, w, b, rm, rv, training, 0.1, 1e-5, relu)
    assert len(out) == 3
    assert_close(tuple(out), case["fwd"], dtype, "bn_fwd")
    if training:  # the reference updates copies of the same initial values
        rm_ref, rv_ref = rm0.clone(), rv0.clone()
        ref.bn_fwd(x, w, b, rm_ref, rv_ref, training, 0.1, 1e-5, relu)
        assert_close(rm, rm_ref, dtype, "running_mean")
        assert_close(rv, rv_ref, dtype, "running_var")
    else:
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def check_bn_backward(ops, case, training, relu, dtype, subsets=None):
    """bn_bwd, and bn_dbwd / bn_jvp for every subset of present second-order inputs (or ``subsets``)."""
    x, w, b = case["x"], case["w"], case["b"]
    _, mean, invstd = case["fwd"]
    C, dev = x.shape[1], x.device
    g, u = randn(*x.shape, dtype=dtype, device=dev), randn(*x.shape, dtype=dtype, device=dev)
    p, q = randn(C, dtype=dtype, device=dev), randn(C, dtype=dtype, device=dev)
    args = (x, mean, invstd, w, b, training, relu)
    assert_close(tuple(ops.bn_bwd(g, *args)), ref.bn_bwd(g, *args), dtype, "bn_bwd")
    for present in subsets or itertools.product([False, True], repeat=3):
        ggx, ggw, ggb = (t if keep else None for t, keep in zip((u, p, q), present))
        assert_close(tuple(ops.bn_dbwd(ggx, ggw, ggb, g, *args)), ref.bn_dbwd(ggx, ggw, ggb, g, *args), dtype,
                     f"bn_dbwd{present}")
        assert_close(ops.bn_jvp(ggx, ggw, ggb, *args), ref.bn_jvp(ggx, ggw, ggb, *args), dtype, f"bn_jvp{present}")
