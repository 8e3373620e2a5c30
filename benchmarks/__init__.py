"""fastjac benchmarks: op-level and VGG-9-BN training-step timings, saved-tensor bytes, peak memory.

Not part of the test suite. Run explicitly:

- ``pytest benchmarks/``                          pytest-benchmark timings (groups pair PyTorch and fastjac)
- ``pytest benchmarks/ --benchmark-disable``      smoke: every workload once
- ``python -m benchmarks.report [--quick] [--out FILE]``  everything in one run, one markdown table
- ``python -m benchmarks.gpu_report [--quick] [--out FILE]``  CUDA device: PyTorch/cuDNN vs fastjac-cuda vs
  fastjac-triton, float32 and bfloat16, copy-bandwidth floor (not yet run on a GPU)

With a GPU, ``pytest benchmarks/`` also times the op workloads on CUDA tensors (float32, bfloat16).

Workloads are defined once in :mod:`benchmarks._common` and shared by both entry points.
"""
