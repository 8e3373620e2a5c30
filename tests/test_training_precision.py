"""``precision: bfloat16`` against float32, on every loss term.

Tolerances (measured on CPU autocast, VGG-4 students of the digits):

- one evaluation, same parameters and batch: every term within 5% of float32 (measured at most 2.3%, the
  input-gradient norms); the Hessian-trace terms run in float32 (in bf16 their finite differences are off
  by 10-50%): equal to 1e-5 with eval-mode BatchNorm; in training mode they use the batch statistics of
  the bf16 clean pass (measured: 0.4-18% from float32, less than the estimator's spread over seeds);
- three training steps: the parameter update deviates from the float32 one by at most 5% more than plain
  PyTorch's own autocast of the same (unfused) model does (measured: equal to three digits; both about 15%,
  the bf16 rounding of early-layer gradients through BatchNorm).
"""
import copy
import math

import pytest
import torch
from _training_config import ALL_TERMS, TERM_MODEL, term_batch, term_config, term_models
from torch.utils._python_dispatch import TorchDispatchMode

from fastjac.training import terms
from fastjac.training.models import build_model
from fastjac.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("single_thread")

TRACE_TERMS = ("score_matching", "score_matching_cv", "anti_score_matching")


def _value(term, student, teacher, x, y, bf16: bool, seed: int = 123) -> float:
    """The term as the trainer evaluates it: the clean pass first, under autocast when ``bf16``."""
    name, options = term.removesuffix("_cv"), ALL_TERMS[term]
    parsed = terms.parse({name: {"weight": 1.0, **options}})
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        ctx = terms.context(copy.deepcopy(student), teacher, x.clone(), y, parsed)
        ctx.logits  # noqa: B018
        torch.manual_seed(seed)  # the trace estimators' seeds
        return terms.evaluate(ctx, name, options).item()


@pytest.mark.parametrize("term", sorted(ALL_TERMS))
def test_term_value_in_bfloat16_matches_float32(term):
    student, teacher = term_models(fused=True)
    x, y = term_batch(n=16)
    if term in TRACE_TERMS:  # float32 throughout when nothing comes from the bf16 clean pass (eval-mode BN)
        student.eval()
    full, mixed = (_value(term, student, teacher, x, y, bf16) for bf16 in (False, True))
    assert mixed == pytest.approx(full, rel=1e-5 if term in TRACE_TERMS else 0.05)


def _train(term, folder, **changes):
    trainer = Trainer(term_config(term, folder, epochs=3, **{"data.train_limit": 8, **changes}),
                      str(folder / "_".join(f"{k}{v}" for k, v in changes.items())), progress=False)
    trainer.run()
    return trainer


@pytest.mark.parametrize("term", sorted(ALL_TERMS))
def test_three_bfloat16_steps_deviate_no_more_than_torch_autocast(term, tmp_path):
    torch.manual_seed(0)  # the runs' seed: their initial parameters
    start = {k: p.detach() for k, p in build_model(TERM_MODEL).named_parameters()}
    reference = {k: p.detach() for k, p in _train(term, tmp_path, precision="float32").model.named_parameters()}
    ours = _train(term, tmp_path, precision="bfloat16")
    plain = _train(term, tmp_path, precision="bfloat16", **{"model.fused": False})

    def deviation(trainer):
        params = {k: p.detach() for k, p in trainer.model.named_parameters()}
        num = sum((params[k] - reference[k]).pow(2).sum() for k in start)
        return float((num / sum((reference[k] - start[k]).pow(2).sum() for k in start)).sqrt())

    assert all(p.dtype == torch.float32 for p in ours.model.parameters())  # float32 master weights
    assert all(math.isfinite(v) for row in ours.history for k, v in row.items() if k.startswith("train_"))
    assert 0 < deviation(ours) <= 1.05 * deviation(plain) + 1e-3, (deviation(ours), deviation(plain))


class _BatchNormDtypes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ == "batch_norm" and func.namespace == "fastjac":
            self.seen.add((args[0].dtype, args[1].dtype, out[1].dtype, out[2].dtype, out[3].dtype))
        return out


def test_fused_batch_norm_runs_in_bfloat16_with_float32_statistics(tmp_path):
    trainer = Trainer(term_config("jacobian_norm", tmp_path, precision="bfloat16"), str(tmp_path / "r"), progress=False)
    trainer.setup()
    with _BatchNormDtypes() as mode:
        trainer._step(torch.arange(8), 0, 0)
    bf16, f32 = torch.bfloat16, torch.float32
    assert (bf16, f32, f32, f32, f32) in mode.seen  # x, weight, mean, invstd, running mean
    assert all(x == bf16 for x, *_ in mode.seen)
    assert all(p.grad.dtype == f32 for p in trainer.model.parameters() if p.grad is not None)


def test_live_trace_term_is_rejected_in_bfloat16(tmp_path):
    with pytest.raises(ValueError, match="loss.score_matching.batch_norm"):
        Trainer(term_config("ce", tmp_path, precision="bfloat16",
                            loss={"ce": 1.0, "score_matching": {"weight": 0.1, "batch_norm": "live"}}), str(tmp_path))
