"""Find a CUDA toolkit that a build can really use (standard library only: ``setup.py`` imports it before torch).

torch's own guess (``torch.utils.cpp_extension.CUDA_HOME``) is ``$CUDA_HOME``, else the grandparent folder of
the ``nvcc`` on the PATH. When that ``nvcc`` is a wrapper script (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``
in ``/usr/local/bin``) the guess is ``/usr/local``, which has no ``lib64/libcudart.so``, and the link fails
minutes into the build. :func:`resolve_toolkit` instead accepts a root only if it has everything the build
uses -- ``bin/nvcc``, ``include/cuda_runtime.h`` and the runtime library ``libcudart.so`` in ``lib64/`` or
``lib/`` (the folders torch links from) -- and looks for one in this order:

1. ``$CUDA_HOME`` / ``$CUDA_PATH`` when set (an explicit choice: if it is not a usable root, that is the
   answer, with the reason; nothing else is tried);
2. the ``nvcc`` on the PATH: its folder's parent after resolving symlinks; for a wrapper script, the absolute
   ``.../bin/nvcc`` paths the script names; then the toolkit root that nvcc itself reports (``TOP=`` in
   ``nvcc --dryrun``);
3. the usual install roots: ``/usr/local/cuda``, ``/usr/local/cuda-X.Y`` (newest first), ``/opt/cuda``.

:func:`probe_link` then compiles and links a one-kernel shared library the way the extension is linked, so
that a toolkit which cannot link (wrong host compiler, broken install) is found in seconds, not after the
whole build.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import subprocess
import tempfile

USUAL_ROOTS = ("/usr/local/cuda", "/usr/local/cuda-*", "/opt/cuda")
_WRAPPER_MAX_BYTES = 64 * 1024  # a wrapper script is small; a real nvcc is a multi-MiB ELF binary


@dataclasses.dataclass(frozen=True)
class Toolkit:
    """A usable CUDA toolkit: its root (what ``CUDA_HOME`` must be), nvcc, version and how it was found."""

    root: str
    nvcc: str
    version: tuple[int, int] | None
    found_by: str


@dataclasses.dataclass(frozen=True)
class Resolution:
    """The result of :func:`resolve_toolkit`: a toolkit, or None and every reason a candidate was refused."""

    toolkit: Toolkit | None
    rejected: tuple[str, ...]

    def why_not(self) -> str:
        if not self.rejected:
            return "no nvcc on the PATH, CUDA_HOME unset and no toolkit in " + ", ".join(USUAL_ROOTS)
        return "; ".join(self.rejected)


def root_problems(root: str) -> list[str]:
    """What ``root`` lacks to serve as ``CUDA_HOME`` for the build (empty: usable)."""
    problems = []
    nvcc = os.path.join(root, "bin", "nvcc")
    if not (os.path.isfile(nvcc) and os.access(nvcc, os.X_OK)):
        problems.append("bin/nvcc")
    if not os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
        problems.append("include/cuda_runtime.h")
    if runtime_library_dir(root) is None:
        problems.append("libcudart.so in lib64/ or lib/")
    return problems


def runtime_library_dir(root: str) -> str | None:
    """The folder torch will link ``-lcudart`` from (``lib64``, else ``lib``) if it holds ``libcudart.so``."""
    lib64, lib = os.path.join(root, "lib64"), os.path.join(root, "lib")
    # torch.utils.cpp_extension.library_paths: lib64, unless lib64 is missing and lib exists.
    folder = lib if (not os.path.exists(lib64) and os.path.exists(lib)) else lib64
    return folder if os.path.exists(os.path.join(folder, "libcudart.so")) else None


def nvcc_version(nvcc: str, run=subprocess.run) -> tuple[int, int] | None:
    """``(major, minor)`` from ``nvcc --version`` ("release 13.0"), or None if nvcc does not say."""
    try:
        out = run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def _wrapper_targets(path: str) -> list[str]:
    """Absolute ``.../bin/nvcc`` paths named inside a small text script (a wrapper's ``exec`` target)."""
    try:
        if os.path.getsize(path) > _WRAPPER_MAX_BYTES:
            return []
        with open(path, "rb") as handle:
            text = handle.read()
    except OSError:
        return []
    if not text.startswith(b"#!"):
        return []
    found = re.findall(rb"(/[^\s'\"]*/bin/nvcc)(?![\w.-])", text)
    return list(dict.fromkeys(p.decode(errors="replace") for p in found))


def _reported_root(nvcc: str, run=subprocess.run) -> str | None:
    """The toolkit root nvcc reports for itself (``#$ TOP=<root>/bin/..`` in a dry run)."""
    try:
        proc = run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                   capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", (proc.stdout or "") + (proc.stderr or ""), re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def _version_key(root: str):
    match = re.search(r"cuda-(\d+)\.(\d+)$", root)
    return (int(match.group(1)), int(match.group(2))) if match else (-1, -1)


def _usual_roots() -> list[str]:
    roots = []
    for pattern in USUAL_ROOTS:
        roots += sorted(glob.glob(pattern), key=_version_key, reverse=True) if "*" in pattern else [pattern]
    return [r for r in dict.fromkeys(roots) if os.path.isdir(r)]


def resolve_toolkit(environ=None, which=shutil.which, run=subprocess.run, usual_roots=_usual_roots) -> Resolution:
    """Find a usable CUDA toolkit root (see the module docstring for the order); never raises."""
    environ = os.environ if environ is None else environ
    rejected: list[str] = []

    def accept(root: str, found_by: str) -> Toolkit | None:
        root = os.path.realpath(root)
        problems = root_problems(root)
        if problems:
            rejected.append(f"{root} ({found_by}) has no {', '.join(problems)}")
            return None
        nvcc = os.path.join(root, "bin", "nvcc")
        return Toolkit(root, nvcc, nvcc_version(nvcc, run), found_by)

    for var in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(var):
            return Resolution(accept(environ[var], f"${var}"), tuple(rejected))

    nvcc = which("nvcc", path=environ.get("PATH"))
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates = [(os.path.dirname(os.path.dirname(real)), f"nvcc on the PATH ({nvcc})")]
        candidates += [(os.path.dirname(os.path.dirname(t)), f"the target of the wrapper {nvcc}")
                       for t in _wrapper_targets(real)]
        tried = set()
        for root, found_by in candidates:
            if os.path.realpath(root) not in tried:
                tried.add(os.path.realpath(root))
                toolkit = accept(root, found_by)
                if toolkit:
                    return Resolution(toolkit, tuple(rejected))
        reported = _reported_root(nvcc, run)
        if reported and reported not in tried:
            toolkit = accept(reported, f"the root {nvcc} reports (nvcc --dryrun)")
            if toolkit:
                return Resolution(toolkit, tuple(rejected))

    for root in usual_roots():
        toolkit = accept(root, "a usual install root")
        if toolkit:
            return Resolution(toolkit, tuple(rejected))
    return Resolution(None, tuple(rejected))


_PROBE_SOURCE = """
#include <cuda_runtime.h>
__global__ void fastjac_probe_kernel(float* x) { x[threadIdx.x] += 1.0f; }
extern "C" int fastjac_probe(void) { int n = 0; return (int)cudaGetDeviceCount(&n); }
"""


def probe_link(toolkit: Toolkit, arch: str = "8.0", cxx: str | None = None, run=subprocess.run) -> str | None:
    """Compile one kernel with the toolkit's nvcc and link it into a shared library against ``libcudart``, as
    the extension is built. Returns None on success, else the failing command and its last output lines."""
    cxx = cxx or os.environ.get("CXX") or "c++"
    major, minor = arch.replace("+PTX", "").split(".")
    with tempfile.TemporaryDirectory(prefix="fastjac-cuda-probe-") as tmp:
        src, obj, lib = (os.path.join(tmp, name) for name in ("probe.cu", "probe.o", "probe.so"))
        with open(src, "w") as handle:
            handle.write(_PROBE_SOURCE)
        steps = [
            [toolkit.nvcc, "-c", src, "-o", obj, "-Xcompiler", "-fPIC", "-ccbin", cxx,
             f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"],
            [cxx, "-shared", obj, "-o", lib, f"-L{runtime_library_dir(toolkit.root)}", "-lcudart"],
        ]
        for cmd in steps:
            try:
                proc = run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as exc:
                return f"`{' '.join(cmd)}` could not run: {exc}"
            if proc.returncode != 0:
                tail = " | ".join(((proc.stderr or "") + (proc.stdout or "")).strip().splitlines()[-3:])
                return f"`{' '.join(cmd)}` failed: {tail}"
    return None


def plan_cuda_build(mode: str, have_sources: bool, torch_cuda: str | None, gpu_visible: bool,
                    arch: str = "8.0", resolve=resolve_toolkit, probe=probe_link):
    """Whether to build the CUDA kernels: ``(toolkit, None)``, or ``(None, why not)``.

    ``mode`` is ``FASTJAC_BUILD_CUDA``: ``"0"`` never; ``"auto"`` only when a GPU is visible; ``"1"`` always
    (the caller turns a ``why not`` into an error). Checks run cheapest first, all before anything compiles:
    the sources, the torch build (``torch_cuda`` = ``torch.version.cuda``), the GPU (auto), the toolkit root and
    its major version, then the link probe."""
    if mode == "0":
        return None, "FASTJAC_BUILD_CUDA=0"
    if not have_sources:
        return None, "there are no csrc/cuda/*.cu sources"
    if torch_cuda is None:
        return None, "the installed torch is a CPU-only build"
    if mode == "auto" and not gpu_visible:
        return None, "no GPU is visible (torch.cuda.is_available() is False)"
    resolution = resolve()
    toolkit = resolution.toolkit
    if toolkit is None:
        return None, f"no usable CUDA toolkit: {resolution.why_not()}"
    torch_major = int(torch_cuda.split(".")[0])
    if toolkit.version is not None and toolkit.version[0] != torch_major:
        return None, (f"the CUDA toolkit at {toolkit.root} is {toolkit.version[0]}.{toolkit.version[1]}, but torch "
                      f"was built with CUDA {torch_cuda} (the major versions must match)")
    failure = probe(toolkit, arch=arch)
    if failure:
        return None, f"the CUDA toolkit at {toolkit.root} cannot build a CUDA extension here: {failure}"
    return toolkit, None
