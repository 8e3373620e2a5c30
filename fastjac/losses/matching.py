"""Activation matching, Jacobian matching and Jacobian-norm penalties (seed 000 Prop. 1-2, Eq. 2-3, Eq. 10).

Every loss is a per-sample sum over the non-batch dimensions followed by a batch reduction
(``reduction="mean"`` by default; ``"sum"``, ``"none"``). Jacobians are tensors or the results of
:func:`fastjac.input_jacobian` (full rows, projections or directional derivatives: all are shaped so
that the per-sample sum of squares estimates the squared norm, see there).
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from ..input_jacobian import InputJacobian, input_jacobian
from ._reduce import as_tensor, check_eps, check_same_shape, per_sample_sum, reduce
from ._reduce import normalize as unit_normalize

__all__ = [
    "activation_matching", "jacobian_matching", "jacobian_norm", "jacobian_norm_penalty", "soft_cross_entropy",
]

FORMS = ("squared_error", "cross_entropy")


def activation_matching(student_outputs: Tensor, teacher_outputs: Tensor, *, reduction: str = "mean") -> Tensor:
    """Squared error between pre-softmax outputs, ``sum_i (S^i(x) - T^i(x))^2`` per sample (000 Prop. 1,
    first term; supp. §4.2 "Match Activations"). Pass teacher outputs without a graph (detached)."""
    s = as_tensor(student_outputs, "student_outputs", "activation_matching")
    t = as_tensor(teacher_outputs, "teacher_outputs", "activation_matching")
    check_same_shape(s, t, ("student_outputs", "teacher_outputs"), "activation_matching")
    return reduce(per_sample_sum((s - t) ** 2), reduction, "activation_matching")


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
                       reduction: str = "mean") -> Tensor:
    """``-sum_i T_s^i(x) log S_s^i(x)`` with ``T_s, S_s`` the softmaxes at ``temperature`` (000 Eq. 2,
    first term; Hinton et al.). The noise form of Eq. 2 adds ``sigma^2 * jacobian_matching(...,
    form="cross_entropy")``."""
    s = as_tensor(student_logits, "student_logits", "soft_cross_entropy")
    t = as_tensor(teacher_logits, "teacher_logits", "soft_cross_entropy")
    check_same_shape(s, t, ("student_logits", "teacher_logits"), "soft_cross_entropy")
    per_sample = -(F.softmax(t / temperature, dim=1) * F.log_softmax(s / temperature, dim=1)).sum(1)
    return reduce(per_sample, reduction, "soft_cross_entropy")


def jacobian_matching(
    j_student,
    j_teacher,
    normalize: bool = False,
    *,
    form: str = "squared_error",
    eps: float = 1e-12,
    reduction: str = "mean",
) -> Tensor:
    """Jacobian matching loss between student and teacher input-Jacobians of the same shape.

    * ``form="squared_error"``, ``normalize=False``: ``||J_s - J_t||^2`` per sample, the
      ``sigma^2``-term of 000 Prop. 1 (to be weighted by ``sigma^2`` or a loss weight).
    * ``normalize=True``: ``|| J_s/||J_s||_2 - J_t/||J_t||_2 ||^2`` per sample (000 Eq. 10), norms over
      all non-batch dims; ``max(||J||, eps)`` in the denominator, so an exactly-zero Jacobian gives a
      finite value (it counts as the zero vector) and a finite gradient.
    * ``form="cross_entropy"`` (000 Eq. 2, second term without ``sigma^2``):
      ``-sum_i grad T_s^i . grad S_s^i / S_s^i = -sum_i grad T_s^i . grad log S_s^i`` per sample, where
      ``j_teacher`` holds Jacobians of the teacher's softmax and ``j_student`` those of the student's
      log-softmax (``input_jacobian(..., output="softmax")`` / ``output="log_softmax"``, same rows).

    For directional derivatives (estimators "jvp" / "finite_difference") computed with the *same probes*
    for both models, the unnormalised squared error is an unbiased estimate of the exact one; the
    normalised form is then only consistent (bias shrinking with the number of probes).
    """
    if form not in FORMS:
        raise ValueError(f"fastjac.losses.jacobian_matching: form must be one of {FORMS}, got {form!r}")
    check_eps(eps, "jacobian_matching")
    s = as_tensor(j_student, "j_student", "jacobian_matching")
    t = as_tensor(j_teacher, "j_teacher", "jacobian_matching")
    check_same_shape(s, t, ("j_student", "j_teacher"), "jacobian_matching")
    _check_same_kind(j_student, j_teacher)
    if form == "cross_entropy":
        if normalize:
            raise ValueError("fastjac.losses.jacobian_matching: normalize=True is defined for form='squared_error' only")
        return reduce(-per_sample_sum(s * t), reduction, "jacobian_matching")
    if normalize:
        s, t = unit_normalize(s, eps), unit_normalize(t, eps)
    return reduce(per_sample_sum((s - t) ** 2), reduction, "jacobian_matching")


def _check_same_kind(a, b) -> None:
    if isinstance(a, InputJacobian) and isinstance(b, InputJacobian) and a.kind != b.kind:
        raise ValueError(
            f"fastjac.losses.jacobian_matching: cannot match a {a.kind!r} Jacobian (student) with a {b.kind!r} one (teacher); "
            "use the same estimator for both"
        )


def jacobian_norm(jacobian, *, reduction: str = "mean") -> Tensor:
    """Jacobian-norm penalty ``||J||^2`` per sample (sum of squares over the non-batch dims).

    With rows of the logits this is the squared-error form of 000 Prop. 2 (``sum_i ||grad S^i||^2``, or
    the target row only, §4.1); with the target row of the log-softmax it is the cross-entropy form,
    Eq. 3: ``sum_i y^i ||grad S_s^i||^2 / (S_s^i)^2 = ||grad log S_s^c||^2`` for a one-hot label ``c``.
    :func:`jacobian_norm_penalty` picks the right Jacobian for each form.
    """
    j = as_tensor(jacobian, "jacobian", "jacobian_norm")
    return reduce(per_sample_sum(j * j), reduction, "jacobian_norm")


def jacobian_norm_penalty(model, x: Tensor, target: Optional[Tensor] = None, *, form: str = "squared_error",
                          mode: str = "target", reduction: str = "mean", **input_jacobian_kwargs):
    """``(outputs, penalty)``: the Jacobian-norm penalty of 000 Prop. 2 (``form="squared_error"``, rows of
    the logits) or Eq. 3 (``form="cross_entropy"``, rows of the log-softmax), from :func:`input_jacobian`
    with ``mode`` (default the label's row, §4.1; "all" / "projection" give the full Frobenius form).

    ``outputs`` are the clean-pass logits (squared_error) or log-probabilities (cross_entropy: use
    ``F.nll_loss(outputs, target)`` for the data term). Other keywords go to :func:`input_jacobian`.
    """
    if form not in FORMS:
        raise ValueError(f"fastjac.losses.jacobian_norm_penalty: form must be one of {FORMS}, got {form!r}")
    if "output" in input_jacobian_kwargs:
        raise ValueError("fastjac.losses.jacobian_norm_penalty: output is set by form; do not pass it")
    output = "logits" if form == "squared_error" else "log_softmax"
    result = input_jacobian(model, x, target, mode=mode, output=output, **input_jacobian_kwargs)
    return result.outputs, jacobian_norm(result.jacobian, reduction=reduction)
