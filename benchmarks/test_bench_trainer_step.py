"""pytest-benchmark of the trainer's own step (``benchmarks/trainer_step.py``): CE and each Jacobian term in each
BatchNorm mode, plain and fused, for VGG-9-BN (batch 64) and the demo's student. Groups pair plain and fused."""
import math

import pytest
import torch

from fastjac.training.models import build_model

from .conftest import rounds
from .trainer_step import LOSSES, MODELS, make_step


@pytest.fixture(scope="module")
def teacher_paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teachers")
    paths = {}
    for model, spec in MODELS.items():
        paths[model] = str(folder / f"{model}.pt")
        torch.save(build_model(dict(spec["teacher"], fused=False)).state_dict(), paths[model])
    return paths


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("model", list(MODELS))
def test_trainer_step(benchmark, teacher_paths, model, loss, fused):
    benchmark.group = f"trainer step {model}: {loss}"
    step = make_step(model, loss, fused, teacher_paths[model])
    step()  # warm-up
    benchmark.pedantic(step, rounds=rounds(3), warmup_rounds=0, iterations=1)
    assert all(math.isfinite(v) for v in step.read().values())
