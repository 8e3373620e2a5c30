"""The training package: models, offline datasets and (next) the trainer and configs of experiments E1–E7
(``../shared/EXPERIMENTS.md``). Imported on demand, not by ``import fastjac``."""
