"""The runtime build: the patch series, how it is applied and labelled, the cache, and runtime info.

Nothing here compiles: building takes ~10 minutes on 2 cores (README set-up does it once). The series is
applied to a copy of the sdist's files it touches (marked upstream: needs the unpacked sdist).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from gguf_mtp import runtime_build as rb
from gguf_mtp.cli import main

REPO = Path(__file__).resolve().parent.parent



# --- the series ----------------------------------------------------------------------------------


def test_series_is_numbered_and_declares_itself():
    s = rb.load_series()
    assert [p.name[:4] for p in s.patches] == [f"{i:04d}" for i in range(1, len(s.patches) + 1)]
    assert s.topics[0] == rb.CENTROID_HEAD and s.topics[-1] == "gguf-mtp-version"
    assert s.declared == f"gguf_mtp.{s.version}:{','.join(s.topics)}"
    assert s.label == f"0.3.36+gguf_mtp.{s.version}"


def test_patches_are_git_format_patch_series():
    for p in rb.load_series().patches:
        text = p.read_text()
        assert text.startswith("From 0000000000000000000000000000000000000000 ")
        assert re.search(r"^Subject: \[PATCH \d+/\d+\] \S", text, flags=re.M), p.name
        assert rb.touched_files(p), p.name


def test_label_satisfies_the_pin():
    """0.3.36+gguf_mtp.N still satisfies gguf-mtp's llama-cpp-python==0.3.36 (PEP 440 local versions)."""
    assert Version(rb.load_series().label) in SpecifierSet("==0.3.36")


def test_inconsistent_series_is_refused(tmp_path):
    series = rb.load_series()
    for p in series.patches:
        (tmp_path / p.name.replace("gguf-mtp-version", "renamed")).write_bytes(p.read_bytes())
    with pytest.raises(rb.RuntimeBuildError, match="declares topics"):
        rb.load_series(tmp_path)
    (tmp_path / "0007-stray.patch").write_text("")
    with pytest.raises(rb.RuntimeBuildError, match=f"expected name {len(series.patches) + 1:04d}-"):
        rb.load_series(tmp_path)
    with pytest.raises(rb.RuntimeBuildError, match="no patches"):
        rb.load_series(tmp_path / "missing")


@pytest.mark.parametrize("value, parsed", [
    ("gguf_mtp.1:centroid-head,gguf-mtp-version", (1, ("centroid-head", "gguf-mtp-version"))),
    ("gguf_mtp.12:x", (12, ("x",))),
    ("1:centroid-head", None),
])
def test_parse_declared(value, parsed):
    assert rb.parse_declared(value) == parsed


@pytest.mark.upstream
def test_series_applies_to_a_fresh_sdist(tmp_path):
    """Every patch applies in order to llama-cpp-python 0.3.36's vendored llama.cpp (a copy of what it touches)."""
    from upstream import llama_cpp_dir

    src = llama_cpp_dir()
    series = rb.load_series()
    tree = tmp_path / "vendor" / "llama.cpp"
    for rel in {f for p in series.patches for f in rb.touched_files(p)}:
        dst = tree / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if (src / rel).is_file():
            dst.write_bytes((src / rel).read_bytes())
    rb.apply_patches(tree, series.patches)
    head = (tree / "src" / "models" / "gemma4-assistant.cpp").read_text()
    assert "build_masked_head" in head and "LLM_KV_CENTROID_COUNT" in head
    assert f'"{series.declared}"' in (tree / "src" / "llama.cpp").read_text()
    with pytest.raises(rb.RuntimeBuildError, match=series.patches[0].name):
        rb.apply_patches(tree, series.patches[:1])  # applied twice: refused, naming the patch


# --- source tree, labels, cache -----------------------------------------------------------------------


def test_set_version(tmp_path):
    init = tmp_path / "llama_cpp" / "__init__.py"
    init.parent.mkdir()
    init.write_text('from .llama_cpp import *\n\n__version__ = "0.3.36"\n')
    rb.set_version(tmp_path, "0.3.36+gguf_mtp.3")
    assert '__version__ = "0.3.36+gguf_mtp.3"' in init.read_text()


def test_sync_tree_touches_only_changed_files(tmp_path):
    """Unchanged files keep their mtime so the persistent build recompiles only what a patch changed."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "src").mkdir(parents=True)
        (d / "src" / "same.cpp").write_text("same")
        (d / "src" / "changed.cpp").write_text("old")
    (b / "src" / "gone.cpp").write_text("stale")
    (b / "llama_cpp" / "lib").mkdir(parents=True)
    (b / "llama_cpp" / "lib" / "libllama.so").write_text("built")
    (a / "src" / "changed.cpp").write_text("new!")
    (a / "src" / "added.cpp").write_text("added")
    old = time.time() - 1000
    os.utime(b / "src" / "same.cpp", (old, old))
    assert rb.sync_tree(a, b, keep=("llama_cpp/lib",)) == 3
    assert (b / "src" / "same.cpp").stat().st_mtime == pytest.approx(old)
    assert (b / "src" / "changed.cpp").read_text() == "new!"
    assert (b / "src" / "added.cpp").is_file() and not (b / "src" / "gone.cpp").exists()
    assert (b / "llama_cpp" / "lib" / "libllama.so").is_file()
    assert rb.sync_tree(a, b, keep=("llama_cpp/lib",)) == 0


def test_variants_and_cmake_args(monkeypatch):
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    assert rb.variant_name(False, None, rpc=False) == "cpu"
    assert rb.variant_name(True, None, rpc=False) == "cuda"
    assert rb.variant_name(True, "86;89", rpc=False) == "cuda-86-89"
    assert rb.variant_name(True, "86;89") == "cuda-86-89-rpc"  # RPC by default
    assert rb.cmake_args(True, "86", rpc=False) == ["-DGGML_CUDA=on", "-DCMAKE_CUDA_ARCHITECTURES=86"]
    assert rb.cmake_args(True, "86") == ["-DGGML_RPC=ON", "-DGGML_CUDA=on", "-DCMAKE_CUDA_ARCHITECTURES=86"]
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_NATIVE=off")
    assert rb.cmake_args(False, None, rpc=False) == ["-DGGML_NATIVE=off"]


@pytest.mark.parametrize("argv, rpc", [([], True), (["--rpc"], True), (["--no-rpc"], False)])
def test_rpc_is_built_unless_no_rpc(monkeypatch, argv, rpc):
    """Both command lines (gguf-mtp runtime build, tools/build_runtime.py) build RPC by default; --rpc stays."""
    seen = []
    monkeypatch.setattr(rb, "build_runtime", lambda **k: seen.append(k["rpc"]) or rb.BuildResult(
        Path("w.whl"), False, False, "v", "cpu", "s"))
    assert rb.main(["build", *argv]) == 0
    assert CliRunner().invoke(main, ["runtime", "build", *argv]).exit_code == 0
    assert seen == [rpc, rpc]


def test_cmake_args_can_turn_rpc_off(monkeypatch, tmp_path):
    """CMAKE_ARGS=-DGGML_RPC=OFF is a build without RPC: its own variant, and no rpc-server step."""
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_RPC=OFF")
    assert not rb.cmake_option(rb.cmake_args(False, None), "GGML_RPC", False)
    seen = {}

    def fake_build(src, build_dir, out_dir, args, jobs, log):
        seen["variant"] = build_dir.name
        out_dir.mkdir(parents=True)
        wheel = out_dir / "llama_cpp_python-0.3.36-py3-none-any.whl"
        wheel.write_bytes(b"")
        return wheel

    monkeypatch.setattr(rb, "fetch_sdist", lambda cache, sdist: None)
    monkeypatch.setattr(rb, "prepare_source", lambda *a: 0)
    monkeypatch.setattr(rb, "build_wheel", fake_build)
    monkeypatch.setattr(rb, "check_wheel", lambda w: "ok")
    monkeypatch.setattr(rb, "build_rpc_server", lambda *a: pytest.fail("no rpc-server without GGML_RPC"))
    r = rb.build_runtime(install=False, cache=tmp_path)
    assert (r.variant, seen["variant"]) == ("cpu", "cpu")


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("GGUF_MTP_CACHE", str(tmp_path / "c"))
    assert rb.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("GGUF_MTP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert rb.cache_dir() == tmp_path / "x" / "gguf-mtp"


def test_cached_wheel_is_reused_without_building(monkeypatch, tmp_path):
    def no_build(*a, **k):
        raise AssertionError("should not build")

    monkeypatch.setattr(rb, "build_wheel", no_build)
    monkeypatch.setattr(rb, "fetch_sdist", no_build)
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    series = rb.load_series()
    key = rb.cache_key(series.sha256, rb.cmake_args(False, None), rb.cpu.cpu_flags(), rb.compiler_identity())
    wheel_dir = tmp_path / "wheels" / f"{rb.variant_name(False, None)}-{key}"
    wheel_dir.mkdir(parents=True)
    wheel = wheel_dir / f"llama_cpp_python-{series.label}-py3-none-linux_x86_64.whl"
    wheel.write_bytes(b"")
    r = rb.build_runtime(install=False, cache=tmp_path)
    assert (r.wheel, r.built, r.installed, r.version) == (wheel, False, False, series.label)
    # the same series on another CPU (a native build) is not that wheel: it would build
    monkeypatch.setattr(rb.cpu, "cpu_flags", lambda: frozenset({"avx2", "amx_tile", "amx_int8"}))
    with pytest.raises(AssertionError, match="should not build"):
        rb.build_runtime(install=False, cache=tmp_path)


AVX2 = frozenset({"avx", "avx2", "fma", "f16c"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl"}
GCC12 = "c++: c++ (Debian 12.2.0-14+deb12u1) 12.2.0"


def test_cache_key_covers_everything_that_changes_the_binary():
    base = rb.cache_key("s" * 64, [], AVX512, GCC12)
    assert base == rb.cache_key("s" * 64, [], set(AVX512), GCC12)  # deterministic, order-free
    assert rb.cache_key("t" * 64, [], AVX512, GCC12) != base  # patch series
    assert rb.cache_key("s" * 64, ["-DGGML_AVX512=OFF"], AVX512, GCC12) != base  # CMAKE_ARGS
    assert rb.cache_key("s" * 64, ["-DGGML_CUDA=on", "-DCMAKE_CUDA_ARCHITECTURES=86"], AVX512, GCC12) != \
        rb.cache_key("s" * 64, ["-DGGML_CUDA=on", "-DCMAKE_CUDA_ARCHITECTURES=89"], AVX512, GCC12)  # CUDA arch
    assert rb.cache_key("s" * 64, [], AVX2, GCC12) != base  # native build, another CPU: SIGILL otherwise
    assert rb.cache_key("s" * 64, [], AVX512, "c++: g++ 13.2.0") != base  # another compiler
    portable = rb.cmake_args(False, None, portable=True)
    assert not rb.is_native(portable)
    assert rb.cache_key("s" * 64, portable, AVX2, GCC12) == rb.cache_key("s" * 64, portable, AVX512, GCC12)


@pytest.mark.parametrize("args, native", [
    ([], True), (["-DGGML_NATIVE=OFF"], False), (["-DGGML_NATIVE=off", "-DGGML_NATIVE=ON"], True),
    (["-DGGML_NATIVE:BOOL=0"], False), (["-DGGML_CUDA=on"], True),
])
def test_native_builds_are_recognised(args, native):
    assert rb.is_native(args) is native


def test_portable_variant_and_args(monkeypatch):
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    assert rb.variant_name(False, None, portable=True, rpc=False) == "cpu-portable"
    assert rb.variant_name(True, "86", portable=True, rpc=False) == "cuda-86-portable"
    args = rb.cmake_args(False, None, portable=True)
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AVX2=ON" in args
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_AVX512=ON")
    assert rb.cmake_args(False, None, portable=True)[-1] == "-DGGML_AVX512=ON"  # the user's CMAKE_ARGS win


def test_progress_is_one_line_per_tenth_off_a_terminal():
    out = io.StringIO()
    p = rb.Progress(out)
    p.feed("-- Configuring done\n")
    for i in range(1, 201):
        p.feed(f"[{i}/200] /usr/bin/c++ -O3 -c x{i}.cpp\n")
    p.close()
    lines = out.getvalue().splitlines()
    assert 9 <= len(lines) <= 11 and all(re.fullmatch(r"building llama-cpp-python: step \d+ of 200, \d+:\d\d elapsed", ln)
                                          for ln in lines)
    assert "c++" not in out.getvalue()


def test_failed_build_names_the_log_and_its_last_lines(monkeypatch, tmp_path):
    src = tmp_path / "src"
    (src / "llama_cpp").mkdir(parents=True)
    fake = tmp_path / "fake_pip.py"
    fake.write_text("import sys\nfor i in range(1, 4): print(f'[{i}/3] compiling x{i}.cpp')\n"
                    "print('x3.cpp:1:1: error: expected unqualified-id')\nsys.exit(1)\n")
    real_popen = subprocess.Popen
    monkeypatch.setattr(rb.subprocess, "Popen", lambda cmd, **kw: real_popen([sys.executable, str(fake)], **kw))
    out = io.StringIO()
    log = tmp_path / "logs" / "build.log"
    with pytest.raises(rb.RuntimeBuildError) as e:
        rb.build_wheel(src, tmp_path / "build", tmp_path / "wheels", [], None, log, rb.Progress(out))
    msg = str(e.value)
    assert str(log) in msg and "error: expected unqualified-id" in msg
    assert "[3/3] compiling x3.cpp" in log.read_text() and "compiling" not in out.getvalue()


def test_a_broken_wheel_is_refused(tmp_path, monkeypatch):
    wheel = tmp_path / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llama_cpp/lib/libggml-cpu.so", b"\x7fELF")
        zf.writestr("llama_cpp/lib/libllama.so", b"\x7fELF")
    seen = []
    monkeypatch.setattr(rb.cpu, "library_tile_config", lambda p: seen.append(p.name) or "broken")
    with pytest.raises(rb.RuntimeBuildError, match="miscompiled"):
        rb.check_wheel(wheel)
    assert seen == ["libggml-cpu.so"]
    monkeypatch.setattr(rb.cpu, "library_tile_config", lambda p: "absent")
    assert rb.check_wheel(wheel) == "absent"


def test_missing_sdist_archive_is_one_clear_error(tmp_path):
    with pytest.raises(rb.RuntimeBuildError, match="sdist archive not found"):
        rb.fetch_sdist(tmp_path, tmp_path / "nope.tar.gz")


# --- what is loaded ---------------------------------------------------------------------------------


def test_runtime_info_json():
    res = CliRunner().invoke(main, ["runtime", "info", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["installed"] and info["llama_cpp_python"].startswith("0.3.36")
    assert "CPU" in info["backends"] and info["devices"]
    assert info["expected_series"] == rb.load_series().version
    # the RPC backend and its rpc-server come together; "GPU offload" means a local GPU device, not RPC
    assert info["rpc"] == (rb.rpc_server_path() is not None)
    assert info["gpu_offload"] == any(d["type"] in ("GPU", "IGPU") for d in info["devices"])
    # a library either carries no patches (stock) or exactly what its version label says
    if info["patched"]:
        assert info["llama_cpp_python"] == f"0.3.36+gguf_mtp.{info['patch_series']}"
        assert info["centroid_head"] == (rb.CENTROID_HEAD in info["patches"])
    else:
        assert info["patches"] == [] and not info["centroid_head"]


def test_runtime_info_table():
    res = CliRunner().invoke(main, ["runtime", "info"])
    assert res.exit_code == 0, res.output
    assert "gguf-mtp patches" in res.output and "backends" in res.output


def test_standalone_tool_needs_no_gguf_mtp_dependencies():
    """tools/build_runtime.py runs before ``pip install -e .``: it must not import gguf_mtp, click or rich."""
    code = ("import runpy, sys; m = runpy.run_path('tools/build_runtime.py'); rb = m['_load']();"
            "print(sorted(k for k in ('gguf_mtp', 'click', 'rich', 'numpy') if k in sys.modules));"
            "print(rb.RuntimeBuildError.__mro__[1].__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "Exception"]
    res = subprocess.run([sys.executable, "tools/build_runtime.py", "info", "--json"], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "expected_series" in json.loads(res.stdout)
