"""The frozen teacher's input-Jacobian rows of every training example, computed once per run (000 Prop. 1, §4.1).

Jacobian matching compares the student's input-Jacobian row of a class with the teacher's. The teacher is frozen
(eval mode, no parameter gradients: :func:`fastjac.training.trainer.load_teacher`), so without random
augmentation (``data.augment: false``) its row for a training example is a fixed function of that example: the
trainer computes every row once at setup instead of a forward and a backward through the teacher every step
(``teacher.cache_jacobians``, :func:`use_cache`). :class:`TeacherJacobians` holds the rows of the classes the
config's ``jacobian_matching`` term matches: ``label`` (the ground truth, 000 §4.1) and/or ``top`` (the
teacher's own top class, which it holds too). They are the per-step rows of
:func:`fastjac.training.jacobian_terms.jacobian_matching` (the same calls, under the step's autocast), computed
in index order in fixed chunks of ``data.batch_size``, so a fresh and a resumed run hold bit-identical caches;
the per-step route computes the same rows on other batches, which agree to float rounding. The cache lives on
the training device (every DDP rank holds all of it) and is never saved.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import nn

from ..input_jacobian import input_jacobian
from . import terms as loss_terms
from .config import ConfigError, check_cache_jacobians

#: The most memory (bytes, on the training device) the cache may take: 1 GiB (CIFAR's 50,000 3×32×32 images
#: take 0.57 GiB for one class selection).
CAP_BYTES = 1 << 30


def matched_classes(terms: Sequence[tuple[str, float, dict]]) -> tuple[str, ...]:
    """The class selections (``classes`` option, default ``label``) of the active ``jacobian_matching`` terms of
    a parsed loss (``[(name, weight, options)]``), sorted."""
    return tuple(sorted({options.get("classes", "label") for name, weight, options in terms
                         if name == "jacobian_matching" and weight != 0}))


def may_cache(cfg) -> bool:
    """Whether ``teacher.cache_jacobians`` can take effect in the run ``cfg`` (a
    :class:`~fastjac.training.config.RunConfig`): a teacher, an active ``jacobian_matching`` term and no
    augmentation (the size cap aside). Elsewhere its value changes nothing, and a resume ignores a change of it."""
    return cfg.teacher is not None and not cfg.data.augment and bool(matched_classes(loss_terms.parse(cfg.loss)))


def cache_bytes(n: int, sample_shape: Sequence[int], classes: Sequence[str], itemsize: int = 4) -> int:
    """Bytes of the cache of ``n`` examples: one row (``sample_shape``) per example and class selection, plus
    the teacher's top classes (int64) when ``top`` is matched."""
    rows = n * int(torch.Size(sample_shape).numel()) * itemsize * len(classes)
    return rows + (8 * n if "top" in classes else 0)


def use_cache(setting, augment: bool, classes: Sequence[str], n: int, sample_shape: Sequence[int],
              itemsize: int = 4) -> bool:
    """Whether a run caches its teacher's Jacobian rows (``setting``: ``teacher.cache_jacobians``).

    ``auto``: when a ``jacobian_matching`` term is active (``classes`` not empty), ``augment`` is off and the
    cache fits :data:`CAP_BYTES`; ``true``: the same, but augmentation or a cache over the cap is a
    :class:`~fastjac.training.config.ConfigError` (nothing to cache without the term: no error); ``false``:
    never (the teacher's rows are computed every step)."""
    check_cache_jacobians(setting, augment, bool(classes))
    if setting is False or not classes or augment:
        return False
    size = cache_bytes(n, sample_shape, classes, itemsize)
    if size > CAP_BYTES:
        if setting is True:
            raise ConfigError(f"teacher.cache_jacobians: true, but the cache of {n} examples of shape "
                              f"{tuple(sample_shape)} ({', '.join(classes)} rows) takes {size / 2**30:.2f} GiB, over "
                              f"the cap of {CAP_BYTES / 2**30:g} GiB; use auto (computes them every step) or false")
        return False
    return True


class TeacherJacobians:
    """The teacher's target-row input-Jacobians of every training example, per class selection (``label``,
    ``top``), and its top classes when ``top`` is matched; on the training device, indexed by dataset index."""

    def __init__(self, rows: dict[str, torch.Tensor], top: torch.Tensor | None = None):
        self._rows, self._top = rows, top

    def __contains__(self, which: str) -> bool:
        return which in self._rows

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._rows.values()) + (0 if self._top is None else self._top.nbytes)

    def rows(self, which: str, indices: torch.Tensor) -> torch.Tensor:
        """The teacher's rows of class selection ``which`` for the examples ``indices`` (on the cache's device)."""
        return self._rows[which].index_select(0, indices)

    def top(self, indices: torch.Tensor) -> torch.Tensor | None:
        """The teacher's top classes of ``indices`` (None when ``top`` is not matched)."""
        return None if self._top is None else self._top.index_select(0, indices)

    @classmethod
    def compute(cls, teacher: nn.Module, classes: Sequence[str], images: torch.Tensor, labels: torch.Tensor,
                batch_size: int, device: torch.device, prepare: Callable[[torch.Tensor], torch.Tensor],
                to_device: Callable[[torch.Tensor], torch.Tensor], autocast=None) -> TeacherJacobians:
        """The rows of every example of ``images`` (the training images before ``prepare``, which
        normalises a chunk and moves it to ``device`` as the step does) in index order, in chunks of
        ``batch_size``, under ``autocast`` (the step's context), with the calls of the per-step route
        (:func:`~fastjac.training.jacobian_terms.jacobian_matching`; ``top``: the arg-max of the teacher's
        output without a graph, :meth:`StepContext.classes`). The global random state is left untouched."""
        bad = sorted(set(classes) - {"label", "top"})
        if bad:
            raise ValueError(f"class selection must be 'label' or 'top', got {bad[0]!r}")
        n = len(labels)
        rows: dict[str, torch.Tensor] = {}
        top = torch.empty(n, dtype=torch.long, device=device) if "top" in classes else None
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for start in range(0, n, batch_size):
                x, y = prepare(images[start:start + batch_size]), to_device(labels[start:start + batch_size])
                end = start + len(y)
                with autocast if autocast is not None else contextlib.nullcontext():
                    if top is not None:
                        with torch.no_grad():
                            top[start:end] = teacher(x).detach().argmax(1)
                    for which in classes:
                        target = y if which == "label" else top[start:end]
                        j = input_jacobian(teacher, x, target, mode="target", create_graph=False).jacobian
                        if which not in rows:
                            rows[which] = torch.empty((n, *j.shape[1:]), dtype=j.dtype, device=device)
                        rows[which][start:end] = j
        return cls(rows, top)
