"""The teacher-Jacobian cache of Jacobian matching (``teacher.cache_jacobians``,
fastjac/training/teacher_jacobians.py): its rows are the per-step teacher rows (``label`` and ``top``, under the
step's autocast), a step with it equals a step without it to rounding, a resumed run equals an uninterrupted
one exactly, ``auto`` falls back to the per-step route with augmentation or over the size cap, ``true`` there is
an error naming the field, and gradient accumulation reads every micro-batch's own rows."""
import json
import os

import pytest
import torch
from _training_config import term_config

from fastjac import input_jacobian
from fastjac.experiments import plan
from fastjac.training import checkpoint as ckpt_io
from fastjac.training import config, jacobian_terms, teacher_jacobians, terms
from fastjac.training import data as data_io
from fastjac.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("single_thread")


def _cfg(tmp_path, classes="label", **changes):
    loss = {"ce": 1.0, "jacobian_matching": {"weight": 0.1, "normalize": True, "classes": classes}}
    return term_config("jacobian_matching", tmp_path, **{"loss": loss, **changes})


def _trainer(tmp_path, classes="label", **changes):
    """A set-up trainer of :func:`_cfg` (the teacher in ``tmp_path``; nothing is written by a setup)."""
    trainer = Trainer(_cfg(tmp_path, classes, **changes), str(tmp_path / "run"), progress=False)
    trainer.setup()
    trainer.model.train()
    return trainer


def _per_step_rows(trainer, idx, classes):
    """The teacher's rows as the per-step route computes them for the batch ``idx``: (rows, classes)."""
    x = data_io.normalize(trainer.train_x[idx], trainer.cfg.data.dataset)
    with trainer._autocast():
        with torch.no_grad():
            c = trainer.train_y[idx] if classes == "label" else trainer.teacher(x).argmax(1)
        return input_jacobian(trainer.teacher, x, c, mode="target", create_graph=False).jacobian, c


@pytest.mark.parametrize("classes", ["label", "top"])
def test_cached_rows_are_the_teachers_per_step_rows(tmp_path, classes):
    trainer = _trainer(tmp_path, classes)
    cache = trainer.teacher_jacobians
    n = len(trainer.train_y)
    assert cache is not None and classes in cache and ("label" in cache) == (classes == "label")
    assert cache.nbytes == teacher_jacobians.cache_bytes(n, trainer.train_x.shape[1:], [classes])
    first = torch.arange(trainer.cfg.data.batch_size)  # the cache's first chunk: the same computation, bit for bit
    rows, c = _per_step_rows(trainer, first, classes)
    assert torch.equal(cache.rows(classes, first), rows)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(5))[:12]  # another batch: equal to rounding
    rows, c = _per_step_rows(trainer, idx, classes)
    torch.testing.assert_close(cache.rows(classes, idx), rows, rtol=1e-5, atol=1e-7)
    if classes == "top":
        assert torch.equal(cache.top(idx), c)
        assert not torch.equal(c, trainer.train_y[idx])  # top is not the label (the test can tell them apart)
    else:
        assert cache.top(idx) is None
    # a wrong index is detected: the rows differ from example to example
    assert not torch.allclose(cache.rows(classes, idx.roll(1)), rows, rtol=1e-3, atol=1e-5)


def test_cache_is_computed_under_the_steps_autocast_and_is_reproducible(tmp_path):
    trainer = _trainer(tmp_path, precision="bfloat16")
    first = torch.arange(trainer.cfg.data.batch_size)
    rows, _ = _per_step_rows(trainer, first, "label")  # under the trainer's bf16 autocast
    assert torch.equal(trainer.teacher_jacobians.rows("label", first), rows)
    x = data_io.normalize(trainer.train_x[first], trainer.cfg.data.dataset)
    full = input_jacobian(trainer.teacher, x, trainer.train_y[first], mode="target", create_graph=False).jacobian
    assert not torch.equal(rows, full)  # bf16 differs from float32: the cache did run under autocast
    again = _trainer(tmp_path, precision="bfloat16")  # a second setup (a resumed run's): bit-identical
    all_idx = torch.arange(len(trainer.train_y))
    assert torch.equal(again.teacher_jacobians.rows("label", all_idx), trainer.teacher_jacobians.rows("label", all_idx))


def _one_step(trainer, idx):
    trainer._step(idx, 0, 0)
    grads = {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None}
    return trainer.log.read(0), grads


def _teacher_calls(trainer):
    calls = []
    trainer.teacher.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("classes", ["label", "top"])
def test_a_cached_step_equals_a_per_step_one(tmp_path, classes, monkeypatch):
    idx = torch.randperm(40, generator=torch.Generator().manual_seed(3))[:8]
    live = _trainer(tmp_path, classes, **{"teacher.cache_jacobians": False})
    assert live.teacher_jacobians is None
    live_calls = _teacher_calls(live)
    ref_values, ref_grads = _one_step(live, idx)
    assert live_calls  # the per-step route runs the teacher

    cached = _trainer(tmp_path, classes, **{"teacher.cache_jacobians": True})
    calls = _teacher_calls(cached)
    values, grads = _one_step(cached, idx)
    assert not calls  # the cached step never runs the teacher (nor its top class)
    assert values.keys() == ref_values.keys() and values["jacobian_matching"] > 0
    for k in values:
        assert values[k] == pytest.approx(ref_values[k], rel=1e-5, abs=1e-7), k
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)

    # the check can fail: rows of the wrong examples give another loss
    wrong = _trainer(tmp_path, classes)
    rows = wrong.teacher_jacobians._rows[classes]
    wrong.teacher_jacobians._rows[classes] = rows.roll(1, 0)
    values, _ = _one_step(wrong, idx)
    assert values["jacobian_matching"] != pytest.approx(ref_values["jacobian_matching"], rel=1e-3)


def test_accumulation_reads_each_micro_batchs_rows(tmp_path, monkeypatch):
    seen = []
    original = terms.StepContext.cached_teacher_rows

    def spy(self, which):
        rows = original(self, which)
        seen.append((self.x.detach().clone(), self.y.clone(), self.indices.clone(), rows))
        return rows

    monkeypatch.setattr(terms.StepContext, "cached_teacher_rows", spy)
    idx = torch.randperm(40, generator=torch.Generator().manual_seed(4))[:8]
    cached = _trainer(tmp_path, accumulate=2)
    values, grads = _one_step(cached, idx)
    assert [tuple(i.tolist()) for _, _, i, _ in seen] == [tuple(idx[:4].tolist()), tuple(idx[4:].tolist())]
    for x, y, _, rows in seen:  # each micro-batch's rows are the teacher's rows of its own inputs
        per_step = input_jacobian(cached.teacher, x, y, mode="target", create_graph=False).jacobian
        torch.testing.assert_close(rows, per_step, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(rows.flip(0), per_step, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(seen[0][3], cached.teacher_jacobians.rows("label", idx[:4]), rtol=0, atol=0)

    live = _trainer(tmp_path, accumulate=2, **{"teacher.cache_jacobians": False})
    ref_values, ref_grads = _one_step(live, idx)
    for k in values:
        assert values[k] == pytest.approx(ref_values[k], rel=1e-5, abs=1e-7), k
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def _killed_run(cfg, run_dir, monkeypatch, epoch):
    """Run ``cfg`` into ``run_dir`` and kill it in the middle of ``epoch`` (tests/test_training_trainer.py)."""
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


def _state(run_dir):
    return torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)


def _history(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("seconds")} for line in f]


def test_resume_with_the_cache_is_bit_identical(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "top", epochs=3)
    full = Trainer(cfg, str(tmp_path / "full"), progress=False)
    full.run()
    assert full.teacher_jacobians is not None
    _killed_run(cfg, tmp_path / "killed", monkeypatch, epoch=2)
    state = ckpt_io.load(str(tmp_path / "killed" / "checkpoint.pt"))
    assert state["config"]["teacher"]["cache_jacobians"] == "auto"
    assert set(state) == {"format", "config", "epoch", "model", "optimizer", "scheduler", "rng", "subset_indices",
                          "history"}  # the cache is not saved
    # a resumed run may not switch route: where the field takes effect it is not result-neutral
    with pytest.raises(ckpt_io.CheckpointError, match=r"\['teacher.cache_jacobians'\]"):
        Trainer(_cfg(tmp_path, "top", epochs=3, **{"teacher.cache_jacobians": False}), str(tmp_path / "killed"),
                progress=False).run(resume=True)
    Trainer(cfg, str(tmp_path / "killed"), progress=False).run(resume=True)
    a, b = _state(tmp_path / "full"), _state(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _history(tmp_path / "full") == _history(tmp_path / "killed")


def test_checkpoints_before_the_field_resume_as_per_step_runs(tmp_path, monkeypatch):
    """A checkpoint without ``teacher.cache_jacobians`` computed the teacher's rows every step: it resumes with
    ``false``, not with ``auto`` (which would cache); without a Jacobian-matching term the field is inert."""
    for loss, run in (({"ce": 1.0, "activation_matching": 0.1}, "inert"), (None, "matching")):
        cfg = _cfg(tmp_path, epochs=2, **({"loss": loss} if loss else {}))
        _killed_run(cfg, tmp_path / run, monkeypatch, epoch=1)
        path = str(tmp_path / run / "checkpoint.pt")
        state = ckpt_io.load(path)
        del state["config"]["teacher"]["cache_jacobians"]
        ckpt_io.save_atomic(state, path)
        resumed = _cfg(tmp_path, epochs=2, **({"loss": loss} if loss else {}))  # auto
        if run == "inert":
            Trainer(resumed, str(tmp_path / run), progress=False).run(resume=True)
            continue
        with pytest.raises(ckpt_io.CheckpointError, match="teacher.cache_jacobians"):
            Trainer(resumed, str(tmp_path / run), progress=False).run(resume=True)
        Trainer(_cfg(tmp_path, epochs=2, **{"teacher.cache_jacobians": False}), str(tmp_path / run),
                progress=False).run(resume=True)


def test_auto_falls_back_with_augmentation_or_over_the_cap_and_true_is_an_error(tmp_path, monkeypatch):
    augmented = _trainer(tmp_path, **{"data.augment": True, "data.crop_padding": 1})
    assert augmented.teacher_jacobians is None
    called = []
    original = jacobian_terms.input_jacobian
    monkeypatch.setattr(jacobian_terms, "input_jacobian", lambda *a, **k: called.append(1) or original(*a, **k))
    values, _ = _one_step(augmented, torch.arange(8))
    assert called and values["jacobian_matching"] > 0  # the per-step route
    with pytest.raises(config.ConfigError, match=r"teacher\.cache_jacobians: true, but data\.augment"):
        _cfg(tmp_path, **{"data.augment": True, "teacher.cache_jacobians": True})
    with pytest.raises(config.ConfigError, match=r"teacher\.cache_jacobians: must be auto, true or false"):
        _cfg(tmp_path, **{"teacher.cache_jacobians": "always"})
    assert _trainer(tmp_path, loss={"ce": 1.0, "activation_matching": 0.1},
                    **{"teacher.cache_jacobians": True}).teacher_jacobians is None  # nothing to cache

    size = teacher_jacobians.cache_bytes(40, (1, 16, 16), ["label"])
    monkeypatch.setattr(teacher_jacobians, "CAP_BYTES", size - 1)
    assert _trainer(tmp_path).teacher_jacobians is None
    cfg = _cfg(tmp_path, **{"teacher.cache_jacobians": True})
    with pytest.raises(config.ConfigError, match=r"teacher\.cache_jacobians: true, but the cache of 40 examples"):
        Trainer(cfg, str(tmp_path / "over"), progress=False).setup()
    run = plan.Run({"method": "m"}, cfg, str(tmp_path / "plan"))  # the experiment's checks, before any training
    with pytest.raises(config.ConfigError, match=r"term: teacher\.cache_jacobians: true, but the cache"):
        plan.check_runs(cfg, [run], resume=False, data_root=None, world=1)
    monkeypatch.setattr(teacher_jacobians, "CAP_BYTES", size)
    assert _trainer(tmp_path).teacher_jacobians is not None


def test_set_of_the_field_where_it_cannot_act_is_an_error(tmp_path):
    cfg = _cfg(tmp_path, loss={"ce": 1.0, "activation_matching": 0.1}, **{"teacher.cache_jacobians": False})
    runs = [plan.Run({"method": "m"}, cfg, str(tmp_path / "r"))]
    with pytest.raises(config.ConfigError, match="applies with a jacobian_matching term"):
        plan.check_overrides(runs, ["teacher.cache_jacobians=false"])
    plan.check_overrides([plan.Run({"method": "m"}, _cfg(tmp_path, **{"teacher.cache_jacobians": False}),
                                   str(tmp_path / "r"))], ["teacher.cache_jacobians=false"])
