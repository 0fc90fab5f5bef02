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
@click.option("--rpc/--no-rpc", default=True, show_default=True, help="llama.cpp's RPC backend (-DGGML_RPC=ON) and "
              "its rpc-server (gguf-mtp rpc-server), to split models over several machines.")
def runtime_build_cmd(cuda: bool, cuda_arch: str | None, jobs: int | None, force: bool, no_install: bool,
                      sdist: str | None, portable: bool, rpc: bool) -> None:
    """Build llama-cpp-python 0.3.36 with our llama.cpp patches and install it as 0.3.36+gguf_mtp.N.

    The sdist is downloaded once; the build directory and the wheels live in the cache ($GGUF_MTP_CACHE, default
    ~/.cache/gguf-mtp), so a changed patch recompiles only what it touches and an unchanged build reinstalls the
    cached wheel. A cached wheel is reused only for the same patch series, CMake arguments (CMAKE_ARGS, CUDA
    architectures, --portable, --no-rpc), compiler and, for a native build, the same CPU features. The compiler's
    output goes to the cache's log; the terminal shows one progress line. Before gguf-mtp is installed, python3
    tools/build_runtime.py does the same.

    \b
    Examples:
      gguf-mtp runtime build --jobs 4
      gguf-mtp runtime build --cuda --cuda-arch 86
      gguf-mtp runtime build --portable
      gguf-mtp runtime build --no-rpc     # without llama.cpp's RPC backend and rpc-server
    """
    from pathlib import Path

    from ..runtime_build import build_runtime

    r = build_runtime(cuda=cuda, cuda_arch=cuda_arch, jobs=jobs, force=force, install=not no_install,
                      sdist=Path(sdist) if sdist else None, portable=portable, rpc=rpc)
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
            ["RPC (rpc-server hosts)", "yes" if info.rpc else "no (built with --no-rpc)"],
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


@click.command("rpc-server")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on. Anything but loopback "
              "exposes this machine's memory and compute to whoever can reach the port.")
@click.option("--port", default=50052, show_default=True, type=click.IntRange(1, 65535), help="TCP port.")
@click.option("--threads", "-t", type=click.IntRange(min=1), help="CPU threads for the CPU device.")
@click.option("--device", "-d", "device", metavar="DEV,...", help="Devices to serve (llama.cpp names, e.g. CUDA0; "
              "default: every GPU, else the CPU).")
@click.option("--cache", is_flag=True, help="Cache received tensors on disk (llama.cpp's -c).")
def rpc_server_cmd(host: str, port: int, threads: int | None, device: str | None, cache: bool) -> None:
    """Serve this machine's devices to gguf-mtp (generate/chat/serve --rpc HOST:PORT) or llama-server over
    llama.cpp's RPC protocol, until Ctrl-C.

    The protocol has no authentication and no encryption: whoever reaches the port can read and write this
    machine's device memory and run graphs on it. It binds to 127.0.0.1 unless --host says otherwise; use another
    address only on a network you trust (or through an SSH tunnel). The server comes from the runtime built with
    gguf-mtp runtime build (the same llama.cpp as the client: the protocol versions must match).

    \b
    Examples:
      gguf-mtp rpc-server --port 50052
      gguf-mtp rpc-server --host 192.168.1.20 --port 50052 --threads 8
    """
    import os

    from ..runtime_build import rpc_server_path

    binary = rpc_server_path()
    if binary is None:
        raise GgufMtpError("this llama-cpp-python has no rpc-server: build and install the runtime with "
                           "gguf-mtp runtime build, without --no-rpc (or python3 tools/build_runtime.py build)")
    from ..runtime.devices import is_loopback

    if not is_loopback(host):
        click.echo(f"warning: listening on {host}:{port}: llama.cpp's RPC has no authentication; anyone who can "
                   "reach this port can use this machine's memory and devices. Trusted networks only.", err=True)
    cmd = [str(binary), "--host", host, "--port", str(port)]
    cmd += ["--threads", str(threads)] if threads else []
    cmd += ["--device", device] if device else []
    cmd += ["--cache"] if cache else []
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(binary.parent),
                                                                          os.environ.get("LD_LIBRARY_PATH")]))}
    # exec, not a child: signals (Ctrl-C, kill) reach the server itself and nothing is left behind
    os.execve(binary, cmd, env)
