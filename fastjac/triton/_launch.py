"""Python side shared by the Triton launchers: argument checks (errors name the argument and what was
expected), compute dtypes, block sizes and the device guard.

The block sizes are module attributes so that tests can shrink them (under ``TRITON_INTERPRET=1``) to exercise
several blocks per tensor and several partial reductions per BatchNorm channel at small shapes. Results depend
on them (summation order) but on nothing else: every reduction is deterministic.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# True when the kernels were decorated under TRITON_INTERPRET=1: they then run on CPU tensors (numpy).
INTERPRETED = bool(triton.knobs.runtime.interpret)

BLOCK = 1024  # elements per program of the element-wise kernels (a power of 2, a multiple of 8)
REDUCE_BLOCK = 1024  # lanes of the per-channel reductions (a power of 2)
REDUCE_CHUNK = 32 * 1024  # elements of one channel per reduction program (a multiple of REDUCE_BLOCK)
CHANNEL_BLOCK = 128  # channels per program of the per-channel kernels (statistics, coefficients)

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def acc_type(x: torch.Tensor):
    """Compute / accumulation type of the kernels for ``x``: float64 for float64, else float32."""
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def index32(x: torch.Tensor) -> bool:
    """Whether element indices of ``x`` fit in int32 (cheaper divisions; offsets stay int64 regardless)."""
    return x.numel() + max(BLOCK, REDUCE_CHUNK) < 2**31


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def out_type(x: torch.Tensor):
    """The Triton dtype of ``x``'s elements."""
    return {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16}[x.dtype]


def check_device(t: torch.Tensor, op: str, name: str) -> None:
    if t.device.type == "cuda" or (t.device.type == "cpu" and INTERPRETED):
        return
    raise RuntimeError(f"{op}: expected {name} on a CUDA device (CPU tensors only under TRITON_INTERPRET=1, set "
                       f"before fastjac first loads its Triton kernels), got {t.device}")


def check_float(t: torch.Tensor, op: str, name: str, device: torch.device | None = None) -> None:
    check_device(t, op, name)
    if device is not None and t.device != device:
        raise RuntimeError(f"{op}: expected {name} on {device} (the device of x), got {t.device}")
    if t.dtype not in _FLOATS:
        raise RuntimeError(f"{op}: expected {name} to be float32, float64, float16 or bfloat16, got {t.dtype}")


def check_like(t: torch.Tensor, x: torch.Tensor, op: str, name: str) -> None:
    """``t`` has x's shape, dtype and device."""
    check_float(t, op, name, x.device)
    if t.shape != x.shape:
        raise RuntimeError(f"{op}: expected {name} of shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise RuntimeError(f"{op}: expected {name} of dtype {x.dtype}, got {t.dtype}")


def check_mask(mask: torch.Tensor, numel: int, device: torch.device, op: str) -> None:
    """A packed mask of ``ceil(numel / 8)`` uint8 bytes on ``device``."""
    if mask.device != device:
        raise RuntimeError(f"{op}: expected mask on {device}, got {mask.device}")
    if mask.dtype != torch.uint8:
        raise RuntimeError(f"{op}: expected mask of dtype uint8, got {mask.dtype}")
    if mask.numel() != (numel + 7) // 8:
        raise RuntimeError(f"{op}: expected a packed mask of {(numel + 7) // 8} bytes for {numel} elements, "
                           f"got {mask.numel()}")


def check_channel(t: torch.Tensor | None, x: torch.Tensor, op: str, name: str) -> None:
    """``t`` is None or a float tensor of C = x.shape[1] elements on x's device."""
    if t is None:
        return
    check_float(t, op, name, x.device)
    if t.numel() != x.shape[1]:
        raise RuntimeError(f"{op}: expected {name} with {x.shape[1]} elements (one per channel), got shape "
                           f"{tuple(t.shape)}")


def check_bn_input(x: torch.Tensor, op: str) -> None:
    check_float(x, op, "x")
    if x.dim() < 2:
        raise RuntimeError(f"{op}: expected x of shape N x C x ..., got {tuple(x.shape)}")


def check_stats(x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, op: str) -> None:
    """The saved ``mean`` / ``invstd``: one per channel, in the statistics dtype of x."""
    for t, name in ((mean, "mean"), (invstd, "invstd")):
        check_channel(t, x, op, name)
        if t.dtype != stat_dtype(x):
            raise RuntimeError(f"{op}: expected {name} of dtype {stat_dtype(x)} for x of dtype {x.dtype}, "
                               f"got {t.dtype}")


def contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
