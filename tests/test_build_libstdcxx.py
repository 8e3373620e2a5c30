"""The build's libstdc++ linkage check (build_support/libstdcxx.py) on two small shared objects compiled here, one
linking libstdc++ as a shared library and one linking it statically (as the GPU machine's default gcc did to
fastjac._C), and on the built extension itself; the warning ``import fastjac`` gives for a static one."""
import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

import fastjac
from fastjac import _backend

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("_fastjac_libstdcxx", ROOT / "build_support" / "libstdcxx.py")
libstdcxx = importlib.util.module_from_spec(spec)
spec.loader.exec_module(libstdcxx)

TOOLS = all(shutil.which(t) for t in ("g++", "readelf", "nm"))
# An error message that formats an integer: what crashed with a static libstdc++.
SOURCE = '#include <sstream>\n#include <string>\nstd::string message(long n) { std::ostringstream s; s << n; return s.str(); }\n'


def _shared_object(tmp_path, *flags):
    src = tmp_path / "probe.cpp"
    src.write_text(SOURCE)
    out = tmp_path / f"probe{len(flags)}.so"
    subprocess.run(["g++", "-shared", "-fPIC", *flags, str(src), "-o", str(out)], check=True, capture_output=True)
    return str(out)


@pytest.mark.skipif(not TOOLS, reason="needs g++, readelf and nm")
def test_shared_and_static_libstdcxx_are_told_apart(tmp_path):
    assert libstdcxx.libstdcxx_linkage(_shared_object(tmp_path)) == "shared"
    try:
        static = _shared_object(tmp_path, "-static-libstdc++")
    except subprocess.CalledProcessError as e:  # a toolchain without libstdc++.a
        pytest.skip(f"g++ -static-libstdc++ failed: {e.stderr.decode()[:200]}")
    assert libstdcxx.libstdcxx_linkage(static) == "static"


def test_missing_tools_or_files_give_unknown(tmp_path):
    def no_tools(*args, **kwargs):
        raise FileNotFoundError("readelf")

    assert libstdcxx.libstdcxx_linkage(str(tmp_path / "x.so"), run=no_tools) == "unknown"
    if shutil.which("readelf"):
        assert libstdcxx.libstdcxx_linkage(str(tmp_path / "missing.so")) == "unknown"


@pytest.mark.skipif(not (TOOLS and fastjac.backends()["cpu"]), reason="needs the built extension and binutils")
def test_the_built_extension_links_libstdcxx_as_a_shared_library():
    assert libstdcxx.libstdcxx_linkage(_backend._C.__file__) == "shared"
    info = _backend.build_info()
    if "libstdcxx" in info:  # builds older than the check have no record
        assert info["libstdcxx"] == "shared"


def test_import_warns_only_for_a_static_libstdcxx():
    assert _backend._static_libstdcxx_warning({"libstdcxx": "shared"}) is None
    assert _backend._static_libstdcxx_warning({}) is None
    message = _backend._static_libstdcxx_warning({"libstdcxx": "static"})
    assert "statically" in message and "CC=/usr/bin/gcc CXX=/usr/bin/g++" in message
