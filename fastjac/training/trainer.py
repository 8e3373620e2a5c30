"""The trainer: one run of a :class:`~fastjac.training.config.RunConfig` into a run directory.

Run directory contents: ``config.yaml`` (the resolved config), ``subset_indices.json`` (the training examples
used), ``metrics.jsonl`` and ``metrics.csv`` (one row per epoch: every loss term, accuracy, lr, time),
``checkpoint.pt`` (written atomically after every epoch: model, optimiser, scheduler, epoch, RNG states,
config, subset indices, metrics so far), ``model.pt`` (final weights) and ``result.json`` (final metrics).

Exactness: data order and augmentation come from their own seeded generators, saved in the checkpoint
with every other RNG state, so ``resume`` continues a killed run and ends bit-identical to an uninterrupted
one. The teacher-Jacobian cache of Jacobian matching (``teacher.cache_jacobians``,
:mod:`fastjac.training.teacher_jacobians`) is not saved: it is recomputed at setup, bit-identically.

No host synchronisation in a step (:mod:`fastjac.training.step_log`): the logged loss terms are summed on the
device and read every ``sync_every`` steps and at the end of each epoch (one transfer, averaged over DDP
ranks); every term, its weighted value, the total and the gradients are checked for finiteness on the device
before the optimiser step that would use them, which is skipped on the device (fused optimiser,
``found_inf``) from the first non-finite value on; the next read raises :class:`NonFiniteLossError` naming
the first non-finite term, epoch and step. The optimisers are torch's fused implementations.

``precision: bfloat16``: the training forward and the loss terms run under ``torch.autocast`` (bf16
matmuls and convolutions; the fused BatchNorm kernels take the bf16 activations with float32 weights and
compute float32 statistics), except terms marked ``autocast=False`` (the finite-difference Hessian-trace
terms), which run in float32; term values are float32, parameters, gradients and the optimiser stay float32
(master weights), and evaluation runs in float32.

Multi-process (``torchrun``): each global batch is split into ``world_size`` contiguous chunks, rank r trains
on chunk r and DistributedDataParallel averages the gradients; ``accumulate: N`` does the same with N
micro-batches in one process (identical BatchNorm batch statistics), which is how the two are compared. The
BatchNorm running statistics are averaged over the ranks after every epoch
(:func:`fastjac.training.distributed.average_batch_norm_stats`): ``model.pt`` holds that average.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn

from . import checkpoint as ckpt_io
from . import data as data_io
from . import teacher_jacobians
from . import terms as loss_terms
from .config import RunConfig
from .distributed import average_batch_norm_stats
from .models import build_model
from .step_log import NonFiniteLossError, StepLog  # noqa: F401 - NonFiniteLossError: raised by Trainer.run


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def build_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The fused torch optimiser of ``cfg.optim`` (fused: its step can be skipped on the device,
    :meth:`StepLog.guarded_step`)."""
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay, fused=True)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay,
                           fused=True)


def build_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer):
    """Per-epoch schedule: constant, or lr × gamma at each milestone epoch (Adam with one annealing step is
    ``multistep`` with one milestone)."""
    milestones = cfg.schedule.milestones if cfg.schedule.name == "multistep" else []
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.schedule.gamma)


class DivergenceWarning(RuntimeWarning):
    """The train loss grew by orders of magnitude (:data:`DIVERGENCE` times its first epoch's)."""


#: How many times its first epoch's magnitude an epoch's train loss may reach before the run warns.
DIVERGENCE = 1e3

#: Config fields (dotted) added after checkpoints were first written, with the value those runs had (the
#: teacher's Jacobian rows were computed every step).
_NEW_FIELDS = {"precision": "float32", "sync_every": None, "teacher.cache_jacobians": False}
#: Config fields a resumed run may change: they change no result. Not ``teacher.cache_jacobians``: the cached
#: and the per-step rows agree to float rounding only, and a resumed run is bit-identical to an uninterrupted
#: one of its config; a change of it is ignored only where it cannot take effect (teacher_jacobians.may_cache).
_RESULT_NEUTRAL = ("sync_every",)


def with_new_fields(saved: dict) -> dict:
    """A copy of a saved config mapping (checkpoint, ``config.yaml``) with the fields it predates
    (:data:`_NEW_FIELDS`) at the values those runs had; a nested field only where its section is set."""
    out = copy.deepcopy(saved)
    for dotted, value in _NEW_FIELDS.items():
        *parents, last = dotted.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(last, value)
    return out


def config_changes(saved: dict, cfg: RunConfig) -> list[str]:
    """The dotted fields in which the config a run was trained with (``saved``, a checkpoint's or
    ``config.yaml``'s mapping) differs from ``cfg`` in a way that would change the run's result: fields it
    predates count at their old value (:func:`with_new_fields`), :data:`_RESULT_NEUTRAL` ones are ignored, and
    ``teacher.cache_jacobians`` only where it can take effect. Resuming (or reusing a finished run) is allowed
    only when this is empty."""
    diff = ckpt_io.config_differences(with_new_fields(saved), cfg.to_dict())
    return [d for d in diff if d not in _RESULT_NEUTRAL
            and (d != "teacher.cache_jacobians" or teacher_jacobians.may_cache(cfg))]


def _keep_fused(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of a checkpoint written with a non-fused optimiser: fused again (its groups
    carry the old flags), Adam's step counts on the parameters' device as the fused kernels need."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, None
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state:
                state["step"] = state["step"].to(p.device, torch.float32)


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_data_root(path: str, data_root: str | None, field: str) -> str:
    """``path`` with ``{data_root}`` replaced by the data root (errors name the config ``field``)."""
    if "{data_root}" in path:
        if data_root is None:
            raise ValueError(f"{field} {path!r} refers to {{data_root}}: pass --data-root")
        path = path.replace("{data_root}", data_root)
    return path


def model_spec(spec: dict, data_root: str | None, field: str = "model") -> dict:
    """A copy of a model mapping whose ``weights`` path has ``{data_root}`` resolved."""
    spec = dict(spec)
    if isinstance(spec.get("weights"), str):
        spec["weights"] = resolve_data_root(spec["weights"], data_root, f"{field}.weights")
    return spec


def load_teacher(cfg: RunConfig, device: torch.device, data_root: str | None = None) -> nn.Module | None:
    """The teacher model in eval mode with its weights from ``teacher.checkpoint`` (a run dir or a file;
    ``{data_root}`` in the path is replaced by the data root)."""
    if cfg.teacher is None:
        return None
    spec = dict(cfg.teacher.model or cfg.model)
    path = cfg.teacher.checkpoint
    if path is None:
        raise ValueError("teacher.checkpoint: the path of a trained teacher (run directory or .pt file) is required")
    path = resolve_data_root(path, data_root, "teacher.checkpoint")
    if os.path.isdir(path):
        path = os.path.join(path, "model.pt")
    spec["weights"] = path
    teacher = build_model(spec).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@dataclass
class RunData:
    """A run's images as float tensors in [0, 1] (not normalised), after limits and the per-class subset."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    subset_indices: torch.Tensor   # indices of the kept training examples in the (limited) training split


def _split_args(cfg: RunConfig, split: str, data_root: str | None) -> tuple[str | None, dict, int | None]:
    """``(root, loader kwargs, limit)`` of one split of ``cfg.data``."""
    d = cfg.data
    root = data_root if data_root is not None else d.root
    limit = d.train_limit if split == "train" else d.test_limit
    kwargs: dict[str, Any] = {}
    if d.dataset == "digits":
        kwargs = dict(image_size=d.image_size, channels=d.channels, test_fraction=d.test_fraction)
    elif d.dataset == "mit_indoor":
        kwargs = dict(image_size=d.image_size)
    elif d.dataset == "imagenet":
        kwargs = dict(image_size=d.image_size, limit=limit or None)
    return root, kwargs, limit


def load_split(cfg: RunConfig, split: str, data_root: str | None = None) -> data_io.ImageSet:
    """One split (``train``/``test``) of ``cfg.data`` after its ``train_limit``/``test_limit`` (``data_root``
    overrides ``data.root``); ImageNet folders read only the files within the limit."""
    root, kwargs, limit = _split_args(cfg, split, data_root)
    images = data_io.load_dataset(cfg.data.dataset, split, root, **kwargs)
    return images.subset(range(min(limit, len(images)))) if limit else images


def load_split_labels(cfg: RunConfig, split: str, data_root: str | None = None) -> torch.Tensor:
    """The labels of :func:`load_split`, without decoding image files where the format allows it."""
    root, kwargs, limit = _split_args(cfg, split, data_root)
    labels = data_io.load_labels(cfg.data.dataset, split, root, **kwargs)
    return labels[:limit] if limit else labels


def load_run_data(cfg: RunConfig, data_root: str | None = None) -> RunData:
    """The training and test images of ``cfg.data`` as the trainer uses them (``data_root`` overrides
    ``data.root``)."""
    d = cfg.data
    train = load_split(cfg, "train", data_root)
    test = load_split(cfg, "test", data_root)
    subset_seed = cfg.seed if d.subset_seed is None else d.subset_seed
    indices = data_io.stratified_subset(train.labels, d.per_class, subset_seed)
    train = train.subset(indices)
    return RunData(train.float_images(), train.labels, test.float_images(), test.labels, indices)


class Trainer:
    """Train ``cfg`` into ``run_dir``; :meth:`run` returns the final metrics.

    ``data`` replaces the config's dataset with given images (ROAR retrains on images with pixels removed);
    its ``subset_indices`` are recorded as the run's subset.
    """

    def __init__(self, cfg: RunConfig, run_dir: str, data_root: str | None = None, device: str = "cpu",
                 progress: bool = True, data: RunData | None = None):
        self.cfg, self.run_dir, self.device = cfg, run_dir, torch.device(device)
        self.data = data
        self.data_root = data_root if data_root is not None else cfg.data.root
        self.progress = progress
        self.rank, self.world = _distributed()
        self.terms = loss_terms.parse(cfg.loss)
        self.active = [(name, weight, options) for name, weight, options in self.terms if weight != 0]
        if cfg.precision != "float32":
            loss_terms.check_precision(self.active)
        self.ckpt_path = os.path.join(run_dir, "checkpoint.pt")

    # --- setup -----------------------------------------------------------------------------------------------
    def _load_data(self):
        data = self.data if self.data is not None else load_run_data(self.cfg, self.data_root)
        self.subset_indices = data.subset_indices
        self.train_x, self.train_y = data.train_x, data.train_y
        self.test_x = data_io.normalize(data.test_x, self.cfg.data.dataset)
        self.test_y = data.test_y

    def setup(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed, cfg.deterministic)
        self._load_data()
        self.model = build_model(model_spec(cfg.model, self.data_root)).to(self.device)
        self.teacher = load_teacher(cfg, self.device, self.data_root)
        self.teacher_jacobians = self._teacher_jacobians()
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.generators = {
            "order": torch.Generator().manual_seed(cfg.seed * 1000003 + 1),
            "augment": torch.Generator().manual_seed(cfg.seed * 1000003 + 2),
        }
        self.ddp = self.model
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(self.model, broadcast_buffers=False)
        self.history: list[dict] = []
        self.start_epoch = 0
        self.log = StepLog([(name, weight) for name, weight, _ in self.active], cfg.accumulate, self.device, cfg.name)

    def _uses_cache(self) -> bool:
        """Whether this run caches the teacher's Jacobian rows (:func:`teacher_jacobians.use_cache`)."""
        cfg = self.cfg
        if cfg.teacher is None:
            return False
        return teacher_jacobians.use_cache(cfg.teacher.cache_jacobians, cfg.data.augment,
                                           teacher_jacobians.matched_classes(self.active), len(self.train_y),
                                           tuple(self.train_x.shape[1:]), self.train_x.element_size())

    def _teacher_jacobians(self) -> teacher_jacobians.TeacherJacobians | None:
        """The teacher's Jacobian rows of every training example (as :meth:`_prepare` gives them, in chunks of
        ``data.batch_size``, under :meth:`_autocast`) when :meth:`_uses_cache`; None otherwise or with 0 epochs."""
        if self.cfg.epochs == 0 or not self._uses_cache():
            return None
        d = self.cfg.data
        return teacher_jacobians.TeacherJacobians.compute(
            self.teacher, teacher_jacobians.matched_classes(self.active), self.train_x, self.train_y, d.batch_size,
            self.device, lambda x: self._to_device(data_io.normalize(x, d.dataset)), self._to_device, self._autocast())

    # --- checkpoints -----------------------------------------------------------------------------------------
    def _save(self, epoch: int) -> None:
        if self.rank != 0:
            return
        state = {
            "format": ckpt_io.FORMAT, "config": self.cfg.to_dict(), "epoch": epoch,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": ckpt_io.rng_state(self.generators),
            "subset_indices": self.subset_indices, "history": self.history,
        }
        ckpt_io.save_atomic(state, self.ckpt_path)

    def _restore(self) -> None:
        state = ckpt_io.load(self.ckpt_path)
        diff = config_changes(state["config"], self.cfg)
        if diff:
            raise ckpt_io.CheckpointError(
                f"checkpoint {self.ckpt_path!r} was written by a different config (fields {diff}); "
                "resume with the same config or use another --out directory")
        if not torch.equal(state["subset_indices"], self.subset_indices):
            raise ckpt_io.CheckpointError(f"checkpoint {self.ckpt_path!r}: training subset differs from this run's")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        _keep_fused(self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt_io.set_rng_state(state["rng"], self.generators)
        self.history = state["history"]
        self.start_epoch = state["epoch"] + 1

    # --- training --------------------------------------------------------------------------------------------
    def _batches(self):
        """One epoch's batches of training indices: a seeded permutation of the subset, or, with
        ``data.epoch_size``, that many examples from successive permutations (each example appears equally
        often, to within one)."""
        n, bs, size = len(self.train_y), self.cfg.data.batch_size, self.cfg.data.epoch_size
        passes = 1 if size is None else -(-size // n)
        order = torch.cat([torch.randperm(n, generator=self.generators["order"]) for _ in range(passes)])
        if size is not None:
            order = order[:size]
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            if len(idx) < 2 * self.world * self.cfg.accumulate:  # BatchNorm needs 2 values per chunk
                continue
            yield idx

    def _prepare(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.cfg.data
        x = self.train_x[idx]
        if d.augment:
            x = data_io.augment(x, self.generators["augment"], d.crop_padding, d.flip)
        return self._to_device(data_io.normalize(x, d.dataset)), self._to_device(self.train_y[idx])

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the training device; to a GPU through pinned memory, asynchronously (a copy from pageable
        memory would wait for the queued kernels)."""
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _chunks(self, *tensors):
        """This rank's micro-batches of a global batch (inputs, labels, dataset indices): world × accumulate
        contiguous chunks of each."""
        parts = self.world * self.cfg.accumulate
        split = [torch.tensor_split(t, parts) for t in tensors]
        mine = range(self.rank * self.cfg.accumulate, (self.rank + 1) * self.cfg.accumulate)
        return [tuple(s[i] for s in split) for i in mine]

    def _autocast(self):
        """The training forward's autocast context (disabled with ``precision: float32``)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bfloat16")

    def _step(self, idx, epoch: int, step: int) -> None:
        """One optimiser step on the batch ``idx``: every loss term of every micro-batch, backward, the step
        (skipped on the device when anything is non-finite, :class:`StepLog`); no host synchronisation."""
        x, y = self._prepare(idx)
        self.optimizer.zero_grad(set_to_none=True)
        chunks = self._chunks(x, y, self._to_device(idx))
        # gradients of the optimised parameters only: the input, a leaf that requires grad for the Jacobian terms,
        # gets none (no first-layer input gradient, no x.grad buffer)
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]
        values, weighted, totals = [], [], []
        for i, (xc, yc, ic) in enumerate(chunks):
            with self._autocast():
                ctx = loss_terms.context(self.ddp, self.teacher, xc, yc, self.terms, indices=ic,
                                         teacher_jacobians=self.teacher_jacobians)
                ctx.logits  # noqa: B018 - the clean pass first, under autocast (it records the BatchNorm statistics)
                vals = [loss_terms.evaluate(ctx, name, options) for name, _, options in self.active]
            values.append(vals)
            weighted.append([weight * value for (_, weight, _), value in zip(self.active, vals)])
            total = weighted[-1][0]
            for term in weighted[-1][1:]:
                total = total + term
            totals.append(total.detach())
            ddp_defers = isinstance(self.ddp, nn.parallel.DistributedDataParallel) and i < len(chunks) - 1
            with self.ddp.no_sync() if ddp_defers else contextlib.nullcontext():
                torch.autograd.backward(total / len(chunks), inputs=params)
        grads = [p.grad for p in params if p.grad is not None]
        found_inf = self.log.record(step, [[v.detach() for v in vals] for vals in values],
                                    [[w.detach() for w in ws] for ws in weighted], totals, grads)
        self.log.guarded_step(self.optimizer, found_inf)

    @torch.no_grad()
    def evaluate(self, noise_std: float = 0.0, generator: torch.Generator | None = None,
                 batch_stats: bool = False) -> dict[str, float]:
        """Test accuracy (%) and cross-entropy, optionally with Gaussian noise added to the normalised images.

        ``batch_stats``: BatchNorm normalises each test batch (``data.eval_batch_size`` images) with that
        batch's own statistics instead of the running ones (a copy of the model in training mode, so the
        running statistics of the trained model are untouched); a diagnostic of the BatchNorm study."""
        model = self.model
        if batch_stats:
            model = copy.deepcopy(self.model).train()
        else:
            model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # correct, summed loss: read once
        bs = self.cfg.data.eval_batch_size
        for start in range(0, len(self.test_y), bs):
            x = self.test_x[start:start + bs]
            if noise_std:
                x = x + noise_std * torch.randn(x.shape, generator=generator)
            x, y = self._to_device(x), self._to_device(self.test_y[start:start + bs])
            out = model(x)
            sums += torch.stack([(out.argmax(1) == y).sum().double(), F.cross_entropy(out, y, reduction="sum").double()])
        self.model.train()
        correct, loss = sums.tolist()
        n = max(len(self.test_y), 1)
        return {"test_acc": 100.0 * correct / n, "test_loss": loss / n}

    def _write_metrics(self) -> None:
        if self.rank != 0:
            return
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "w") as f:
            for row in self.history:
                f.write(json.dumps(row) + "\n")
        keys = list(dict.fromkeys(k for row in self.history for k in row))
        with open(os.path.join(self.run_dir, "metrics.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.history)

    def _write_static(self) -> None:
        if self.rank != 0:
            return
        with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(self.cfg.to_dict(), f, sort_keys=False)
        with open(os.path.join(self.run_dir, "subset_indices.json"), "w") as f:
            subset_seed = self.cfg.seed if self.cfg.data.subset_seed is None else self.cfg.data.subset_seed
            json.dump({"per_class": self.cfg.data.per_class, "subset_seed": subset_seed,
                       "indices": self.subset_indices.tolist()}, f)

    def _train_epoch(self, epoch: int, bar=None) -> dict[str, float]:
        """Train one epoch; the means of its logged terms (read every ``sync_every`` steps, the running loss
        shown by ``bar``, and at the end: the only host synchronisations of the epoch)."""
        self.log.begin_epoch()
        every, steps = self.cfg.sync_every, self._steps_per_epoch()
        for step, idx in enumerate(self._batches()):
            self._step(idx, epoch, step)
            if bar is not None:
                bar.update(1)
            if every is not None and (step + 1) % every == 0 and step + 1 < steps:
                running = self.log.read(epoch)
                if bar is not None:
                    bar.set_postfix(self._postfix(epoch, running["loss"]))
        return self.log.read(epoch) if self.log.steps else {}

    def _check_divergence(self, row: dict) -> None:
        """Warn (once a run) when the epoch's train loss is :data:`DIVERGENCE` times the first epoch's or more."""
        first = next((r for r in self.history if "train_loss" in r), None)
        if first is None or "train_loss" not in row or getattr(self, "_warned", False):
            return
        ratio = abs(row["train_loss"]) / max(abs(first["train_loss"]), 1e-30)
        if ratio >= DIVERGENCE:
            self._warned = True
            warnings.warn(f"run {self.cfg.name!r}: the train loss grew from {first['train_loss']:.3g} (epoch "
                          f"{first['epoch']}) to {row['train_loss']:.3g} (epoch {row['epoch']}), {ratio:.1e} times: "
                          "the run is diverging; lower the learning rate or the loss weights", DivergenceWarning,
                          stacklevel=2)

    def _steps_per_epoch(self) -> int:
        """How many batches :meth:`_batches` yields (short batches that BatchNorm cannot use are dropped)."""
        n, bs, size = len(self.train_y), self.cfg.data.batch_size, self.cfg.data.epoch_size
        full, rest = divmod(n if size is None else size, bs)
        least = 2 * self.world * self.cfg.accumulate
        return (full if bs >= least else 0) + (rest >= least)

    def _progress_bar(self):
        """A bar over all steps of the run (rank 0, ``progress``), or None."""
        if not (self.progress and self.rank == 0):
            return None
        from tqdm import tqdm

        steps = self._steps_per_epoch()
        return tqdm(total=steps * self.cfg.epochs, initial=steps * self.start_epoch, desc=self.cfg.name,
                    leave=False, unit="step")

    def _postfix(self, epoch: int, loss: float) -> dict[str, str]:
        last_acc = next((r["test_acc"] for r in reversed(self.history) if "test_acc" in r), math.nan)
        return {"epoch": f"{epoch + 1}/{self.cfg.epochs}", "loss": f"{loss:.3f}", "acc": f"{last_acc:.1f}"}

    def run(self, resume: bool = False) -> dict[str, Any]:
        os.makedirs(self.run_dir, exist_ok=True)
        result_path = os.path.join(self.run_dir, "result.json")
        self.setup()
        if resume and self.rank == 0:
            ckpt_io.remove_orphans(self.run_dir)  # temporary files of a write that a kill interrupted
        if os.path.exists(self.ckpt_path):
            if not resume:
                raise ckpt_io.CheckpointError(
                    f"run directory {self.run_dir!r} already holds a checkpoint; pass --resume to continue it or "
                    "choose another --out")
            self._restore()
        self._write_static()
        self.model.train()
        bar = self._progress_bar()
        for epoch in range(self.start_epoch, self.cfg.epochs):
            t0 = time.perf_counter()
            means = self._train_epoch(epoch, bar)
            if self.log.steps == 0:
                raise ValueError(f"run {self.cfg.name!r}: epoch {epoch} made 0 optimiser steps ({len(self.train_y)} "
                                 f"training examples, data.batch_size {self.cfg.data.batch_size}, "
                                 f"{self.world} process(es) x accumulate {self.cfg.accumulate} micro-batches, each "
                                 "needing 2 examples for BatchNorm)")
            average_batch_norm_stats(self.model)
            train_seconds = time.perf_counter() - t0
            row = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"], "steps": self.log.steps,
                   "train_seconds": train_seconds}
            row.update({f"train_{k}": v for k, v in means.items()})
            self._check_divergence(row)
            self.scheduler.step()
            if (epoch + 1) % self.cfg.eval_every == 0 or epoch + 1 == self.cfg.epochs:
                row.update(self.evaluate())
            row["seconds"] = time.perf_counter() - t0
            self.history.append(row)
            self._write_metrics()
            self._save(epoch)
            if bar is not None:
                bar.set_postfix(self._postfix(epoch, row.get("train_loss", math.nan)))
        if bar is not None:
            bar.close()
        result = {"name": self.cfg.name, "epochs": self.cfg.epochs, **(self.history[-1] if self.history else {}),
                  "total_train_seconds": sum(row["train_seconds"] for row in self.history)}
        result.update(self._final_evaluations())
        if self.rank == 0:
            ckpt_io.save_atomic(self.model.state_dict(), os.path.join(self.run_dir, "model.pt"))
            ckpt_io.write_json_atomic(result, result_path)  # a result.json is always complete
        return result

    def _final_evaluations(self) -> dict[str, Any]:
        """Evaluations of ``cfg.eval``: ``noise_stds`` (accuracy under Gaussian noise, E2) with ``noise_repeats``;
        ``batch_stats: true`` repeats each with BatchNorm using the test batches' statistics (keys suffixed
        ``_batch_stats``; :meth:`evaluate`)."""
        out: dict[str, Any] = {}
        stds = self.cfg.eval.get("noise_stds")
        modes = [False, True] if self.cfg.eval.get("batch_stats") else [False]
        if self.cfg.eval.get("batch_stats"):
            out["test_acc_batch_stats"] = self.evaluate(batch_stats=True)["test_acc"]
        for batch_stats in modes if stds else []:
            suffix = "_batch_stats" if batch_stats else ""
            repeats = int(self.cfg.eval.get("noise_repeats", 5))
            g = torch.Generator().manual_seed(12345)
            for std in stds:
                accs = [self.evaluate(float(std), g, batch_stats)["test_acc"] for _ in range(repeats if std else 1)]
                out[f"noise_{std}_acc_mean{suffix}"] = float(np.mean(accs))
                out[f"noise_{std}_acc_std{suffix}"] = float(np.std(accs))
        return out
