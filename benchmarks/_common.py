"""Workloads and measurements shared by the pytest-benchmark files and ``python -m benchmarks.report``.

Every workload is defined here once:

- op level (:data:`OP_CASES`, :func:`make_op_workload`): one call runs forward, backward with
  ``create_graph=True`` and double backward of one op, PyTorch autograd (``impl="torch"``) or fastjac
  (``impl="fastjac"``); :func:`floor_bytes` is the minimum memory traffic of that work;
- model level (:data:`VGG_VARIANTS`, :func:`make_vgg_step`): one full VGG-9-BN training step;
- :func:`saved_tensor_bytes` (bytes of unique storages packed by autograd during a step),
  :func:`peak_memory_many` (peak memory of one step, a fresh subprocess per variant, see
  :mod:`benchmarks._memory`),
  :func:`copy_bandwidth` and :func:`time_fn`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import fastjac
from fastjac.training.models import build_model

REPO_ROOT = Path(__file__).resolve().parent.parent
IMPLS = ("torch", "fastjac")
FLOAT_BYTES = 4  # everything on the CPU path is float32 (CUDA: float32 or bfloat16, see DEVICE_DTYPES)


def impls(device: str = "cpu") -> tuple:
    """Implementations compared on ``device``: PyTorch, and fastjac with its automatic backend (CPU) or each
    available GPU backend forced (``fastjac-cuda``, ``fastjac-triton``)."""
    if device == "cpu":
        return IMPLS
    found = fastjac.backends()
    return ("torch",) + tuple(f"fastjac-{b}" for b in ("cuda", "triton") if found[b])


#: (device, dtype) pairs measured: the CPU in float32; a GPU, when present, in float32 and bfloat16.
DEVICE_DTYPES = (("cpu", torch.float32),) + (
    (("cuda", torch.float32), ("cuda", torch.bfloat16)) if torch.cuda.is_available() else ())


# ---------------------------------------------------------------------------------------------------
# op level
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OpCase:
    """One op at one shape. ``wrt_all``: the double backward differentiates the first-order gradient
    w.r.t. everything it depends on (incoming gradient ``v``, ``x`` and BN ``weight``), as inside a
    network trained with a Jacobian loss; ``False``: w.r.t. ``x`` only, ``v`` a constant."""

    op: str  # "bn" | "bn_relu" | "relu" | "softplus"
    shape: tuple
    wrt_all: bool = True

    @property
    def label(self) -> str:
        names = {"bn": "BN", "bn_relu": "BN+ReLU", "relu": "ReLU", "softplus": "Softplus"}
        return names[self.op] + ("" if self.wrt_all else " (dbwd w.r.t. x only)")

    @property
    def shape_str(self) -> str:
        return "×".join(str(s) for s in self.shape)

    @property
    def id(self) -> str:
        return f"{self.op}{'' if self.wrt_all else '_xonly'}-{'x'.join(map(str, self.shape))}"

    @property
    def group(self) -> str:
        return f"{self.op}{'' if self.wrt_all else ' (x only)'} {self.shape_str}"


OP_CASES = (
    OpCase("bn", (128, 64, 32, 32)),
    OpCase("bn", (128, 64, 32, 32), wrt_all=False),
    OpCase("bn", (128, 256, 8, 8)),
    OpCase("bn_relu", (128, 64, 32, 32)),
    OpCase("bn_relu", (128, 256, 8, 8)),
    OpCase("relu", (128, 64, 32, 32)),
    OpCase("softplus", (128, 64, 32, 32)),
)


def _op_fn(op: str, impl: str) -> Callable:
    """``f(x, params) -> y``; BN in training mode (batch statistics, running statistics updated)."""
    if impl == "torch":
        if op == "relu":
            return lambda x, p: F.relu(x)
        if op == "softplus":
            return lambda x, p: F.softplus(x)
        if op == "bn":
            return lambda x, p: F.batch_norm(x, p["rm"], p["rv"], p["w"], p["b"], training=True)
        if op == "bn_relu":
            return lambda x, p: F.relu(F.batch_norm(x, p["rm"], p["rv"], p["w"], p["b"], training=True))
    elif impl.startswith("fastjac"):
        ops = fastjac.ops
        if op == "relu":
            return lambda x, p: ops.relu(x)
        if op == "softplus":
            return lambda x, p: ops.softplus(x)
        if op == "bn":
            return lambda x, p: ops.batch_norm(x, p["rm"], p["rv"], p["w"], p["b"], training=True)
        if op == "bn_relu":
            return lambda x, p: ops.batch_norm_relu(x, p["rm"], p["rv"], p["w"], p["b"], training=True)
    raise ValueError(f"unknown op/impl {op!r}/{impl!r}")


def make_op_workload(case: OpCase, impl: str, seed: int = 0, device: str = "cpu",
                     dtype: torch.dtype = torch.float32) -> Callable[[], tuple]:
    """Allocate inputs once; return ``run()`` doing one forward + backward + double backward.

    ``run()``: ``y = op(x)``; ``gx = dy/dx^T v`` with ``create_graph=True``; then the double backward
    ``d(<gx, u>)/d(x, v, weight)`` (``wrt_all``) or ``d(<gx, u>)/dx``. Returns the double-backward
    gradients (eager CPU: they are fully computed when ``run`` returns; on a GPU time it with ``sync``).
    ``impl``: ``torch``, ``fastjac`` (automatic backend) or ``fastjac-<backend>`` (that backend forced).
    Activations are ``dtype`` on ``device``; BatchNorm parameters and running statistics stay float32.
    """
    g = torch.Generator().manual_seed(seed)
    shape = case.shape

    def randn(requires_grad=False):
        return torch.randn(shape, generator=g).to(device, dtype).requires_grad_(requires_grad)

    x, v, u = randn(True), randn(case.wrt_all), randn()
    params = {}
    wrt = [x, v] if case.wrt_all else [x]
    if case.op in ("bn", "bn_relu"):
        c = shape[1]
        params = {
            "w": (1 + 0.1 * torch.randn(c, generator=g)).to(device).requires_grad_(),
            "b": (0.1 * torch.randn(c, generator=g)).to(device).requires_grad_(),
            "rm": torch.zeros(c, device=device),
            "rv": torch.ones(c, device=device),
        }
        if case.wrt_all:
            wrt.append(params["w"])
    f = _op_fn(case.op, impl)
    backend = impl.split("-", 1)[1] if impl.startswith("fastjac-") else None

    def run():
        with fastjac.use_backend(backend) if backend else contextlib.nullcontext():
            y = f(x, params)
            (gx,) = torch.autograd.grad(y, x, v, create_graph=True)
            return torch.autograd.grad(gx, wrt, u, allow_unused=True)

    return run


def check_op_agreement(case: OpCase, rtol: float = 1e-3, atol: float = 1e-3, device: str = "cpu",
                       dtype: torch.dtype = torch.float32, impl: str = "fastjac") -> Optional[str]:
    """Run PyTorch and ``impl`` on the same inputs; None when the double-backward gradients agree,
    else a description of the mismatch (a benchmark comparing different work is meaningless)."""
    ref = make_op_workload(case, "torch", device=device, dtype=dtype)()
    got = make_op_workload(case, impl, device=device, dtype=dtype)()
    for i, (a, b) in enumerate(zip(ref, got)):
        a = torch.zeros((), device=device) if a is None else a.float()  # absent == zero (ReLU's d/dx is None)
        b = torch.zeros((), device=device) if b is None else b.float()
        err = (a - b).abs().max().item()
        # half types: both sides round every intermediate, so compare relative to the largest value
        scaled = dtype != torch.float32 and err <= rtol * max(1.0, a.abs().max().item())
        if not (scaled or torch.allclose(a, b, rtol=rtol, atol=atol)):
            return f"{case.id} {impl}: double-backward gradient #{i} differs (max abs err {err:.3g})"
    return None


def floor_bytes(case: OpCase, itemsize: int = FLOAT_BYTES) -> int:
    """Minimum bytes that must move between memory and the cores for forward + backward + double backward
    of ``case``, three separate passes over memory (autograd runs them at different times, so nothing
    stays in cache between them; the tensors are 8-32 MiB each). N = numel, 4-byte floats; per-channel
    vectors (C floats) are negligible and not counted; a ReLU mask is the 1-bit-per-element minimum."""
    n = int(torch.Size(case.shape).numel())
    f = itemsize
    bit = n / 8  # bytes of a packed 1-bit mask
    if case.op == "relu":
        # fwd: read x, write y, write mask                        2N floats + 1 mask
        # bwd: read v, read mask, write gx = v*m                  2N floats + 1 mask
        # dbwd: read u, read mask, write d/dv = u*m (d/dx = 0)    2N floats + 1 mask
        return int(6 * n * f + 3 * bit)
    if case.op == "softplus":
        # fwd: read x, write y                                    2N
        # bwd: read v, x, write gx = v*s(x)                       3N
        # dbwd: read u, v, x, write d/dv = u*s, d/dx = u*v*s'     5N
        return int(10 * n * f)
    if case.op in ("bn", "bn_relu"):
        # BN is two passes per phase: per-channel sums, then one elementwise affine combination.
        # fwd: pass 1 read x (sum, sum of squares); pass 2 read x, write y                 3N
        # bwd: pass 1 read v, x (sums of v, v*xh); pass 2 read v, x, write gx              5N
        # dbwd (d/dv, d/dx, d/dw): pass 1 read u, v, x (5 sums);
        #      pass 2 read u, v, x, write d/dv, d/dx                                      8N
        # dbwd w.r.t. x only: pass 2 writes only d/dx                                     7N
        # BN+ReLU moves the same bytes: its mask is not stored but recomputed from x, which every pass reads.
        floats = 3 + 5 + (8 if case.wrt_all else 7)
        return int(floats * n * f)
    raise ValueError(case.op)


# ---------------------------------------------------------------------------------------------------
# model level
# ---------------------------------------------------------------------------------------------------
VGG_BATCH = 64
JAC_WEIGHT = 0.01
#: (a) plain CE, unconverted; (b) Jacobian loss, unconverted; (c) Jacobian loss, fastjac.convert-ed.
VGG_VARIANTS = ("ce", "jac_torch", "jac_fastjac")
VGG_LABELS = {
    "ce": "(a) CE step, PyTorch model",
    "jac_torch": "(b) Jacobian step, PyTorch model",
    "jac_fastjac": "(c) Jacobian step, fastjac.convert(model)",
}


def convert_available() -> bool:
    return callable(getattr(fastjac, "convert", None))


def make_vgg_model(variant: str, seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model({"arch": "vgg9", "num_classes": 100, "fused": False}).to(device)
    if variant == "jac_fastjac":
        if not convert_available():
            raise RuntimeError("fastjac.convert is not available in this checkout")
        model = fastjac.convert(model, fuse=True)
    return model.train()


def make_vgg_step(variant: str, batch: int = VGG_BATCH, seed: int = 0, device: str = "cpu"):
    """``(step, model)``: ``step()`` is one full training step of VGG-9-BN (zero_grad, loss, backward,
    SGD step) on a fixed random CIFAR-like batch (``batch x 3 x 32 x 32``, 100 classes).

    ``ce``: ``loss = CE(model(x), y)``. ``jac_*``: ``loss = CE + 0.01 * mean_i ||d logit_{i,y_i} / d x_i||^2``
    with the input gradient from ``torch.autograd.grad(sum_i logit_{i,y_i}, x, create_graph=True)``
    (train-mode BN couples the samples, so that is the gradient of the summed target logits).
    """
    model = make_vgg_model(variant, seed, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 100, (batch,), generator=g).to(device)
    jacobian = variant != "ce"

    def step():
        opt.zero_grad(set_to_none=True)
        if jacobian:
            xr = x.detach().requires_grad_()
            logits = model(xr)
            ce = F.cross_entropy(logits, y)
            target = logits.gather(1, y[:, None]).sum()
            (gx,) = torch.autograd.grad(target, xr, create_graph=True)
            loss = ce + JAC_WEIGHT * gx.pow(2).sum() / batch
        else:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step, model


def saved_tensor_bytes(step: Callable, model: torch.nn.Module) -> dict:
    """Bytes of the unique storages autograd packs during one ``step()`` (forward graph plus the
    second-order graph that ``create_graph=True`` records during the first backward).

    Deduplicated by storage: a tensor saved by two nodes (a ReLU output saved by ReLU and by the next
    conv), or two views of one storage, count once, with the full storage size. The hook keeps every
    packed storage alive until the step ends, so a freed address cannot be reused by another tensor and
    miscounted as a duplicate. ``params`` is the part that is model parameters/buffers (they exist
    anyway); ``activations`` = ``total - params`` is what the step adds; ``backward`` is the part first
    packed while autograd ran a backward node (the graph ``create_graph=True`` records);
    ``packed_no_dedup`` sums every pack call (what counting without deduplication would report).
    """
    seen: dict[int, int] = {}
    first_in_backward: set[int] = set()
    keep = []
    packed = [0]
    current_node = getattr(torch._C, "_current_autograd_node", lambda: None)

    def pack(t):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        packed[0] += s.nbytes()
        if ptr and ptr not in seen:
            seen[ptr] = s.nbytes()
            keep.append(s)
            if current_node() is not None:
                first_in_backward.add(ptr)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    state = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    total = sum(seen.values())
    params = sum(b for p, b in seen.items() if p in state)
    return {
        "total": total,
        "params": params,
        "activations": total - params,
        "backward": sum(seen[p] for p in first_in_backward),
        "storages": len(seen),
        "packed_no_dedup": packed[0],
    }


def _memory_cmd(variant: str, backend: Optional[str]):
    cmd = [sys.executable, "-m", "benchmarks._memory", variant]
    if backend:
        cmd += ["--backend", backend]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # Every allocation >= 64 KiB gets its own mmap and is unmapped on free, so RSS follows the live
    # tensor bytes instead of glibc's cached free heap (a fixed threshold also disables the dynamic one).
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    return cmd, env


def peak_memory_many(variants, backend: Optional[str] = None, timeout: float = 600) -> dict:
    """Peak memory of one training step per variant, each in its own fresh subprocess (see
    :mod:`benchmarks._memory`). The subprocesses run concurrently: they measure bytes, not time, and each
    process's RSS is its own."""
    procs = {}
    for variant in variants:
        cmd, env = _memory_cmd(variant, backend)
        procs[variant] = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    results, errors = {}, []
    for variant, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        if proc.returncode != 0:
            errors.append(f"memory subprocess for {variant} failed (rc {proc.returncode}):\n{err[-3000:]}")
            continue
        results[variant] = json.loads(out.strip().splitlines()[-1])
    if errors:
        raise RuntimeError("\n".join(errors))
    return results


def peak_memory(variant: str, backend: Optional[str] = None, timeout: float = 600) -> dict:
    """Peak memory of one training step of ``variant``, in a fresh subprocess."""
    return peak_memory_many([variant], backend, timeout)[variant]


# ---------------------------------------------------------------------------------------------------
# timing, bandwidth, machine
# ---------------------------------------------------------------------------------------------------
def sync(device: str = "cpu") -> None:
    """Wait for the queued GPU work (a no-op on the CPU: eager ops are done when they return)."""
    if device != "cpu":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable, warmup: int, repeats: int, device: str = "cpu") -> list[float]:
    """Wall-clock seconds of ``repeats`` calls after ``warmup`` untimed calls (GPU: synchronized around each)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def time_interleaved(fns: dict, warmup: int, repeats: int, device: str = "cpu") -> dict:
    """Like :func:`time_fn` for several functions, round-robin: each round times every function once,
    so a change of machine load during the measurement hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs) -> float:
    return statistics.median(xs)


def copy_bandwidth(mbytes: int = 256, warmup: int = 2, repeats: int = 10, device: str = "cpu") -> float:
    """Copy bandwidth in bytes/s: ``dst.copy_(src)`` on a ``mbytes`` MiB float32 tensor, counting the
    bytes read plus the bytes written (2x the size; write-allocate traffic is not counted, as in STREAM).
    On a GPU: the device-to-device copy within its memory."""
    n = mbytes * 1024 * 1024 // FLOAT_BYTES
    src = torch.ones(n, device=device)
    dst = torch.zeros(n, device=device)
    times = time_fn(lambda: dst.copy_(src), warmup, repeats, device)
    return 2 * n * FLOAT_BYTES / median(times)


def first_touch_cost(mbytes: int = 32, warmup: int = 2, repeats: int = 7) -> float:
    """Seconds a *fresh* ``mbytes`` MiB float32 tensor costs on first write, over rewriting an existing one:
    ``torch.empty(n).fill_(1)`` minus ``existing.fill_(1)``. glibc serves blocks of 32 MiB and more with a
    new ``mmap`` every time, so each such output pays page faults and kernel page zeroing; every op output
    at 128x64x32x32 float32 (exactly 32 MiB) does, in PyTorch and fastjac alike."""
    n = mbytes * 1024 * 1024 // FLOAT_BYTES
    existing = torch.zeros(n)
    fresh = median(time_fn(lambda: torch.empty(n).fill_(1), warmup, repeats))
    reuse = median(time_fn(lambda: existing.fill_(1), warmup, repeats))
    return fresh - reuse


class ForeignLoad:
    """Share of the machine's CPU time used by *other* processes between ``start()`` and ``stop()``:
    (system-wide busy time from ``/proc/stat`` - this process's and its children's CPU time) / (wall time x
    cores). Timings taken while it is high are not trustworthy; the report prints it per measurement."""

    def __init__(self):
        self._t0 = None

    @staticmethod
    def _snapshot():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user..steal, no guest (in user)
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        return time.perf_counter(), busy, own

    def start(self) -> "ForeignLoad":
        try:
            self._t0 = self._snapshot()
        except (OSError, ValueError, IndexError):
            self._t0 = None
        return self

    def stop(self) -> Optional[float]:
        if self._t0 is None:
            return None
        wall1, busy1, own1 = self._snapshot()
        wall0, busy0, own0 = self._t0
        cores = os.cpu_count() or 1
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / max((wall1 - wall0) * cores, 1e-9))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fastjac_backend() -> str:
    from fastjac import _backend

    return _backend.backend_name(torch.device("cpu"))


def git_revision() -> str:
    """``<short sha>`` of the checkout, noting uncommitted changes to the measured code (csrc/, fastjac/)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "csrc", "fastjac", "setup.py"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + (" + uncommitted changes in csrc/ or fastjac/" if dirty else "")


def machine_info() -> dict:
    return {
        "git": git_revision(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "fastjac": getattr(fastjac, "__version__", "?"),
        "fastjac_backends": fastjac.backends(),
        "fastjac_backend_in_use": fastjac_backend(),
        "fastjac_convert": convert_available(),
    }
