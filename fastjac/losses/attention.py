"""Attention maps, attention matching and attention-Jacobian matching (seed 000 Eq. 8-10, §5.2-5.2.1, Table 5).

``attention_map(Z) = sum_c |Z_c|^2`` (Eq. 8) of an N x C x H x W feature; attention matching compares unit-
normalised maps (Eq. 9). Attention-Jacobian matching (§5.2.1, supp. §4.2, Table 5) average-pools the
teacher's map (window a fraction of the feature size, stride 1), takes its arg-max position per sample,
and matches the unit-normalised input-Jacobians of that pooled pixel for teacher and student (Eq. 10).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..batch_norm_stats import BatchNormStats
from ..input_jacobian import input_jacobian
from ._reduce import as_tensor, check_eps, check_same_shape, normalize, per_sample_sum, reduce
from .features import StopForward, capture_features, get_layer
from .matching import jacobian_matching

__all__ = ["PooledAttention", "attention_jacobian_matching", "attention_map", "attention_matching", "pool_attention"]

Window = Union[float, str, None]


def attention_map(features: Tensor) -> Tensor:
    """``A = sum_c |Z_c|^2`` over the channel dim 1 (000 Eq. 8): N x C x (spatial) -> N x (spatial)."""
    z = as_tensor(features, "features", "attention_map")
    if z.dim() < 3:
        raise ValueError(f"fastjac.losses.attention_map: features must be N x C x (spatial...), got shape {tuple(z.shape)}")
    return (z * z).sum(1)


def attention_matching(a_student: Tensor, a_teacher: Tensor, *, squared: bool = False, eps: float = 1e-12,
                       reduction: str = "mean") -> Tensor:
    """``|| A_t/||A_t||_2 - A_s/||A_s||_2 ||_2`` per sample (000 Eq. 9; ``squared=True`` drops the square
    root, as Eq. 10 and Zagoruyko & Komodakis' code do). Maps must have the same shape (N x spatial).
    All-zero maps count as zero vectors (finite values and gradients); at an exact match the gradient of
    the square root is taken as 0 (its subgradient)."""
    check_eps(eps, "attention_matching")
    s = as_tensor(a_student, "a_student", "attention_matching")
    t = as_tensor(a_teacher, "a_teacher", "attention_matching")
    check_same_shape(s, t, ("a_student (student attention map)", "a_teacher (teacher attention map)"), "attention_matching")
    d = per_sample_sum((normalize(t, eps) - normalize(s, eps)) ** 2)
    if not squared:
        tiny = torch.finfo(d.dtype).tiny
        d = torch.where(d > 0, d.clamp_min(tiny).sqrt(), torch.zeros_like(d))
    return reduce(d, reduction, "attention_matching")


def _kernel(size: int, window: Window) -> int:
    if window is None:
        return 1
    if window == "full":
        return size
    if isinstance(window, (int, float)) and not isinstance(window, bool) and 0 < window <= 1:
        return max(1, min(size, int(round(window * size))))
    raise ValueError(
        f"fastjac.losses: window must be a fraction of the feature size in (0, 1] (Table 5: 1/3, 1/5, 1/7), "
        f"'full' (global average) or None (no pooling), got {window!r}"
    )


def pool_attention(attention: Tensor, window: Window = 0.2) -> Tensor:
    """Average-pool an N x H x W attention map with stride 1 and a ``round(window * size)`` window per
    spatial dim (000 §6.3.2, Table 5; supp. §4.2 uses size/5): N x H' x W'. ``window="full"`` is global
    average pooling (1 x 1), ``None`` no pooling."""
    a = as_tensor(attention, "attention", "pool_attention")
    if a.dim() != 3:
        raise ValueError(f"fastjac.losses.pool_attention: attention must be N x H x W, got shape {tuple(a.shape)}")
    kernel = (_kernel(a.shape[1], window), _kernel(a.shape[2], window))
    return F.avg_pool2d(a[:, None], kernel, stride=1)[:, 0]


class PooledAttention(nn.Module):
    """``x -> pool_attention(attention_map(model.layer(x)))`` flattened to N x (H' W'): the pooled attention
    of one named layer as a "model" with H' W' outputs, for :func:`fastjac.input_jacobian` (its mode "top"
    is the arg-max pooled pixel). The forward stops right after the layer (later layers are not run).

    ``expected`` (optional ``(description, (H, W))``) makes a feature of another spatial size an error.
    """

    def __init__(self, model: nn.Module, layer: str, window: Window = 0.2, expected: Optional[tuple] = None):
        super().__init__()
        get_layer(model, layer, caller="PooledAttention")
        _kernel(1, window)  # validate early
        self.model, self.layer, self.window, self.expected = model, layer, window, expected
        self.feature_shape: Optional[tuple] = None

    def forward(self, x: Tensor) -> Tensor:
        with capture_features(self.model, self.layer, stop_after=True) as features:
            try:
                self.model(x)
            except StopForward:
                pass
        if self.layer not in features:
            raise RuntimeError(f"fastjac.losses.PooledAttention: layer {self.layer!r} was not called by the forward pass")
        z = features[self.layer]
        if z.dim() != 4:
            raise ValueError(f"fastjac.losses.PooledAttention: layer {self.layer!r} output must be N x C x H x W, got {tuple(z.shape)}")
        self.feature_shape = tuple(z.shape)
        if self.expected is not None and tuple(z.shape[2:]) != tuple(self.expected[1]):
            raise ValueError(
                f"fastjac.losses.attention_jacobian_matching: layer {self.layer!r} has spatial size {tuple(z.shape[2:])} "
                f"but {self.expected[0]} has {tuple(self.expected[1])}; pick layers with the same spatial size"
            )
        return pool_attention(attention_map(z), self.window).flatten(1)


def attention_jacobian_matching(
    student: nn.Module,
    teacher: nn.Module,
    x: Tensor,
    student_layer: str,
    teacher_layer: str,
    *,
    window: Window = 0.2,
    estimator: str = "exact",
    samples: int = 1,
    sigma: float = 1e-3,
    generator: Optional[torch.Generator] = None,
    student_stats: Optional[BatchNormStats] = None,
    teacher_stats: Optional[BatchNormStats] = None,
    eps: float = 1e-12,
    reduction: str = "mean",
) -> Tensor:
    """Attention-Jacobian matching (000 §5.2.1, Table 5, supp. §4.2): Eq. 10 on the input-Jacobians of
    the pooled attention pixel at the teacher's arg-max position.

    Per sample: pool the teacher's attention map of ``teacher_layer`` (:func:`pool_attention`, ``window``),
    take its arg-max position p; the loss is ``|| g_s/||g_s|| - g_t/||g_t|| ||^2`` with ``g`` the input-
    gradient of the pooled attention at p (teacher: no graph; student: ``create_graph=True``, same p, same
    window). Both layers must have the same spatial size. ``estimator`` / ``samples`` / ``sigma`` /
    ``generator`` as in :func:`fastjac.input_jacobian` (the student reuses the teacher's probes; with
    "jvp" / "finite_difference" the normalised loss is only consistent as ``samples`` grows).

    BatchNorm in training mode: pass ``student_stats`` (from :func:`fastjac.record_batch_norm_stats`
    around the step's ordinary student forward) so that this feature pass uses those statistics and
    updates nothing; without it the feature pass is a clean pass that updates the running statistics
    of the layers before ``student_layer`` once. Same for ``teacher_stats``.
    """
    teacher_head = PooledAttention(teacher, teacher_layer, window)
    t = input_jacobian(teacher_head, x, mode="top", estimator=estimator, create_graph=False, samples=samples, sigma=sigma,
                       generator=generator, batch_norm_stats=teacher_stats)
    expected = (f"teacher layer {teacher_layer!r}", teacher_head.feature_shape[2:])
    student_head = PooledAttention(student, student_layer, window, expected=expected)
    s = input_jacobian(student_head, x, t.target, mode="target", estimator=estimator, create_graph=True, samples=samples,
                       sigma=sigma, probes=t.probes, batch_norm_stats=student_stats)
    return jacobian_matching(s.jacobian, t.jacobian, normalize=True, eps=eps, reduction=reduction)
