"""Trainer: exact resume, atomic checkpoints, non-finite losses, config validation, CLI, DDP equivalence."""
import json
import os
import subprocess
import sys

import pytest
import torch
from _training_config import config_with

from fastjac.training import checkpoint as ckpt_io
from fastjac.training import config, terms
from fastjac.training.models import build_model
from fastjac.training.trainer import NonFiniteLossError, Trainer

BASE = {
    "name": "t", "epochs": 3, "seed": 3,
    "model": {"arch": "vgg4", "num_classes": 10, "in_channels": 1},
    "data": {"dataset": "digits", "image_size": 8, "channels": 1, "batch_size": 16, "train_limit": 120,
             "test_limit": 40, "augment": True, "crop_padding": 1},
    "optim": {"name": "sgd", "lr": 0.05},
    "schedule": {"name": "multistep", "milestones": [2]},
    "model_dropout_note": None,
}
BASE.pop("model_dropout_note")


def _cfg(**changes):
    return config_with(BASE, **changes)


def _state(run_dir):
    return torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)


def _history(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("seconds")} for line in f]


def _killed_run(cfg, run_dir, monkeypatch, epoch):
    """Run ``cfg`` into ``run_dir`` and kill it in the middle of ``epoch`` (after the previous checkpoint)."""
    original = Trainer._step

    def dying(self, idx, at_epoch, step):
        if at_epoch == epoch and step == 1:
            raise KeyboardInterrupt("killed")
        return original(self, idx, at_epoch, step)

    monkeypatch.setattr(Trainer, "_step", dying)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, str(run_dir), progress=False).run()
    monkeypatch.setattr(Trainer, "_step", original)
    assert ckpt_io.load(str(run_dir / "checkpoint.pt"))["epoch"] == epoch - 1


def test_resume_is_bit_identical(tmp_path, monkeypatch):
    cfg = _cfg(**{"model.dropout": 0.3})
    Trainer(cfg, str(tmp_path / "full"), progress=False).run()
    _killed_run(cfg, tmp_path / "killed", monkeypatch, epoch=2)
    with pytest.raises(ckpt_io.CheckpointError, match="--resume"):
        Trainer(cfg, str(tmp_path / "killed"), progress=False).run()
    Trainer(cfg, str(tmp_path / "killed"), progress=False).run(resume=True)

    full, resumed = _state(tmp_path / "full"), _state(tmp_path / "killed")
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    assert _history(tmp_path / "full") == _history(tmp_path / "killed")


def test_checkpoint_of_an_earlier_version_resumes(tmp_path, monkeypatch):
    """A checkpoint without the ``precision`` and ``sync_every`` fields, of a non-fused Adam, resumes (fused) and
    ends as the uninterrupted run; a resumed run may change ``sync_every``."""
    cfg = _cfg(epochs=2, **{"optim.name": "adam"})
    Trainer(cfg, str(tmp_path / "full"), progress=False).run()
    _killed_run(cfg, tmp_path / "old", monkeypatch, epoch=1)
    path = str(tmp_path / "old" / "checkpoint.pt")
    state = ckpt_io.load(path)
    del state["config"]["precision"], state["config"]["sync_every"]
    for group in state["optimizer"]["param_groups"]:
        group["fused"], group["foreach"] = None, None
    ckpt_io.save_atomic(state, path)
    Trainer(_cfg(epochs=2, sync_every=3, **{"optim.name": "adam"}), str(tmp_path / "old"), progress=False).run(resume=True)
    full, resumed = _state(tmp_path / "full"), _state(tmp_path / "old")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_corrupt_or_mismatched_checkpoint_is_an_error(tmp_path):
    cfg = _cfg(epochs=1)
    run = tmp_path / "r"
    Trainer(cfg, str(run), progress=False).run()
    with pytest.raises(ckpt_io.CheckpointError, match="optim.lr"):
        Trainer(_cfg(epochs=1, **{"optim.lr": 0.1}), str(run), progress=False).run(resume=True)
    (run / "checkpoint.pt").write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(ckpt_io.CheckpointError, match="corrupt"):
        Trainer(cfg, str(run), progress=False).run(resume=True)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    ckpt_io.save_atomic({"a": 1}, path)

    def broken(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        ckpt_io.save_atomic({"a": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"a": 1}
    assert os.listdir(tmp_path) == ["c.pt"]


def test_non_finite_loss_names_term_epoch_and_step(tmp_path, monkeypatch):
    calls = {"n": 0}

    def exploding(ctx):
        calls["n"] += 1
        return ctx.logits.sum() * (float("nan") if calls["n"] == 5 else 0.0)

    monkeypatch.setitem(terms.TERMS, "exploding", terms.Term(exploding))
    cfg = _cfg(loss={"ce": 1.0, "exploding": 1.0})
    steps_per_epoch = 120 // 16
    with pytest.raises(NonFiniteLossError, match=r"'exploding' is nan at epoch 0, step 4"):
        Trainer(cfg, str(tmp_path / "r"), progress=False).run()
    assert steps_per_epoch > 4


@pytest.mark.parametrize("changes,match", [
    ({"optim.name": "rmsprop"}, "optim.name"),
    ({"epochs": -1}, "epochs"),
    ({"data.dataset": "mnist"}, "data.dataset"),
    ({"data.batch_sise": 3}, "batch_sise"),
    ({"schedule.milestones": [5, 2]}, "schedule.milestones"),
    ({"accumulate": 3}, "accumulate"),
    ({"loss": {"ce": "one"}}, "loss.ce"),
])
def test_config_errors_name_the_field(changes, match):
    with pytest.raises(config.ConfigError, match=match):
        _cfg(**changes)


def test_unknown_loss_term_is_named(tmp_path):
    with pytest.raises(ValueError, match="loss.jacobain"):
        Trainer(_cfg(loss={"jacobain": 1.0}), str(tmp_path), progress=False)


def test_sweep_expands_methods_per_class_and_seeds():
    cfg = _cfg(sweep={"methods": {"CE": {}, "CE + A": {"loss": {"ce": 1, "activation_matching": 1}}},
                      "per_class": [1, 5], "seeds": [0, 1]})
    runs = config.expand(cfg)
    assert len(runs) == 8
    cell, run = runs[-1]
    assert cell == {"method": "CE + A", "per_class": 5, "seed": 1}
    assert run.loss == {"ce": 1, "activation_matching": 1} and run.data.per_class == 5 and run.seed == 1


def _cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastjac", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=600)


def test_cli_run_table_plot(tmp_path):
    out = str(tmp_path / "out")
    r = _cli("run", "smoke_digits", "--out", out, "--no-progress", "--set", "epochs=1")
    assert r.returncode == 0, r.stderr
    assert "| CE + A + J |" in r.stdout
    r = _cli("table", out)
    assert r.returncode == 0 and "5 per class" in r.stdout and "| CE + A |" in r.stdout
    r = _cli("plot", out)
    assert r.returncode == 0 and os.path.isfile(r.stdout.strip())
    r = _cli("run", "no_such_config")
    assert r.returncode == 2 and "no_such_config" in r.stderr


def test_ddp_matches_single_process_accumulation(tmp_path):
    """2 gloo processes, each half of every global batch, against one process with accumulate=2 (the same
    BatchNorm batch statistics), with a double-backward loss (Jacobian norm): equal parameters up to float
    reduction order, and equal logged losses (averaged over the ranks)."""
    common = ["--no-progress", "--set", "sweep=null", "--set", "teacher=null", "--set", "epochs=1",
              "--set", "data.per_class=10", "--set", "optim.name=sgd", "--set", "optim.lr=0.05",
              "--set", "loss={ce: 1.0, jacobian_norm: {weight: 0.1, form: cross_entropy}}"]
    single = _cli("run", "smoke_digits", "--out", str(tmp_path / "single"), "--set", "accumulate=2", *common,
                  env={"OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                          "-m", "fastjac", "run", "smoke_digits", "--out", str(tmp_path / "ddp"), *common],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = torch.load(tmp_path / "single/smoke_digits/pc10/seed0/model.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp/smoke_digits/pc10/seed0/model.pt", weights_only=True)
    torch.manual_seed(0)  # the runs' seed: their initial parameters
    run_cfg = config.load(str(tmp_path / "single/smoke_digits/pc10/seed0/config.yaml"))
    before = build_model(run_cfg.model).state_dict()
    moved = 0
    for k in a:
        if a[k].is_floating_point() and "running" not in k:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
            moved += not torch.allclose(a[k], before[k])
    assert moved > 0
    # the logged train loss of the DDP run is averaged over the ranks: that of the whole batch
    single_rows, ddp_rows = (_history(tmp_path / run / "smoke_digits/pc10/seed0") for run in ("single", "ddp"))
    for one, two in zip(single_rows, ddp_rows, strict=True):
        for key in ("train_loss", "train_ce", "train_jacobian_norm"):
            assert two[key] == pytest.approx(one[key], rel=1e-5), key
