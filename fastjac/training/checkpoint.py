"""Atomic checkpoints and the random-number-generator states an exact resume needs.

A checkpoint is written to a temporary file in the run directory, flushed to disk and renamed over the
previous one, so a run killed at any moment leaves either the old or the new checkpoint, never a torn one
(a kill during the write can leave the temporary ``.tmp-*`` file: :func:`remove_orphans` deletes them on
resume). ``result.json`` is written the same way (:func:`write_json_atomic`).
"""
from __future__ import annotations

import glob
import json
import os
import random
import tempfile
from typing import Any

import numpy as np
import torch

FORMAT = "fastjac-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not belong to this run."""


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every RNG state that influences training: torch (CPU and CUDA), Python, NumPy, and named generators."""
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    for k, g in generators.items():
        g.set_state(state["generators"][k])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: str, write, suffix: str, mode: str = "wb") -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` through a temporary file and an atomic rename."""
    _write_atomic(path, lambda f: torch.save(obj, f), ".pt")


def write_json_atomic(obj: Any, path: str) -> None:
    """``obj`` as JSON to ``path`` through a temporary file and an atomic rename: the file is always complete."""
    _write_atomic(path, lambda f: json.dump(obj, f, indent=1), ".json", "w")


def read_json(path: str) -> Any:
    """The JSON in ``path``; a truncated or invalid file is a :class:`CheckpointError` naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path!r} is truncated or not valid JSON ({exc}); delete it (or its run) to "
                              "recompute it") from exc


def remove_orphans(run_dir: str) -> list[str]:
    """Delete the temporary files of atomic writes that a killed process left in ``run_dir``; returns them."""
    orphans = sorted(glob.glob(os.path.join(glob.escape(run_dir), ".tmp-*")))
    for path in orphans:
        os.remove(path)
    return orphans


def load(path: str) -> dict[str, Any]:
    """Read a checkpoint; a missing, truncated or foreign file is a :class:`CheckpointError` naming it."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torn zip, not a torch file, ...
        raise CheckpointError(f"checkpoint {path!r} is corrupt or not a fastjac checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path!r} is not a {FORMAT} file")
    return ckpt


def config_differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Dotted paths where two config dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += config_differences(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if a == b else [path or "<root>"]
