"""Which trained runs and which test inputs an evaluation uses, in the form the E7 evaluations take them."""
from __future__ import annotations

from torch import Tensor

from .common import select_cells, test_images
from .registry import Cell, EvalContext


def selected_cells(ctx: EvalContext, methods: list, evaluation: str) -> list[Cell]:
    """The experiment's runs of ``methods`` (empty: all runs, in sweep order); an unknown method is a
    ConfigError naming ``evaluations.<evaluation>.methods``."""
    return select_cells(ctx, evaluation, methods, option="methods")


def eval_inputs(ctx: EvalContext, cell: Cell, images: int) -> tuple[Tensor, Tensor]:
    """The first ``images`` test images of the run, normalised as the network's input, on the device, and their
    labels (only the test split is read)."""
    x, y = test_images(ctx, cell, images)
    return ctx.normalize(x, cell).to(ctx.device), y.to(ctx.device)
