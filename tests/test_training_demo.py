"""The main job's code path (``fastjac demo``) at a reduced size: teacher, students, table, the claim check,
the figure, and the fused-vs-plain timing of fresh runs."""
import os
import subprocess
import sys

from fastjac.cli import main
from fastjac.experiments.demo import claim_lines


def test_demo_quick(tmp_path, capfd, monkeypatch):
    r = subprocess.run([sys.executable, "-m", "fastjac", "demo", "--quick"], capture_output=True, cwd=tmp_path,
                       text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "runs" / "demo-quick"          # --quick never writes into the full run's folder
    assert not (tmp_path / "runs" / "demo").exists()
    assert "| CE + A + J |" in r.stdout and "| CE + A |" in r.stdout and "| CE |" in r.stdout
    assert "1 per class: CE + A + J - CE =" in r.stdout and "the paper's ordering is" in r.stdout
    figure = next(line.split(": ", 1)[1] for line in r.stdout.splitlines() if line.startswith("figure: "))
    figure = tmp_path / figure                      # printed relative to the demo's working directory
    assert figure.is_file() and figure.parent.samefile(out)
    assert "plain PyTorch autograd" in r.stdout and "largest accuracy difference" in r.stdout
    assert (out / "teacher" / "model.pt").is_file()
    assert not (out / "plain_autograd").exists()    # the timed runs are fresh, in temporary folders
    # the plain-autograd rerun trains the same function: equal accuracy up to float rounding
    line = next(l for l in r.stdout.splitlines() if "largest accuracy difference" in l)
    assert float(line.split(":")[-1].split()[0]) <= 2.0

    # the full demo into the quick run's folder: refused before it trains, naming what differs; nothing rewritten
    experiment = (out / "experiment.yaml").read_text()
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--out", str(out)]) == 2
    assert "'epochs'" in capfd.readouterr().err
    assert (out / "experiment.yaml").read_text() == experiment


def test_claim_lines_say_plainly_whether_the_ordering_holds():
    cells = {("CE + A + J", 1): [80.0, 82.0, 84.0], ("CE", 1): [55.0, 60.0, 65.0], ("CE + A", 1): [60.0, 61.0],
             ("CE + A + J", 2): [70.0, 80.0, 90.0], ("CE", 2): [60.0, 70.0, 80.0], ("CE + A", 2): [90.0, 91.0]}
    one, two = claim_lines(cells, [1, 2])
    assert "+22.00 points (needs > 10.00" in one and one.endswith("is reproduced")
    assert "needs > 20.00" in two and ": no;" in two and two.endswith("is NOT reproduced")
    assert "too few seeds" in claim_lines({("CE + A + J", 5): [1.0]}, [5])[0]
