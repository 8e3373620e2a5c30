"""``fastjac demo``, the main job: experiment E1 (Jacobian-matching distillation, seed 000 Table 1) on
scikit-learn's digits, a figure, and the time the fused ops save against plain PyTorch autograd.

1. ``digits_e1``: a VGG teacher on the full training split, then VGG-4 students trained with CE, CE + A and
   CE + A + J on 1 and 2 images per class, three seeds each; the table of test accuracies (mean ± std) and,
   per sample size, whether the paper's ordering holds (CE + A + J above CE by more than twice the larger of
   their standard deviations, and CE + A + J ≥ CE + A), said plainly either way.
2. ``OUT/accuracy_per_class.png``: accuracy against images per class, one line per method with error bars,
   beside the paper's Table 1 (CIFAR-100) trend.
3. One CE + A + J cell (its first ``TIMED_EPOCHS`` epochs) trained twice from scratch, in a fresh temporary
   folder each time (never a cached cell): with the fused ops and with ``model.fused: false`` (plain autograd;
   same seed, data, epochs and loss). Both training times, their ratio and both accuracies are printed,
   whatever they show.

``--quick`` runs the same code path at a reduced size into ``runs/demo-quick`` (never into the full run's
folder; and a finished cell is only reused for the config it was trained with, see
:func:`fastjac.experiments.runner.finished_result`).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

from ..training import config as config_io
from ..training.checkpoint import CheckpointError
from ..training.config import resolve_config
from ..training.report import method_stats, plot_per_class, table
from ..training.trainer import Trainer
from .plan import with_teacher
from .runner import run_experiment

QUICK = ["epochs=3", "sweep.per_class=[1]", "sweep.seeds=[0, 1]", "teacher.train.epochs=1"]
JACOBIAN, BASELINES = "CE + A + J", ("CE", "CE + A")
TIMED_EPOCHS = 10  # the timed pair trains the cell's first 10 epochs (100 optimiser steps), both runs alike


def claim_lines(cells: dict, per_classes: list) -> list[str]:
    """One line per sample size: does CE + A + J beat CE by more than twice the larger of their standard
    deviations (over seeds), and is it at least CE + A? Says "reproduced" or "NOT reproduced" plainly."""
    lines = []
    for pc in per_classes:
        jac, ce, ce_a = (cells.get((m, pc), []) for m in (JACOBIAN, *BASELINES))
        if len(jac) < 2 or len(ce) < 2 or not ce_a:
            lines.append(f"  {pc} per class: too few seeds to judge the ordering")
            continue
        margin = statistics.mean(jac) - statistics.mean(ce)
        spread = 2 * max(statistics.stdev(jac), statistics.stdev(ce))
        beats_ce, beats_a = margin > spread, statistics.mean(jac) >= statistics.mean(ce_a)
        verdict = "reproduced" if beats_ce and beats_a else "NOT reproduced"
        lines.append(f"  {pc} per class: CE + A + J - CE = {margin:+.2f} points (needs > {spread:.2f}, twice the "
                     f"larger std): {'yes' if beats_ce else 'no'}; CE + A + J >= CE + A "
                     f"({statistics.mean(jac):.2f} vs {statistics.mean(ce_a):.2f}): {'yes' if beats_a else 'no'}"
                     f" -> the paper's ordering is {verdict}")
    return lines


def _timed_pair(cfg, out: str) -> tuple[dict, dict, dict]:
    """Train the CE + A + J cell of the smallest sample size and seed, its first ``TIMED_EPOCHS`` epochs, twice
    from scratch: fused, then plain autograd (``model.fused: false`` for student and teacher). Returns (cell,
    fused result, plain result)."""
    cells = config_io.expand(with_teacher(cfg, out))
    per_class = min(c["per_class"] for c, _ in cells)
    seed = min(c["seed"] for c, _ in cells)
    cell, fused_cfg = next((c, r) for c, r in cells
                           if c["method"] == JACOBIAN and c["per_class"] == per_class and c["seed"] == seed)
    results, runs = [], []
    for fused in (True, False):
        run = fused_cfg.to_dict()
        run["epochs"] = min(TIMED_EPOCHS, run["epochs"])
        run["eval_every"] = run["epochs"]
        run["model"]["fused"] = fused
        if run.get("teacher"):
            run["teacher"]["model"] = dict(run["teacher"]["model"] or run["model"], fused=fused)
        runs.append(config_io.validate(config_io.from_dict(config_io.RunConfig, run)))
    for run_cfg in runs:
        with tempfile.TemporaryDirectory(prefix="fastjac-demo-timing-") as tmp:
            results.append(Trainer(run_cfg, tmp, progress=False).run())
    return cell, results[0], results[1]


def main(out: str | None = None, quick: bool = False) -> int:
    t0 = time.perf_counter()
    out = out or os.path.join("runs", "demo-quick" if quick else "demo")
    cfg = config_io.load(resolve_config("digits_e1"), QUICK if quick else [])
    try:
        run_experiment(cfg, out, progress=True, resume=True)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}. (The demo continues the runs in its --out folder, which holds runs of "
                              f"{'the full demo' if quick else 'another config, e.g. --quick'}: give this run another "
                              "--out, or delete that folder)") from exc
    print()
    if quick:
        print("(--quick: a reduced run of the same code path, 3 epochs and a 1-epoch teacher; its numbers "
              "show that the code runs, not the paper's result)")
    print(table(out))

    cells = method_stats(out)
    per_classes = sorted({pc for _, pc in cells if pc is not None})
    print("Seed 000's claim (Table 1: Jacobian matching helps most with few samples per class):")
    print("\n".join(claim_lines(cells, per_classes)))

    paper_cfg = config_io.load(resolve_config("e1_table1"))
    paper = {m: v for m, v in paper_cfg.sweep.paper.items() if m in (*BASELINES, JACOBIAN)}
    figure = plot_per_class(out, os.path.join(out, "accuracy_per_class.png"), [*BASELINES, JACOBIAN], paper,
                            paper_label="seed 000 Table 1 (CIFAR-100, VGG-9 -> VGG-4)")
    print(f"figure: {figure}")

    cell, fused, plain = _timed_pair(cfg, out)
    fused_t, plain_t = fused["total_train_seconds"], plain["total_train_seconds"]
    print(f"\nFused ops vs plain autograd: student {JACOBIAN} ({cell['per_class']} per class, seed {cell['seed']}, "
          f"first {fused['epochs']} of {cfg.epochs} epochs, {fused['steps'] * fused['epochs']} optimiser steps), "
          "trained twice from scratch:")
    print(f"  fastjac fused ops: {fused_t:.1f} s   plain PyTorch autograd: {plain_t:.1f} s   "
          f"plain / fused = {plain_t / max(fused_t, 1e-9):.2f}x "
          f"({'fastjac saved' if plain_t > fused_t else 'fastjac cost'} {abs(plain_t - fused_t):.1f} s)")
    print(f"  test accuracy: fused {fused['test_acc']:.2f} %, plain {plain['test_acc']:.2f} % "
          f"(largest accuracy difference: {abs(fused['test_acc'] - plain['test_acc']):.2f} points)")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; results in {out}")
    return 0
