"""Jacobian-based training losses.

- Seed 000: activation and Jacobian matching (Prop. 1, Eq. 2, Eq. 10), Jacobian-norm penalties (Prop. 2, Eq. 3),
  intermediate features by layer name, attention maps and attention matching (Eq. 8-9), attention-Jacobian
  matching (§5.2.1, Table 5).
- Seed 001 / thesis Ch. 4: bias-Jacobian (full-Jacobian) matching (thesis Eq. 4.3) and the bias-Jacobian norm
  regulariser (001 Prop. 3), on :func:`fastjac.full_jacobian` results.
- Thesis Ch. 5: score matching of a classifier's implicit density (Eq. 5.4), anti-score-matching and the
  gradient-norm regulariser, with :func:`fastjac.hessian_trace`.

Reduction convention (every loss): the per-sample sum over all non-batch dimensions, then the batch mean
(``reduction="mean"``, default), ``"sum"`` or ``"none"`` (N values).
"""
from .attention import PooledAttention, attention_jacobian_matching, attention_map, attention_matching, pool_attention
from .bias_jacobian import bias_jacobian_map, bias_jacobian_matching, bias_jacobian_norm
from .features import LayerNotFoundError, StopForward, capture_features, get_layer
from .score_matching import (
    AntiScoreMatchingLoss,
    GradientNormLoss,
    ScoreMatchingLoss,
    ScoreTerms,
    anti_score_matching,
    gradient_norm,
    score_matching,
)
from .matching import (
    activation_matching,
    jacobian_matching,
    jacobian_norm,
    jacobian_norm_penalty,
    soft_cross_entropy,
)

__all__ = [
    "AntiScoreMatchingLoss", "GradientNormLoss", "ScoreMatchingLoss", "ScoreTerms",
    "anti_score_matching", "gradient_norm", "score_matching",
    "LayerNotFoundError", "PooledAttention", "StopForward",
    "activation_matching", "attention_jacobian_matching", "attention_map", "attention_matching",
    "bias_jacobian_map", "bias_jacobian_matching", "bias_jacobian_norm", "capture_features",
    "get_layer", "jacobian_matching", "jacobian_norm", "jacobian_norm_penalty", "pool_attention", "soft_cross_entropy",
]
