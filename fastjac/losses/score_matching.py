"""Score-matching regularisers of a classifier's implicit density (thesis Ch. 5).

A classifier's logit ``f_i(x)`` is read as an unnormalised class-conditional log-density,
``log p(x | y = i) = f_i(x) + const`` (thesis §5.3), with ``i`` the label. Per sample, with the Hessian trace
``h(x) = tr(d^2 f_i / dx^2)`` estimated by :func:`fastjac.hessian_trace` (default: the Taylor estimator of
Eq. 5.3 / 5.9, one extra forward and no backward):

- score matching (Eq. 5.4, with the stability term of §5.3.3): ``h + 1/2 ||grad_x f_i||^2 + mu h^2``;
- anti-score matching (§5.5): ``-min(h, tau)``, i.e. maximise the Hessian trace until it reaches ``tau``;
- gradient-norm regulariser (§5.5, the "gradient-norm" term of Eq. 5.4): ``||grad_x f_i||^2``.

The training loss of Eq. 5.4 is ``cross_entropy(logits, y) + lam * regulariser`` (thesis: ``lam = 1e-3``,
``mu = 1e-4`` for score matching; ``lam = 1e-4``, ``tau = 1000`` for anti-score matching; ``lam = 1e-3`` for the
gradient norm). The modules return the logits of their clean forward so the cross-entropy needs no second one.

Reduction (as every loss of :mod:`fastjac.losses`): per-sample values, then ``"mean"`` (default), ``"sum"``
or ``"none"``. Gradients ``grad_x f_i`` are those of ``sum_i f_i`` w.r.t. the batch, i.e. per-sample
gradients when samples do not interact (no BatchNorm in training mode; see :mod:`fastjac.hessian_trace` for
how the perturbed forwards treat BatchNorm).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..hessian_trace import METHODS, hessian_trace
from ..ops.perturb import DISTRIBUTIONS
from ._reduce import REDUCTIONS, reduce


class ScoreTerms(NamedTuple):
    """What a score-matching module computed: the reduced ``loss``, the clean ``logits`` (N x C), and the
    per-sample ``trace`` (``h``) and ``grad_norm_sq`` (``||grad_x f_i||^2``) it used (None if not needed)."""

    loss: Tensor
    logits: Tensor
    trace: Optional[Tensor]
    grad_norm_sq: Optional[Tensor]


def _check_per_sample(t, name: str, fn: str) -> None:
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 1:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"fastjac.losses.{fn}: {name} must be a floating-point tensor of shape (N,), got {got}")


def score_matching(trace: Tensor, grad_norm_sq: Tensor, mu: float = 1e-4, reduction: str = "mean") -> Tensor:
    """Stabilised score-matching objective (thesis Eq. 5.4): ``h + 1/2 ||grad_x f_i||^2 + mu h^2`` per sample.

    Minimising ``h + 1/2 ||grad||^2`` is Hyvarinen score matching (Eq. 5.2); ``mu h^2`` (§5.3.3) keeps the
    trace from collapsing to minus infinity.
    """
    _check_per_sample(trace, "trace", "score_matching")
    _check_per_sample(grad_norm_sq, "grad_norm_sq", "score_matching")
    if trace.shape != grad_norm_sq.shape:
        raise ValueError(
            f"fastjac.losses.score_matching: trace has shape {tuple(trace.shape)} but grad_norm_sq has shape "
            f"{tuple(grad_norm_sq.shape)}; they must match"
        )
    if not mu >= 0:
        raise ValueError(f"fastjac.losses.score_matching: mu must be >= 0, got {mu!r}")
    return reduce(trace + 0.5 * grad_norm_sq + mu * trace * trace, reduction, "score_matching")


def anti_score_matching(trace: Tensor, tau: float = 1000.0, reduction: str = "mean") -> Tensor:
    """Anti-score-matching objective (thesis §5.5): ``-min(h, tau)`` per sample; minimising it maximises the
    Hessian trace, and the clamp stops the push (zero gradient) once ``h >= tau``."""
    _check_per_sample(trace, "trace", "anti_score_matching")
    return reduce(-torch.clamp(trace, max=float(tau)), reduction, "anti_score_matching")


def gradient_norm(grad_norm_sq: Tensor, reduction: str = "mean") -> Tensor:
    """Gradient-norm regulariser (thesis §5.5; the "gradient-norm" term of Eq. 5.4): ``||grad_x f_i||^2``."""
    _check_per_sample(grad_norm_sq, "grad_norm_sq", "gradient_norm")
    return reduce(grad_norm_sq, reduction, "gradient_norm")


class _ClassLogitRegulariser(nn.Module):
    """Shared machinery: the clean forward, ``f_i`` = logit of the label, its input gradient, the trace."""

    _name = "regulariser"

    def __init__(self, method="taylor", samples=1, sigma=1e-2, distribution="gaussian", control_variate=False,
                 reduction="mean"):
        super().__init__()
        where = f"fastjac.losses.{type(self).__name__}"
        if method not in METHODS:
            raise ValueError(f"{where}: method must be one of {', '.join(METHODS)}, got {method!r}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"{where}: distribution must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"{where}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.method, self.samples, self.sigma = method, samples, sigma
        self.distribution, self.control_variate, self.reduction = distribution, control_variate, reduction

    def extra_repr(self) -> str:
        return f"method={self.method!r}, samples={self.samples}, sigma={self.sigma}, reduction={self.reduction!r}"

    def _terms(self, model, x: Tensor, target: Tensor, need_grad: bool, need_trace: bool, seed):
        where = f"fastjac.losses.{type(self).__name__}"
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
            raise ValueError(f"{where}: x must be a floating-point batch tensor, got {type(x).__name__}")
        if not isinstance(target, Tensor) or target.dtype != torch.int64 or target.shape != (x.shape[0],):
            got = (tuple(target.shape), target.dtype) if isinstance(target, Tensor) else type(target).__name__
            raise ValueError(f"{where}: target must be int64 class labels of shape ({x.shape[0]},), got {got}")
        index = target[:, None]

        def class_logit(z: Tensor) -> Tensor:
            return model(z).gather(1, index).squeeze(1)

        need_grad = need_grad or (need_trace and (self.method in ("hutchinson", "exact") or self.control_variate))
        xr = x.detach().requires_grad_() if need_grad and not x.requires_grad else x
        logits = model(xr)
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"{where}: model(x) must return logits of shape (N, C) with N = {x.shape[0]}, got {got}")
        fx = logits.gather(1, index).squeeze(1)
        grad = None
        if need_grad:
            (grad,) = torch.autograd.grad(fx.sum(), xr, create_graph=True)
        trace = None
        if need_trace:
            trace = hessian_trace(
                class_logit, xr, self.method, self.samples, self.sigma, distribution=self.distribution, seed=seed,
                fx=fx, grad_fx=grad, control_variate=self.control_variate,
            )
        grad_norm_sq = None if grad is None else grad.reshape(x.shape[0], -1).pow(2).sum(1)
        return logits, trace, grad_norm_sq


class ScoreMatchingLoss(_ClassLogitRegulariser):
    """Stabilised score matching of thesis Eq. 5.4 on the label's logit: ``h + 1/2 ||grad_x f_i||^2 + mu h^2``.

    ``forward(model, x, target, seed=None)`` -> :class:`ScoreTerms`; add ``lam * terms.loss`` to the
    cross-entropy of ``terms.logits``. ``method``, ``samples``, ``sigma``, ``distribution``,
    ``control_variate`` choose the trace estimator (:func:`fastjac.hessian_trace`).
    """

    def __init__(self, mu: float = 1e-4, **estimator):
        super().__init__(**estimator)
        self.mu = mu

    def forward(self, model, x: Tensor, target: Tensor, seed: Optional[int] = None) -> ScoreTerms:
        logits, trace, grad_norm_sq = self._terms(model, x, target, True, True, seed)
        return ScoreTerms(score_matching(trace, grad_norm_sq, self.mu, self.reduction), logits, trace, grad_norm_sq)


class AntiScoreMatchingLoss(_ClassLogitRegulariser):
    """Anti-score matching (thesis §5.5): ``-min(h, tau)`` on the label's logit (maximise the clamped trace).
    With the default Taylor estimator it costs one extra forward and no input gradient."""

    def __init__(self, tau: float = 1000.0, **estimator):
        super().__init__(**estimator)
        self.tau = tau

    def forward(self, model, x: Tensor, target: Tensor, seed: Optional[int] = None) -> ScoreTerms:
        logits, trace, _ = self._terms(model, x, target, False, True, seed)
        return ScoreTerms(anti_score_matching(trace, self.tau, self.reduction), logits, trace, None)


class GradientNormLoss(_ClassLogitRegulariser):
    """Gradient-norm regulariser (thesis §5.5): ``||grad_x f_i||^2`` of the label's logit, differentiable
    (double backward)."""

    def __init__(self, reduction: str = "mean"):
        super().__init__(reduction=reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"

    def forward(self, model, x: Tensor, target: Tensor) -> ScoreTerms:
        logits, _, grad_norm_sq = self._terms(model, x, target, True, False, None)
        return ScoreTerms(gradient_norm(grad_norm_sq, self.reduction), logits, None, grad_norm_sq)
