#!/usr/bin/env python3
"""llama.cpp's C++ tools for the benches, built from the sdist our runtime is built from, with our patches.

    python bench/cppbuild.py llama-server llama-speculative-simple     # build (incremental), print the paths

One patched tree and one CMake build directory under .work/cpp/ serve every bench (bench_speed_pair.py's
``llama-speculative-simple``, bench_serve.py's ``llama-server``), so the libraries compile once. The tree is
unpacked, patched and labelled exactly as ``tools/build_runtime.py`` does it (gguf_mtp/runtime_build.py:
patches/llama.cpp applied in order; unchanged files keep their mtime, so a rebuild recompiles only what changed),
and CMake gets the runtime's own arguments (native CPU flags, ``$CMAKE_ARGS``), so the C++ tools and our Python
runtime run the same ggml. ~10 minutes on 2 cores the first time. The server's web UI is not built or downloaded
(no network; the benches only talk to the API).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gguf_mtp import runtime_build as rb  # noqa: E402

CPP = ROOT / ".work" / "cpp"
SRC_ROOT = CPP / "src" / rb.SDIST_NAME
BUILD = CPP / "build"
LOCAL_SDIST = ROOT / ".work" / "sdist" / f"{rb.SDIST_NAME}.tar.gz"  # tools/fetch_sdist.py's download
CMAKE_ARGS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=ON",
              "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF",
              "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"]


def find_tool(name: str, env: str | None = None) -> Path | None:
    """A built tool: ``$env`` if set, else the shared build's binary, else None."""
    if env and os.environ.get(env):
        return Path(os.environ[env])
    exe = BUILD / "bin" / name
    return exe if exe.is_file() else None


def prepare_source() -> Path:
    """The patched vendor/llama.cpp (unpacked and patched once; later calls rewrite only changed files)."""
    archive = LOCAL_SDIST if LOCAL_SDIST.is_file() else rb.fetch_sdist(rb.cache_dir() / "sdist")
    changed = rb.prepare_source(archive, rb.load_series(), SRC_ROOT)
    if changed:
        print(f"patched source: {changed} file(s) written under {SRC_ROOT.relative_to(ROOT)}", flush=True)
    return SRC_ROOT / "vendor" / "llama.cpp"


def build_tools(*targets: str, jobs: int | None = None) -> dict[str, Path]:
    """Configure once, build only ``targets``; returns each target's binary."""
    src = prepare_source()
    args = [*CMAKE_ARGS, *rb.cmake_args(cuda=False, cuda_arch=None)]
    subprocess.run(["cmake", "-S", str(src), "-B", str(BUILD), *args], check=True)
    subprocess.run(["cmake", "--build", str(BUILD), "--target", *targets, "-j", str(jobs or os.cpu_count())],
                   check=True)
    return {t: BUILD / "bin" / t for t in targets}


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__.split("\n\n")[1])
    for name, path in build_tools(*sys.argv[1:]).items():
        print(f"{name}: {path}")
