"""Benchmarks are run only on request: ``pytest benchmarks/`` (or a file/node inside it).

A bare ``pytest`` from the repository root (or ``pytest tests/``) must not pick them up: they take
minutes and are not correctness tests, so every file here is ignored unless an argument on the command
line points into this directory. ``FASTJAC_BENCH_ROUNDS`` sets the timed rounds (default 5 for ops, 3 for
VGG steps); ``--benchmark-disable`` runs each workload once (CI smoke).
"""
from __future__ import annotations

import os
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _requested(config) -> bool:
    base = Path(config.invocation_params.dir)
    for arg in config.args:
        path = (base / arg.split("::", 1)[0]).resolve()
        if path == _HERE or _HERE in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path, config):
    here = Path(collection_path).resolve()
    if (here == _HERE or _HERE in here.parents) and not _requested(config):
        return True
    return None


def rounds(default: int) -> int:
    return int(os.environ.get("FASTJAC_BENCH_ROUNDS", default))
