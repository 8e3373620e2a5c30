"""Evaluations of saliency maps and of trained models (thesis §3.5, §5.5, §5.7), reachable from configs.

See :mod:`fastjac.evaluation.registry` for how an evaluation is declared and run.
"""
from .registry import EVALUATIONS, Cell, EvalContext, register, run_evaluations, write_table  # noqa: F401
from . import denoising, density_ratio, gan_test, gradient_fooling  # noqa: E402,F401  (register the E7 evaluations)
