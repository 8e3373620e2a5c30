"""Gradient fooling with a fixed mask (thesis appendix §5.7.2, Eq. 5.7, Fig. 5.5): evaluation ``gradient_fooling``.

Each selected trained run is fine-tuned with ``CE + λ · L_fool`` (:func:`.fooling.fine_tune`, Eq. 5.7) towards a
fixed square mask; then, for the original and the fine-tuned model, on test images: accuracy, and the fraction of
gradient energy inside the mask ``Σ_mask |g|² / Σ |g|²`` (and the ``Σ|g|`` share of Eq. 5.7's map) for
logit-gradients ``∇ₓ f_i`` (fooled in the thesis: 83.85 % vs 22 % of the area), loss-gradients ``∇ₓ CE``
(T = 1: not fooled, thesis) and loss-gradients at softmax temperature T (1000: partly fooled, 60.17 %).
``i`` is the test label. The fine-tuned weights are saved next to the table (``fooled_<method>_seed<s>.pt``), and
the gradient maps in the layout of Fig. 5.5 (``maps_<method>_seed<s>.png``).

The thesis fine-tunes a pretrained VGG-11 on CIFAR-100 and gives neither λ, the learning rate nor the number of
epochs; ours are options (defaults measured on digits, see the configs).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch

from . import fooling
from . import option_checks as check
from .images import file_stem, save_grid
from .registry import EvalContext, register
from .runs import eval_inputs, selected_cells

NAME = "gradient_fooling"
KINDS = (("logit", "logit", 1.0), ("loss", "loss", 1.0), ("loss_T", "loss", None))  # (column, kind, temperature)


@dataclass
class GradientFoolingOptions:
    """Options of ``gradient_fooling``: the mask (top-left corner ``mask_top`` / ``mask_left`` and side
    ``mask_size`` as fractions of the image; default the thesis' 15 × 15 top-left square of a 32 × 32 image),
    the fooling weight λ, fine-tuning epochs / lr / optimizer / BatchNorm mode (``train``, or ``eval``: running
    statistics used and kept, see :func:`.fooling.fine_tune`) / batch size / number of training images
    (0: the run's whole training set, else a seeded random subset), ``images`` test images for the report,
    the temperature of the second loss-gradient, seed, and the runs to fine-tune (``methods``, empty: all)."""

    mask_top: float = 0.0
    mask_left: float = 0.0
    mask_size: float = 15 / 32
    weight: float = 1000.0
    epochs: int = 2
    lr: float = 1e-4
    optimizer: str = "adam"
    batch_norm: str = "train"
    batch_size: int = 128
    train_images: int = 0
    images: int = 1000
    temperature: float = 1000.0
    seed: int = 0
    methods: list = field(default_factory=list)

    def __post_init__(self):
        check.fraction(NAME, "mask_top", self.mask_top, high_open=True)
        check.fraction(NAME, "mask_left", self.mask_left, high_open=True)
        check.fraction(NAME, "mask_size", self.mask_size, low_open=True)
        check.non_negative(NAME, "weight", self.weight)
        check.positive(NAME, "epochs", self.epochs)
        check.positive(NAME, "lr", self.lr)
        check.choice(NAME, "optimizer", self.optimizer, ("adam", "sgd"))
        check.choice(NAME, "batch_norm", self.batch_norm, ("train", "eval"))
        check.positive(NAME, "batch_size", self.batch_size)
        check.non_negative(NAME, "train_images", self.train_images)
        check.positive(NAME, "images", self.images)
        check.positive(NAME, "temperature", self.temperature)
        check.string_list(NAME, "methods", self.methods)


@torch.no_grad()
def _accuracy(model, x, y, batch_size: int) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    return 100.0 * correct / max(len(y), 1)


def measure(model, x, y, mask, temperature: float, batch_size: int) -> dict:
    """Accuracy and in-mask fractions (mean over images) of logit-, loss- and temperature-T loss-gradients."""
    out = {"test_acc": _accuracy(model, x, y, batch_size)}
    for column, kind, temp in KINDS:
        g = fooling.input_gradients(model, x, y, kind, temp or temperature, batch_size)
        out[f"{column}_energy_in_mask"] = float(fooling.mask_fraction(g, mask, 2.0).nanmean())
        out[f"{column}_abs_in_mask"] = float(fooling.mask_fraction(g, mask, 1.0).nanmean())
        if kind == "logit":
            out["fool_loss"] = float(fooling.fooling_loss(g, mask))
    return out


def plot_gradient_fooling(rows: list[dict], path: str) -> None:
    """Grouped bars: in-mask energy fraction of each gradient kind, original vs fooled, per run; the mask's
    area fraction (what uniform gradients would give) as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c, _, _ in KINDS]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(rows) + 1), 4))
    width = 0.8 / len(columns)
    for j, column in enumerate(columns):
        ax.bar([i + j * width for i in range(len(rows))], [100 * float(r[f"{column}_energy_in_mask"]) for r in rows],
               width, label=column.replace("loss_T", f"loss (T={rows[0]['temperature']})"))
    ax.axhline(100 * float(rows[0]["mask_area"]), color="k", ls="--", lw=0.8, label="mask area")
    ax.set_xticks([i + width * (len(columns) - 1) / 2 for i in range(len(rows))])
    ax.set_xticklabels([f"{r['method']}\n{r['model']}" for r in rows], fontsize=7)
    ax.set(ylabel="gradient energy inside the mask (%)", ylim=(0, 100), title="gradient fooling (Eq. 5.7)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_gradient_maps(original, fooled, x, y, mask, temperature: float, path: str, k: int = 6) -> str:
    """PNG in the layout of thesis Fig. 5.5: the mask, then Eq. 5.7's unsigned maps of the first ``k`` images:
    logit-gradients of the original and the fooled model, and the fooled model's loss-gradients at T = 1 and T
    (each map scaled to its maximum)."""
    x, y = x[:k], y[:k]
    rows = [("original logit", original, "logit", 1.0), ("fooled logit", fooled, "logit", 1.0),
            ("fooled loss", fooled, "loss", 1.0), (f"fooled loss T={temperature:g}", fooled, "loss", temperature)]
    maps = [mask.float().expand(len(y), *mask.shape)]
    for _, model, kind, temp in rows:
        s = fooling.unsigned_saliency(fooling.input_gradients(model, x, y, kind, temp)).cpu()
        maps.append(s / s.flatten(1).amax(1).clamp_min(1e-30).view(-1, 1, 1))
    grid = torch.stack(maps)[:, :, None]  # (rows, k, 1, H, W)
    return save_grid(grid, path, ["mask"] + [r[0] for r in rows], title="gradient fooling (thesis Fig. 5.5)")


@register(NAME, GradientFoolingOptions, plot=plot_gradient_fooling)
def evaluate_gradient_fooling(ctx: EvalContext, options: GradientFoolingOptions) -> list[dict]:
    """Two rows per run (``model`` = original / fooled): accuracy, in-mask gradient fractions, L_fool, and the
    last fine-tuning epoch's losses."""
    rows = []
    folder = ctx.folder(NAME)
    for cell in selected_cells(ctx, options.methods, NAME):
        model = ctx.model(cell)
        data = ctx.data(cell)
        x, y = eval_inputs(ctx, cell, options.images)
        mask = fooling.square_mask(x.shape[-2], x.shape[-1], options.mask_top, options.mask_left, options.mask_size)
        base = {"method": cell.method, "seed": cell.seed, "weight": options.weight, "temperature": options.temperature,
                "mask_area": float(mask.float().mean())}
        rows.append({**base, "model": "original", **measure(model, x, y, mask, options.temperature,
                                                           cell.config.data.eval_batch_size)})
        fooled = copy.deepcopy(model)
        keep = torch.arange(len(data.train_y))
        if options.train_images and options.train_images < len(keep):  # a seeded random subset
            keep = torch.randperm(len(keep), generator=torch.Generator().manual_seed(options.seed))[:options.train_images]
        history = fooling.fine_tune(fooled, data.train_x[keep], data.train_y[keep], mask, options.weight,
                                    options.epochs, options.lr, options.batch_size, options.seed,
                                    dataset=cell.config.data.dataset, augment=cell.config.data.augment,
                                    optimizer=options.optimizer, batch_norm=options.batch_norm,
                                    log=ctx.log if ctx.progress else None)
        torch.save(fooled.state_dict(), os.path.join(folder, f"fooled_{file_stem(cell.method)}_seed{cell.seed}.pt"))
        save_gradient_maps(model, fooled, x, y, mask, options.temperature,
                           os.path.join(folder, f"maps_{file_stem(cell.method)}_seed{cell.seed}.png"))
        last = history[-1] if history else {}
        rows.append({**base, "model": "fooled", **measure(fooled, x, y, mask, options.temperature,
                                                         cell.config.data.eval_batch_size),
                     "train_ce": last.get("ce"), "train_fool_loss": last.get("fool")})
        ctx.log(f"  {NAME} {cell.method}: logit-gradient energy in mask {100 * rows[-2]['logit_energy_in_mask']:.1f} % "
                f"-> {100 * rows[-1]['logit_energy_in_mask']:.1f} %, accuracy {rows[-2]['test_acc']:.2f} -> "
                f"{rows[-1]['test_acc']:.2f} %")
    return rows
