"""``fastjac`` under ``torchrun`` for tests/test_training_ddp.py, with two probes: rank 0 writes every
``model.pt`` a second late (a slow disk: a rank that does not wait for it fails to load the teacher), and each
rank records its BatchNorm running statistics before and after the end-of-epoch averaging (the last epoch of
the last run stays in ``$FASTJAC_PROBE_DIR/rank<r>.pt``), with its parameters then."""
import os
import sys
import time

import torch

from fastjac.cli import main
from fastjac.training import checkpoint as ckpt_io
from fastjac.training import trainer

_save, _average = ckpt_io.save_atomic, trainer.average_batch_norm_stats


def slow_save(obj, path):
    if os.path.basename(path) == "model.pt":
        time.sleep(0.5)
    _save(obj, path)


def recorded_average(model):
    def stats():
        return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}

    before = stats()
    _average(model)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    torch.save({"before": before, "after": stats(), "params": params},
               os.path.join(os.environ["FASTJAC_PROBE_DIR"], f"rank{os.environ['RANK']}.pt"))


ckpt_io.save_atomic = slow_save
trainer.average_batch_norm_stats = recorded_average
sys.exit(main(sys.argv[1:]))
