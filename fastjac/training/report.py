"""``fastjac table`` and ``fastjac plot``: a run directory's results as a paper-shaped table and curves."""
from __future__ import annotations

import glob
import json
import os
import statistics
from collections import defaultdict
from typing import Any

import yaml

from .checkpoint import read_json
from .layout import experiment_cell_dirs


def _results(run_dir: str) -> list[dict]:
    """The cells' results; only the cells of ``experiment.yaml`` when there is one (never leftovers of another
    config in the same directory)."""
    rows = []
    listed = experiment_cell_dirs(run_dir)
    for path in sorted(glob.glob(os.path.join(run_dir, "*", "pc*", "seed*", "result.json"))):
        seed_dir = os.path.dirname(path)
        if listed is not None and os.path.normpath(seed_dir) not in listed:
            continue
        pc_dir = os.path.dirname(seed_dir)
        method_dir = os.path.dirname(pc_dir)
        result = read_json(path)
        cell_path = os.path.join(seed_dir, "cell.json")
        if os.path.isfile(cell_path):
            cell = read_json(cell_path)
        else:
            pc = os.path.basename(pc_dir)[2:]
            cell = {"method": os.path.basename(method_dir), "per_class": None if pc == "all" else int(pc),
                    "seed": int(os.path.basename(seed_dir)[4:])}
        rows.append({**result, **cell})
    if not rows and os.path.isfile(os.path.join(run_dir, "result.json")):
        rows.append({"method": "run", "per_class": None, "seed": 0, **read_json(os.path.join(run_dir, "result.json"))})
    return rows


def _fmt(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(run_dir: str) -> str:
    """Markdown: one row per method, one column per samples-per-class value, test accuracy mean ± std over
    seeds, the paper's number in brackets where the config gives it; noise-robustness columns (E2) when the
    runs evaluated them."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir!r} does not exist")
    rows = _results(run_dir)
    if not rows:
        raise FileNotFoundError(f"no results (result.json) under {run_dir!r}; has the run finished?")
    paper: dict = {}
    exp: dict = {}
    exp_path = os.path.join(run_dir, "experiment.yaml")
    name = os.path.basename(os.path.abspath(run_dir))
    if os.path.isfile(exp_path):
        with open(exp_path) as f:
            exp = yaml.safe_load(f) or {}
        name = exp.get("name", name)
        paper = ((exp.get("sweep") or {}).get("paper") or {})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    order = list((exp.get("sweep") or {}).get("methods") or {})
    methods.sort(key=lambda m: order.index(m) if m in order else len(order))  # the config's order
    per_classes = sorted({r["per_class"] for r in rows}, key=lambda v: (v is None, v or 0))
    cells = defaultdict(list)
    for r in rows:
        if "test_acc" in r:
            cells[(r["method"], r["per_class"])].append(r["test_acc"])
    head = ["method"] + [("all" if pc is None else str(pc)) + " per class" for pc in per_classes]
    lines = [f"### {name}: test accuracy (%), mean ± std over seeds [paper]", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        line = [m]
        for pc in per_classes:
            text = _fmt(cells[(m, pc)])
            published = _paper_value(paper, m, pc)
            line.append(f"{text} [{published}]" if published is not None else text)
        lines.append("| " + " | ".join(line) + " |")
    noise_keys = sorted({k for r in rows for k in r if k.startswith("noise_") and k.endswith("_acc_mean")},
                        key=lambda k: float(k.split("_")[1]))
    if noise_keys:
        lines += ["", f"### {name}: accuracy (%) under Gaussian input noise (std of the noise)", "",
                  "| method | " + " | ".join(k.split("_")[1] for k in noise_keys) + " |",
                  "|" + "---|" * (len(noise_keys) + 1)]
        for m in methods:
            vals = [_fmt([r[k] for r in rows if r["method"] == m and k in r]) for k in noise_keys]
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
    lines += _evaluation_tables(run_dir, list(exp.get("evaluations") or {}), name)
    return "\n".join(lines) + "\n"


def _cell(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() and "." not in value else f"{number:.4g}"


def _evaluation_tables(run_dir: str, names: list, experiment: str) -> list[str]:
    """Markdown of every ``OUT/evaluations/<name>/table.csv`` (config order, then the rest), numbers to 4
    significant digits."""
    import csv

    found = sorted(os.path.basename(os.path.dirname(p))
                   for p in glob.glob(os.path.join(run_dir, "evaluations", "*", "table.csv")))
    lines: list[str] = []
    for ev in [n for n in names if n in found] + [n for n in found if n not in names]:
        with open(os.path.join(run_dir, "evaluations", ev, "table.csv")) as f:
            rows = list(csv.reader(f))
        if len(rows) < 2:
            continue
        lines += ["", f"### {experiment}: evaluation {ev}", "", "| " + " | ".join(rows[0]) + " |",
                  "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows[1:]]
    return lines


def _paper_value(paper: dict, method: str, per_class):
    entry = paper.get(method)
    if isinstance(entry, dict):
        return entry.get(per_class, entry.get(str(per_class)))
    return entry


def plot(run_dir: str, out_path: str | None = None) -> str:
    """PNG of test accuracy and training loss against epoch for every run under ``run_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = sorted(glob.glob(os.path.join(run_dir, "**", "metrics.jsonl"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no metrics.jsonl under {run_dir!r}")
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for path in paths:
        with open(path) as f:
            hist = [json.loads(line) for line in f if line.strip()]
        label = os.path.relpath(os.path.dirname(path), run_dir)
        epochs = [h["epoch"] for h in hist]
        evaluated = [h for h in hist if "test_acc" in h]
        ax_acc.plot([h["epoch"] for h in evaluated], [h["test_acc"] for h in evaluated], marker=".", label=label)
        ax_loss.plot(epochs, [h.get("train_loss", float("nan")) for h in hist], label=label)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)")
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log")
    if len(paths) <= 12:
        ax_acc.legend(fontsize=7)
    fig.tight_layout()
    out_path = out_path or os.path.join(run_dir, "curves.png")
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def method_stats(run_dir: str) -> dict[tuple[str, Any], list[float]]:
    """``{(method, per_class): [test accuracy of each seed]}`` of a run directory."""
    cells: dict = defaultdict(list)
    for r in _results(run_dir):
        if "test_acc" in r:
            cells[(r["method"], r["per_class"])].append(r["test_acc"])
    return dict(cells)


def plot_per_class(run_dir: str, out_path: str, methods: list[str], paper: dict | None = None,
                   paper_label: str = "paper") -> str:
    """PNG: test accuracy against images per class, one line per method with ±1 std error bars (over seeds);
    with ``paper`` (method -> {per_class: accuracy}) a second panel shows the published trend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = method_stats(run_dir)
    used = sorted({pc for (_, pc) in cells if pc is not None})
    panels = 2 if paper else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for m in methods:
        pcs = sorted(pc for (mm, pc) in cells if mm == m and pc is not None)
        means = [statistics.mean(cells[(m, pc)]) for pc in pcs]
        stds = [statistics.stdev(cells[(m, pc)]) if len(cells[(m, pc)]) > 1 else 0.0 for pc in pcs]
        seeds = max((len(cells[(m, pc)]) for pc in pcs), default=0)
        ax.errorbar(pcs, means, yerr=stds, marker="o", capsize=4, label=f"{m} ({seeds} seeds)")
    name = os.path.basename(os.path.abspath(run_dir))
    exp_path = os.path.join(run_dir, "experiment.yaml")
    if os.path.isfile(exp_path):
        with open(exp_path) as f:
            name = (yaml.safe_load(f) or {}).get("name", name)
    ax.set(xlabel="training images per class", ylabel="test accuracy (%)", title=f"ours: {name} (mean ± std)",
           xscale="log")
    ax.set_xticks(used, [str(pc) for pc in used])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    if paper:
        ax2 = axes[0][1]
        for m in methods:
            entry = paper.get(m) or {}
            pcs = sorted(int(k) for k in entry)
            ax2.plot(pcs, [entry.get(pc, entry.get(str(pc))) for pc in pcs], marker="s", label=m)
        ax2.set(xlabel="training images per class", ylabel="test accuracy (%)", title=paper_label, xscale="log")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def plot_noise(run_dir: str, out_path: str | None = None, batch_stats: bool = False) -> str | None:
    """PNG (E2): test accuracy against the std of the Gaussian input noise, one line per method (mean ± std
    over seeds, error bars); ``batch_stats``: the accuracies measured with test-batch BatchNorm statistics.
    None when the runs measured no noise robustness."""
    suffix = "_acc_mean_batch_stats" if batch_stats else "_acc_mean"
    rows = _results(run_dir)
    stds = sorted({float(k.split("_")[1]) for r in rows for k in r if k.startswith("noise_") and k.endswith(suffix)})
    if not stds:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in dict.fromkeys(r["method"] for r in rows):
        points = [(s, [r[f"noise_{s}{suffix}"] for r in rows if r["method"] == m and f"noise_{s}{suffix}" in r])
                  for s in stds]
        points = [(s, v) for s, v in points if v]
        ax.errorbar([s for s, _ in points], [statistics.mean(v) for _, v in points],
                    yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points], marker="o", capsize=3,
                    label=f"{m} ({max(len(v) for _, v in points)} seeds)")
    mode = "test-batch BatchNorm statistics" if batch_stats else "running BatchNorm statistics (eval mode)"
    ax.set(xlabel="std of the Gaussian noise on the normalised test images", ylabel="test accuracy (%)",
           title=f"accuracy under input noise, {mode}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out_path = out_path or os.path.join(run_dir, "noise_batch_stats.png" if batch_stats else "noise.png")
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
