"""Evaluations of saliency maps and of trained models (thesis §3.5, §5.5, §5.7), reachable from configs.

See :mod:`fastjac.evaluation.registry` for how an evaluation is declared and run. Registered here: E6's
``pixel_perturbation`` (§3.5.1), ``roar`` (§3.5.2) and ``discriminative_pixel_perturbation`` (§5.5.2), built on
:mod:`fastjac.evaluation.pixel_removal`; E7's ``density_ratio`` (§5.5.1), ``gan_test`` (Table 5.1, samples from
:mod:`fastjac.evaluation.sampling`), ``denoising`` (appendix §5.10) and ``gradient_fooling`` (§5.7.2, Eq. 5.7).
"""
from .registry import EVALUATIONS, Cell, EvalContext, register, run_evaluations, write_table  # noqa: F401
from . import pixel_removal  # noqa: F401
from . import pixel_perturbation, roar, discriminative_pixel_perturbation  # noqa: F401,E402  (register E6's)
from . import denoising, density_ratio, gan_test, gradient_fooling  # noqa: E402,F401  (register the E7 evaluations)
