"""Model-level pytest-benchmark: one VGG-9-BN training step (batch 64, 3x32x32, 100 classes).

(a) ``ce``: plain cross-entropy step of the PyTorch model; (b) ``jac_torch``: CE + 0.01 ||d logit_y/dx||^2
step of the PyTorch model; (c) ``jac_fastjac``: the same on ``fastjac.convert(model, fuse=True)``.
The first step runs under the saved-tensor hooks (bytes go to ``extra_info``) and doubles as the warm-up.
``test_vgg_memory`` measures the peak memory of one step in a fresh subprocess per variant.
"""
import math

import pytest

from ._common import VGG_VARIANTS, convert_available, make_vgg_step, peak_memory_many, saved_tensor_bytes
from .conftest import rounds

MiB = 2**20


def _available(variant):
    return variant != "jac_fastjac" or convert_available()


@pytest.mark.parametrize("variant", VGG_VARIANTS)
def test_vgg_step(benchmark, variant):
    if not _available(variant):
        pytest.skip("fastjac.convert is not available yet")
    benchmark.group = "vgg9-bn training step"
    step, model = make_vgg_step(variant)
    saved = saved_tensor_bytes(step, model)  # first step = warm-up
    benchmark.extra_info.update({f"saved_{k}": v for k, v in saved.items()})
    assert saved["activations"] > 0
    loss = benchmark.pedantic(step, rounds=rounds(3), warmup_rounds=0, iterations=1)
    assert math.isfinite(loss.item())


def test_vgg_memory(record_property):
    variants = [v for v in VGG_VARIANTS if _available(v)]
    for variant, mem in peak_memory_many(variants).items():
        record_property(f"{variant}_step_peak_bytes", mem["step_peak_bytes"])
        record_property(f"{variant}_alloc_peak_bytes", mem["alloc_peak_bytes"])
        print(f"{variant}: peak RSS growth {mem['step_peak_bytes'] / MiB:.1f} MiB, "
              f"allocator peak {mem['alloc_peak_bytes'] / MiB:.1f} MiB ({mem['method']})")
        assert mem["step_peak_bytes"] > 0 and mem["alloc_peak_bytes"] > 0
