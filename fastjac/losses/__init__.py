"""Jacobian-based training losses.

Bias-Jacobian (full-Jacobian) losses, computed on :func:`fastjac.full_jacobian` results: matching
(thesis Eq. 4.3) and the norm regulariser (seed 001 Prop. 3).
"""
from .bias_jacobian import bias_jacobian_map, bias_jacobian_matching, bias_jacobian_norm

__all__ = ["bias_jacobian_map", "bias_jacobian_matching", "bias_jacobian_norm"]
