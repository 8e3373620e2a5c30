"""Per-sample Hessian traces ``h_i = tr(d^2 f_i / dx_i^2)`` of a batched scalar function, four ways.

``fn`` maps a batch ``x`` (N x ...) to one scalar per sample (shape ``(N,)``), e.g. the target-class logit
``f_i(x) = log p(x | y = i) + const`` of score matching (thesis Ch. 5). Write ``g = grad f``, ``H`` its Hessian
(of one sample, D = elements per sample), probes ``v = sigma z`` with ``z`` Gaussian N(0, I) or Rademacher
(+-1), one independent probe per sample and per Monte-Carlo draw, ``S = samples`` draws averaged. For a
quadratic ``f`` (and to leading order otherwise), per draw:

============  ==========================================  ============================  =======================
method        estimate                                    bias                          variance (Gaussian z)
============  ==========================================  ============================  =======================
exact         sum_j e_j^T H e_j (D double backwards)      0                             0
hutchinson    z^T H z (two backwards, Pearlmutter HVP)    0                             2 ||H||_F^2
taylor        (2 / sigma^2) (f(x + v) - f(x))              sigma^2/4 lap^2 f + O(s^4)    4 ||g||^2 / sigma^2
              (thesis Eq. 5.3 / 5.9; one forward)                                       + 2 ||H||_F^2
  + control_variate: subtract g^T v                        same                          2 ||H||_F^2
antithetic    (f(x + v) + f(x - v) - 2 f(x)) / sigma^2     sigma^2/4 lap^2 f + O(s^4)    2 ||H||_F^2
              (two forwards; the g^T v terms cancel)
============  ==========================================  ============================  =======================

Variances are per draw (divide by ``S``). With Rademacher probes replace ``2 ||H||_F^2`` by
``2 (||H||_F^2 - sum_k H_kk^2)``; the ``4 ||g||^2 / sigma^2`` term is the same. ``lap^2 f = sum_ab d_aa d_bb f``
(the fourth-order Taylor term; the third-order term vanishes in expectation because ``v`` is symmetric); for
Rademacher probes the bias is ``sigma^2 / 12 (3 lap^2 f - 2 sum_a d_aaaa f)``. The Taylor estimator drops the
gradient term ``g^T v`` of Eq. 5.8 because its expectation is zero (Eq. 5.3), which is why its variance carries
``4 ||g||^2 / sigma^2`` (thesis §5.8, "Observation": at most that much above Hutchinson's); the antithetic pair
cancels that term exactly, at the cost of a second forward. Finite differences lose ``~eps |f| / sigma^2`` to
rounding (``eps`` the dtype's machine epsilon): keep ``sigma`` well above ``sqrt(eps)`` in float32.

Perturbed forwards are separate calls ``fn(x + v)`` on the whole perturbed batch, never concatenated with the
clean batch, so a BatchNorm in training mode normalises a perturbed batch by that batch's own statistics (not
a mix of clean and perturbed samples). Each such call is a real forward: in training mode it also updates the
running statistics, and batch statistics couple the samples, so ``f_i`` then depends on the other samples' noise
as well (and the derivative methods differentiate through the batch statistics). Freeze the statistics (eval
mode) where that matters. The noise is regenerated from ``(seed, offset)`` by :func:`fastjac.ops.perturb` /
:func:`fastjac.ops.noise_dot` rather than stored; draw ``s`` uses stream offset ``offset + s * x.numel()``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .ops.perturb import DISTRIBUTIONS, noise_dot, perturb

METHODS = ("taylor", "antithetic", "hutchinson", "exact")


def _error(message: str) -> ValueError:
    return ValueError(f"fastjac.hessian_trace: {message}")


def _check_output(y, x: Tensor, what: str = "fn(x)") -> Tensor:
    if not isinstance(y, Tensor) or y.shape != (x.shape[0],):
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise _error(f"fn must map a batch to one scalar per sample: {what} must have shape ({x.shape[0]},), got {got}")
    return y


def _validate(x, method, samples, sigma, distribution, seed, offset):
    if method not in METHODS:
        raise _error(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise _error(f"x must be a floating-point tensor with a batch dimension, got {x!r:.80}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise _error(f"samples must be a positive int, got {samples!r}")
    if method in ("taylor", "antithetic") and not (isinstance(sigma, (int, float)) and 0 < float(sigma) < float("inf")):
        raise _error(f"sigma must be a positive finite float, got {sigma!r}")
    if distribution not in DISTRIBUTIONS:
        raise _error(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _error(f"seed must be an int or None, got {seed!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise _error(f"offset must be a non-negative int, got {offset!r}")


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """A 63-bit seed from torch's default (or the given) generator, so ``torch.manual_seed`` reproduces it."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64, generator=generator))


def _input_gradient(fn, x: Tensor, fx, grad_fx):
    """``(x', fx, grad f(x'))`` with the graph kept (create_graph), ``x'`` = ``x`` or a leaf copy requiring grad;
    ``fx``/``grad_fx`` are reused when given."""
    if grad_fx is not None:
        if fx is None or not x.requires_grad or grad_fx.shape != x.shape:
            raise _error("grad_fx must come with fx, computed from x requiring grad, with the shape of x")
        return x, fx, grad_fx
    if fx is None or not x.requires_grad or not fx.requires_grad:  # no graph from x to fx: run fn again
        x = x if x.requires_grad else x.detach().requires_grad_()
        fx = _check_output(fn(x), x)
    g = _grad_or_zero(fx.sum(), x, create_graph=True)
    return x, fx, g


def _grad_or_zero(out: Tensor, x: Tensor, create_graph: bool) -> Tensor:
    if not out.requires_grad:  # out does not depend on x: f is at most linear
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(out, x, create_graph=create_graph, retain_graph=True, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def _taylor(fn, x, y0, samples, sigma, seed, offset, distribution, grad_fx):
    total = 0
    for s in range(samples):
        off = offset + s * x.numel()
        diff = _check_output(fn(perturb(x, sigma, seed, off, distribution)), x, "fn(x + v)") - y0
        if grad_fx is not None:  # control variate g^T v = sigma <g, z>, zero mean
            diff = diff - sigma * noise_dot(grad_fx, seed, off, distribution).to(diff.dtype)
        total = total + diff
    return total * (2.0 / (sigma * sigma * samples))


def _antithetic(fn, x, y0, samples, sigma, seed, offset, distribution):
    total = 0
    for s in range(samples):
        off = offset + s * x.numel()
        plus = _check_output(fn(perturb(x, sigma, seed, off, distribution)), x, "fn(x + v)")
        minus = _check_output(fn(perturb(x, -sigma, seed, off, distribution)), x, "fn(x - v)")
        total = total + (plus + minus - 2 * y0)
    return total / (sigma * sigma * samples)


def _hutchinson(x, g, samples, seed, offset, distribution, create_graph):
    total = 0
    for s in range(samples):
        off = offset + s * x.numel()
        hz = _grad_or_zero(noise_dot(g, seed, off, distribution).sum(), x, create_graph)  # H z, z regenerated
        total = total + noise_dot(hz, seed, off, distribution)  # z^T H z
    return total / samples


def _exact(x, g, max_exact_dim, create_graph):
    n = x.shape[0]
    dim = x.numel() // max(n, 1)
    if dim > max_exact_dim:
        raise _error(
            f"method='exact' takes one double backward per input element: {dim} elements per sample exceed "
            f"max_exact_dim={max_exact_dim}; use 'hutchinson', 'antithetic' or 'taylor', or raise max_exact_dim"
        )
    flat = g.reshape(n, dim)
    total = torch.zeros(n, dtype=g.dtype, device=g.device)
    for j in range(dim):
        total = total + _grad_or_zero(flat[:, j].sum(), x, create_graph).reshape(n, dim)[:, j]
    return total


def hessian_trace(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    method: str = "taylor",
    samples: int = 1,
    sigma: float = 1e-2,
    *,
    distribution: str = "gaussian",
    seed: Optional[int] = None,
    offset: int = 0,
    fx: Optional[Tensor] = None,
    grad_fx: Optional[Tensor] = None,
    control_variate: bool = False,
    create_graph: bool = True,
    max_exact_dim: int = 4096,
) -> Tensor:
    """One estimate per sample of ``tr(d^2 f_i / dx_i^2)``, shape ``(N,)`` (module docstring: bias, variance).

    - ``method``: ``"taylor"`` (thesis Eq. 5.9: ``2/sigma^2 (f(x+v) - f(x))``, ``samples`` extra forwards),
      ``"antithetic"`` (``(f(x+v) + f(x-v) - 2 f(x)) / sigma^2``, ``2 samples`` extra forwards),
      ``"hutchinson"`` (``z^T H z`` by double backward), ``"exact"`` (small inputs only, for tests).
    - ``sigma``: probe scale of the finite-difference methods (``v = sigma z``; unused by the others).
    - ``distribution``: ``"gaussian"`` or ``"rademacher"`` probes. ``seed`` (default: drawn from torch's
      generator, so ``torch.manual_seed`` reproduces it) and ``offset`` fix the probes exactly.
    - ``fx``, ``grad_fx``: ``fn(x)`` (with its graph) and the gradient of ``fx.sum()`` w.r.t. ``x`` (with
      ``create_graph=True``) when the caller has them already (score matching does), so they are not recomputed.
    - ``control_variate`` (taylor): subtract ``g^T v``, which has zero mean; removes the ``4||g||^2/sigma^2``
      variance for the price of the input gradient (free when ``grad_fx`` is given).
    - ``create_graph``: keep the result differentiable w.r.t. ``fn``'s parameters (and ``x``) for training.
    """
    _validate(x, method, samples, sigma, distribution, seed, offset)
    seed = draw_seed() if seed is None else seed
    sigma = float(sigma)
    with torch.enable_grad() if create_graph else torch.no_grad():
        if method in ("taylor", "antithetic"):
            g = None
            if method == "taylor" and control_variate:
                with torch.enable_grad():
                    x, fx, g = _input_gradient(fn, x, fx, grad_fx)
            y0 = _check_output(fn(x) if fx is None else fx, x, "fx" if fx is not None else "fn(x)")
            if method == "taylor":
                out = _taylor(fn, x, y0, samples, sigma, seed, offset, distribution, g)
            else:
                out = _antithetic(fn, x, y0, samples, sigma, seed, offset, distribution)
        else:
            with torch.enable_grad():
                x, fx, g = _input_gradient(fn, x, fx, grad_fx)
                if method == "hutchinson":
                    out = _hutchinson(x, g, samples, seed, offset, distribution, create_graph)
                else:
                    out = _exact(x, g, max_exact_dim, create_graph)
            out = out.to(fx.dtype)
    return out if create_graph else out.detach()
