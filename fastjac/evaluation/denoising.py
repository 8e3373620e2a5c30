"""'Denoising' with the implicit density model (thesis appendix §5.10, Fig. 5.8): evaluation ``denoising``.

Test images plus Gaussian noise (σ = 0.1, thesis) are moved by the sampler of :func:`.sampling.denoise` (gradient
ascent on the label's logit, Fig. 5.8's caption; or Langevin dynamics, §5.10's text) towards the modes of the
implicit density ``p(x | y = i)``; "the modes of an ideal generative model lie near clean, un-noised data". The
thesis shows the images only; we also measure how far the result lies from the clean image (mean squared error
per pixel, in [0, 1] image units) before and after, the class logits, and the model's accuracy on the noisy and
the denoised images. A PNG per run shows clean / noisy / denoised rows.

Choices the thesis does not fix: the noise is added in the network's input space (normalised units, as in
:mod:`.density_ratio`), the result is clamped to the valid image range, the sampler settings are options.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from . import option_checks as check
from . import sampling
from .gan_test import SAMPLERS, gan_test_accuracy
from .images import denormalize, file_stem, save_grid, valid_range
from .model_outputs import class_logits
from .registry import EvalContext, register
from .runs import eval_inputs, selected_cells

NAME = "denoising"


@dataclass
class DenoisingOptions:
    """Options of ``denoising``: noise std (thesis 0.1), sampler (``ascent`` / ``langevin``), steps, step size
    (α, with ``normalize`` as in ``gan_test``; ε for Langevin), Langevin noise multiplier, test images, seed,
    batch size, runs (``methods``, empty: all), images shown in the PNG."""

    noise_std: float = 0.1
    sampler: str = "ascent"
    steps: int = 100
    step_size: float = 0.01
    normalize: bool = True
    noise: float = 1.0
    images: int = 500
    seed: int = 0
    batch_size: int = 250
    methods: list = field(default_factory=list)
    grid_images: int = 8

    def __post_init__(self):
        check.positive(NAME, "noise_std", self.noise_std)
        check.choice(NAME, "sampler", self.sampler, SAMPLERS)
        check.positive(NAME, "steps", self.steps)
        check.positive(NAME, "step_size", self.step_size)
        check.non_negative(NAME, "noise", self.noise)
        check.positive(NAME, "images", self.images)
        check.positive(NAME, "batch_size", self.batch_size)
        check.string_list(NAME, "methods", self.methods)
        check.positive(NAME, "grid_images", self.grid_images)


def plot_denoising(rows: list[dict], path: str) -> None:
    """Bars: distance to the clean images of the noisy and of the denoised images, per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 1.5), 4))
    pos = list(range(len(rows)))
    ax.bar([p - 0.2 for p in pos], [float(r["mse_noisy"]) for r in rows], 0.4, label="noisy")
    ax.bar([p + 0.2 for p in pos], [float(r["mse_denoised"]) for r in rows], 0.4, label="denoised")
    ax.set_xticks(pos)
    ax.set_xticklabels([r["method"] for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="mean squared error to the clean image", title=f"denoising (σ = {rows[0]['noise_std']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@register(NAME, DenoisingOptions, plot=plot_denoising)
def evaluate_denoising(ctx: EvalContext, options: DenoisingOptions) -> list[dict]:
    """One row per run: distance to the clean image, mean label logit and accuracy, noisy vs denoised."""
    rows = []
    for cell in selected_cells(ctx, options.methods, NAME):
        model = ctx.model(cell)
        for p in model.parameters():
            p.requires_grad_(False)
        x, y = eval_inputs(ctx, cell, options.images)
        dataset = cell.config.data.dataset
        low, high = (t.to(x.device) for t in valid_range(dataset, x.shape[1]))
        start, result = sampling.denoise(model, x, y, options.noise_std, options.sampler, options.steps,
                                         options.step_size, noise=options.noise, normalize=options.normalize,
                                         low=low, high=high, seed=options.seed, batch_size=options.batch_size)
        clean_img, noisy_img, out_img = (denormalize(t, dataset) for t in (x, start, result.samples))
        row = {"method": cell.method, "seed": cell.seed, "noise_std": options.noise_std, "sampler": options.sampler,
               "images": len(y),
               "mse_noisy": float((noisy_img - clean_img).pow(2).mean()),
               "mse_denoised": float((out_img - clean_img).pow(2).mean()),
               "logit_clean": float(class_logits(model, x, y, options.batch_size).mean()),
               "logit_noisy": float(result.logits[0].mean()), "logit_denoised": float(result.logits[-1].mean()),
               "acc_noisy": gan_test_accuracy(model, start, y, options.batch_size),
               "acc_denoised": gan_test_accuracy(model, result.samples, y, options.batch_size)}
        rows.append(row)
        ctx.log(f"  {NAME} {cell.method}: MSE to clean {row['mse_noisy']:.4g} -> {row['mse_denoised']:.4g}")
        k = min(options.grid_images, len(y))
        grid = torch.stack([clean_img[:k], noisy_img[:k], out_img[:k]]).cpu()
        name = f"samples_{file_stem(cell.method)}_seed{cell.seed}.png"
        save_grid(grid, os.path.join(ctx.folder(NAME), name), ["clean", f"+ noise {options.noise_std}", "denoised"],
                  title=f"{cell.method}: {options.sampler}")
    return rows
