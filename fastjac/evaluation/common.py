"""Helpers shared by the evaluations: saliency-method and fraction option checks (on top of
:mod:`.option_checks`), the runs and test images an evaluation sees, batched model and saliency calls, and the
curve plot."""
from __future__ import annotations

import inspect
from collections import defaultdict
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..saliency_maps import METHODS, saliency
from . import option_checks as check
from .option_checks import option_error
from .pixel_removal import FILLS
from .registry import Cell, EvalContext

__all__ = ["option_error", "check_methods", "check_fractions", "check_fill",
           "select_cells", "test_images", "batched_logits", "saliency_maps", "plot_curves"]


def _method_option_names(name: str) -> Optional[list[str]]:
    params = inspect.signature(METHODS[name]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return [k for k in params if k not in ("model", "x", "target", "generator")]


def check_methods(evaluation: str, methods: Any, option: str = "methods") -> dict[str, dict]:
    """Saliency methods as ``{name: options}`` from a list of names or a mapping ``name -> options`` (None: no
    options). Unknown names and options a method does not take are errors naming the option."""
    if isinstance(methods, (list, tuple)):
        if not all(isinstance(m, str) for m in methods):
            raise option_error(evaluation, option, f"expected saliency method names, got {methods!r}")
        if len(set(methods)) != len(methods):
            raise option_error(evaluation, option, f"method names repeat: {methods!r}")
        methods = {m: {} for m in methods}
    if not isinstance(methods, dict) or not methods:
        raise option_error(evaluation, option, f"expected a non-empty list of saliency method names or a mapping "
                                               f"name -> options, got {methods!r}")
    out = {}
    for name, opts in methods.items():
        if name not in METHODS:
            raise option_error(evaluation, f"{option}.{name}", f"unknown saliency method {name!r}; expected one of "
                                                               f"{sorted(METHODS)}")
        opts = {} if opts is None else opts
        if not isinstance(opts, dict):
            raise option_error(evaluation, f"{option}.{name}", f"expected a mapping of method options, got {opts!r}")
        allowed = _method_option_names(name)
        unknown = sorted(k for k in opts if allowed is not None and k not in allowed)
        if unknown:
            raise option_error(evaluation, f"{option}.{name}", f"saliency method {name!r} takes no option(s) "
                                                               f"{unknown}; its options: {allowed}")
        out[name] = dict(opts)
    return out


def check_fractions(evaluation: str, fractions: Any, option: str = "fractions") -> list[float]:
    """A non-empty list of distinct fractions in (0, 1), returned sorted."""
    if not isinstance(fractions, list) or not fractions or any(
            isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k < 1 for k in fractions):
        raise option_error(evaluation, option, f"expected a non-empty list of fractions in (0, 1) (0.1 = 10 % of the "
                                               f"pixels), got {fractions!r}")
    if len(set(fractions)) != len(fractions):
        raise option_error(evaluation, option, f"fractions repeat: {fractions!r}")
    return sorted(float(k) for k in fractions)


def check_fill(evaluation: str, fill: str, fill_value: Any) -> None:
    check.choice(evaluation, "fill", fill, FILLS)
    if fill_value is not None and (not isinstance(fill_value, list) or not fill_value or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) for v in fill_value)):
        raise option_error(evaluation, "fill_value", f"expected null or a list of per-channel values in [0, 1] "
                                                     f"units, got {fill_value!r}")


def select_cells(ctx: EvalContext, evaluation: str, runs: Optional[list], option: str = "runs") -> list[Cell]:
    """The experiment's runs named in ``runs`` (sweep method names; None or empty: every run), in config order;
    errors name ``evaluations.<evaluation>.<option>``."""
    if not runs:
        if runs is not None and not isinstance(runs, list):
            raise option_error(evaluation, option, f"expected null or a list of method names, got {runs!r}")
        return list(ctx.cells)
    if not isinstance(runs, list) or not all(isinstance(r, str) for r in runs):
        raise option_error(evaluation, option, f"expected null or a list of the experiment's method names, "
                                               f"got {runs!r}")
    known = [c.method for c in ctx.cells]
    missing = [r for r in runs if r not in known]
    if missing:
        raise option_error(evaluation, option, f"no trained run(s) of {missing} in this experiment; methods: "
                                               f"{sorted(set(known))}")
    return [c for c in ctx.cells if c.method in runs]


def test_images(ctx: EvalContext, cell: Cell, limit: Optional[int]) -> tuple[Tensor, Tensor]:
    """The first ``limit`` test images of the run (after its ``data.test_limit``), in [0, 1], and their labels.
    Only the test split is read."""
    from ..training.trainer import load_split

    test = load_split(cell.config, "test", ctx.data_root)
    if limit is not None:
        test = test.subset(range(min(limit, len(test))))
    return test.float_images(), test.labels


@torch.no_grad()
def batched_logits(model: nn.Module, x: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """``model(x)`` in chunks of ``batch_size`` on ``device``; returns CPU float logits."""
    outs = [model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def saliency_maps(model: nn.Module, x: Tensor, target: Tensor, method: str, options: dict, seed: int,
                  batch_size: int, device: torch.device) -> Tensor:
    """``fastjac.saliency`` of ``x`` (moved to ``device`` whole, processed in ``batch_size`` chunks, so that the
    maps of random methods come from one generator and do not depend on ``batch_size``); CPU maps ``(N, H, W)``."""
    return saliency(model, x.to(device), target.to(device), method=method, seed=seed, batch_size=batch_size,
                    **options).float().cpu()


def plot_curves(rows: list[dict], png: str, x: str, y: str, yerr: Optional[str], label: tuple[str, ...],
                xlabel: str, ylabel: str, title: str, logx: bool = False) -> None:
    """One line (with error bars ``yerr`` when given) per distinct value of the ``label`` columns, ``y`` vs ``x``."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[" / ".join(str(row[k]) for k in label)].append(row)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, items in groups.items():
        items = sorted(items, key=lambda r: float(r[x]))
        xs = [float(r[x]) for r in items]
        ys = [float(r[y]) for r in items]
        errs = [float(r[yerr]) for r in items] if yerr else None
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=name)
    if logx:  # ticks at the measured k, labelled plainly (0.1, 1, 10 rather than 10^-1 ...)
        ticks = sorted({float(r[x]) for r in rows if float(r[x]) > 0})
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
