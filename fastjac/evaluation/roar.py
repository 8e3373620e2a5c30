"""RemOve And Retrain, ROAR (thesis §3.5.2, Fig. 3.2b; Hooker et al. 2019): remove the k % *most* salient
pixels of every training and test image, retrain a fresh model on the modified data, report its test accuracy;
lower is better.

For one trained run of the experiment (option ``run``; default the first), each saliency method and fraction
k: saliency maps of the run's trained model on its training subset and test images (normalised, as the network
sees them), for the model's top class (``target: predicted``; ``label`` uses the true class); the
``round(k·H·W)`` most salient pixels (all channels) of each image are replaced by the per-channel dataset mean;
then a fresh model is trained with the run's config (seed replaced by each of ``seeds``, ``epochs`` optionally
overridden) through :class:`~fastjac.training.trainer.Trainer` on these images, in
``OUT/evaluations/roar/<method>/k<k>/seed<s>/``. The k = 0 accuracy is the same retraining on unmodified
images (``OUT/evaluations/roar/none/k0/seed<s>/``). Finished retrains (``result.json``) are skipped on
``--resume`` and killed ones continue from their checkpoint; saliency maps are cached in
``OUT/evaluations/roar/<method>/saliency.pt`` (float32, 4·N·H·W bytes: about 250 MB for CIFAR's 60k images).

Pixel space: removal happens on the trainer's images in [0, 1] (``RunData``, un-normalised), with the fill
``NORMALIZATION[dataset].mean`` (per channel, [0, 1] units); the trainer then normalises, so removed pixels are
exactly 0 in the network's input, the dataset mean. Augmentation (if the config has it) is applied to the
modified images.

Choices the thesis does not fix: k values (Fig. 3.2b's axis; default 10, 30, 50, 70, 90 %, Hooker et al.'s
grid), the saliency target class (predicted), mean ± sample standard deviation (ddof 1) over ``seeds``
(three runs, as the thesis averages three), and the random baseline (included by default).
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from . import common
from . import option_checks as check
from .pixel_removal import remove_pixels
from .registry import Cell, EvalContext, register
from ..training import checkpoint as ckpt_io
from ..training import config as config_io
from ..training import data as data_io
from ..training.trainer import RunData, Trainer

NAME = "roar"
TARGETS = ("predicted", "label")


@dataclass
class RoarOptions:
    methods: Any = field(default_factory=lambda: ["fullgrad", "input_gradient", "integrated_gradients",
                                                  "smoothgrad_squared", "gradcam", "random"])
    fractions: list = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    epochs: Optional[int] = None        # retraining epochs (null: the run's)
    seeds: list = field(default_factory=lambda: [0, 1, 2])   # retraining seeds (the thesis averages three runs)
    batch_size: int = 100               # saliency batch size
    seed: int = 0                       # seeds random saliency methods
    target: str = "predicted"           # predicted | label: the class whose saliency is used
    fill: str = "dataset_mean"          # dataset_mean | black | image_mean (in [0, 1] image space)
    fill_value: Optional[list] = None   # dataset_mean: per-channel values in [0, 1] (null: the dataset's mean)
    run: Optional[str] = None           # the sweep method whose trained model computes the saliency (null: first)

    def __post_init__(self):
        self.methods = common.check_methods(NAME, self.methods)
        self.fractions = common.check_fractions(NAME, self.fractions)
        check.positive_int(NAME, "epochs", self.epochs, allow_none=True)
        check.positive_int(NAME, "batch_size", self.batch_size)
        if not isinstance(self.seeds, list) or not self.seeds or any(
                isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds) or \
                len(set(self.seeds)) != len(self.seeds):
            raise common.option_error(NAME, "seeds", f"expected a non-empty list of distinct non-negative integers, "
                                                     f"got {self.seeds!r}")
        check.choice(NAME, "target", self.target, TARGETS)
        common.check_fill(NAME, self.fill, self.fill_value)
        if self.run is not None and not isinstance(self.run, str):
            raise common.option_error(NAME, "run", f"expected null or a sweep method name, got {self.run!r}")


def retrain_config(cfg: config_io.RunConfig, seed: int, epochs: Optional[int], name: str) -> config_io.RunConfig:
    """The run's config for one retrain: ``seed`` (and ``epochs``) replaced, no sweep, no evaluations."""
    data = copy.deepcopy(cfg.to_dict())
    data.update(seed=seed, name=name, sweep=None, evaluations={})
    if epochs is not None:
        data["epochs"] = epochs
    return config_io.validate(config_io.from_dict(config_io.RunConfig, data))


def fill_value_01(fill: str, fill_value: Optional[list], dataset: str) -> Optional[list]:
    """The fill in [0, 1] image space: the dataset mean (default), black = 0, or None for the image mean."""
    if fill == "dataset_mean":
        return list(fill_value if fill_value is not None else data_io.NORMALIZATION[dataset][0])
    return [0.0] if fill == "black" else None


def _retrain(ctx: EvalContext, cfg: config_io.RunConfig, run_dir: str, data: RunData) -> float:
    """Test accuracy of one retrain; a finished one (``result.json``) is read back when resuming."""
    result_path = os.path.join(run_dir, "result.json")
    if ctx.resume and os.path.isfile(result_path):
        ctx.log(f"[done] {cfg.name}")
        with open(result_path) as f:
            return float(json.load(f)["test_acc"])
    os.makedirs(run_dir, exist_ok=True)
    result = Trainer(cfg, run_dir, data_root=ctx.data_root, device=str(ctx.device), progress=ctx.progress,
                     data=data).run(resume=ctx.resume)
    ctx.log(f"[{cfg.name}] test accuracy {result['test_acc']:.2f} %")
    return float(result["test_acc"])


def _maps(ctx: EvalContext, cell: Cell, model, data: RunData, method: str, options: RoarOptions) -> tuple:
    """Saliency maps of the train and test images (cached in ``<method>/saliency.pt``)."""
    path = os.path.join(ctx.folder(NAME), method, "saliency.pt")
    n_train, n_test = len(data.train_y), len(data.test_y)
    if ctx.resume and os.path.isfile(path):
        cached = torch.load(path, weights_only=True)
        if cached["train"].shape[0] == n_train and cached["test"].shape[0] == n_test:
            return cached["train"], cached["test"]
    maps = []
    for x, y in ((data.train_x, data.train_y), (data.test_x, data.test_y)):
        xn = ctx.normalize(x, cell)
        target = (common.batched_logits(model, xn, options.batch_size, ctx.device).argmax(1)
                  if options.target == "predicted" else y)
        maps.append(common.saliency_maps(model, xn, target, method, options.methods[method], options.seed,
                                         options.batch_size, ctx.device))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ckpt_io.save_atomic({"train": maps[0], "test": maps[1]}, path)
    return maps[0], maps[1]


def _row(method: str, k: float, accs: list[float]) -> dict:
    return {"method": method, "fraction": k, "k_percent": 100 * k, "acc_mean": float(np.mean(accs)),
            "acc_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0, "runs": len(accs),
            "accs": ";".join(f"{a:.2f}" for a in accs)}


def plot(rows: list[dict], png: str) -> None:
    """Test accuracy after retraining vs k, one curve per method starting at the shared k = 0 point."""
    base = [r for r in rows if r["method"] == "none"]
    curves = [r for r in rows if r["method"] != "none"]
    methods = list(dict.fromkeys(r["method"] for r in curves))
    curves += [{**r, "method": m} for m in methods for r in base]
    common.plot_curves(curves or base, png, "k_percent", "acc_mean", "acc_std", ("method",),
                       "% pixels removed (most salient)", "test accuracy after retraining (%)",
                       "Remove and retrain (lower is better)")


@register(NAME, RoarOptions, plot=plot)
def roar(ctx: EvalContext, options: RoarOptions) -> list[dict]:
    """Thesis §3.5.2: rows ``{method, fraction, k_percent, acc_mean, acc_std, runs, accs}``, k = 0 first."""
    cell = common.select_cells(ctx, NAME, [options.run])[0] if options.run is not None else ctx.cells[0]
    model = ctx.model(cell)
    data = ctx.data(cell)
    fill = fill_value_01(options.fill, options.fill_value, cell.config.data.dataset)
    folder = ctx.folder(NAME)

    def retrain_all(method: str, k: float, run_data: RunData) -> list[float]:
        tag = f"k{100 * k:g}"
        return [_retrain(ctx, retrain_config(cell.config, s, options.epochs,
                                             f"{ctx.cfg.name}/roar/{method}/{tag}/seed{s}"),
                         os.path.join(folder, method, tag, f"seed{s}"), run_data) for s in options.seeds]

    rows = [_row("none", 0.0, retrain_all("none", 0.0, data))]
    for method in options.methods:
        ctx.log(f"[{NAME}] saliency {method} of run {cell.method} on {len(data.train_y)} + {len(data.test_y)} images")
        train_maps, test_maps = _maps(ctx, cell, model, data, method, options)
        for k in options.fractions:
            removed = RunData(remove_pixels(data.train_x, train_maps, k, "most", options.fill, fill),
                              data.train_y,
                              remove_pixels(data.test_x, test_maps, k, "most", options.fill, fill),
                              data.test_y, data.subset_indices)
            rows.append(_row(method, k, retrain_all(method, k, removed)))
    return rows
