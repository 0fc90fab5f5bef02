"""runtime build, runtime info: our patched llama-cpp-python (gguf_mtp/runtime_build.py)."""

from __future__ import annotations

import click

from ..errors import GgufMtpError
from .common import print_json, print_table


@click.group("runtime")
def runtime_group() -> None:
    """The llama-cpp-python runtime: build ours from patches/llama.cpp, or show what is loaded."""


@runtime_group.command("build")
@click.option("--cuda", is_flag=True, help="Build the CUDA backend (-DGGML_CUDA=on).")
@click.option("--cuda-arch", metavar="ARCHS", help="CMAKE_CUDA_ARCHITECTURES, e.g. 86 or '86;89' (default: CMake's).")
@click.option("--jobs", "-j", type=click.IntRange(1), help="Parallel compile jobs (default: all cores).")
@click.option("--force", is_flag=True, help="Rebuild even if a wheel of this patch series is cached.")
@click.option("--no-install", is_flag=True, help="Only build (and cache) the wheel.")
@click.option("--sdist", type=click.Path(exists=True, dir_okay=False), help="Use this llama-cpp-python 0.3.36 sdist "
              "archive instead of downloading it.")
def runtime_build_cmd(cuda: bool, cuda_arch: str | None, jobs: int | None, force: bool, no_install: bool,
                      sdist: str | None) -> None:
    """Build llama-cpp-python 0.3.36 with our llama.cpp patches and install it as 0.3.36+gguf_mtp.N.

    The sdist is downloaded once; the build directory and the wheels live in the cache ($GGUF_MTP_CACHE, default
    ~/.cache/gguf-mtp), so a changed patch recompiles only what it touches and an unchanged series reinstalls the
    cached wheel. Before gguf-mtp is installed, python3 tools/build_runtime.py does the same.

    \b
    Examples:
      gguf-mtp runtime build --jobs 4
      gguf-mtp runtime build --cuda --cuda-arch 86
    """
    from pathlib import Path

    from ..runtime_build import build_runtime

    r = build_runtime(cuda=cuda, cuda_arch=cuda_arch, jobs=jobs, force=force, install=not no_install,
                      sdist=Path(sdist) if sdist else None)
    how = f"built ({r.files_changed} source files changed)" if r.built else "taken from the cache"
    click.echo(f"llama-cpp-python {r.version} [{r.variant}] {how}: {r.wheel}")
    click.echo("installed" if r.installed else "not installed (--no-install)")


@runtime_group.command("info")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def runtime_info_cmd(as_json: bool) -> None:
    """Which llama-cpp-python is loaded, its backends and devices, and which of our patches it carries."""
    from ..runtime_build import runtime_info

    info = runtime_info()
    if as_json:
        print_json(info.to_dict())
        return
    if not info.installed:
        raise GgufMtpError("llama-cpp-python is not installed (python3 tools/build_runtime.py build)")
    rows = [["llama-cpp-python", info.llama_cpp_python], ["library", info.library],
            ["backends", ", ".join(info.backends) or "unknown"], ["GPU offload", "yes" if info.gpu_offload else "no"],
            ["gguf-mtp patches", ", ".join(info.patches) if info.patched else "none (stock build)"],
            ["centroid-head drafters", "yes" if info.centroid_head else "no"]]
    if info.expected_series is not None:
        rows.append(["this checkout's series", f"gguf_mtp.{info.expected_series}: {', '.join(info.expected_patches)}"
                     + ("" if info.up_to_date else " (not the loaded one: gguf-mtp runtime build)")])
    rows += [[f"device {i}", f"{d['name']} ({d['type']}, {d['backend']}): {d['description']}"]
             for i, d in enumerate(info.devices)]
    print_table("runtime", ["", "value"], rows)
