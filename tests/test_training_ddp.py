"""The README's DDP command (``torchrun --nproc_per_node=2 -m fastjac run smoke_digits --out runs/ddp``): the
students wait for the teacher that rank 0 writes (made slow on purpose, tests/_ddp_probe.py), and every rank
ends each epoch with the BatchNorm running statistics averaged over the ranks, which ``model.pt`` keeps, and with
the same weights (the gradients, of the parameters only, are all-reduced)."""
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def test_readme_ddp_command_waits_for_the_teacher_and_averages_batch_norm_statistics(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTJAC_PROBE_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29537",
                        os.path.join(HERE, "_ddp_probe.py"), "run", "smoke_digits", "--out", "runs/ddp",
                        "--no-progress", "--set", "epochs=1"], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| CE + A + J |" in r.stdout and r.stdout.count("results in runs/ddp") == 1  # rank 0 alone reports
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1)]
    saved = torch.load(tmp_path / "runs/ddp/CE+A+J/pc5/seed0/model.pt", weights_only=True)
    differed = 0
    for key, after in ranks[0]["after"].items():
        mean = (ranks[0]["before"][key] + ranks[1]["before"][key]) / 2  # each rank's own, from its half-batches
        torch.testing.assert_close(after, mean, msg=key)
        torch.testing.assert_close(ranks[1]["after"][key], after, rtol=0, atol=0, msg=key)
        torch.testing.assert_close(saved[key], after, rtol=0, atol=0, msg=key)
        differed += not torch.equal(ranks[0]["before"][key], ranks[1]["before"][key])
    assert differed > 0  # the ranks' own statistics did differ: the average is not rank 0's
    for key, value in ranks[0]["params"].items():  # the gradients were all-reduced: the ranks' weights agree
        torch.testing.assert_close(ranks[1]["params"][key], value, rtol=0, atol=0, msg=key)
