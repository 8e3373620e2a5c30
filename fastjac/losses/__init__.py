"""Jacobian- and Hessian-based training losses.

Score matching of a classifier's implicit density (thesis Ch. 5): :class:`ScoreMatchingLoss` (Eq. 5.4),
:class:`AntiScoreMatchingLoss`, :class:`GradientNormLoss`, and their objectives as functions of per-sample terms.
"""
from .score_matching import (
    AntiScoreMatchingLoss,
    GradientNormLoss,
    ScoreMatchingLoss,
    ScoreTerms,
    anti_score_matching,
    gradient_norm,
    score_matching,
)

__all__ = [
    "AntiScoreMatchingLoss", "GradientNormLoss", "ScoreMatchingLoss", "ScoreTerms",
    "anti_score_matching", "gradient_norm", "score_matching",
]
