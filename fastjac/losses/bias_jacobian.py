"""Bias-Jacobian losses on :func:`fastjac.full_jacobian` results: matching (thesis Eq. 4.3) and norm (001 Prop. 3).

Both are differentiable when the student's decomposition was computed with ``create_graph=True`` (the default
of :func:`fastjac.full_jacobian`); the teacher's needs no graph (``create_graph=False``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..full_jacobian import FullJacobian

__all__ = ["bias_jacobian_map", "bias_jacobian_matching", "bias_jacobian_norm"]

BiasJacobians = Union[FullJacobian, Mapping[str, Tensor]]
_INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}
_REDUCTIONS = ("mean", "sum", "none")


def _layers_of(jacobians: BiasJacobians, who: str) -> Mapping[str, Tensor]:
    if isinstance(jacobians, FullJacobian):
        return jacobians.bias_jacobians
    if isinstance(jacobians, Mapping):
        return jacobians
    raise TypeError(
        f"{who} must be a FullJacobian or a mapping layer name -> bias-Jacobian, got {type(jacobians).__name__}"
    )


def _get(layers: Mapping[str, Tensor], name: str, who: str) -> Tensor:
    if name not in layers:
        raise ValueError(
            f"{who} layer {name!r} has no bias-Jacobian; decomposed layers: {list(layers)} "
            "(pass it in full_jacobian(..., layers=...) and check it has a bias)"
        )
    return layers[name]


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def _check_reduction(reduction: str, who: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{who}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def bias_jacobian_map(bias_jacobian: Tensor, name: str = "bias-Jacobian") -> Tensor:
    """Channel sum of a convolutional layer's bias-Jacobian: ``(N, C, *spatial) -> (N, *spatial)``.

    The per-layer map of 001 §4.1.3 / thesis §4.7.2 (summed over channels only, not over positions).
    """
    if bias_jacobian.dim() < 3:
        raise ValueError(
            f"{name}: bias-Jacobian matching needs a convolutional layer's output (N x C x spatial...), "
            f"got shape {tuple(bias_jacobian.shape)}"
        )
    return bias_jacobian.sum(1)


def _unit_normalize(v: Tensor) -> Tensor:
    """``v / ‖v‖₂`` per sample over all but dim 0; an all-zero row maps to 0 with a zero (finite) gradient.

    A zero map has no direction; mapping it to 0 keeps the value and its gradient finite, where ``v/max(‖v‖, ε)``
    would give a gradient of order 1/ε.
    """
    flat = v.flatten(1)
    norm = torch.linalg.vector_norm(flat, dim=1, keepdim=True)
    nonzero = norm > 0
    safe = torch.where(nonzero, norm, torch.ones_like(norm))
    return torch.where(nonzero, flat / safe, torch.zeros_like(flat))


def _common_size(a: Tensor, b: Tensor, size, where: str) -> tuple[int, ...]:
    if a.dim() != b.dim():
        raise ValueError(
            f"{where}: spatial dimensions differ, student map {tuple(a.shape[1:])} vs teacher map {tuple(b.shape[1:])}"
        )
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{where}: batch sizes differ, student {a.shape[0]} vs teacher {b.shape[0]}")
    if size is None:  # the smaller map is resized to the larger (thesis §4.2)
        return tuple(max(p, q) for p, q in zip(a.shape[1:], b.shape[1:]))
    size = (size,) * (a.dim() - 1) if isinstance(size, int) else tuple(size)
    if len(size) != a.dim() - 1:
        raise ValueError(f"{where}: size must have {a.dim() - 1} entries, got {size}")
    return size


def _resize(m: Tensor, size: tuple[int, ...]) -> Tensor:
    if tuple(m.shape[1:]) == size:
        return m
    mode = _INTERPOLATION.get(len(size))
    if mode is None:
        raise ValueError(f"bias_jacobian_matching: cannot resize {len(size)}-d maps (1-3 spatial dims supported)")
    return F.interpolate(m[:, None], size=size, mode=mode, align_corners=False)[:, 0]


def bias_jacobian_matching(
    student: BiasJacobians,
    teacher: BiasJacobians,
    layer_pairs: Union[Sequence[tuple[str, str]], Mapping[str, str]],
    *,
    size: Optional[Union[int, Sequence[int]]] = None,
    reduction: str = "mean",
) -> Tensor:
    """Bias-Jacobian matching, thesis Eq. 4.3 (001 §4.1.3): ``Σ_pairs ‖ψ(f^b_l) − ψ(g^b_l')‖₂²`` per sample.

    ``ψ`` = unit-normalise(resize(channel sum)): each layer's bias-Jacobian is summed over channels
    (:func:`bias_jacobian_map`), the two maps of a pair are resized (bilinear / linear / trilinear,
    ``align_corners=False``) to ``size`` (default: the larger of the two, per dimension), and each sample's map
    is scaled to unit L2 norm (an all-zero map stays 0, with finite gradient). The thesis resizes before the
    channel sum; both are linear per channel, so summing first gives the same maps at lower cost.

    Args:
        student, teacher: :class:`fastjac.FullJacobian` results (or mappings layer name -> bias-Jacobian) for
            the same inputs and target classes.
        layer_pairs: ``(student_layer, teacher_layer)`` pairs, or a mapping student layer -> teacher layer.
        size: common spatial size, an int or one int per spatial dimension.
        reduction: ``"mean"`` over samples (default), ``"sum"``, or ``"none"`` for the per-sample ``(N,)`` loss.
    """
    _check_reduction(reduction, "bias_jacobian_matching")
    s_layers, t_layers = _layers_of(student, "student"), _layers_of(teacher, "teacher")
    pairs = list(layer_pairs.items()) if isinstance(layer_pairs, Mapping) else list(layer_pairs)
    if not pairs:
        raise ValueError("bias_jacobian_matching: layer_pairs is empty; give (student_layer, teacher_layer) pairs")
    total = None
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(
                f"bias_jacobian_matching: each layer pair must be (student_layer, teacher_layer), got {pair!r}"
            )
        s_name, t_name = pair
        where = f"bias_jacobian_matching pair ({s_name!r}, {t_name!r})"
        s_map = bias_jacobian_map(_get(s_layers, s_name, "student"), f"student layer {s_name!r}")
        t_map = bias_jacobian_map(_get(t_layers, t_name, "teacher"), f"teacher layer {t_name!r}")
        common = _common_size(s_map, t_map, size, where)
        t_map = t_map.to(s_map.dtype)
        diff = _unit_normalize(_resize(s_map, common)) - _unit_normalize(_resize(t_map, common))
        per_sample = diff.pow(2).sum(1)
        total = per_sample if total is None else total + per_sample
    return _reduce(total, reduction)


def bias_jacobian_norm(
    full: BiasJacobians,
    layers: Optional[Iterable[str]] = None,
    *,
    reduction: str = "mean",
) -> Tensor:
    """Bias-Jacobian norm regulariser (001 §5, Prop. 3): ``Σ_l ‖f^b_l(x)‖₂²`` per sample.

    By Prop. 3, ``σ²`` times this is, to first order, the mean squared change of the output under
    multiplicative noise ``b → b ⊙ ξ``, ``ξ ~ N(1, σ²)``, drawn independently at every position where a
    layer's bias is added (the bias-Jacobian has the shape of the layer output). ``layers``: names of the
    regularised layers (None = every decomposed layer). ``reduction`` as in :func:`bias_jacobian_matching`.
    """
    _check_reduction(reduction, "bias_jacobian_norm")
    all_layers = _layers_of(full, "full")
    names = list(all_layers) if layers is None else ([layers] if isinstance(layers, str) else list(layers))
    if not names:
        raise ValueError("bias_jacobian_norm: no layers to regularise")
    total = None
    for name in names:
        per_sample = _get(all_layers, name, "bias_jacobian_norm").flatten(1).pow(2).sum(1)
        total = per_sample if total is None else total + per_sample
    return _reduce(total, reduction)
