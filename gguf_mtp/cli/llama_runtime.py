"""runtime build, runtime info: our patched llama-cpp-python (gguf_mtp/runtime_build.py)."""

from __future__ import annotations

from typing import Any

import click

from ..errors import GgufMtpError
from .common import emit, print_table


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
@click.option("--portable", is_flag=True, help="No -march=native: an AVX2 baseline that runs on other x86-64 CPUs "
              "(a shared cache, a wheel copied to other machines).")
def runtime_build_cmd(cuda: bool, cuda_arch: str | None, jobs: int | None, force: bool, no_install: bool,
                      sdist: str | None, portable: bool) -> None:
    """Build llama-cpp-python 0.3.36 with our llama.cpp patches and install it as 0.3.36+gguf_mtp.N.

    The sdist is downloaded once; the build directory and the wheels live in the cache ($GGUF_MTP_CACHE, default
    ~/.cache/gguf-mtp), so a changed patch recompiles only what it touches and an unchanged build reinstalls the
    cached wheel. A cached wheel is reused only for the same patch series, CMake arguments (CMAKE_ARGS, CUDA
    architectures, --portable), compiler and, for a native build, the same CPU features. The compiler's output goes
    to the cache's log; the terminal shows one progress line. Before gguf-mtp is installed, python3
    tools/build_runtime.py does the same.

    \b
    Examples:
      gguf-mtp runtime build --jobs 4
      gguf-mtp runtime build --cuda --cuda-arch 86
      gguf-mtp runtime build --portable
    """
    from pathlib import Path

    from ..runtime_build import build_runtime

    r = build_runtime(cuda=cuda, cuda_arch=cuda_arch, jobs=jobs, force=force, install=not no_install,
                      sdist=Path(sdist) if sdist else None, portable=portable)
    how = f"built ({r.files_changed} source files changed)" if r.built else "taken from the cache"
    click.echo(f"llama-cpp-python {r.version} [{r.variant}] {how}: {r.wheel}")
    click.echo("installed" if r.installed else "not installed (--no-install)")


@runtime_group.command("info")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def runtime_info_cmd(as_json: bool) -> None:
    """Which llama-cpp-python is loaded, its backends and devices, and which of our patches it carries."""
    from ..runtime_build import runtime_info

    emit(runtime_info(), as_json, _print_runtime_info)


def _print_runtime_info(info: Any) -> None:
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
    rows += [["CPU flags (kernel)", " ".join(info.cpu_flags) or "none of the vector extensions llama.cpp uses"],
             ["CPU features (llama.cpp)", " ".join(k for k, on in info.cpu_features.items() if on) or "unknown"],
             ["AMX", amx_summary(info.amx)]]
    for path, bufts in info.last_load.get("models", {}).items():
        rows.append([f"last load ({info.last_load.get('time', '?')})", f"{path}: {', '.join(bufts) or 'unknown'}"])
    print_table("runtime", ["", "value"], rows)


def amx_summary(amx: dict) -> str:
    """One line: is llama.cpp's AMX path used here, and if not, why (runtime_build.RuntimeInfo.amx)."""
    if not amx.get("cpu_reports_amx"):
        return "not used: this CPU does not report AMX"
    if amx.get("tile_permission") is False:
        return "not used: the OS refused AMX tile state to this process (arch_prctl)"
    if amx.get("library_amx") == "absent":
        return "not used: this build has no AMX kernels (not built with -march=native on this CPU)"
    if amx.get("usable"):
        return "used: quantized CPU weights go to the AMX buffer type"
    return ("not used: this build's AMX kernels are miscompiled (GCC 12 tile configuration); models load without "
            "extra buffer types (gguf-mtp runtime build fixes it)")
