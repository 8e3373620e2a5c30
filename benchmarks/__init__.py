"""fastjac benchmarks: op-level and VGG-9-BN training-step timings, saved-tensor bytes, peak memory.

Not part of the test suite. Run explicitly:

- ``pytest benchmarks/``                          pytest-benchmark timings (groups pair PyTorch and fastjac)
- ``pytest benchmarks/ --benchmark-disable``      smoke: every workload once
- ``python -m benchmarks.report [--quick] [--out FILE]``  everything in one run, one markdown table

Workloads are defined once in :mod:`benchmarks._common` and shared by both entry points.
"""
