"""``import fastjac`` without the compiled extension: the reference backend serves everything."""
import os
import subprocess
import sys

SCRIPT = r"""
import sys
sys.modules["fastjac._C"] = None  # makes `from . import _C` raise ImportError, as on a machine without a build
import torch, torch.nn.functional as F
import fastjac
b = fastjac.backends()
assert b["reference"] and not b["cpu"] and not b["cuda_compiled"], b
x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
model = fastjac.convert(torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.ReLU()).double())
(g,) = torch.autograd.grad(model(x).pow(2).sum(), x, create_graph=True)
g.pow(2).sum().backward()
assert torch.isfinite(x.grad).all()
try:
    with fastjac.use_backend("cpu"):
        fastjac.ops.relu(x)
except RuntimeError as e:
    assert "fastjac._C is not built" in str(e), e
else:
    raise AssertionError("forcing the cpu backend without the extension must fail")
print("ok")
"""


def test_import_and_train_without_extension():
    env = {k: v for k, v in os.environ.items() if k != "FASTJAC_BACKEND"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr
