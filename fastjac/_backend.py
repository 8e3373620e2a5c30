"""Backend discovery and selection.

A backend is a table of the kernels listed in ``csrc/KERNELS.md``:

- ``reference``: pure PyTorch (:mod:`fastjac.reference`), always available, any device;
- ``cpu``: the C++ kernels of the compiled extension ``fastjac._C`` (CPU tensors);
- ``cuda``: the CUDA kernels of ``fastjac._C`` when it was built with them (CUDA tensors);
- ``triton``: Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

``FASTJAC_BACKEND=auto|reference|cpu|cuda|triton`` (read at import) or :func:`use_backend` forces one;
``auto`` picks the fastest available backend for each tensor's device.
"""
from __future__ import annotations

import contextlib
import os
import types

import torch

from . import reference

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")
_CHOICES = ("auto",) + BACKEND_NAMES

try:  # the compiled extension registers torch.ops.fastjac.<kernel>
    from . import _C  # noqa: F401
    from . import _kernel_fakes

    _kernel_fakes.register()
    _EXTENSION_ERROR = None
except ImportError as exc:  # pragma: no cover - exercised on machines without a build
    _C = None
    _EXTENSION_ERROR = exc


def _cuda_compiled() -> bool:
    return _C is not None and bool(_C.compiled_with_cuda())


def build_info() -> dict:
    """How ``fastjac._C`` was built, as ``setup.py`` recorded it in ``fastjac/_build_info.json``: whether the
    CUDA kernels were built and, if not, why (e.g. no GPU was visible and ``FASTJAC_BUILD_CUDA`` was ``auto``).
    Empty when the file is missing (a build older than the record, or no build)."""
    import json

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def _static_libstdcxx_warning(info: dict) -> str | None:
    """The warning ``import fastjac`` gives when ``setup.py`` found libstdc++ linked statically into ``fastjac._C``
    (build_support/libstdcxx.py), or None."""
    if info.get("libstdcxx") != "static":
        return None
    return ("fastjac._C links libstdc++ statically, so an error raised by its kernels can crash the interpreter "
            "instead of raising; rebuild with a compiler that links it as a shared library, e.g. "
            "CC=/usr/bin/gcc CXX=/usr/bin/g++ pip install -e . --no-build-isolation")


if _C is not None and (_LIBSTDCXX_WARNING := _static_libstdcxx_warning(build_info())):
    import warnings

    warnings.warn(_LIBSTDCXX_WARNING, RuntimeWarning, stacklevel=2)


def _why_no_cuda() -> str:
    if _C is not None and not _cuda_compiled():
        why = build_info().get("cuda_skipped_because")
        return (f"fastjac._C was built without the CUDA kernels ({why or 'FASTJAC_BUILD_CUDA'}); "
                "rebuild with FASTJAC_BUILD_CUDA=1 pip install -e . --no-build-isolation")
    if _C is None:
        return f"the C++ extension fastjac._C is not built ({_EXTENSION_ERROR})"
    return "fastjac._C has the CUDA kernels, but no GPU is usable (torch.cuda.is_available() is False)"


_triton_state = None  # (kernel table or None, reason it is unavailable), decided once on first use


def _load_triton():
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return None, f"triton is not installed ({exc})"
    if not (torch.cuda.is_available() or _interpret_requested()):
        return None, "no CUDA device is usable (set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors)"
    try:
        from . import triton as table
    except Exception as exc:  # pragma: no cover - a broken triton install
        return None, f"the Triton kernels failed to load ({type(exc).__name__}: {exc})"
    return table, None


def _interpret_requested() -> bool:
    from triton import knobs

    return bool(knobs.runtime.interpret)


def _triton_kernels():
    """The Triton kernel table (:mod:`fastjac.triton`) when triton is importable and usable: a CUDA device is
    available, or ``TRITON_INTERPRET=1`` was set (then the kernels also accept CPU tensors). Else None.

    Decided once, on first use (importing fastjac does not import triton)."""
    global _triton_state
    if _triton_state is None:
        _triton_state = _load_triton()
    return _triton_state[0]


def _triton_interpreted() -> bool:
    """Whether the Triton kernels run under the interpreter (so they serve CPU tensors)."""
    table = _triton_kernels()
    return table is not None and table.INTERPRETED


_AVAILABLE = {
    "reference": lambda: True,
    "cpu": lambda: _C is not None,
    "cuda": lambda: _cuda_compiled() and torch.cuda.is_available(),
    "cuda_compiled": _cuda_compiled,
    "triton": lambda: _triton_kernels() is not None,
}


def backends() -> dict[str, bool]:
    """Which backends can run here: ``{"reference": True, "cpu": ..., "cuda": ..., "triton": ...}``.

    ``cuda`` needs the extension compiled with CUDA *and* a usable GPU; ``cuda_compiled`` reports the
    former alone.
    """
    return {name: bool(check()) for name, check in _AVAILABLE.items()}


def _validate_choice(name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in _CHOICES:
        raise ValueError(f"{source} must be one of {', '.join(_CHOICES)}; got {name!r}")
    return name


_forced = _validate_choice(os.environ.get("FASTJAC_BACKEND", "auto"), "FASTJAC_BACKEND")


_compiled_serves_cache: dict = {}  # device kind -> compiled_serves' answer under the current choice


def compiled_serves(x: torch.Tensor) -> bool:
    """Whether the compiled kernels (the ``cpu`` or ``cuda`` backend) serve ``x`` under the current choice.

    Called on every fused-op call, so it is a dictionary lookup after the first call per device type (the cache
    holds the current choice's answers; :func:`set_backend` clears it). An unavailable forced backend answers False here: the Python chain
    then raises the full error."""
    kind = "cpu" if x.is_cpu else "cuda" if x.is_cuda else "other"
    answer = _compiled_serves_cache.get(kind)
    if answer is None:
        try:
            answer = kind != "other" and backend_name(x.device) in ("cpu", "cuda")
        except RuntimeError:
            answer = False
        _compiled_serves_cache[kind] = answer
    return answer


def current_backend() -> str:
    """The forced backend name, or ``"auto"``."""
    return _forced


def set_backend(name: str) -> None:
    """Force a backend for all subsequent fastjac ops (``"auto"`` restores automatic choice)."""
    global _forced
    _forced = _validate_choice(name, "backend")
    _compiled_serves_cache.clear()


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager forcing a backend inside a ``with`` block."""
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _unavailable(name: str, device: torch.device) -> RuntimeError:
    why = {
        "cpu": f"the C++ extension fastjac._C is not built ({_EXTENSION_ERROR}); "
        "build it with `pip install -e . --no-build-isolation`",
        "cuda": _why_no_cuda(),
        "triton": _triton_state[1] if _triton_state else "",
    }.get(name, "")
    return RuntimeError(f"fastjac backend {name!r} is not available for {device} tensors: {why}")


def backend_name(device: torch.device) -> str:
    """The backend that serves tensors on ``device`` under the current choice."""
    available = _AVAILABLE  # checked lazily: serving CPU tensors never loads the Triton kernels
    if _forced == "auto":
        if device.type == "cpu":
            return "cpu" if available["cpu"]() else "reference"
        if device.type == "cuda":
            if available["cuda"]():
                return "cuda"
            return "triton" if available["triton"]() else "reference"
        return "reference"
    name = _forced
    if not available[name]():
        raise _unavailable(name, device)
    if name == "cpu" and device.type != "cpu":
        raise RuntimeError(f"fastjac backend 'cpu' runs CPU tensors only; got a tensor on {device}")
    if name == "cuda" and device.type != "cuda":
        raise RuntimeError(f"fastjac backend 'cuda' runs CUDA tensors only; got a tensor on {device}")
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and _triton_interpreted()):
        raise RuntimeError(
            f"fastjac backend 'triton' runs CUDA tensors, and CPU tensors only under the Triton interpreter "
            f"(TRITON_INTERPRET=1, set before fastjac first uses Triton); got a tensor on {device}"
        )
    return name


def kernels(device: torch.device) -> types.ModuleType | object:
    """The kernel table (attributes named as in ``csrc/KERNELS.md``) for tensors on ``device``."""
    name = backend_name(device)
    if name == "reference":
        return reference
    if name in ("cpu", "cuda"):
        return torch.ops.fastjac
    return _triton_kernels()
