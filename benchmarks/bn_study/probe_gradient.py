"""BatchNorm study: why ``batch_norm: frozen_constant`` fails (benchmarks/RESULTS.md, "BatchNorm semantics").

For trained runs of ``e2_study.yaml``: on one training batch (64 images, training mode), the Jacobian penalty
(Eq. 3, ``frozen`` rows) and, for each BatchNorm mode, the cosine between the penalty's gradient with respect
to each convolution's weights and those weights. BatchNorm after a convolution makes the network invariant to
the scale of its weights, so the true gradient has no component along them (cosine 0); a non-zero cosine is
a push that the next batch's normalisation undoes.

    python -m benchmarks.bn_study.probe_gradient runs/e2_study "lambda=0" "lambda=1(frozen)" "lambda=1(frozen_constant)"
"""
from __future__ import annotations

import sys

import torch
import yaml

from fastjac.training import config as config_io
from fastjac.training import data as data_io
from fastjac.training import terms
from fastjac.training.models import build_model
from fastjac.training.trainer import load_run_data


def probe(run_dir: str, seed: int = 0) -> list[str]:
    with open(f"{run_dir}/config.yaml") as f:
        cfg = config_io.from_mapping(yaml.safe_load(f))
    data = load_run_data(cfg)
    x = data_io.normalize(data.train_x, cfg.data.dataset)
    idx = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(seed))[:64]
    lines = []
    for mode in terms.BATCH_NORM_MODES:
        model = build_model(cfg.model)
        model.load_state_dict(torch.load(f"{run_dir}/model.pt", weights_only=True))
        model.train()
        convs = [p for p in model.parameters() if p.dim() == 4]
        loss = {"jacobian_norm": {"weight": 1.0, "form": "cross_entropy", "batch_norm": mode}}
        ctx = terms.context(model, None, x[idx], data.train_y[idx], terms.parse(loss))
        penalty = terms.TERMS["jacobian_norm"].fn(ctx, form="cross_entropy", batch_norm=mode)
        grads = torch.autograd.grad(penalty, convs)
        cos = [float((g * w.detach()).sum() / (g.norm() * w.detach().norm())) for g, w in zip(grads, convs)]
        lines.append(f"penalty ({mode} rows) {penalty.item():.4f}; cos(grad, W) per conv: "
                     + " ".join(f"{c:+.2f}" for c in cos))
    return lines


if __name__ == "__main__":
    root, names = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    for name in names:
        print(f"{name}:")
        for line in probe(f"{root}/{name}/pcall/seed0"):
            print("  " + line)
