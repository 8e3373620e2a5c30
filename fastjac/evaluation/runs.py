"""Which trained runs and which test inputs an evaluation uses (shared by the E7 evaluations)."""
from __future__ import annotations

from torch import Tensor

from ..training.config import ConfigError
from .registry import Cell, EvalContext


def selected_cells(ctx: EvalContext, methods: list, evaluation: str) -> list[Cell]:
    """The experiment's runs of ``methods`` (empty: all runs, in sweep order); an unknown method is a
    ConfigError naming ``evaluations.<evaluation>.methods``."""
    known = [c.method for c in ctx.cells]
    bad = [m for m in methods if m not in known]
    if bad:
        raise ConfigError(f"evaluations.{evaluation}.methods: no trained run of {bad}; methods: {sorted(set(known))}")
    return [c for c in ctx.cells if not methods or c.method in methods]


def eval_inputs(ctx: EvalContext, cell: Cell, images: int) -> tuple[Tensor, Tensor]:
    """The first ``images`` test images of the run, normalised as the network's input, on the device, and their
    labels."""
    data = ctx.data(cell)
    x = ctx.normalize(data.test_x[:images], cell).to(ctx.device)
    return x, data.test_y[:images].to(ctx.device)
