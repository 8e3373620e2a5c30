"""Pixel perturbation (thesis §3.5.1, Fig. 3.2a): remove the k % *least* salient pixels and measure how much
the output of the originally most confident class changes; lower is better.

For each evaluated run, saliency method and fraction k, over the first ``images`` test images:

    change(x) = |f_c(x') − f_c(x)| / |f_c(x)|,   c = argmax f(x),

x' = x with the ``round(k·H·W)`` least salient pixels (all channels) set to black (:mod:`.pixel_removal`),
reported as the mean and the (population, ddof 0) standard deviation over images. Saliency maps are computed
once per method for class c and reused for every k.

Choices the thesis does not fix (stated here and in the E6 configs):

- ``f`` is the **logit** by default (``output: logit``): the thesis measures "the neural network function
  output", and in Ch. 3 f is the pre-softmax output that the full-gradient decomposes (§5.4.2 also describes
  this test "when logits are used"); ``output: softmax`` measures the probability instead.
- Black = ``normalise(0)``, a black pixel in the network's normalised input space; ``fill: image_mean`` and
  ``fill: dataset_mean`` (``fill_value`` per channel in [0, 1] units, default the dataset's normalisation mean,
  i.e. 0 after normalisation) are alternatives.
- k: the thesis lists no values (Fig. 3.2a's axis spans 0.1 % to 10 %, log scale); default
  0.1, 0.5, 1, 5, 10 %.
- Number of images: not given; ``images`` (default 1000) first test images in the loader's order (ImageNet:
  the seeded class-balanced order of ``data.test_limit``, one image per class for 1000).
- Random baseline: the ``random`` saliency method (uniform maps from ``seed``), one draw per image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from . import common
from . import option_checks as check
from .pixel_removal import black_pixel, remove_pixels
from .registry import EvalContext, register
from ..training import data as data_io

NAME = "pixel_perturbation"
OUTPUTS = ("logit", "softmax")


@dataclass
class PixelPerturbationOptions:
    methods: Any = field(default_factory=lambda: ["fullgrad", "input_gradient", "integrated_gradients",
                                                  "smoothgrad", "gradcam", "random"])
    fractions: list = field(default_factory=lambda: [0.001, 0.005, 0.01, 0.05, 0.1])
    images: Optional[int] = 1000        # first N test images (null: all loaded)
    batch_size: int = 50
    fill: str = "black"                 # black | image_mean | dataset_mean
    fill_value: Optional[list] = None   # dataset_mean: per-channel values in [0, 1] units (null: the dataset's mean)
    output: str = "logit"               # logit | softmax
    seed: int = 0                       # seeds random saliency methods (random, smoothgrad)
    runs: Optional[list] = None         # sweep method names of the runs to evaluate (null: every run)

    def __post_init__(self):
        self.methods = common.check_methods(NAME, self.methods)
        self.fractions = common.check_fractions(NAME, self.fractions)
        check.positive_int(NAME, "images", self.images, allow_none=True)
        check.positive_int(NAME, "batch_size", self.batch_size)
        common.check_fill(NAME, self.fill, self.fill_value)
        check.choice(NAME, "output", self.output, OUTPUTS)


def fill_for(fill: str, fill_value: Optional[list], dataset: str, channels: int) -> Optional[torch.Tensor]:
    """The per-channel fill value in the network's normalised input space (None for ``image_mean``)."""
    if fill == "black":
        return black_pixel(dataset, channels)
    if fill == "dataset_mean":
        mean = fill_value if fill_value is not None else data_io.NORMALIZATION[dataset][0]
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        if mean.numel() not in (1, channels):
            raise common.option_error(NAME, "fill_value", f"expected 1 or {channels} values, got {mean.numel()}")
        return data_io.normalize(mean.expand(channels).view(1, channels, 1, 1), dataset).flatten()
    return None


def class_output(logits: torch.Tensor, classes: torch.Tensor, output: str) -> torch.Tensor:
    """``f_c`` per sample: the logit of class ``c`` or its softmax probability."""
    values = logits.softmax(1) if output == "softmax" else logits
    return values.gather(1, classes[:, None]).squeeze(1)


def fractional_change(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``|after − before| / |before|`` per sample (thesis §3.5.1)."""
    return (after - before).abs() / before.abs()


def perturbation_curve(model, x: torch.Tensor, methods: dict[str, dict], fractions: list[float], fill_value,
                       fill: str = "black", output: str = "logit", seed: int = 0, batch_size: int = 50,
                       device: torch.device = torch.device("cpu")) -> list[dict]:
    """Rows ``{method, fraction, k_percent, mean, std, images}`` for normalised images ``x`` ``(N, C, H, W)``:
    the absolute fractional change of the top-class output after removing the k least salient pixels."""
    logits = common.batched_logits(model, x, batch_size, device)
    top = logits.argmax(1)
    before = class_output(logits, top, output)
    rows = []
    for method, options in methods.items():
        maps = common.saliency_maps(model, x, top, method, options, seed, batch_size, device)
        for k in fractions:
            perturbed = remove_pixels(x, maps, k, "least", fill, fill_value)
            after = class_output(common.batched_logits(model, perturbed, batch_size, device), top, output)
            change = fractional_change(before, after).numpy().astype(np.float64)
            rows.append({"method": method, "fraction": k, "k_percent": 100 * k, "mean": float(change.mean()),
                         "std": float(change.std()), "images": len(x)})
    return rows


def plot(rows: list[dict], png: str) -> None:
    """Absolute fractional output change vs k (log axis, as Fig. 3.2a), one curve per run and method."""
    label = ("run", "method") if len({r["run"] for r in rows}) > 1 else ("method",)
    common.plot_curves(rows, png, "k_percent", "mean", "std", label, "% pixels removed (least salient)",
                       f"absolute fractional change of the top-class {rows[0]['output']}",
                       "Pixel perturbation (lower is better)", logx=True)


@register(NAME, PixelPerturbationOptions, plot=plot)
def pixel_perturbation(ctx: EvalContext, options: PixelPerturbationOptions) -> list[dict]:
    """Thesis §3.5.1 for every selected run (trained ``model.pt``, or the configured model with ``epochs: 0``)."""
    rows = []
    for cell in common.select_cells(ctx, NAME, options.runs):
        model = ctx.model(cell)
        images, _ = common.test_images(ctx, cell, options.images)
        x = ctx.normalize(images, cell)
        value = fill_for(options.fill, options.fill_value, cell.config.data.dataset, x.shape[1])
        ctx.log(f"[{NAME}] run {cell.method} seed {cell.seed}: {len(x)} images, methods {list(options.methods)}")
        curve = perturbation_curve(model, x, options.methods, options.fractions, value, options.fill, options.output,
                                   options.seed, options.batch_size, ctx.device)
        rows += [{"run": cell.method, "run_seed": cell.seed, **row, "output": options.output, "fill": options.fill}
                 for row in curve]
    return rows
