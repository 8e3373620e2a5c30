"""``fastjac run`` as a user calls it (``fastjac.cli.main``): stale runs are refused or recomputed, never reported
as results; settings that would be ignored, runs that would train nothing and bad input are errors naming the
field, argument or file, raised before training starts (and before anything in ``--out`` is rewritten)."""
import json
import os

import pytest
import torch

import fastjac
from fastjac.cli import main
from fastjac.experiments import plan
from fastjac.training import config
from fastjac.training.models import build_model
from fastjac.training.trainer import RunData, Trainer

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = """\
name: tiny
description: a two-method sweep of VGG-4 on 8x8 digits (seconds)
epochs: 1
model: {arch: vgg4, num_classes: 10, in_channels: 1, width: 0.25}
data: {dataset: digits, image_size: 8, channels: 1, batch_size: 10, train_limit: 60, test_limit: 30}
optim: {name: adam, lr: 2e-3}
sweep:
  methods:
    CE: {loss: {ce: 1.0}}
    CE + J: {loss: {ce: 1.0, jacobian_norm: 0.01}}
  seeds: [0]
"""


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return str(path)


def _run(capfd, *argv) -> tuple[int, str]:
    rc = main(["run", *argv, "--no-progress"])
    return rc, capfd.readouterr().err


def _row(capfd, method: str) -> str:
    return next(line for line in capfd.readouterr().out.splitlines() if line.startswith(f"| {method} |"))


def test_resume_with_another_config_is_refused_and_keeps_experiment_yaml(tiny, tmp_path, capfd):
    out = str(tmp_path / "A")
    assert _run(capfd, tiny, "--out", out)[0] == 0
    experiment = open(os.path.join(out, "experiment.yaml")).read()
    rc, err = _run(capfd, tiny, "--out", out, "--resume", "--set", "epochs=3", "--set", "optim.lr=0.5")
    assert rc == 2 and "finished run of a different config" in err and "'epochs'" in err and "'optim.lr'" in err
    rc, err = _run(capfd, tiny, "--out", out)  # without --resume: the finished runs are not overwritten
    assert rc == 2 and "already holds a run" in err
    assert open(os.path.join(out, "experiment.yaml")).read() == experiment
    assert main(["run", tiny, "--out", out, "--resume", "--no-progress"]) == 0  # the same config: reused
    assert capfd.readouterr().out.count("[done]") == 2
    # a field that changes no result (how often the logged losses are read) does not make the runs stale
    assert main(["run", tiny, "--out", out, "--resume", "--no-progress", "--set", "sync_every=5"]) == 0
    assert capfd.readouterr().out.count("[done]") == 2


def test_table_lists_only_the_cells_of_the_experiment(tiny, tmp_path, capfd):
    out = str(tmp_path / "A")
    one = ["--set", "sweep.methods={CE: {}}"]
    assert _run(capfd, tiny, "--out", out, *one, "--set", "sweep.seeds=[0, 1]")[0] == 0
    assert main(["table", out]) == 0 and " ± " in _row(capfd, "CE")  # mean ± std of two seeds
    assert _run(capfd, tiny, "--out", out, *one, "--resume", "--set", "sweep.seeds=[1]")[0] == 0
    assert main(["table", out]) == 0 and " ± " not in _row(capfd, "CE")  # seed 0 is not this experiment's


@pytest.mark.parametrize("setting,field", [
    ("loss.jacobian_norm=0.1", "loss.jacobian_norm"),   # every sweep method defines its own loss
    ("data.per_class=3", "data.per_class"),             # ... and here sweep.per_class would replace it
    ("eval.noise_stdz=[0.1]", "eval.noise_stdz"),        # unknown eval key
    ("optim.momentum=0.5", "optim.momentum"),            # Adam has no momentum setting
    ("data.batch_size=1", "data.batch_size"),            # BatchNorm needs two: 0 steps
    ("data.train_limit=-5", "data.train_limit"),
    ("data.epoch_size=1", "data.batch_size"),            # 1 example per epoch: 0 steps
    ("sweep.methods.CE.loss.ce=-1", "loss.ce"),          # a negative weight maximises CE
    ("data.channels=3", "data.channels"),
    ("data.image_size=4", "data.image_size"),            # too small for VGG-4's three pools
    ("sweep.methods.CE.loss.jacobain=1", "loss.jacobain"),
])
def test_setting_that_would_be_ignored_or_train_nothing_is_an_error(tiny, tmp_path, capfd, setting, field):
    if setting == "data.per_class=3":
        setting_args = ["--set", "sweep.per_class=[1]", "--set", setting]
    else:
        setting_args = ["--set", setting]
    out = tmp_path / "out"
    rc, err = _run(capfd, tiny, "--out", str(out), *setting_args)
    assert rc == 2 and field in err, err
    assert not out.exists()  # refused before anything was written


def test_every_cell_is_validated_before_the_teacher_trains(tmp_path, capfd):
    out = tmp_path / "out"
    rc, err = _run(capfd, "smoke_digits", "--out", str(out), "--set", "sweep.per_class=[5, 500]")
    assert rc == 2 and "data.per_class" in err and "CE/pc500" in err
    assert not (out / "teacher").exists()


def test_numbers_in_e_notation_are_numbers(tiny, tmp_path, capfd):
    out = tmp_path / "out"
    assert _run(capfd, tiny, "--out", str(out), "--set", "optim.lr=5e-4", "--set", "sweep.methods={CE: {}}")[0] == 0
    trained = config.load(str(out / "CE" / "pcall" / "seed0" / "config.yaml"))
    assert trained.optim.lr == 5e-4
    assert config.load(tiny).optim.lr == 2e-3  # `lr: 2e-3` in the file


@pytest.mark.parametrize("device,match", [("gpu", "--device: 'gpu'"), ("cuda:7", "--device cuda:7")])
def test_device_is_checked_before_the_data_loads(tiny, tmp_path, capfd, device, match):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    rc, err = _run(capfd, tiny, "--out", str(tmp_path / "out"), "--device", device)
    assert rc == 2 and match in err


def test_out_and_resume_arguments(tiny, tmp_path, capfd):
    rc, err = _run(capfd, tiny, "--out", str(tmp_path / "missing"), "--resume")
    assert rc == 2 and "--resume" in err and "does not exist" in err
    (tmp_path / "file").write_text("")
    rc, err = _run(capfd, tiny, "--out", str(tmp_path / "file"))
    assert rc == 2 and "--out" in err and "is a file" in err


def test_truncated_result_is_named_and_orphaned_temporaries_are_removed_on_resume(tiny, tmp_path, capfd):
    out = tmp_path / "A"
    assert _run(capfd, tiny, "--out", str(out), "--set", "sweep.methods={CE: {}}")[0] == 0
    cell = out / "CE" / "pcall" / "seed0"
    result = (cell / "result.json").read_text()
    (cell / "result.json").write_text(result[:20])
    rc, err = _run(capfd, tiny, "--out", str(out), "--set", "sweep.methods={CE: {}}", "--resume")
    assert rc == 2 and "result.json" in err and "truncated" in err
    assert main(["table", str(out)]) == 2 and "result.json" in capfd.readouterr().err
    # an unfinished run (its last checkpoint, no result) with the temporary file of a killed checkpoint write
    (cell / "result.json").unlink()
    (cell / ".tmp-killed.pt").write_bytes(b"partial")
    assert _run(capfd, tiny, "--out", str(out), "--set", "sweep.methods={CE: {}}", "--resume")[0] == 0
    assert not (cell / ".tmp-killed.pt").exists()
    assert json.loads((cell / "result.json").read_text())["test_acc"] == json.loads(result)["test_acc"]


def test_synth_writes_the_data_of_every_smoke_config(tmp_path, capfd):
    root = str(tmp_path / "data")
    assert main(["synth", root]) == 0 and "--data-root" in capfd.readouterr().out
    for name in sorted(n[:-5] for n in os.listdir(config.CONFIG_DIR) if n.startswith("smoke_")):
        cfg = config.load(config.resolve_config(name))
        plan.check_runs(cfg, plan.plan(cfg, str(tmp_path / name)), False, root, 1)  # reads every run's labels


@pytest.mark.parametrize("method", ["input_gradient", "integrated_gradients", "smoothgrad", "gradcam", "fullgrad"])
@pytest.mark.parametrize("target", [10, -1])
def test_saliency_target_out_of_range_names_target_and_range(method, target):
    torch.manual_seed(0)
    model = build_model({"arch": "vgg4", "num_classes": 10, "in_channels": 1, "width": 0.25}).eval()
    with pytest.raises(ValueError, match=r"target.*\[0, 10\)"):
        fastjac.saliency(model, torch.randn(2, 1, 8, 8), target=target, method=method)


def test_evaluation_of_other_options_is_not_reused(tiny, tmp_path, capfd):
    out = str(tmp_path / "A")
    args = [tiny, "--out", out, "--set", "sweep.methods={CE: {}}", "--set",
            "evaluations={pixel_perturbation: {methods: [random], fractions: [0.1], images: 10, batch_size: 10}}"]
    assert _run(capfd, *args)[0] == 0
    assert _run(capfd, *args, "--resume")[0] == 0  # the same options: the table is reused
    rc, err = _run(capfd, *args, "--resume", "--set", "evaluations.pixel_perturbation.fractions=[0.2]")
    assert rc == 2 and "evaluations.pixel_perturbation" in err and "fractions" in err


def test_trainer_refuses_an_epoch_without_optimiser_steps(tmp_path):
    """Data handed to the trainer directly (as ROAR does) bypasses the experiment's checks: one training
    example cannot make a BatchNorm step, and the trainer says so instead of reporting an untrained model."""
    cfg = config.from_mapping({"model": {"arch": "vgg4", "num_classes": 10, "in_channels": 1, "width": 0.25},
                               "data": {"dataset": "digits", "image_size": 8, "channels": 1, "batch_size": 10}})
    x = torch.rand(3, 1, 8, 8)
    data = RunData(x[:1], torch.tensor([0]), x, torch.tensor([0, 1, 2]), torch.tensor([0]))
    with pytest.raises(ValueError, match="0 optimiser steps"):
        Trainer(cfg, str(tmp_path / "r"), progress=False, data=data).run()
    assert not (tmp_path / "r" / "result.json").exists()
