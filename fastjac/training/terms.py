"""Named loss terms of the trainer: the loss is ``Σ weight_k · term_k``, every term logged separately.

A config's ``loss`` maps term names to a weight, or to a mapping ``{weight: w, <option>: value, ...}``. Each
term is a function of a :class:`StepContext`, which runs the student (and teacher) once per micro-batch and
shares the outputs, captured features and input-gradients between terms. The Jacobian terms live in
:mod:`fastjac.training.jacobian_terms` (which does not import this module); :data:`TERMS` holds them all.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..batch_norm_stats import record_batch_norm_stats
from ..losses import capture_features, get_layer
from ..nn.one_pass import why_not_one_pass
from ..ops.frozen_backward import FrozenBackward
from . import jacobian_terms


BATCH_NORM_MODES = ("frozen", "frozen_constant", "live")
"""How the input-gradient terms treat BatchNorm layers that normalise with batch statistics (training mode):

- ``frozen`` (default): each row is the sample's own input-Jacobian (the batch statistics constant in the
  input), and the loss is differentiated through the statistics' dependence on the parameters, as
  training-mode BatchNorm is (its scale invariance holds). Computed from the clean pass itself
  (:class:`fastjac.ops.FrozenBackward`) when the student is piecewise linear with fused BatchNorms on the C++
  chain and every term using it takes only a first derivative; otherwise with an extra pass with the clean
  batch's statistics. Both give the same rows, loss and gradients (tests/test_frozen_backward.py).
- ``frozen_constant``: the same rows, but the statistics are constants for the parameter gradient too (a
  stop-gradient). Kept for the study in ``benchmarks/RESULTS.md``: the penalty's gradient then pushes the
  weights before each BatchNorm towards zero, which the next batch's normalisation undoes; on digits E2 the
  Jacobian penalty is not reduced and the model collapses under input noise.
- ``live``: plain double backprop of the clean training-mode pass: row n is ``∇_{x_n} Σ_m out[m, c_m]``,
  which includes the cross-sample terms through the batch statistics; one forward pass cheaper.
"""


@dataclass
class Term:
    """A loss term: ``fn(ctx, **options)``; what it needs from the step (teacher, input gradient, features of
    the layers named by its ``*_layer(s)`` options, BatchNorm statistics for extra passes). ``autocast``:
    False for terms that must run in float32 under mixed precision (finite differences of the outputs)."""

    fn: Callable[..., torch.Tensor]
    needs_teacher: bool = False
    needs_input_grad: bool = False
    options: tuple[str, ...] = ()
    extra_passes: bool = False
    first_derivative_only: bool = False  # uses the input gradient only in the loss (not differentiated in x)
    allows_negative: bool = False   # a negative weight is meaningful (otherwise it maximises the term: an error)
    autocast: bool = True


class StepContext:
    """One micro-batch: inputs, labels and lazily computed, shared model outputs.

    The student's clean forward runs once (through DDP when wrapped), capturing the features of
    ``student_layers`` and, when a term runs extra forward passes, the BatchNorm batch statistics
    (:func:`fastjac.record_batch_norm_stats`), so that extra passes use the clean batch's statistics and
    update no running statistics. The teacher runs in eval mode without a graph. Under ``torch.autocast``
    the extra passes and input-gradients are cached per autocast state, so a float32 term (``Term.autocast``)
    never reuses a bfloat16 pass.

    ``indices``: the dataset indices of the micro-batch's examples; with ``teacher_jacobians`` (the run's
    :class:`~fastjac.training.teacher_jacobians.TeacherJacobians`) the teacher's Jacobian rows and top classes
    are read from that cache (:meth:`cached_teacher_rows`, :meth:`classes`) instead of computed.
    """

    def __init__(self, model: nn.Module, teacher: nn.Module | None, x: torch.Tensor, y: torch.Tensor, *,
                 needs_input_grad: bool = False, student_layers=(), teacher_layers=(), record_stats: bool = False,
                 one_pass_frozen: bool = False, indices: torch.Tensor | None = None, teacher_jacobians=None):
        self.model, self.teacher, self.y = model, teacher, y
        self.indices = indices
        self.teacher_jacobians = teacher_jacobians if indices is not None else None
        self.x = x.requires_grad_(True) if needs_input_grad else x
        self.student_layers, self.teacher_layers = tuple(student_layers), tuple(teacher_layers)
        self.record_stats = record_stats
        # `frozen` input gradients from the clean pass (FrozenBackward) instead of an extra pass
        self.switch = FrozenBackward() if one_pass_frozen else None
        self._logits = self._aux = self._teacher = self.bn_stats = None
        self.features: dict[str, torch.Tensor] = {}
        self.teacher_features: dict[str, torch.Tensor] = {}
        self._grads: dict[Any, torch.Tensor] = {}

    @property
    def module(self) -> nn.Module:
        """The student itself (unwrapped from DistributedDataParallel)."""
        return getattr(self.model, "module", self.model)

    def layer(self, name: str, who: str = "student") -> nn.Module:
        """The student's (or teacher's) submodule ``name``; a clear error lists valid names."""
        return get_layer(self.module if who == "student" else self.teacher_model(), name, caller=f"{who} layer")

    def teacher_model(self) -> nn.Module:
        if self.teacher is None:
            raise ValueError("this loss term needs a teacher: set `teacher` in the config")
        return self.teacher

    def _amp(self) -> bool:
        return torch.is_autocast_enabled(self.x.device.type)

    def _run(self) -> None:
        self._logits_amp = self._amp()
        with contextlib.ExitStack() as stack:
            if self.student_layers:
                self.features = stack.enter_context(capture_features(self.module, self.student_layers))
            if self.record_stats:  # in the graph: `frozen` passes differentiate through them w.r.t. parameters
                self.bn_stats = stack.enter_context(record_batch_norm_stats(self.module, differentiable=True))
            if self.switch is not None:
                stack.enter_context(self.switch.recording())
            if hasattr(self.module, "both"):
                self._logits, self._aux = self.model(self.x, both=True)
            else:
                self._logits = self.model(self.x)
        self.features = dict(self.features)

    @property
    def logits(self) -> torch.Tensor:
        """The student's output (the target head of a two-head model)."""
        if self._logits is None:
            self._run()
        return self._logits

    @property
    def matched_logits(self) -> torch.Tensor:
        """The student output matched to the teacher: the auxiliary head of a two-head model (E3), else the
        only output."""
        self.logits  # noqa: B018 - runs the model once
        return self._aux if self._aux is not None else self._logits

    @property
    def teacher_logits(self) -> torch.Tensor:
        if self._teacher is None:
            teacher = self.teacher_model()
            with torch.no_grad(), contextlib.ExitStack() as stack:
                if self.teacher_layers:
                    feats = stack.enter_context(capture_features(teacher, self.teacher_layers))
                self._teacher = teacher(self.x.detach())
                if self.teacher_layers:
                    self.teacher_features = dict(feats)
        return self._teacher

    def classes(self, which: str) -> torch.Tensor:
        """Per-sample classes: ``"label"`` (the ground truth, 000 §4.1) or ``"top"`` (the teacher's top class,
        label-free, read from the teacher-Jacobian cache when it holds them; the student's own when there is no
        teacher)."""
        if which == "label":
            return self.y
        if which == "top":
            cached = None if self.teacher_jacobians is None else self.teacher_jacobians.top(self.indices)
            if cached is not None:
                return cached
            out = self.teacher_logits if self.teacher is not None else self.matched_logits
            return out.detach().argmax(1)
        raise ValueError(f"class selection must be 'label' or 'top', got {which!r}")

    def cached_teacher_rows(self, which: str) -> torch.Tensor | None:
        """The teacher's input-Jacobian rows of class selection ``which`` of this micro-batch from the run's
        cache (:mod:`fastjac.training.teacher_jacobians`), or None when there is no cache for ``which``."""
        if self.teacher_jacobians is None or which not in self.teacher_jacobians:
            return None
        return self.teacher_jacobians.rows(which, self.indices)

    def frozen(self, batch_norm: str = "frozen_constant"):
        """Context for an extra pass with the clean batch's BatchNorm statistics (see :data:`BATCH_NORM_MODES`):
        ``frozen``: constant in that pass's input, differentiable in the parameters; ``frozen_constant``:
        constants altogether. A null context when the student has no batch-statistics BatchNorm."""
        if not self.bn_stats:
            return contextlib.nullcontext()
        return self.bn_stats.frozen(differentiable=batch_norm == "frozen")

    def differentiable_pass(self, batch_norm: str = "frozen"):
        """``(x, logits, matched_logits)`` of a pass whose outputs can be differentiated w.r.t. ``x``.

        ``batch_norm`` (:data:`BATCH_NORM_MODES`): ``"frozen"`` (default) and ``"frozen_constant"``: when the
        student has BatchNorm layers normalising with batch statistics, an extra pass of the per-sample
        function with the clean batch's statistics (:mod:`fastjac.batch_norm_stats`), so that row n of a
        gradient of ``Σ_n out[n, c_n]`` is sample n's own input-Jacobian row (the quantity of seed 000's
        Propositions); without such layers it is the clean pass itself. ``"live"``: always the clean pass;
        with batch statistics the gradient then also flows through them and mixes samples (what plain double
        backprop of a training-mode network computes; one pass cheaper)."""
        if batch_norm not in BATCH_NORM_MODES:
            raise ValueError(f"batch_norm must be one of {', '.join(BATCH_NORM_MODES)}; got {batch_norm!r}")
        self.logits  # noqa: B018 - the clean pass (records the statistics)
        clean = batch_norm == "live" or (batch_norm == "frozen" and self.switch is not None) or not self.bn_stats
        if clean and self._amp() == self._logits_amp:
            return self.x, self._logits, self.matched_logits
        if clean and (self.bn_stats or self.switch is not None):
            raise ValueError(f"batch_norm {batch_norm!r} differentiates the clean pass, which ran under autocast, but "
                             "this term runs in float32: use an extra-pass batch_norm mode or precision float32")
        key = (batch_norm, self._amp())
        if key not in self._grads:
            xf = self.x.detach().requires_grad_(True)
            with self.frozen(batch_norm):
                if hasattr(self.module, "both"):
                    logits, aux = self.module(xf, both=True)
                else:
                    logits = aux = self.module(xf)
            self._grads[key] = (xf, logits, aux)
        return self._grads[key]

    def input_grad(self, output: str, which: str, batch_norm: str = "frozen") -> torch.Tensor:
        """``∇ₓ Σ_n out[n, c_n]`` with ``create_graph=True`` (``output``: ``"matched"`` logits, ``"logits"`` of
        the target head, or ``"log_softmax"`` of the target head; ``which``: :meth:`classes`) on the pass of
        :meth:`differentiable_pass`; cached."""
        key = (output, which, batch_norm, self._amp())
        if key not in self._grads:
            x, logits, matched = self.differentiable_pass(batch_norm)
            out = matched if output == "matched" else logits
            if output == "log_softmax":
                out = F.log_softmax(out, dim=1)
            c = self.classes(which)
            one_pass = batch_norm == "frozen" and self.switch is not None
            with self.switch.frozen() if one_pass else contextlib.nullcontext():
                (self._grads[key],) = torch.autograd.grad(out.gather(1, c[:, None]).sum(), x, create_graph=True)
        return self._grads[key]


def _ce(ctx: StepContext) -> torch.Tensor:
    """Cross-entropy of the (target-head) logits with the labels."""
    return F.cross_entropy(ctx.logits, ctx.y)


def _activation_matching(ctx: StepContext) -> torch.Tensor:
    """Activation matching (000 §3): squared error of pre-softmax outputs, summed over classes, batch mean."""
    return (ctx.matched_logits - ctx.teacher_logits).pow(2).sum(1).mean()


def _bias_decay(ctx: StepContext, layers: list[str] | None = None) -> torch.Tensor:
    """L2 of the bias parameters of ``layers`` (all biases when None): the bias weight-decay baseline of E5."""
    if layers is None:
        params = [p for n, p in ctx.module.named_parameters() if n.endswith("bias")]
    else:
        params = []
        for name in layers:
            bias = getattr(ctx.layer(name), "bias", None)
            if bias is None:
                raise ValueError(f"loss.bias_decay: layer {name!r} has no bias")
            params.append(bias)
    return sum(p.pow(2).sum() for p in params)


TERMS: dict[str, Term] = {
    "ce": Term(_ce),
    "activation_matching": Term(_activation_matching, needs_teacher=True),
    "bias_decay": Term(_bias_decay, options=("layers",)),
    **{name: Term(**spec) for name, spec in jacobian_terms.SPECS.items()},
}


def register(name: str, term: Term) -> None:
    """Add a loss term (used by the modules that provide Jacobian terms)."""
    TERMS[name] = term


def parse(loss_cfg: dict[str, Any]) -> list[tuple[str, float, dict]]:
    """``[(name, weight, options)]`` of a config's ``loss`` mapping; unknown names or options, and negative weights
    of terms that do not declare them meaningful (:attr:`Term.allows_negative`), are errors."""
    out = []
    for name, spec in loss_cfg.items():
        if name not in TERMS:
            raise ValueError(f"loss.{name}: unknown loss term; known: {sorted(TERMS)}")
        if isinstance(spec, dict):
            spec = dict(spec)
            weight = spec.pop("weight")
            bad = sorted(set(spec) - set(TERMS[name].options))
            if bad:
                raise ValueError(f"loss.{name}: unknown option(s) {bad}; allowed: {list(TERMS[name].options)}")
        else:
            weight, spec = spec, {}
        if float(weight) < 0 and not TERMS[name].allows_negative:
            raise ValueError(f"loss.{name}: weight must be >= 0, got {weight!r} (a negative weight maximises the term; "
                             "this term does not declare that meaningful)")
        out.append((name, float(weight), spec))
    if not any(w != 0 for _, w, _ in out):
        raise ValueError(f"loss: at least one term needs a non-zero weight, got {loss_cfg!r}")
    return out


def evaluate(ctx: StepContext, name: str, options: dict) -> torch.Tensor:
    """Term ``name`` on ``ctx`` as a float32 value; a term with ``autocast=False`` runs with autocast off."""
    term = TERMS[name]
    if term.autocast:
        return term.fn(ctx, **options).float()
    with torch.autocast(ctx.x.device.type, enabled=False):
        return term.fn(ctx, **options).float()


def check_precision(terms: list[tuple[str, float, dict]]) -> None:
    """Mixed precision: a float32 term (``autocast=False``) cannot differentiate the bfloat16 clean pass."""
    for name, weight, options in terms:
        if weight and not TERMS[name].autocast and options.get("batch_norm") == "live":
            raise ValueError(f"loss.{name}.batch_norm: 'live' differentiates the clean (bfloat16) pass, but "
                             f"{name} runs in float32 (finite differences); use 'frozen' or precision float32")


def context(model, teacher, x, y, terms: list[tuple[str, float, dict]], indices=None,
            teacher_jacobians=None) -> StepContext:
    """The :class:`StepContext` of a micro-batch with what the active ``terms`` need (``indices``: the dataset
    indices of its examples, which a ``teacher_jacobians`` cache is read at)."""
    active = [(TERMS[n], o) for n, w, o in terms if w != 0]
    student_layers, teacher_layers = set(), set()
    for _, options in active:
        if "student_layer" in options:
            student_layers.add(options["student_layer"])
        if "teacher_layer" in options:
            teacher_layers.add(options["teacher_layer"])
    frozen_users = [t for t, o in active if t.needs_input_grad and o.get("batch_norm", "frozen") == "frozen"]
    module = getattr(model, "module", model)
    one_pass = bool(frozen_users) and all(t.first_derivative_only for t in frozen_users) \
        and why_not_one_pass(module, x) is None
    record = any(t.extra_passes for t, _ in active) or (bool(frozen_users) and not one_pass) or any(
        t.needs_input_grad and o.get("batch_norm", "frozen") == "frozen_constant" for t, o in active)
    return StepContext(model, teacher, x, y, needs_input_grad=any(t.needs_input_grad for t, _ in active),
                       student_layers=sorted(student_layers), teacher_layers=sorted(teacher_layers),
                       record_stats=record, one_pass_frozen=one_pass, indices=indices,
                       teacher_jacobians=teacher_jacobians)
