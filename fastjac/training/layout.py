"""Where an experiment's cells live in its output directory, and which cells an ``experiment.yaml`` lists (so
that a table shows those cells only, never leftovers of an earlier config in the same directory)."""
from __future__ import annotations

import os
from typing import Optional

from . import config as config_io


def cell_dir(out: str, cell: dict) -> str:
    """``OUT/<method>/pc<k>/seed<s>``; the method name is made a safe folder name (``cell.json`` keeps it)."""
    pc = cell["per_class"] if cell["per_class"] is not None else "all"
    safe = "".join(ch if ch.isalnum() or ch in "+-=.,()" else "_" for ch in str(cell["method"]).replace(" ", ""))
    return os.path.join(out, safe, f"pc{pc}", f"seed{cell['seed']}")


def experiment_cell_dirs(out: str) -> Optional[set[str]]:
    """The cell directories of the config in ``OUT/experiment.yaml`` (None when there is none or it cannot be
    read as a config)."""
    path = os.path.join(out, "experiment.yaml")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            cfg = config_io.from_dict(config_io.RunConfig, config_io.yaml_load(f) or {})
    except (ValueError, OSError):
        return None
    return {os.path.normpath(cell_dir(out, cell)) for cell, _ in config_io.sweep_cells(cfg)}
