"""Jacobian loss terms of the trainer, built on :mod:`fastjac.losses`, :func:`fastjac.input_jacobian`,
:func:`fastjac.full_jacobian` and :func:`fastjac.hessian_trace`: :data:`SPECS` (name -> the fields of a
:class:`~fastjac.training.terms.Term`), which :mod:`fastjac.training.terms` adds to its registry (this module
does not import it: the dependency runs one way).

Student input-gradients are ``torch.autograd.grad(..., create_graph=True)`` (the loss's backward is the double
backward the fused ops accelerate). With BatchNorm in training mode they are taken, by default
(``batch_norm: frozen``), on a pass with the clean batch's statistics held constant in the input, so each row
is that sample's own Jacobian, while the loss is still differentiated through the statistics' dependence on
the parameters (:meth:`StepContext.differentiable_pass`, :data:`terms.BATCH_NORM_MODES`; why, measured:
``benchmarks/RESULTS.md``, "BatchNorm semantics of the Jacobian terms"). For a piecewise-linear student with
fused BatchNorms those rows come from the clean pass itself (:class:`fastjac.ops.FrozenBackward`), otherwise
from an extra pass. ``batch_norm: live`` differentiates the clean pass, whose rows also carry the
cross-sample terms through the batch statistics (plain double backprop); ``frozen_constant`` is the
stop-gradient variant that fails on digits E2. Every extra pass
(frozen, perturbed, feature-only, full-Jacobian) uses the clean batch's statistics and updates no running
statistics (:mod:`fastjac.batch_norm_stats`), so they are updated once per step. The full-Jacobian and
attention-Jacobian passes use the statistics as constants (their E3-E5 behaviour is unchanged).
Teachers run in eval mode without a graph; the teacher's rows of Jacobian matching (and its top classes) come
from a cache computed once per run (:mod:`fastjac.training.teacher_jacobians`) when the step has one
(``teacher.cache_jacobians``; by default whenever the data has no augmentation and the cache fits 1 GiB), else
from a teacher pass every step. Under mixed precision the trace terms (score and anti-score matching) run in
float32: their finite differences of bf16 outputs would be rounding noise.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import losses
from ..full_jacobian import full_jacobian
from ..hessian_trace import hessian_trace
from ..input_jacobian import input_jacobian

if TYPE_CHECKING:  # annotations only
    from .terms import StepContext


def _per_sample_sq(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).pow(2).sum(1)


def _frozen(ctx: StepContext, batch_norm: str = "frozen_constant"):
    """An extra pass with the clean batch's statistics (``ctx.frozen``); the full-Jacobian terms use constant
    statistics, the trace terms the mode of their input-gradient."""
    return ctx.frozen(batch_norm)


def jacobian_matching(ctx: StepContext, normalize: bool = False, classes: str = "label",
                      batch_norm: str = "frozen") -> torch.Tensor:
    """Jacobian matching (000 Prop. 1; ``normalize``: Eq. 10) of the row of class ``classes`` (``label``: the
    correct class, 000 §4.1; ``top``: the teacher's top class): the student's matched output vs the teacher's.

    The teacher's rows (and its top classes) are read from the run's cache when the context has one
    (:meth:`StepContext.cached_teacher_rows`: ``teacher.cache_jacobians``, computed once at setup by
    :mod:`fastjac.training.teacher_jacobians` without augmentation); otherwise a forward and a backward through
    the teacher compute them for this batch."""
    j_teacher = ctx.cached_teacher_rows(classes)
    c = ctx.classes(classes) if j_teacher is None else None
    j_student = ctx.input_grad("matched", classes, batch_norm)
    if j_teacher is None:
        j_teacher = input_jacobian(ctx.teacher_model(), ctx.x.detach(), c, mode="target", create_graph=False).jacobian
    return losses.jacobian_matching(j_student, j_teacher, normalize=normalize)


def jacobian_norm(ctx: StepContext, form: str = "squared_error", batch_norm: str = "frozen") -> torch.Tensor:
    """Jacobian-norm penalty of the label's row: ``‖∇ₓ f_c‖²`` (``squared_error``, 000 Prop. 2) or
    ``‖∇ₓ log softmax_c‖²`` (``cross_entropy``, Eq. 3); per-sample sum, batch mean."""
    if form not in ("squared_error", "cross_entropy"):
        raise ValueError(f"loss.jacobian_norm.form must be 'squared_error' or 'cross_entropy', got {form!r}")
    return losses.jacobian_norm(ctx.input_grad("logits" if form == "squared_error" else "log_softmax", "label", batch_norm))


def attention_matching(ctx: StepContext, student_layer: str, teacher_layer: str, squared: bool = False) -> torch.Tensor:
    """Attention matching (000 Eq. 9) between the student's and teacher's features of the named layers."""
    ctx.logits, ctx.teacher_logits  # noqa: B018 - the passes that capture the features
    return losses.attention_matching(losses.attention_map(ctx.features[student_layer]),
                                     losses.attention_map(ctx.teacher_features[teacher_layer]), squared=squared)


def attention_jacobian(ctx: StepContext, student_layer: str, teacher_layer: str, window=0.2) -> torch.Tensor:
    """Attention-Jacobian matching (000 §5.2.1, Table 5): normalised input-Jacobians of the average-pooled
    attention pixel at the teacher's arg-max (``window``: fraction of the feature size, ``full`` or None)."""
    ctx.logits  # noqa: B018 - the clean pass records the BatchNorm statistics the feature pass reuses
    return losses.attention_jacobian_matching(ctx.module, ctx.teacher_model(), ctx.x.detach(), student_layer,
                                              teacher_layer, window=window, student_stats=ctx.bn_stats or None)


def _pairs(student_layers, teacher_layers, term: str):
    if not isinstance(student_layers, list) or not isinstance(teacher_layers, list) or \
            len(student_layers) != len(teacher_layers) or not student_layers:
        raise ValueError(f"loss.{term}: student_layers and teacher_layers must be equally long non-empty lists")
    return list(zip(student_layers, teacher_layers))


def bias_jacobian_matching(ctx: StepContext, student_layers: list, teacher_layers: list,
                           classes: str = "label") -> torch.Tensor:
    """Bias-Jacobian matching (thesis Eq. 4.3) at the given layer pairs, for the row of ``classes``."""
    pairs = _pairs(student_layers, teacher_layers, "bias_jacobian_matching")
    ctx.logits  # noqa: B018 - clean pass first (BatchNorm statistics)
    c = ctx.classes(classes)
    x = ctx.x.detach()
    with _frozen(ctx):
        student = full_jacobian(ctx.module, x, c, layers=student_layers, create_graph=True)
    teacher = full_jacobian(ctx.teacher_model(), x, c, layers=teacher_layers, create_graph=False)
    return losses.bias_jacobian_matching(student, teacher, pairs)


def bias_jacobian_norm(ctx: StepContext, layers: list) -> torch.Tensor:
    """Bias-Jacobian norm regulariser (001 Prop. 3) on ``layers``, for the label's row."""
    ctx.logits  # noqa: B018
    with _frozen(ctx):
        full = full_jacobian(ctx.module, ctx.x.detach(), ctx.y, layers=layers, create_graph=True)
    return losses.bias_jacobian_norm(full, layers)


def _trace(ctx: StepContext, sigma: float, method: str, samples: int, with_grad: bool, batch_norm: str,
           control_variate: bool = False):
    """Hessian trace of the label's logit and, if ``with_grad``, the squared input-gradient norm, all on the
    pass of :meth:`StepContext.differentiable_pass` (perturbed passes with frozen BatchNorm statistics).
    ``control_variate`` (Taylor): subtract gᵀv, removing the 4‖g‖²/σ² variance (:func:`fastjac.hessian_trace`)."""
    index = ctx.y[:, None]
    x, logits, _ = ctx.differentiable_pass(batch_norm)
    fx = logits.gather(1, index).squeeze(1)
    needs_grad = with_grad or control_variate or method in ("hutchinson", "exact")
    grad = ctx.input_grad("logits", "label", batch_norm) if needs_grad else None

    def class_logit(z):
        with _frozen(ctx, "frozen_constant" if batch_norm == "live" else batch_norm):
            out = ctx.module(z)
        return out.gather(1, index).squeeze(1)

    trace = hessian_trace(class_logit, x, method, samples, sigma, fx=fx, grad_fx=grad, control_variate=control_variate)
    return trace, (None if grad is None else _per_sample_sq(grad))


def score_matching(ctx: StepContext, mu: float = 1e-4, sigma: float = 1e-2, method: str = "taylor",
                   samples: int = 1, batch_norm: str = "frozen", control_variate: bool = False) -> torch.Tensor:
    """Score matching (thesis Eq. 5.4): ``h + ½‖∇ₓf_i‖² + μh²`` with the trace estimate ``h`` (Eq. 5.9)."""
    trace, grad_sq = _trace(ctx, sigma, method, samples, True, batch_norm, control_variate)
    return losses.score_matching(trace, grad_sq, mu)


def anti_score_matching(ctx: StepContext, tau: float = 1000.0, sigma: float = 1e-2, method: str = "taylor",
                        samples: int = 1, batch_norm: str = "frozen", control_variate: bool = False) -> torch.Tensor:
    """Anti-score matching (thesis §5.5): maximise the trace estimate clamped at ``tau``."""
    trace, _ = _trace(ctx, sigma, method, samples, False, batch_norm, control_variate)
    return losses.anti_score_matching(trace, tau)


def gradient_norm(ctx: StepContext, batch_norm: str = "frozen") -> torch.Tensor:
    """Gradient-norm regulariser (thesis §5.5): ``‖∇ₓ f_i‖²`` of the label's logit."""
    return losses.gradient_norm(_per_sample_sq(ctx.input_grad("logits", "label", batch_norm)))


#: name -> the fields of its :class:`~fastjac.training.terms.Term`
SPECS: dict[str, dict] = {
    "jacobian_matching": dict(fn=jacobian_matching, needs_teacher=True, needs_input_grad=True,
        options=("normalize", "classes", "batch_norm"), first_derivative_only=True),
    "jacobian_norm": dict(fn=jacobian_norm, needs_input_grad=True, options=("form", "batch_norm"),
        first_derivative_only=True),
    "attention_matching": dict(fn=attention_matching, needs_teacher=True,
        options=("student_layer", "teacher_layer", "squared")),
    "attention_jacobian": dict(fn=attention_jacobian, needs_teacher=True, extra_passes=True,
        options=("student_layer", "teacher_layer", "window")),
    "bias_jacobian_matching": dict(fn=bias_jacobian_matching, needs_teacher=True, extra_passes=True,
        options=("student_layers", "teacher_layers", "classes")),
    "bias_jacobian_norm": dict(fn=bias_jacobian_norm, extra_passes=True, options=("layers",)),
    "score_matching": dict(fn=score_matching, needs_input_grad=True, extra_passes=True, autocast=False,
        options=("mu", "sigma", "method", "samples", "batch_norm", "control_variate")),
    "anti_score_matching": dict(fn=anti_score_matching, needs_input_grad=True, extra_passes=True, autocast=False,
        options=("tau", "sigma", "method", "samples", "batch_norm", "control_variate")),
    "gradient_norm": dict(fn=gradient_norm, needs_input_grad=True, options=("batch_norm",),
        first_derivative_only=True),
}
