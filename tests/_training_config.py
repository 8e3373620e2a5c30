"""Shared by the trainer tests: run configs (a base mapping with dotted-key changes, validated), one option
set of every loss term for a VGG-4 (layer names ``features.<i>``), models and a batch for the terms."""
import copy
import os

import torch

from fastjac.training import config
from fastjac.training.models import build_model


def config_with(base: dict, **changes):
    """``base`` (a config mapping, not modified) with ``changes`` (dotted keys) applied, as a validated RunConfig."""
    data = copy.deepcopy(base)
    for key, value in changes.items():
        config.set_dotted(data, key, value)
    return config.from_mapping(data)


#: Options of every loss term (``*_cv``: a second option set of the same term), for a VGG-4 student and teacher.
ALL_TERMS = {
    "ce": {},
    "activation_matching": {},
    "jacobian_matching": {"normalize": True},
    "jacobian_norm": {"form": "cross_entropy"},
    "attention_matching": {"student_layer": "features.3", "teacher_layer": "features.3"},
    "attention_jacobian": {"student_layer": "features.3", "teacher_layer": "features.3", "window": 0.5},
    "bias_jacobian_matching": {"student_layers": ["features.1", "features.5"], "teacher_layers": ["features.1", "features.5"]},
    "bias_jacobian_norm": {"layers": ["features.9"]},
    "score_matching": {"mu": 1e-3, "sigma": 0.05},
    "score_matching_cv": {"mu": 1e-3, "sigma": 0.05, "control_variate": True},
    "anti_score_matching": {"tau": 10.0, "sigma": 0.05},
    "gradient_norm": {},
    "bias_decay": {"layers": ["features.1"]},
}


#: A few steps of every loss term on the digits: VGG-4 students of ``TERM_MODEL``, 1×16×16, 5 steps of 8.
TERM_MODEL = {"arch": "vgg4", "num_classes": 10, "in_channels": 1, "width": 0.25}
TERM_RUN = {
    "name": "term", "epochs": 1, "seed": 0, "model": TERM_MODEL,
    "data": {"dataset": "digits", "image_size": 16, "channels": 1, "batch_size": 8, "train_limit": 40,
             "test_limit": 16},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
}


def term_config(term: str, folder, **changes):
    """``TERM_RUN`` training ``ce + term`` (options of :data:`ALL_TERMS`), with an untrained teacher saved in
    ``folder``; ``changes``: dotted keys (``loss`` replaces the loss)."""
    name = term.removesuffix("_cv")
    teacher = os.path.join(folder, "teacher.pt")
    if not os.path.exists(teacher):
        torch.manual_seed(1)
        torch.save(build_model(TERM_MODEL).state_dict(), teacher)
    loss = {"ce": 1.0} if name == "ce" else {"ce": 1.0, name: {"weight": 0.1, **ALL_TERMS[term]}}
    return config_with(TERM_RUN, **{"loss": loss, "teacher": {"model": TERM_MODEL, "checkpoint": teacher}, **changes})


def term_models(fused=False, seed=0):
    """A VGG-4 student and eval-mode teacher (5 classes, 1 channel) with non-trivial BatchNorm state."""
    torch.manual_seed(seed)
    student = build_model({"arch": "vgg4", "num_classes": 5, "in_channels": 1, "fused": fused})
    teacher = build_model({"arch": "vgg4", "num_classes": 5, "in_channels": 1, "fused": fused}).eval()
    for model in (student, teacher):  # non-trivial BatchNorm parameters and running statistics
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                with torch.no_grad():
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
    return student, teacher


def term_batch(n=6, seed=1):
    """``n`` random 1×16×16 inputs and labels of :func:`term_models`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 5, (n,), generator=g)
