"""Named loss terms of the trainer: the loss is ``Σ weight_k · term_k``, every term logged separately.

A config's ``loss`` maps term names to a weight, or to a mapping ``{weight: w, <option>: value, ...}``. Each
term is a function of a :class:`StepContext`, which computes the student's (and teacher's) outputs once per
micro-batch and shares them between terms.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


class StepContext:
    """The inputs of one micro-batch and lazily computed, shared model outputs."""

    def __init__(self, model: nn.Module, teacher: nn.Module | None, x: torch.Tensor, y: torch.Tensor,
                 needs_input_grad: bool):
        self.model, self.teacher, self.y = model, teacher, y
        self.x = x.requires_grad_(True) if needs_input_grad else x
        self._logits = self._aux = self._teacher = None

    def _run(self):
        if hasattr(self.model, "both"):
            self._logits, self._aux = self.model.both(self.x)
        else:
            self._logits = self.model(self.x)

    @property
    def module(self) -> nn.Module:
        """The student itself (unwrapped from DistributedDataParallel)."""
        return getattr(self.model, "module", self.model)

    def layer(self, name: str, who: str = "student") -> nn.Module:
        """The student's (or teacher's) submodule ``name``; a clear error lists valid names."""
        model = self.module if who == "student" else self.teacher
        modules = dict(model.named_modules())
        if name not in modules:
            some = [n for n in modules if n][:12]
            raise ValueError(f"{who} layer {name!r} not found; some valid names: {some}")
        return modules[name]

    @property
    def logits(self) -> torch.Tensor:
        """The student's output (the target head of a two-head model)."""
        if self._logits is None:
            self._run()
        return self._logits

    @property
    def matched_logits(self) -> torch.Tensor:
        """The student output that is matched to the teacher: the auxiliary head of a two-head model (E3),
        else the only output."""
        self.logits  # noqa: B018 - runs the model once
        return self._aux if self._aux is not None else self._logits

    @property
    def teacher_logits(self) -> torch.Tensor:
        if self.teacher is None:
            raise ValueError("this loss term needs a teacher: set `teacher` in the config")
        if self._teacher is None:
            with torch.no_grad():
                self._teacher = self.teacher(self.x.detach())
        return self._teacher


@dataclass
class Term:
    fn: Callable[..., torch.Tensor]
    needs_teacher: bool = False
    needs_input_grad: bool = False
    options: tuple[str, ...] = ()


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
}


def register(name: str, term: Term) -> None:
    """Add a loss term (used by the modules that provide Jacobian terms)."""
    TERMS[name] = term


def parse(loss_cfg: dict[str, Any]) -> list[tuple[str, float, dict]]:
    """``[(name, weight, options)]`` of a config's ``loss`` mapping; unknown names or options are errors."""
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
        out.append((name, float(weight), spec))
    if not any(w != 0 for _, w, _ in out):
        raise ValueError(f"loss: at least one term needs a non-zero weight, got {loss_cfg!r}")
    return out


def needs(terms: list[tuple[str, float, dict]], what: str) -> bool:
    return any(getattr(TERMS[name], what) for name, weight, _ in terms if weight != 0)
