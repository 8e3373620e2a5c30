"""The build's CUDA toolkit resolution (build_support/cuda_toolkit.py) on fake toolkits in a temporary folder,
and the fat-binary reader that CI uses to check the compiled architectures. No GPU, no real toolkit needed."""
import importlib.util
import os
import pathlib
import stat
import struct
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_fastjac_{name}", ROOT / "build_support" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ct = _load("cuda_toolkit")
fatbin = _load("fatbin")


def _script(path, body):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def fake_toolkit(root, version="13.0", libcudart=True, headers=True, lib_folder="lib64"):
    """A toolkit root whose nvcc answers --version and --dryrun like the real one."""
    _script(root / "bin" / "nvcc", f"""case "$*" in
  *--version*) echo "Cuda compilation tools, release {version}, V{version}.88" ;;
  *--dryrun*) echo "#\\$ TOP=$(dirname "$0")/.." ;;
esac
""")
    if headers:
        (root / "include").mkdir(parents=True, exist_ok=True)
        (root / "include" / "cuda_runtime.h").write_text("")
    (root / lib_folder).mkdir(parents=True, exist_ok=True)
    if libcudart:
        (root / lib_folder / "libcudart.so").write_text("")
    return root


def resolve(tmp_path, environ, usual=()):
    env = {"PATH": str(tmp_path / "nothing-on-path")} | environ
    return ct.resolve_toolkit(environ=env, usual_roots=lambda: [str(p) for p in usual])


def test_wrapper_script_is_followed_to_the_real_toolkit(tmp_path):
    real = fake_toolkit(tmp_path / "cuda-13.0")
    wrapper_bin = tmp_path / "usr-local" / "bin"
    _script(wrapper_bin / "nvcc", f'exec {real}/bin/nvcc "$@"\n')
    result = resolve(tmp_path, {"PATH": str(wrapper_bin)})
    assert result.toolkit is not None, result.why_not()
    assert result.toolkit.root == str(real) and result.toolkit.version == (13, 0)
    assert "wrapper" in result.toolkit.found_by
    # the wrapper's own grandparent (torch's guess) was considered and refused for the missing runtime library
    assert any(str(tmp_path / "usr-local") in r and "libcudart.so" in r for r in result.rejected)


def test_symlinked_nvcc_resolves_to_its_toolkit(tmp_path):
    real = fake_toolkit(tmp_path / "cuda-12.4", version="12.4", lib_folder="lib")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(real / "bin" / "nvcc")
    result = resolve(tmp_path, {"PATH": str(tmp_path / "bin")})
    assert result.toolkit.root == str(real) and result.toolkit.version == (12, 4)
    assert ct.runtime_library_dir(str(real)) == str(real / "lib")


def test_root_reported_by_nvcc_itself(tmp_path):
    """An nvcc that names no path in its text (not a readable wrapper) is asked for its root (--dryrun TOP=)."""
    real = fake_toolkit(tmp_path / "opt" / "toolkit")
    shim = tmp_path / "shim" / "bin"
    _script(shim / "nvcc", f"""D={tmp_path}/opt; N=nvcc
case "$*" in *--dryrun*) echo "#\\$ TOP=$D/toolkit/bin/.." ;; *) exec "$D/toolkit/bin/$N" "$@" ;; esac
""")
    result = resolve(tmp_path, {"PATH": str(shim)})
    assert result.toolkit is not None, result.why_not()
    assert result.toolkit.root == str(real) and "--dryrun" in result.toolkit.found_by


def test_missing_runtime_library_or_headers_is_refused_with_the_reason(tmp_path):
    fake_toolkit(tmp_path / "no-lib", libcudart=False)
    fake_toolkit(tmp_path / "no-inc", headers=False)
    result = resolve(tmp_path, {"PATH": f"{tmp_path / 'no-lib' / 'bin'}"}, usual=[tmp_path / "no-inc"])
    assert result.toolkit is None
    why = result.why_not()
    assert "libcudart.so in lib64/ or lib/" in why and "include/cuda_runtime.h" in why


def test_explicit_cuda_home_wins_and_is_not_second_guessed(tmp_path):
    good = fake_toolkit(tmp_path / "good")
    bad = fake_toolkit(tmp_path / "bad", libcudart=False)
    assert resolve(tmp_path, {"CUDA_HOME": str(good)}).toolkit.root == str(good)
    result = resolve(tmp_path, {"CUDA_HOME": str(bad)}, usual=[good])
    assert result.toolkit is None and "$CUDA_HOME" in result.why_not() and "libcudart" in result.why_not()


def test_usual_roots_when_nvcc_is_absent(tmp_path):
    good = fake_toolkit(tmp_path / "cuda-13.0")
    assert resolve(tmp_path, {}, usual=[tmp_path / "missing", good]).toolkit.root == str(good)
    result = resolve(tmp_path, {})
    assert result.toolkit is None and "no nvcc on the PATH" in result.why_not()


def test_usual_roots_newest_version_first():
    roots = ["/usr/local/cuda-11.8", "/usr/local/cuda-12.10", "/usr/local/cuda-12.4"]
    assert sorted(roots, key=ct._version_key, reverse=True)[0] == "/usr/local/cuda-12.10"


def _plan(mode, gpu=False, torch_cuda="13.0", toolkit_version=(13, 0), probe_failure=None, found=True):
    toolkit = ct.Toolkit("/fake/cuda", "/fake/cuda/bin/nvcc", toolkit_version, "test")
    resolution = ct.Resolution(toolkit if found else None, () if found else ("/x has no bin/nvcc",))
    calls = []

    def probe(tk, arch):
        calls.append(arch)
        return probe_failure

    result = ct.plan_cuda_build(mode, True, torch_cuda, gpu, arch="9.0", resolve=lambda: resolution, probe=probe)
    return result, calls


def test_auto_builds_cuda_only_when_a_gpu_is_visible():
    (toolkit, why), calls = _plan("auto", gpu=False)
    assert toolkit is None and "no GPU is visible" in why and calls == []
    (toolkit, why), calls = _plan("auto", gpu=True)
    assert toolkit is not None and why is None and calls == ["9.0"]


def test_forced_build_ignores_the_gpu_but_reports_every_other_lack():
    (toolkit, _), _ = _plan("1", gpu=False)
    assert toolkit is not None
    for kwargs, expected in [
        (dict(found=False), "no usable CUDA toolkit: /x has no bin/nvcc"),
        (dict(toolkit_version=(12, 8)), "is 12.8, but torch was built with CUDA 13.0"),
        (dict(probe_failure="`c++ -shared ...` failed: cannot find -lcudart"), "cannot find -lcudart"),
        (dict(torch_cuda=None), "CPU-only build"),
    ]:
        (toolkit, why), _ = _plan("1", **kwargs)
        assert toolkit is None and expected in why, why
    (toolkit, why), _ = _plan("0", gpu=True)
    assert toolkit is None and why == "FASTJAC_BUILD_CUDA=0"


def test_probe_reports_a_toolkit_that_cannot_link(tmp_path):
    root = fake_toolkit(tmp_path / "cuda")
    _script(root / "bin" / "nvcc", 'echo "ld: cannot find -lcudart: No such file or directory" >&2; exit 1\n')
    toolkit = ct.Toolkit(str(root), str(root / "bin" / "nvcc"), (13, 0), "test")
    failure = ct.probe_link(toolkit, arch="9.0")
    assert failure is not None and "cannot find -lcudart" in failure and "nvcc" in failure


def test_probe_links_with_the_real_toolkit_when_there_is_one():
    result = ct.resolve_toolkit()
    if result.toolkit is None:
        pytest.skip(f"no CUDA toolkit on this machine: {result.why_not()}")
    assert ct.probe_link(result.toolkit, arch="9.0") is None


def _fatbin_entry(kind, arch, payload=b"\0" * 24):
    header = struct.pack("<HHIQIIHHI", kind, 0x101, 64, len(payload), len(payload), 0, 0, 8, arch).ljust(64, b"\0")
    return header + payload


def test_fatbin_reader_lists_entry_architectures():
    entries = _fatbin_entry(2, 80) + _fatbin_entry(2, 90) + _fatbin_entry(1, 90)
    container = struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(entries)) + entries
    data = b"\x7fELF junk" + container + b"more" + container.replace(struct.pack("<I", 80), struct.pack("<I", 86))
    assert fatbin.architectures(data) == {("sm", 80), ("sm", 90), ("ptx", 90), ("sm", 86)}
    assert fatbin.architectures(b"no device code here") == set()


def test_fatbin_cli_requires_architectures(tmp_path):
    entries = _fatbin_entry(2, 80)
    lib = tmp_path / "lib.so"
    lib.write_bytes(struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(entries)) + entries)
    assert fatbin.main([str(lib), "--require", "80"]) == 0
    assert fatbin.main([str(lib), "--require", "80,90"]) == 1
