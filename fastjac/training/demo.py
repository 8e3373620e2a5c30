"""``fastjac demo``, the main job: experiment E1 (Jacobian-matching distillation, seed 000 Table 1) on
scikit-learn's digits, then the time the fused ops saved against plain PyTorch autograd on the same run.

1. ``digits_e1``: a VGG-9 teacher on the full training split, then VGG-4 students trained with CE, CE + A and
   CE + A + J on 2 and 5 images per class, three seeds each; the table of test accuracies (mean ± std).
2. The CE + A + J student (5 per class, seed 0) trained again for its first ``TIMED_EPOCHS`` epochs with
   ``model.fused: false`` (plain autograd, no fastjac kernels; same initialisation, data order and loss): the
   training time of those epochs in both runs, and their test accuracy after them (the two compute the same
   function; float rounding makes the trajectories drift apart slowly).
"""
from __future__ import annotations

import json
import os
import time

from ..cli import resolve_config
from . import config as config_io
from .report import table
from .runner import cell_dir, run_experiment, with_teacher
from .trainer import Trainer

QUICK = ["epochs=3", "sweep.per_class=[2]", "sweep.seeds=[0]", "teacher.train.epochs=1"]
TIMED_EPOCHS = 10


def _history(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(out: str = os.path.join("runs", "demo"), quick: bool = False) -> int:
    t0 = time.perf_counter()
    cfg = config_io.load(resolve_config("digits_e1"), QUICK if quick else [])
    run_experiment(cfg, out, progress=True, resume=True)
    print()
    print(table(out))

    # The same student cell with plain autograd (no fused ops), for the timing comparison.
    cells = config_io.expand(with_teacher(cfg, out))
    per_class = max(c["per_class"] for c, _ in cells)
    cell, fused_cfg = next((c, r) for c, r in cells if c["method"] == "CE + A + J" and c["per_class"] == per_class)
    fused_dir = cell_dir(out, cell)
    plain_cfg = fused_cfg.to_dict()
    plain_cfg["model"]["fused"] = False
    timed = min(TIMED_EPOCHS, fused_cfg.epochs)
    plain_cfg["epochs"] = timed
    plain_cfg["eval_every"] = timed
    if plain_cfg.get("teacher"):
        plain_cfg["teacher"]["model"] = dict(plain_cfg["teacher"]["model"] or plain_cfg["model"], fused=False)
    plain_dir = os.path.join(out, "plain_autograd")
    plain_cfg = config_io.validate(config_io.from_dict(config_io.RunConfig, plain_cfg))
    if not os.path.isfile(os.path.join(plain_dir, "result.json")):
        Trainer(plain_cfg, plain_dir, progress=True).run(resume=True)
    fused_hist, plain_hist = _history(fused_dir)[:timed], _history(plain_dir)
    fused_t = sum(r["train_seconds"] for r in fused_hist)
    plain_t = sum(r["train_seconds"] for r in plain_hist)
    fused_acc = fused_hist[-1].get("test_acc")
    plain_acc = plain_hist[-1]["test_acc"]
    print(f"Fused ops vs plain autograd: student CE + A + J ({per_class} per class, seed {cell['seed']}), "
          f"training steps of its first {timed} epochs:")
    print(f"  fastjac fused ops: {fused_t:.1f} s   plain PyTorch autograd: {plain_t:.1f} s   "
          f"saved {plain_t - fused_t:.1f} s ({plain_t / max(fused_t, 1e-9):.2f}x)")
    if fused_acc is not None:
        print(f"  test accuracy after epoch {timed}: fused {fused_acc:.2f} %, plain {plain_acc:.2f} % "
              f"(largest accuracy difference: {abs(fused_acc - plain_acc):.2f} points)")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; results in {out}")
    return 0
