"""The training step needs no host synchronisation; non-finite values are still named (term, epoch, step)
and never reach the parameters; the logged losses are read every ``sync_every`` steps or once per epoch."""
import contextlib
import math
import traceback

import pytest
import torch
from _training_config import ALL_TERMS, term_config
from torch.utils._python_dispatch import TorchDispatchMode

from fastjac.training import config, terms
from fastjac.training.step_log import StepLog
from fastjac.training.trainer import DivergenceWarning, NonFiniteLossError, Trainer

pytestmark = pytest.mark.usefixtures("single_thread")

#: aten ops that read a device tensor's value on the host (or need its value to size their output).
SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "equal", "allclose", "nonzero", "masked_select", "_unique2",
            "unique_dim", "unique_consecutive", "repeat_interleave"}
#: Python-level reads of a tensor's value (on a GPU each one waits for the queued kernels).
SYNC_METHODS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__", "__array__")
#: Reads of tensors that are on the CPU on every device: the Hessian-trace seed from torch's CPU generator.
HOST_BY_DESIGN = ("draw_seed",)


class SyncCounter(TorchDispatchMode):
    """Records every host read of a tensor value (aten ops of :data:`SYNC_OPS`, boolean-mask indexing and the
    methods of :data:`SYNC_METHODS`) while :attr:`active`, with the Python stack it came from."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.active, self.events = False, []
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def method(tensor, *args, **kwargs):
            self._record(name)
            return original(tensor, *args, **kwargs)
        return method

    def _record(self, what):
        if self.active:
            stack = traceback.extract_stack()
            if not any(frame.name in HOST_BY_DESIGN for frame in stack):
                self.events.append((what, "".join(traceback.format_list(stack[-8:-2]))))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                             for i in (args[1] or ()))
        if name in SYNC_OPS or bool_index:
            self._record(f"aten.{name}")
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def counting(self):
        self.active = True
        try:
            with self:
                yield
        finally:
            self.active = False


def _count(monkeypatch, method):
    """Wrap ``Trainer.method`` to count the host reads inside each call: a list of per-call event lists."""
    counter, calls = SyncCounter(monkeypatch), []
    original = getattr(Trainer, method)

    def counted(self, *args):
        before = len(counter.events)
        with counter.counting():
            out = original(self, *args)
        calls.append(counter.events[before:])
        return out

    monkeypatch.setattr(Trainer, method, counted)
    return calls


#: every term in float32 with SGD; the other variants on one term of each kind (plain, input-gradient, trace)
SYNC_CASES = [(term, "float32") for term in sorted(ALL_TERMS)] + [
    (term, variant) for variant in ("bfloat16", "adam", "accumulate") for term in ("ce", "jacobian_norm", "score_matching")]


@pytest.mark.parametrize("term,variant", SYNC_CASES)
def test_a_training_step_has_no_host_sync(tmp_path, monkeypatch, term, variant):
    steps = _count(monkeypatch, "_step")
    changes = {"bfloat16": {"precision": "bfloat16"}, "adam": {"optim.name": "adam"}, "accumulate": {"accumulate": 2},
               "float32": {}}[variant]
    cfg = term_config(term, tmp_path, **{"data.train_limit": 24, **changes})
    Trainer(cfg, str(tmp_path / "run"), progress=False).run()
    assert len(steps) == 3
    for events in steps:
        assert not events, f"{len(events)} host syncs in a step, the first: {events[0][0]} at\n{events[0][1]}"


@pytest.mark.parametrize("sync_every,reads", [(None, 1), (2, 3), (1, 5)])
def test_the_epoch_reads_the_device_once_per_sync_point(tmp_path, monkeypatch, sync_every, reads):
    epochs = _count(monkeypatch, "_train_epoch")
    cfg = term_config("jacobian_norm", tmp_path, sync_every=sync_every, epochs=2)
    trainer = Trainer(cfg, str(tmp_path / "run"), progress=False)
    trainer.run()
    assert [len(events) for events in epochs] == [reads, reads]  # 5 steps per epoch
    assert all(what == "tolist" and "read" in where for events in epochs for what, where in events)
    assert [row["steps"] for row in trainer.history] == [5, 5] == [trainer._steps_per_epoch()] * 2


def test_sync_every_and_precision_are_validated(tmp_path):
    with pytest.raises(config.ConfigError, match="sync_every"):
        term_config("ce", tmp_path, sync_every=0)
    with pytest.raises(config.ConfigError, match="precision"):
        term_config("ce", tmp_path, precision="float16")


def _initial_parameters(monkeypatch):
    """Snapshot of the trainable parameters right after ``Trainer.setup`` (filled when a run starts)."""
    snapshot = {}
    original = Trainer.setup

    def setup(self):
        original(self)
        snapshot.update({k: p.detach().clone() for k, p in self.model.named_parameters()})

    monkeypatch.setattr(Trainer, "setup", setup)
    return snapshot


@pytest.mark.parametrize("sync_every,optim", [(None, "sgd"), (2, "adam")])
def test_huge_weight_is_named_at_step_0_and_no_step_is_taken(tmp_path, monkeypatch, sync_every, optim):
    initial = _initial_parameters(monkeypatch)
    cfg = term_config("ce", tmp_path, loss={"ce": 1.0, "jacobian_norm": 1e39}, sync_every=sync_every,
                      **{"optim.name": optim})
    trainer = Trainer(cfg, str(tmp_path / "run"), progress=False)
    with pytest.raises(NonFiniteLossError, match=r"'jacobian_norm' times its weight 1e\+39 is inf at epoch 0, step 0"):
        trainer.run()
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, initial[name]), f"{name} was changed by a step with non-finite values"
    if optim == "adam":  # the skipped steps are not counted either
        assert all(state["step"] == 0 for state in trainer.optimizer.state.values())


def test_non_finite_gradient_of_finite_terms_is_named_and_skipped(tmp_path, monkeypatch):
    def steep(ctx):  # value 0 at step 2, where its gradient is 0 · ∞ = nan
        steep.calls += 1
        return torch.sqrt(ctx.logits.sum() * (0.0 if steep.calls == 3 else 1e-30) + (steep.calls != 3) * 1.0)
    steep.calls = 0

    monkeypatch.setitem(terms.TERMS, "steep", terms.Term(steep))
    initial = _initial_parameters(monkeypatch)
    seen = []
    original = StepLog.record

    def record(self, step, *args):
        found = original(self, step, *args)
        seen.append({k: p.detach().clone() for k, p in trainer.model.named_parameters()})
        return found

    monkeypatch.setattr(StepLog, "record", record)
    cfg = term_config("ce", tmp_path, loss={"ce": 1.0, "steep": 1.0})
    trainer = Trainer(cfg, str(tmp_path / "run"), progress=False)
    message = r"a gradient of the loss is not finite \(every loss term finite\) at epoch 0, step 2"
    with pytest.raises(NonFiniteLossError, match=message):
        trainer.run()
    assert steep.calls == 5  # the epoch ran to its end (read once), its last 3 steps skipped
    assert not torch.equal(seen[1]["features.0.weight"], initial["features.0.weight"])  # step 0 was taken
    for name, p in trainer.model.named_parameters():  # nothing changed from step 2 on
        assert torch.isfinite(p).all() and torch.equal(p, seen[2][name]), name

def test_first_of_several_failures_is_reported(tmp_path, monkeypatch):
    """A nan at step 1 and infs after it: the message names step 1 (the minimum of the device-side keys)."""
    def later(ctx):
        later.calls += 1
        return ctx.logits.sum() * (1.0 if later.calls == 1 else (math.nan if later.calls == 2 else math.inf))
    later.calls = 0
    monkeypatch.setitem(terms.TERMS, "later", terms.Term(later))
    cfg = term_config("ce", tmp_path, loss={"ce": 1.0, "later": 1.0}, sync_every=3)
    with pytest.raises(NonFiniteLossError, match=r"'later' is nan at epoch 0, step 1"):
        Trainer(cfg, str(tmp_path / "run"), progress=False).run()
    assert later.calls == 3  # read after step 2 (sync_every 3)


class _Bar:
    """Stands in for ``tqdm.tqdm``: records the total, the steps and the postfixes shown."""

    made = []

    def __init__(self, total, initial, **kwargs):
        self.total, self.n, self.postfixes = total, initial, []
        _Bar.made.append(self)

    def update(self, n):
        self.n += n

    def set_postfix(self, postfix, refresh=True):
        self.postfixes.append((self.n, dict(postfix)))

    def close(self):
        pass


def test_progress_shows_steps_and_the_running_loss_at_sync_points(tmp_path, monkeypatch):
    import tqdm

    monkeypatch.setattr(tqdm, "tqdm", _Bar)
    _Bar.made.clear()
    trainer = Trainer(term_config("ce", tmp_path, epochs=2, sync_every=2), str(tmp_path / "run"))
    trainer.run()
    (bar,) = _Bar.made
    assert bar.total == bar.n == 10  # 2 epochs of 5 steps
    # running loss after steps 2 and 4 of each epoch (sync_every), the epoch's mean after its end
    assert [n for n, _ in bar.postfixes] == [2, 4, 5, 7, 9, 10]
    assert [p["epoch"] for _, p in bar.postfixes] == ["1/2"] * 3 + ["2/2"] * 3
    assert all(0 < float(p["loss"]) < 10 for _, p in bar.postfixes)
    assert float(bar.postfixes[2][1]["loss"]) == pytest.approx(trainer.history[0]["train_loss"], abs=1e-3)


def test_a_diverging_loss_is_reported(tmp_path, monkeypatch):
    """A finite loss that grows by three orders of magnitude after the first epoch: one warning, naming both."""
    def growing(ctx):  # 1 in epoch 0 (5 steps), 1e4 from epoch 1 on
        growing.calls += 1
        return ctx.logits.sum() * 0.0 + (1.0 if growing.calls <= 5 else 1e4)
    growing.calls = 0
    monkeypatch.setitem(terms.TERMS, "growing", terms.Term(growing))
    cfg = term_config("ce", tmp_path, loss={"ce": 1.0, "growing": 1.0}, epochs=3)
    message = r"grew from 3\.\d+ \(epoch 0\) to 1e\+04 \(epoch 1\), 2\.\de\+03 times"  # ce ≈ 2.3 plus 1
    with pytest.warns(DivergenceWarning, match=message) as seen:
        Trainer(cfg, str(tmp_path / "run"), progress=False).run()
    assert len([w for w in seen if w.category is DivergenceWarning]) == 1
