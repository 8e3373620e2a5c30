"""Whether a built shared object links libstdc++ as a shared library, as ``fastjac._C`` must.

A toolchain that links libstdc++ statically into the extension gives it a second, uninitialised copy of the C++
runtime's locale machinery beside the one torch uses: every extension error whose message formats an integer
(``TORCH_CHECK(..., n)``) then crashes the interpreter instead of raising. The GPU machine's default gcc did that
(benchmarks/RESULTS.md, "First GPU measurements"); building with ``CC=/usr/bin/gcc CXX=/usr/bin/g++`` fixed it.
``setup.py`` records the result in ``fastjac/_build_info.json`` and ``import fastjac`` warns when it is "static".
"""
from __future__ import annotations

import subprocess

REBUILD_HINT = ("rebuild with a compiler that links libstdc++ as a shared library, e.g. "
                "CC=/usr/bin/gcc CXX=/usr/bin/g++ pip install -e . --no-build-isolation")


def libstdcxx_linkage(path: str, run=subprocess.run) -> str:
    """``"shared"`` (a NEEDED entry names libstdc++), ``"static"`` (none does, yet the object defines
    ``std::locale``'s symbols itself), ``"none"`` (neither) or ``"unknown"`` (``readelf`` / ``nm`` missing or
    failing)."""
    try:
        dynamic = run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
        if any("(NEEDED)" in line and "libstdc++" in line for line in dynamic.splitlines()):
            return "shared"
        symbols = run(["nm", "-D", "--defined-only", path], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return "static" if any(" _ZNSt6locale" in line for line in symbols.splitlines()) else "none"
