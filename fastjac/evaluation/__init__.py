"""Evaluations of saliency maps and of trained models (thesis §3.5, §5.5, §5.7), reachable from configs.

See :mod:`fastjac.evaluation.registry` for how an evaluation is declared and run. Registered here: E6's
``pixel_perturbation`` (§3.5.1), ``roar`` (§3.5.2) and ``discriminative_pixel_perturbation`` (§5.5.2), built on
:mod:`fastjac.evaluation.pixel_removal`.
"""
from .registry import EVALUATIONS, Cell, EvalContext, register, run_evaluations, write_table  # noqa: F401
from . import pixel_removal  # noqa: F401
from . import pixel_perturbation, roar, discriminative_pixel_perturbation  # noqa: F401,E402  (register)
