"""The main job's code path (``fastjac demo``) at a reduced size: teacher, students, table, fused-vs-plain timing."""
import os
import subprocess
import sys


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "fastjac", "demo", "--quick", "--out", str(out)], capture_output=True,
                       text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| CE + A + J |" in r.stdout and "| CE + A |" in r.stdout and "| CE |" in r.stdout
    assert "plain PyTorch autograd" in r.stdout and "largest accuracy difference" in r.stdout
    assert (out / "teacher" / "model.pt").is_file() and (out / "plain_autograd" / "result.json").is_file()
    # the plain-autograd rerun trains the same function: equal accuracy up to float rounding
    line = next(l for l in r.stdout.splitlines() if "largest accuracy difference" in l)
    assert float(line.split(":")[-1].split()[0]) <= 2.0
