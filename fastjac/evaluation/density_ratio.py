"""Density-ratio profiles of the implicit density model (thesis §5.5.1, Fig. 5.1): evaluation ``density_ratio``.

With ``log p(x | y = i) = f_i(x) − log Z_i`` (thesis §5.3), the log density ratio of a perturbed input is
``log p(x + η | i) / p(x | i) = f_i(x + η) − f_i(x)``: no normaliser needed. For Gaussian noise
``η ~ N(0, σ² I)`` of several standard deviations σ it traces local cross-sections of the density along random
directions, averaged over test points. A well-aligned density model gives noisy inputs lower density than clean
data (negative ratios, "lower is better" in Fig. 5.1); the thesis reports positive ratios for the baseline,
steeper ones for anti-score-matching.

Choices the thesis leaves open: i is the test image's label; the noise is added in the network's input space
(normalised images, the space of the score-matching noise σ = 0.01 of Eq. 5.4), without clamping; the model is
in eval mode; each noise direction z (η = σ z) is shared by all σ and all models (common random numbers: the
curves of different models differ by the models only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from . import option_checks as check
from .model_outputs import check_classes, class_logits, eval_mode
from .runs import eval_inputs, selected_cells
from .registry import EvalContext, register

NAME = "density_ratio"


def density_ratios(model: nn.Module, x: Tensor, classes: Tensor, stds: list, draws: int = 1, seed: int = 0,
                   batch_size: Optional[int] = None) -> Tensor:
    """``f_i(x + σ z) − f_i(x)`` for every σ in ``stds``, image and draw: ``(len(stds), N, draws)`` (thesis
    §5.5.1). ``z ~ N(0, I)`` of ``x``'s shape, one per (draw, image), drawn from a CPU generator seeded with
    ``seed`` (draw by draw, all images at once: independent of ``batch_size``) and shared by all σ."""
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor (N, ...), got {getattr(x, 'shape', type(x).__name__)}")
    classes = check_classes(classes, x.shape[0])
    if not isinstance(stds, (list, tuple)) or not stds or any(not isinstance(s, (int, float)) or s < 0 for s in stds):
        raise ValueError(f"stds: expected a non-empty list of noise standard deviations >= 0, got {stds!r}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws: expected a positive integer, got {draws!r}")
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(len(stds), x.shape[0], draws, dtype=x.dtype)
    with eval_mode(model):
        clean = class_logits(model, x, classes, batch_size).cpu()
        for d in range(draws):
            z = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
            for s, std in enumerate(stds):
                out[s, :, d] = class_logits(model, x + std * z, classes, batch_size).cpu() - clean
    return out


@dataclass
class DensityRatioOptions:
    """Options of ``density_ratio``: noise standard deviations (in normalised-input units; the thesis' axis is
    not given, we span 1e-3 .. 1 around the training σ = 0.01), test images (the first ``images``), noise draws per
    image, seed, forward batch size, and the sweep methods to evaluate (empty: all)."""

    stds: list = field(default_factory=lambda: [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0])
    images: int = 1000
    draws: int = 4
    seed: int = 0
    batch_size: int = 500
    methods: list = field(default_factory=list)

    def __post_init__(self):
        check.positive_list(NAME, "stds", self.stds)
        check.positive(NAME, "images", self.images)
        check.positive(NAME, "draws", self.draws)
        check.positive(NAME, "batch_size", self.batch_size)
        check.string_list(NAME, "methods", self.methods)


def plot_density_ratios(rows: list[dict], path: str) -> None:
    """Mean log density ratio against σ (log-x) per method, interquartile band shaded (thesis Fig. 5.1); the y axis
    is symmetric-log when the means exceed 100 in magnitude."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key in dict.fromkeys((r["method"], r["seed"]) for r in rows):
        mine = sorted((r for r in rows if (r["method"], r["seed"]) == key), key=lambda r: float(r["std"]))
        stds = [float(r["std"]) for r in mine]
        label = key[0] if len({r["seed"] for r in rows}) == 1 else f"{key[0]} (seed {key[1]})"
        line, = ax.plot(stds, [float(r["mean"]) for r in mine], marker="o", label=label)
        ax.fill_between(stds, [float(r["q25"]) for r in mine], [float(r["q75"]) for r in mine],
                        color=line.get_color(), alpha=0.15)
    ax.axhline(0, color="k", lw=0.6)
    if max(abs(float(r["mean"])) for r in rows) > 100:  # orders of magnitude between models: symmetric log axis
        ax.set_yscale("symlog", linthresh=1.0)
    ax.set(xscale="log", xlabel="noise std σ (normalised input units)",
           ylabel="log density ratio  f_i(x+η) − f_i(x)", title="density ratios (lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@register(NAME, DensityRatioOptions, plot=plot_density_ratios)
def evaluate_density_ratio(ctx: EvalContext, options: DensityRatioOptions) -> list[dict]:
    """One row per (run, σ): mean, std, quartiles of ``f_i(x+η) − f_i(x)`` over images and draws."""
    rows = []
    for cell in selected_cells(ctx, options.methods, NAME):
        model = ctx.model(cell)
        x, y = eval_inputs(ctx, cell, options.images)
        ratios = density_ratios(model, x, y, options.stds, options.draws, options.seed, options.batch_size)
        for std, r in zip(options.stds, ratios.flatten(1).double()):
            rows.append({"method": cell.method, "seed": cell.seed, "std": std, "mean": float(r.mean()),
                         "std_dev": float(r.std()) if r.numel() > 1 else 0.0,
                         "q25": float(r.quantile(0.25)), "median": float(r.median()), "q75": float(r.quantile(0.75)),
                         "images": x.shape[0], "draws": options.draws})
        mine = rows[-len(options.stds):]
        ctx.log(f"  {NAME} {cell.method}: " + ", ".join(f"σ={r['std']}: {r['mean']:.3g}" for r in mine))
    return rows
