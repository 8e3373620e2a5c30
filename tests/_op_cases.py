"""The fused ops as uniform cases: ``fastjac`` function and its ``torch.nn.functional`` counterpart; the paths
(backend and autograd chain) a parity test runs each case on."""
import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import fastjac
from _kernel_cases import KERNEL_BACKENDS


def op_paths():
    """(backend, chain, device) triples: every backend here, and for the compiled ones both chains."""
    found = fastjac.backends()
    out = [("reference", "python", "cpu")]
    if found["cpu"]:
        out += [("cpu", "cpp", "cpu"), ("cpu", "python", "cpu")]
    out += [("triton", "python", kb.device) for kb in KERNEL_BACKENDS if kb.name == "triton"]
    if torch.cuda.is_available() and found["cuda"]:
        out += [("cuda", "cpp", "cuda"), ("cuda", "python", "cuda")]
    return out


class OpPath:
    """One (backend, chain, device) of :func:`op_paths`; calling it gives the context a test's fastjac calls run in."""

    def __init__(self, backend, chain, device):
        self.backend, self.chain, self.device = backend, chain, device

    def __call__(self):
        """The context every call of a test runs in: the backend forced, the Python chain forced if asked."""
        stack = contextlib.ExitStack()
        stack.enter_context(fastjac.use_backend(self.backend))
        if self.chain == "python" and fwAD._current_level < 0:  # (forward mode takes the Python chain anyway)
            stack.enter_context(fwAD.dual_level())  # fastjac.ops._paths.use_cpp_chain is False inside
        return stack

    def __str__(self):
        return f"{self.backend}-{self.chain}" + ("" if self.device == "cpu" else f"@{self.device}")


@dataclass
class BNSetup:
    """A BatchNorm call: input shape and mode; ``make`` builds fresh running stats and parameters."""

    shape: tuple
    training: bool = True
    affine: bool = True
    relu: bool = False

    def make(self, dtype, requires_grad=True):
        c = self.shape[1]
        rm = torch.randn(c, dtype=dtype) * 0.1
        rv = torch.rand(c, dtype=dtype) + 0.5
        w = (torch.rand(c, dtype=dtype) + 0.5).requires_grad_(requires_grad) if self.affine else None
        b = torch.randn(c, dtype=dtype).requires_grad_(requires_grad) if self.affine else None
        return rm, rv, w, b

    def fns(self, rm, rv):
        """(fastjac, torch) callables of ``(x, w, b)`` sharing ``rm``/``rv`` copies."""
        fj_op = fastjac.ops.batch_norm_relu if self.relu else fastjac.ops.batch_norm
        rm_t, rv_t = rm.clone(), rv.clone()

        def fj(x, w=None, b=None):
            return fj_op(x, rm, rv, w, b, self.training, 0.1, 1e-5)

        def ref(x, w=None, b=None):
            y = F.batch_norm(x, rm_t, rv_t, w, b, self.training, 0.1, 1e-5)
            return F.relu(y) if self.relu else y

        return fj, ref, (rm_t, rv_t)

    def __str__(self):
        mode = "train" if self.training else "eval"
        return f"{'bnrelu' if self.relu else 'bn'}-{'x'.join(map(str, self.shape))}-{mode}-{'affine' if self.affine else 'plain'}"


@dataclass
class PointwiseCase:
    name: str
    fj: Callable
    ref: Callable

    def __str__(self):
        return self.name


POINTWISE = [
    PointwiseCase("relu", fastjac.ops.relu, F.relu),
    PointwiseCase("softplus", fastjac.ops.softplus, F.softplus),
    PointwiseCase(
        "softplus-beta2-thr3",
        lambda x: fastjac.ops.softplus(x, beta=2.0, threshold=3.0),
        lambda x: F.softplus(x, beta=2.0, threshold=3.0),
    ),
    PointwiseCase(
        "softplus-beta-neg",
        lambda x: fastjac.ops.softplus(x, beta=-1.5, threshold=2.0),
        lambda x: F.softplus(x, beta=-1.5, threshold=2.0),
    ),
]

BN_SETUPS = [
    BNSetup((4, 3, 5, 7), training=t, affine=a, relu=r)
    for t in (True, False)
    for a in (True, False)
    for r in (False, True)
] + [
    BNSetup((5, 3)),  # 1-d, N x C
    BNSetup((2, 3, 4, 3, 5), relu=True),  # 3-d spatial
    BNSetup((1, 2, 2, 1), relu=True),  # N*HW = 2
    BNSetup((3, 5, 7, 11), training=True),  # primes
]
