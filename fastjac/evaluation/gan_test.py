"""GAN-test of class-conditional samples (thesis §5.5.1, Table 5.1, Table 5.2; Shmelkov et al. 2018): evaluation
``gan_test``.

For every trained run, M samples per class are drawn from its implicit density model (:mod:`.sampling`:
gradient ascent on the class logit from random inputs, Fig. 5.2, or Langevin dynamics, or either started from
noisy test images, appendix §5.10), and an *independently trained* classifier labels them: the GAN-test score is
its accuracy (%) with the class each sample was generated for as the label. It measures sample quality, not
diversity.

The independent classifier is trained by this evaluation with the trainer (the experiment's base config with
plain cross-entropy, another seed and the ``classifier`` overrides) into ``OUT/evaluations/gan_test/classifier/``
(reused when its ``result.json`` exists, continued from its checkpoint when it was killed), or read from an
existing run directory (``classifier_checkpoint``: a folder with ``config.yaml`` and ``model.pt``).

Choices the thesis does not fix (sampler settings, starting points, the classifier) are options; the defaults
are stated in :class:`GanTestOptions`.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import yaml
from torch import Tensor, nn

from . import option_checks as check
from . import sampling
from .images import denormalize, file_stem, save_grid, valid_range
from .model_outputs import check_classes, eval_mode
from .registry import EvalContext, register
from .runs import selected_cells

NAME = "gan_test"
SAMPLERS = ("ascent", "langevin")
INITS = sampling.INITS + ("noisy_test",)


@dataclass
class GanTestOptions:
    """Options of ``gan_test``.

    sampler: ``ascent`` (thesis §5.5.1) or ``langevin``; init: starting points, ``uniform`` (random images in the
    valid range; default), ``normal`` (N(0, I) in normalised units) or ``noisy_test`` (test images of the class
    plus N(0, init_std²) noise: the 'denoising' variant, appendix §5.10, σ = 0.1); steps, step_size: α for ascent
    (with ``normalize``: per-sample gradient scaled to RMS 1, so that every model's samples move equally far
    whatever its gradient scale, our default since gradient-norm-regularised models have small gradients by
    design), ε for Langevin; noise: Langevin noise multiplier (1 = Welling & Teh); samples_per_class (M);
    classes: subset of classes (empty: all); classifier: dotted overrides of the independent classifier's run
    config (default: seed = experiment seed + 1000, plain CE); classifier_checkpoint: an existing run directory
    instead; paper: method -> published GAN-test %, shown as a column; methods: runs to test (empty: all);
    grid_classes / grid_samples: size of the PNG sample grid per method.
    """

    sampler: str = "ascent"
    init: str = "uniform"
    init_std: float = 0.1
    steps: int = 100
    step_size: float = 0.05
    normalize: bool = True
    noise: float = 1.0
    samples_per_class: int = 10
    classes: list = field(default_factory=list)
    batch_size: int = 250
    seed: int = 0
    classifier: dict = field(default_factory=dict)
    classifier_checkpoint: Optional[str] = None
    paper: dict = field(default_factory=dict)
    methods: list = field(default_factory=list)
    grid_classes: int = 10
    grid_samples: int = 8

    def __post_init__(self):
        check.choice(NAME, "sampler", self.sampler, SAMPLERS)
        check.choice(NAME, "init", self.init, INITS)
        check.non_negative(NAME, "init_std", self.init_std)
        check.positive(NAME, "steps", self.steps)
        check.positive(NAME, "step_size", self.step_size)
        check.non_negative(NAME, "noise", self.noise)
        check.positive(NAME, "samples_per_class", self.samples_per_class)
        check.non_negative_int_list(NAME, "classes", self.classes)
        check.positive(NAME, "batch_size", self.batch_size)
        check.string_list(NAME, "methods", self.methods)
        check.positive(NAME, "grid_classes", self.grid_classes)
        check.positive(NAME, "grid_samples", self.grid_samples)
        for method, value in self.paper.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                check._fail(NAME, f"paper.{method}", "a number (published GAN-test %)", value)


def generate(model: nn.Module, classes: Tensor, shape: tuple, options: GanTestOptions, low: Tensor, high: Tensor,
             start: Optional[Tensor] = None) -> sampling.Samples:
    """Samples of ``classes`` (one per entry) from ``model`` with the sampler of ``options``; starting points are
    ``start`` when given (noisy test images), else :func:`sampling.initial_inputs` with ``options.init``."""
    device = next(model.parameters()).device
    if start is None:
        start = sampling.initial_inputs(len(classes), shape, options.init, options.seed, low, high, device)
    classes = classes.to(device)
    if options.sampler == "ascent":
        return sampling.gradient_ascent(model, start, classes, options.steps, options.step_size,
                                        normalize=options.normalize, low=low, high=high, batch_size=options.batch_size)
    return sampling.langevin(model, start, classes, options.steps, options.step_size, noise=options.noise, low=low,
                             high=high, seed=options.seed + 1, batch_size=options.batch_size)


@torch.no_grad()
def gan_test_accuracy(classifier: nn.Module, samples: Tensor, classes: Tensor, batch_size: int = 250) -> float:
    """GAN-test score (Shmelkov et al. 2018): accuracy (%) of ``classifier`` (eval mode) on ``samples`` with the
    classes they were generated for as labels."""
    classes = check_classes(classes, samples.shape[0])
    if not len(classes):
        raise ValueError("samples: expected at least one sample")
    correct = 0
    with eval_mode(classifier):
        for i in range(0, len(classes), batch_size):
            pred = classifier(samples[i:i + batch_size]).argmax(1).cpu()
            correct += int((pred == classes[i:i + batch_size].cpu()).sum())
    return 100.0 * correct / len(classes)


def class_images(images: Tensor, labels: Tensor, classes: Tensor) -> Tensor:
    """For each entry of ``classes``, a test image of that class: the k-th occurrence of class c takes the k-th
    test image labelled c (cycling when the class has fewer); the starting points of the 'denoising' variant."""
    out = torch.empty((len(classes),) + tuple(images.shape[1:]), dtype=images.dtype, device=images.device)
    seen: dict[int, int] = {}
    for j, c in enumerate(classes.tolist()):
        idx = (labels == c).nonzero().flatten()
        if not len(idx):
            raise ValueError(f"classes: class {c} has no test image to start the denoising sampler from")
        k = seen.get(c, 0)
        out[j] = images[idx[k % len(idx)]]
        seen[c] = k + 1
    return out


# --- the independent classifier ------------------------------------------------------------------------------
def classifier_config(ctx: EvalContext, overrides: dict):
    """The run config of the independent classifier: the experiment's base config, one run, plain CE, seed
    ``cfg.seed + 1000``, then ``overrides`` (dotted keys; ``loss`` replaces the loss). Errors name
    ``evaluations.gan_test.classifier``."""
    from ..training import config as config_io

    base = ctx.cfg.to_dict()
    base.update(sweep=None, teacher=None, evaluations={}, eval={}, loss={"ce": 1.0}, seed=ctx.cfg.seed + 1000,
                name=f"{ctx.cfg.name}/gan_test_classifier")
    try:
        for key, value in overrides.items():
            if key == "loss":
                base["loss"] = copy.deepcopy(value)
            else:
                config_io.set_dotted(base, key, copy.deepcopy(value))
        return config_io.validate(config_io.from_dict(config_io.RunConfig, base))
    except config_io.ConfigError as exc:
        raise config_io.ConfigError(f"evaluations.{NAME}.classifier: {exc}") from exc


def load_run_model(run_dir: str, device) -> nn.Module:
    """The trained model of a run directory (its ``config.yaml`` model spec and ``model.pt``), eval mode."""
    from ..training.models import build_model

    cfg_path, weights = os.path.join(run_dir, "config.yaml"), os.path.join(run_dir, "model.pt")
    for path in (cfg_path, weights):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"evaluations.{NAME}.classifier_checkpoint: {path!r} is missing (expected a run "
                                    "directory written by fastjac run: config.yaml and model.pt)")
    with open(cfg_path) as f:
        spec = dict((yaml.safe_load(f) or {}).get("model") or {})
    model = build_model(dict(spec, weights=weights)).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def independent_classifier(ctx: EvalContext, options: GanTestOptions) -> tuple[nn.Module, str]:
    """``(classifier, run_dir)``: ``classifier_checkpoint``, or the classifier trained (once) into
    ``OUT/evaluations/gan_test/classifier``."""
    from ..training.trainer import Trainer

    if options.classifier_checkpoint:
        return load_run_model(options.classifier_checkpoint, ctx.device), options.classifier_checkpoint
    run_dir = os.path.join(ctx.folder(NAME), "classifier")
    if not os.path.isfile(os.path.join(run_dir, "result.json")):
        cfg = classifier_config(ctx, options.classifier)
        resume = os.path.isfile(os.path.join(run_dir, "checkpoint.pt"))
        ctx.log(f"  {NAME}: {'continuing' if resume else 'training'} the independent classifier in {run_dir}")
        result = Trainer(cfg, run_dir, data_root=ctx.data_root, device=str(ctx.device), progress=ctx.progress).run(
            resume=resume)
        ctx.log(f"  {NAME}: classifier test accuracy {result.get('test_acc', float('nan')):.2f} %")
    return load_run_model(run_dir, ctx.device), run_dir


# --- the evaluation ------------------------------------------------------------------------------------------
def plot_gan_test(rows: list[dict], path: str) -> None:
    """Bars of the GAN-test score per run, the published number as a black tick where given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['method']}" + ("" if len({x['seed'] for x in rows}) == 1 else f" s{r['seed']}") for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 1.5), 4))
    pos = range(len(rows))
    ax.bar(pos, [float(r["gan_test"]) for r in rows], color="tab:blue", label="ours")
    paper = [(i, float(r["paper"])) for i, r in enumerate(rows) if r.get("paper") not in (None, "")]
    if paper:
        ax.scatter([p[0] for p in paper], [p[1] for p in paper], marker="_", s=400, color="k", label="paper")
    ax.set_xticks(list(pos))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="GAN-test accuracy (%)", ylim=(0, 100), title=f"GAN-test ({rows[0]['sampler']} samples)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@register(NAME, GanTestOptions, plot=plot_gan_test)
def evaluate_gan_test(ctx: EvalContext, options: GanTestOptions) -> list[dict]:
    """One row per run: sampler, GAN-test %, the generating model's own accuracy on its samples, mean class
    logit before / after sampling, the paper's number; a PNG grid of samples per run."""
    cells = selected_cells(ctx, options.methods, NAME)
    classifier, classifier_dir = independent_classifier(ctx, options)
    folder = ctx.folder(NAME)
    rows = []
    for cell in cells:
        model = ctx.model(cell)
        for p in model.parameters():
            p.requires_grad_(False)
        data = ctx.data(cell)
        num_classes = int(cell.config.model.get("num_classes", 0)) or int(data.test_y.max()) + 1
        wanted = options.classes or list(range(num_classes))
        if max(wanted) >= num_classes:
            from ..training.config import ConfigError

            raise ConfigError(f"evaluations.{NAME}.classes: class {max(wanted)} does not exist (the model has "
                              f"{num_classes} classes)")
        classes = torch.tensor(wanted).repeat_interleave(options.samples_per_class)
        shape = tuple(data.test_x.shape[1:])
        low, high = (t.to(ctx.device) for t in valid_range(cell.config.data.dataset, shape[0]))
        start = None
        if options.init == "noisy_test":
            clean = ctx.normalize(class_images(data.test_x, data.test_y, classes), cell).to(ctx.device)
            start = sampling.noisy_start(clean, options.init_std, options.seed, low, high)
        result = generate(model, classes, shape, options, low, high, start)
        score = gan_test_accuracy(classifier, result.samples, classes, options.batch_size)
        own = gan_test_accuracy(model, result.samples, classes, options.batch_size)
        row = {"method": cell.method, "seed": cell.seed, "sampler": options.sampler, "init": options.init,
               "samples": len(classes), "gan_test": score, "own_accuracy": own,
               "logit_start": float(result.logits[0].mean()), "logit_end": float(result.logits[-1].mean())}
        if options.paper:
            row["paper"] = options.paper.get(cell.method)
        rows.append(row)
        ctx.log(f"  {NAME} {cell.method}: GAN-test {score:.2f} % (own model {own:.2f} %)")
        _save_sample_grid(result.samples, wanted, options, cell, os.path.join(
            folder, f"samples_{file_stem(cell.method)}_seed{cell.seed}.png"))
    with open(os.path.join(folder, "classifier.json"), "w") as f:
        json.dump({"classifier": classifier_dir}, f)
    return rows


def _save_sample_grid(samples: Tensor, wanted: list, options: GanTestOptions, cell, path: str) -> None:
    m = options.samples_per_class
    rows = min(options.grid_classes, len(wanted))
    cols = min(options.grid_samples, m)
    grid = samples.view(len(wanted), m, *samples.shape[1:])[:rows, :cols]
    images = denormalize(grid.flatten(0, 1), cell.config.data.dataset).view(rows, cols, *samples.shape[1:])
    save_grid(images.cpu(), path, [f"class {c}" for c in wanted[:rows]], title=f"{cell.method}: {options.sampler}")
