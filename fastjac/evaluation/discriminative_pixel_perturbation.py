"""Discriminative pixel perturbation (thesis §5.5.2, Fig. 5.3; §5.4.2): replace the k % *least* relevant pixels,
by a model's input-gradient, with the image's mean and report classification accuracy; higher is better.

Two settings, for every evaluated run M (a sweep method, e.g. baseline / score-matching / ...):

- ``own`` (Fig. 5.3a): pixels chosen by M's gradients, accuracy of M;
- ``fixed`` (Fig. 5.3b): pixels chosen by M's gradients, accuracy of one fixed model (``fixed_method``, default
  the ``baseline`` run), which separates the quality of M's gradients from M's robustness.

Relevance is ``fastjac.saliency(M, x, method=gradient_method)`` (default ``input_gradient``, Σ_c |∇ₓf|) for
M's own top class; the fill is each image's per-channel mean (before removal), in the normalised input space
(the same as in [0, 1] space: normalisation is affine). Rows also hold the unperturbed accuracy (k = 0).

Choices the thesis does not fix: the gradient's class (M's predicted class; ``target: label`` uses the true
class), the k values (default 10 % ... 90 % in steps of 10), the number of images (default all test images
after ``data.test_limit``), and when M has several seeds the fixed model is the fixed method's run of the same
seed if there is one, else its first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from . import common
from . import option_checks as check
from .pixel_removal import remove_pixels
from .registry import Cell, EvalContext, register

NAME = "discriminative_pixel_perturbation"
SETTINGS = ("own", "fixed")
TARGETS = ("predicted", "label")


@dataclass
class DiscriminativePixelPerturbationOptions:
    fractions: list = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    images: Optional[int] = None        # first N test images (null: all loaded)
    gradient_method: str = "input_gradient"
    gradient_options: dict = field(default_factory=dict)
    settings: list = field(default_factory=lambda: ["own", "fixed"])
    fixed_method: str = "baseline"      # the sweep method whose model is evaluated in the "fixed" setting
    target: str = "predicted"           # predicted | label: the class whose gradient ranks the pixels
    batch_size: int = 100
    seed: int = 0
    runs: Optional[list] = None         # sweep method names whose gradients are evaluated (null: every run)

    def __post_init__(self):
        self.fractions = common.check_fractions(NAME, self.fractions)
        check.positive_int(NAME, "images", self.images, allow_none=True)
        if not isinstance(self.gradient_method, str):
            raise common.option_error(NAME, "gradient_method", f"expected a saliency method name, got "
                                                               f"{self.gradient_method!r}")
        methods = common.check_methods(NAME, {self.gradient_method: self.gradient_options}, "gradient_method")
        self.gradient_options = methods[self.gradient_method]
        if not isinstance(self.settings, list) or not self.settings or any(s not in SETTINGS for s in self.settings):
            raise common.option_error(NAME, "settings", f"expected a non-empty list of {list(SETTINGS)}, "
                                                        f"got {self.settings!r}")
        if not isinstance(self.fixed_method, str):
            raise common.option_error(NAME, "fixed_method", f"expected a sweep method name, got {self.fixed_method!r}")
        check.choice(NAME, "target", self.target, TARGETS)
        check.positive_int(NAME, "batch_size", self.batch_size)


def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Top-1 accuracy (%) of ``model`` on normalised images ``x``."""
    return 100.0 * float((common.batched_logits(model, x, batch_size, device).argmax(1) == y).float().mean())


def _fixed_cell(ctx: EvalContext, options, cell: Cell) -> Cell:
    fixed = [c for c in ctx.cells if c.method == options.fixed_method]
    if not fixed:
        raise common.option_error(NAME, "fixed_method", f"no run of method {options.fixed_method!r} in this "
                                                        f"experiment; runs: {sorted({c.method for c in ctx.cells})}")
    return next((c for c in fixed if c.seed == cell.seed), fixed[0])


def plot(rows: list[dict], png: str) -> None:
    """Accuracy vs k, one curve per setting and gradient source (Fig. 5.3a/b in one plot)."""
    label = ("setting", "gradients_of") + (("seed",) if len({r["seed"] for r in rows}) > 1 else ())
    common.plot_curves(rows, png, "k_percent", "accuracy", None, label,
                       "% pixels replaced by the image mean (least relevant)", "accuracy (%)",
                       "Discriminative pixel perturbation (higher is better)")


@register(NAME, DiscriminativePixelPerturbationOptions, plot=plot)
def discriminative_pixel_perturbation(ctx: EvalContext, options: DiscriminativePixelPerturbationOptions) -> list[dict]:
    """Thesis §5.5.2: rows ``{setting, gradients_of, evaluated_on, seed, fraction, k_percent, accuracy}``."""
    rows = []
    models: dict[str, Any] = {}

    def model_of(c: Cell):
        if c.run_dir not in models:
            models[c.run_dir] = ctx.model(c)
        return models[c.run_dir]

    for cell in common.select_cells(ctx, NAME, options.runs):
        images, labels = common.test_images(ctx, cell, options.images)
        x = ctx.normalize(images, cell)
        model = model_of(cell)
        evaluated = {"own": cell} if "own" in options.settings else {}
        if "fixed" in options.settings:
            evaluated["fixed"] = _fixed_cell(ctx, options, cell)
        if options.target == "predicted":
            target = common.batched_logits(model, x, options.batch_size, ctx.device).argmax(1)
        else:
            target = labels
        maps = common.saliency_maps(model, x, target, options.gradient_method, options.gradient_options,
                                    options.seed, options.batch_size, ctx.device)
        for setting, judge in evaluated.items():
            judge_model = model_of(judge)
            for k in [0.0] + options.fractions:
                xk = x if k == 0 else remove_pixels(x, maps, k, "least", "image_mean")
                rows.append({"setting": setting, "gradients_of": cell.method, "evaluated_on": judge.method,
                             "seed": cell.seed, "fraction": k, "k_percent": 100 * k,
                             "accuracy": accuracy(judge_model, xk, labels, options.batch_size, ctx.device),
                             "images": len(x)})
    return rows
