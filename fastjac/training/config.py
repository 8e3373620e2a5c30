"""Run configurations: typed dataclasses loaded from YAML and validated on load.

Every error names the offending field by its dotted path (``optim.lr``, ``data.per_class``) and says what was
expected. ``--set key=value`` overrides (values parsed as YAML) are applied before validation. YAML is read
with numbers in every usual notation as numbers (``5e-4`` too, which YAML 1.1 reads as a string).

A config describes one training run, or, with ``sweep``, a grid of runs (methods × samples per class ×
seeds) that together fill one table of a paper: each run's config is the base config with the method's
overrides applied (see :func:`expand`).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from . import terms as loss_terms
from .models import check_input_fits


#: The bundled experiment configs (``fastjac list``).
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def resolve_config(name: str) -> str:
    """A config path, or the name of a bundled config (with or without ``.yaml``)."""
    if os.path.isfile(name):
        return name
    bundled = os.path.join(CONFIG_DIR, name if name.endswith(".yaml") else name + ".yaml")
    if os.path.isfile(bundled):
        return bundled
    raise FileNotFoundError(f"config {name!r} is neither a file nor a bundled config; see `fastjac list`")


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``5e-4``, ``1E3``, ``+2.5e+1`` as floats (YAML 1.2 numbers)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def yaml_load(stream) -> Any:
    """YAML (a string or an open file) with :class:`_Loader`."""
    return yaml.load(stream, Loader=_Loader)


@dataclass
class DataConfig:
    dataset: str = "digits"              # cifar10 | cifar100 | mit_indoor | imagenet | digits
    root: Optional[str] = None           # data root (overridden by --data-root)
    per_class: Optional[int] = None      # few-samples-per-class subset of the training split (None: all)
    subset_seed: Optional[int] = None    # seed of the class-stratified subset draw (None: the run's seed)
    batch_size: int = 128
    epoch_size: Optional[int] = None     # examples per epoch, drawn as successive seeded permutations of the
                                         # training subset (fixes the optimiser steps per epoch of few-shot
                                         # runs: epoch_size / batch_size); None: one pass over the subset
    eval_batch_size: int = 500
    augment: bool = False                # random crop (zero padding crop_padding) + horizontal flip
    crop_padding: int = 4
    flip: bool = True
    image_size: int = 32                 # digits are upsampled, MIT Indoor resized to this
    channels: int = 3                    # digits: copies of the grey channel
    test_fraction: float = 0.25          # digits: held-out fraction (class-stratified, fixed seed 0)
    train_limit: Optional[int] = None    # keep only the first N training examples (smoke configs)
    test_limit: Optional[int] = None     # imagenet: only these files are read (seeded class-balanced order)


@dataclass
class OptimConfig:
    name: str = "adam"                   # adam | sgd
    lr: float = 1e-3
    momentum: float = 0.9                # sgd
    nesterov: bool = False
    weight_decay: float = 0.0            # on all parameters


@dataclass
class ScheduleConfig:
    name: str = "constant"               # constant | multistep (lr × gamma at each milestone epoch)
    milestones: list = field(default_factory=list)
    gamma: float = 0.1


@dataclass
class TeacherConfig:
    model: dict = field(default_factory=dict)   # as RunConfig.model
    checkpoint: Optional[str] = None            # a run directory or checkpoint file of a trained teacher
    train: Optional[dict] = None                # or: overrides of this config to train the teacher first
    cache_jacobians: Any = "auto"               # auto | true | false: jacobian_matching reads the teacher's rows
                                                # from a cache computed once at setup (auto: when the loss has the
                                                # term, data.augment is false and it fits 1 GiB; true: an error
                                                # otherwise; false: every step), fastjac.training.teacher_jacobians


@dataclass
class SweepConfig:
    methods: dict = field(default_factory=dict)       # method name -> overrides (dotted keys) of the base
    per_class: list = field(default_factory=list)     # values of data.per_class
    seeds: list = field(default_factory=list)         # values of seed
    paper: dict = field(default_factory=dict)         # method -> {per_class: published number}, for tables


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    epochs: int = 1
    model: dict = field(default_factory=dict)         # fastjac.training.models.build_model fields
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: dict = field(default_factory=lambda: {"ce": 1.0})   # term name -> weight, plus term options
    teacher: Optional[TeacherConfig] = None
    eval: dict = field(default_factory=dict)          # per-run evaluations after training (noise_stds, ...)
    evaluations: dict = field(default_factory=dict)   # experiment evaluations: name -> options (fastjac.evaluation)
    sweep: Optional[SweepConfig] = None
    deterministic: bool = False                       # torch.use_deterministic_algorithms
    accumulate: int = 1                               # micro-batches per step (emulates DDP ranks' BN)
    eval_every: int = 1                               # test evaluation every N epochs (and after the last)
    precision: str = "float32"                        # float32 | bfloat16: autocast of the training forward
                                                      # and loss terms; parameters and optimiser stay float32
    sync_every: Optional[int] = None                  # read the logged losses and finiteness flags on the
                                                      # host every N steps (None: once, at the epoch's end)
    description: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _check(value: Any, tp, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check(value, inner[0], path)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if tp in (list, dict) or origin in (list, dict):
        base = origin or tp
        if not isinstance(value, base):
            raise ConfigError(f"{path}: expected a {_type_name(base)}, got {value!r}")
        return copy.deepcopy(value)
    return value


def from_dict(cls, data: Any, path: str = "config"):
    """Build dataclass ``cls`` from a mapping, rejecting unknown fields and wrong types (errors name the path)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {k: _check(v, hints[k], f"{path}.{k}" if path != "config" else k) for k, v in data.items()}
    return cls(**kwargs)


_CHOICES = {
    "data.dataset": ("cifar10", "cifar100", "mit_indoor", "imagenet", "digits"),
    "optim.name": ("adam", "sgd"),
    "schedule.name": ("constant", "multistep"),
    "precision": ("float32", "bfloat16"),
}


#: The values of ``teacher.cache_jacobians``.
CACHE_JACOBIANS_SETTINGS = ("auto", True, False)


def check_cache_jacobians(setting, augment: bool, matches: bool) -> None:
    """``teacher.cache_jacobians`` is auto, true or false, and not true with ``data.augment`` when a
    ``jacobian_matching`` term is active (``matches``): the teacher then sees another image of an example every
    epoch, so its Jacobian rows cannot be cached."""
    if setting not in CACHE_JACOBIANS_SETTINGS or not isinstance(setting, (bool, str)):
        raise ConfigError(f"teacher.cache_jacobians: must be auto, true or false, got {setting!r}")
    if setting is True and augment and matches:
        raise ConfigError("teacher.cache_jacobians: true, but data.augment is true (the teacher sees another "
                          "image of an example every epoch, so its Jacobian rows cannot be cached); use auto or "
                          "false")


def validate(cfg: RunConfig) -> RunConfig:
    """Value checks beyond types."""
    for dotted, allowed in _CHOICES.items():
        value = get(cfg, dotted)
        if value not in allowed:
            raise ConfigError(f"{dotted}: must be one of {list(allowed)}, got {value!r}")
    if cfg.epochs < 0:
        raise ConfigError(f"epochs: must be >= 0 (0: evaluate the configured model without training), got {cfg.epochs!r}")
    positive = {"data.batch_size": cfg.data.batch_size,
                "data.eval_batch_size": cfg.data.eval_batch_size, "optim.lr": cfg.optim.lr,
                "accumulate": cfg.accumulate, "eval_every": cfg.eval_every}
    for dotted, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{dotted}: must be positive, got {value!r}")
    if cfg.sync_every is not None and cfg.sync_every < 1:
        raise ConfigError(f"sync_every: must be a positive number of steps or null (once per epoch), "
                          f"got {cfg.sync_every!r}")
    if cfg.data.epoch_size is not None and cfg.data.epoch_size < 1:
        raise ConfigError(f"data.epoch_size: must be a positive integer or null, got {cfg.data.epoch_size!r}")
    for dotted in ("data.per_class", "data.train_limit", "data.test_limit"):
        value = get(cfg, dotted)
        if value is not None and value < 1:
            raise ConfigError(f"{dotted}: must be a positive integer or null, got {value!r}")
    if cfg.data.batch_size % cfg.accumulate:
        raise ConfigError(f"accumulate: must divide data.batch_size ({cfg.data.batch_size}), got {cfg.accumulate}")
    if cfg.data.batch_size < 2 * cfg.accumulate:
        raise ConfigError(f"data.batch_size: BatchNorm needs at least 2 examples per micro-batch, so at least "
                          f"{2 * cfg.accumulate} with accumulate {cfg.accumulate}; got {cfg.data.batch_size} (a step "
                          "with fewer is skipped: the run would train nothing)")
    if sorted(cfg.schedule.milestones) != list(cfg.schedule.milestones) or not all(
            isinstance(m, int) and m > 0 for m in cfg.schedule.milestones):
        raise ConfigError(f"schedule.milestones: expected increasing positive epochs, got {cfg.schedule.milestones!r}")
    if "arch" not in cfg.model:
        raise ConfigError("model.arch: missing (e.g. vgg9, resnet18)")
    for name, weight in cfg.loss.items():
        if isinstance(weight, (int, float)) and not isinstance(weight, bool):
            continue
        if not isinstance(weight, dict) or "weight" not in weight:
            raise ConfigError(f"loss.{name}: expected a weight or a mapping with 'weight' and options, got {weight!r}")
    try:
        parsed = loss_terms.parse(cfg.loss)  # unknown terms and options, negative weights
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if cfg.teacher is not None:
        # the value, and `true` with augmentation (the size cap needs the data: checked before training starts,
        # fastjac.training.teacher_jacobians.use_cache)
        check_cache_jacobians(cfg.teacher.cache_jacobians, cfg.data.augment,
                              any(name == "jacobian_matching" and weight != 0 for name, weight, _ in parsed))
    _check_eval(cfg.eval)
    _check_inputs(cfg)
    for name, spec in cfg.evaluations.items():
        parse_evaluation_options(name, spec)
    return cfg


#: ``eval`` keys (the trainer's per-run evaluations after training) and what each must be.
EVAL_KEYS = {
    "noise_stds": "a non-empty list of noise stds >= 0",
    "noise_repeats": "a positive integer (repeats per noise std; needs noise_stds)",
    "batch_stats": "true or false",
}


def _check_eval(spec: dict) -> None:
    unknown = sorted(set(spec) - set(EVAL_KEYS))
    if unknown:
        raise ConfigError(f"eval.{unknown[0]}: unknown key; allowed: {sorted(EVAL_KEYS)}")
    number = (int, float)
    checks = {
        "noise_stds": lambda v: isinstance(v, list) and v and all(
            isinstance(x, number) and not isinstance(x, bool) and x >= 0 for x in v),
        "noise_repeats": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "batch_stats": lambda v: isinstance(v, bool),
    }
    for key, value in spec.items():
        if not checks[key](value):
            raise ConfigError(f"eval.{key}: expected {EVAL_KEYS[key]}, got {value!r}")
    if "noise_repeats" in spec and "noise_stds" not in spec:
        raise ConfigError("eval.noise_repeats: has no effect without eval.noise_stds")


def input_shape(data: DataConfig) -> tuple[int, int, int]:
    """``(channels, height, width)`` of the images the trainer feeds; ``data.channels`` and ``data.image_size``
    that a dataset cannot honour are errors naming them (CIFAR is 3×32×32, MIT Indoor and ImageNet RGB)."""
    if data.dataset == "digits":
        return data.channels, data.image_size, data.image_size
    if data.channels != 3:
        raise ConfigError(f"data.channels: {data.dataset} images have 3 channels, got {data.channels}")
    if data.dataset in ("cifar10", "cifar100") and data.image_size != 32:
        raise ConfigError(f"data.image_size: {data.dataset} images are 32x32 (not resized), got {data.image_size}")
    return 3, data.image_size, data.image_size


def _check_inputs(cfg: RunConfig) -> None:
    """The student (and the teacher) take the data's images: channels and image size, checked on the meta device
    (no weights read, nothing computed)."""
    shape = input_shape(cfg.data)
    specs = {"model": cfg.model}
    if cfg.teacher is not None:
        specs["teacher.model"] = cfg.teacher.model or cfg.model
    for field_name, spec in specs.items():
        try:
            check_input_fits(spec, shape)
        except ValueError as exc:
            message = str(exc) if str(exc).startswith("model") else f"model: {exc}"  # build_model names its fields
            raise ConfigError(message.replace("model", field_name, 1)) from exc


#: Evaluation name -> its options dataclass: filled by :func:`fastjac.evaluation.registry.register` (the
#: evaluations register when :mod:`fastjac.evaluation` is imported), read here to validate ``evaluations``.
EVALUATION_OPTIONS: dict[str, type] = {}


def parse_evaluation_options(name: str, spec: Any):
    """The options dataclass of evaluation ``name`` from its config mapping (``None``: all defaults); errors
    name ``evaluations.<name>[.<option>]``."""
    if name not in EVALUATION_OPTIONS:
        hint = "" if EVALUATION_OPTIONS else " (none is registered: import fastjac.evaluation first)"
        raise ConfigError(f"evaluations.{name}: unknown evaluation; expected one of {sorted(EVALUATION_OPTIONS)}{hint}")
    return from_dict(EVALUATION_OPTIONS[name], spec or {}, f"evaluations.{name}")


def get(cfg: Any, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """``data[a][b][c] = value`` for ``dotted = "a.b.c"``, creating mappings on the way."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: {part!r} is not a mapping in this config")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``["optim.lr=0.1", "loss.jacobian_norm=0.01"]`` -> pairs, values parsed as YAML."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set: expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key.strip()}: the value {raw!r} is not valid YAML: {exc}") from exc
        out.append((key.strip(), value))
    return out


def read(path: str, _seen: tuple = ()) -> dict:
    """The mapping of a YAML config file, with ``base:`` resolved.

    A config may derive from another: ``base: NAME`` (a file next to this one, ``.yaml`` optional) plus
    ``overrides: {dotted.key: value, ...}``; its other top-level fields replace the base's. Smoke and digits
    variants are written this way, so they run exactly the code path of the full config.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    with open(path) as f:
        try:
            data = yaml_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r}: expected a mapping at the top level")
    base = data.pop("base", None)
    overrides = data.pop("overrides", None) or {}
    if base is None:
        if overrides:
            raise ConfigError(f"{path}: 'overrides' needs a 'base' config")
        return data
    base_path = os.path.join(os.path.dirname(os.path.abspath(path)), base if base.endswith(".yaml") else base + ".yaml")
    if base_path in _seen:
        raise ConfigError(f"{path}: circular 'base' chain through {base_path}")
    merged = read(base_path, _seen + (base_path,))
    merged.update(data)
    if not isinstance(overrides, dict):
        raise ConfigError(f"{path}: 'overrides' must map dotted keys to values")
    for key, value in overrides.items():
        set_dotted(merged, key, copy.deepcopy(value))
    return merged


def load(path: str, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a YAML config file (``base`` resolved), applying ``--set`` overrides first."""
    return from_mapping(read(path), overrides)


def from_mapping(data: dict, overrides: list[str] | None = None) -> RunConfig:
    data = copy.deepcopy(data)
    for key, value in parse_overrides(overrides or []):
        set_dotted(data, key, value)
    return validate(from_dict(RunConfig, data))


def sweep_cells(cfg: RunConfig) -> list[tuple[dict, dict]]:
    """``[(cell, method_overrides)]`` of a config's sweep, ``cell`` = {method, per_class, seed} (methods × samples
    per class × seeds, in that order); a config without ``sweep`` is one cell named after the config."""
    if cfg.sweep is None:
        return [({"method": cfg.name, "per_class": cfg.data.per_class, "seed": cfg.seed}, {})]
    methods = cfg.sweep.methods or {cfg.name: {}}
    per_classes = cfg.sweep.per_class or [cfg.data.per_class]
    seeds = cfg.sweep.seeds or [cfg.seed]
    return [({"method": method, "per_class": per_class, "seed": seed}, changes)
            for method, changes in methods.items() for per_class in per_classes for seed in seeds]


def expand(cfg: RunConfig) -> list[tuple[dict, RunConfig]]:
    """The runs of a config: ``[(cell, run_config)]`` where ``cell`` = {method, per_class, seed} (see
    :func:`sweep_cells`); each run config is validated (errors name the sweep method)."""
    if cfg.sweep is None:
        return [(sweep_cells(cfg)[0][0], cfg)]
    base = cfg.to_dict()
    base["sweep"] = None
    runs = []
    for cell, changes in sweep_cells(cfg):
        method = cell["method"]
        if not isinstance(changes, dict):
            raise ConfigError(f"sweep.methods.{method}: expected a mapping of dotted overrides, got {changes!r}")
        data = copy.deepcopy(base)
        for key, value in changes.items():
            if key == "loss":  # a method's loss replaces the base loss entirely
                data["loss"] = copy.deepcopy(value)
            else:
                set_dotted(data, key, copy.deepcopy(value))
        per_class, seed = cell["per_class"], cell["seed"]
        data["data"]["per_class"] = per_class
        data["seed"] = seed
        data["name"] = f"{cfg.name}/{method}/pc{per_class if per_class is not None else 'all'}/seed{seed}"
        try:
            run = validate(from_dict(RunConfig, data))
        except ConfigError as exc:
            raise ConfigError(f"sweep.methods.{method}: {exc}") from exc
        runs.append((cell, run))
    return runs
