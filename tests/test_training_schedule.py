"""Trainer features of the few-shot schedules: ``data.epoch_size`` (optimiser steps per epoch), ``model.width``,
evaluation with batch statistics, and the rule that a finished run is reused only for the config it was
trained with."""

import pytest
import torch
from _training_config import config_with

from fastjac.training import checkpoint as ckpt_io
from fastjac.training import config
from fastjac.training.models import build_model, scaled_vgg_config
from fastjac.experiments.runner import run_experiment
from fastjac.training.trainer import Trainer

BASE = {
    "name": "s", "epochs": 2, "seed": 1,
    "model": {"arch": "vgg4", "num_classes": 10, "in_channels": 1, "width": 0.25},
    "data": {"dataset": "digits", "image_size": 8, "channels": 1, "batch_size": 10, "per_class": 1,
             "epoch_size": 50, "test_limit": 60, "eval_batch_size": 30},
    "optim": {"name": "adam", "lr": 1e-3},
}


def _cfg(**changes):
    return config_with(BASE, **changes)


def test_epoch_size_fixes_the_steps_and_balances_examples(tmp_path):
    trainer = Trainer(_cfg(), str(tmp_path), progress=False)
    trainer.setup()
    batches = list(trainer._batches())
    assert [len(b) for b in batches] == [10] * 5           # 50 examples per epoch of a 10-image subset
    counts = torch.bincount(torch.cat(batches), minlength=10)
    assert counts.tolist() == [5] * 10                     # successive permutations: each image equally often
    assert all(sorted(b.tolist()) == list(range(10)) for b in batches)   # batch = subset size: every batch is it
    result = Trainer(_cfg(), str(tmp_path / "run"), progress=False).run()
    assert result["steps"] == 5


def test_epoch_size_uneven_and_default_one_pass(tmp_path):
    trainer = Trainer(_cfg(**{"data.epoch_size": 23, "data.batch_size": 4}), str(tmp_path), progress=False)
    trainer.setup()
    order = torch.cat(list(trainer._batches()))
    assert len(order) == 23                                # 5 batches of 4 and a last one of 3 (BatchNorm: >= 2)
    counts = torch.bincount(order, minlength=10)
    assert counts.max() - counts.min() <= 1
    trainer = Trainer(_cfg(**{"data.epoch_size": None, "data.batch_size": 2}), str(tmp_path), progress=False)
    trainer.setup()
    assert sorted(torch.cat(list(trainer._batches())).tolist()) == list(range(10))


def test_epoch_size_must_be_positive():
    with pytest.raises(config.ConfigError, match="data.epoch_size"):
        _cfg(**{"data.epoch_size": 0})


def test_width_scales_every_vgg_block():
    assert scaled_vgg_config([64, "M", 128, "M", 512, "M"], 0.25) == [16, "M", 32, "M", 128, "M"]
    model = build_model({"arch": "vgg4", "num_classes": 10, "in_channels": 1, "width": 0.25, "fused": False})
    convs = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [16, 32, 128] and model.classifier.in_features == 128
    with pytest.raises(ValueError, match="model.width"):
        build_model({"arch": "vgg4", "num_classes": 10, "width": 0})
    with pytest.raises(ValueError, match="model.width"):
        build_model({"arch": "resnet18", "num_classes": 10, "width": 0.5})


def test_batch_statistics_evaluation_leaves_the_model_alone(tmp_path):
    cfg = _cfg(**{"eval": {"batch_stats": True, "noise_stds": [0.0, 1.0], "noise_repeats": 2}})
    trainer = Trainer(cfg, str(tmp_path), progress=False)
    result = trainer.run()
    assert {"test_acc_batch_stats", "noise_1.0_acc_mean_batch_stats", "noise_1.0_acc_mean"} <= set(result)
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    again = trainer.evaluate(batch_stats=True)
    assert again["test_acc"] == result["test_acc_batch_stats"]
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in state.items())   # running stats intact
    assert trainer.model.training


def test_finished_cell_is_reused_only_for_its_own_config(tmp_path):
    cfg = _cfg()
    out = str(tmp_path / "out")
    first = run_experiment(cfg, out, progress=False, log=lambda *_: None)
    logs = []
    again = run_experiment(cfg, out, resume=True, progress=False, log=logs.append)
    assert logs == ["[done] s"] and again[0]["test_acc"] == first[0]["test_acc"]
    with pytest.raises(ckpt_io.CheckpointError, match=r"different config \(fields \['epochs', 'optim.lr'\]\)"):
        run_experiment(_cfg(epochs=3, **{"optim.lr": 0.5}), out, resume=True, progress=False, log=lambda *_: None)
