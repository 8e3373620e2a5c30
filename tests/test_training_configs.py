"""Every bundled config validates; every smoke config runs end to end on synthetic data in the real on-disk
formats (CIFAR pickles, MIT Indoor folders, a local ResNet-34 weights file)."""
import glob
import os
import time

import pytest

from fastjac.cli import CONFIG_DIR
from fastjac.training import config, synthetic, terms
from fastjac.training.models import build_model
from fastjac.training.report import table
from fastjac.experiments.runner import run_experiment

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIGS = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))
SMOKE = [c for c in CONFIGS if c.startswith("smoke_")]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_and_every_run_is_buildable(name):
    cfg = config.load(os.path.join(CONFIG_DIR, name + ".yaml"))
    assert cfg.description, f"{name}: a description says what the config reruns"
    runs = config.expand(cfg)
    assert runs
    for _, run in runs:
        terms.parse(run.loss)
    spec = dict(runs[0][1].model, weights=None)
    build_model(spec)


def test_every_experiment_has_a_smoke_variant():
    full = [c for c in CONFIGS if c.startswith("e")]
    bases = {config.read(os.path.join(CONFIG_DIR, s + ".yaml")).get("name") for s in SMOKE}
    smoke_bases = set()
    for s in SMOKE:
        import yaml

        with open(os.path.join(CONFIG_DIR, s + ".yaml")) as f:
            smoke_bases.add(yaml.safe_load(f)["base"])
    # e7_table5_2 is the same code path as e7_table5_1 (a grid of its score_matching term); 20 runs are too long
    assert set(full) - smoke_bases == {"e7_table5_2"}, set(full) - smoke_bases
    assert bases


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    synthetic.write_smoke_data(root)  # what `fastjac synth DIR` writes
    return root


@pytest.mark.parametrize("name", SMOKE)
def test_smoke_config_runs_end_to_end(name, data_root, tmp_path):
    cfg = config.load(os.path.join(CONFIG_DIR, name + ".yaml"))
    t0 = time.perf_counter()
    results = run_experiment(cfg, str(tmp_path / "out"), data_root=data_root, progress=False, log=lambda *_: None)
    assert len(results) == (len(config.expand(cfg)) if cfg.epochs > 0 else 0)  # epochs: 0 trains nothing
    assert all(0 <= r["test_acc"] <= 100 for r in results)
    for name_ in cfg.evaluations:  # every listed evaluation wrote its table and plot
        for fname in ("table.csv", "plot.png"):
            assert os.path.getsize(tmp_path / "out" / "evaluations" / name_ / fname) > 0, (name_, fname)
    if results:
        text = table(str(tmp_path / "out"))
        for method in (cfg.sweep.methods if cfg.sweep else {}):
            assert f"| {method} |" in text
    print(f"{name}: {len(results)} runs in {time.perf_counter() - t0:.1f} s")
