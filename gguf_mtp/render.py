"""One renderer: runtime settings + file paths -> a llama-server command line and Ollama Modelfile lines.

``plan``, ``serve-cmd`` and ``modelfile`` all call this module, so the three never disagree about what a
setting means on the other side.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from .settings import RuntimeSettings

DEFAULT_DRAFT = 3  # llama-server's --spec-draft-n-max default; used when the settings say "adaptive"


def draft_length(settings: RuntimeSettings, default: int = DEFAULT_DRAFT) -> int:
    """Servers take a fixed draft length; adaptive settings fall back to ``default`` (capped)."""
    return settings.draft_max if settings.draft_max is not None else min(default, settings.draft_cap)


def server_args(
    settings: RuntimeSettings,
    target: str | Path,
    drafter: str | Path | None = None,
    mmproj: str | Path | None = None,
    port: int | None = None,
    placement_fixed: bool = True,
) -> list[str]:
    """llama-server's argument list (without the program name).

    ``placement_fixed`` adds ``--fit off``: a plan already chose layers and context, and llama-server's
    fitter would otherwise re-decide them without counting the drafter.
    """
    s = settings
    args = ["-m", str(target)]
    if mmproj:
        args += ["--mmproj", str(mmproj)]
        if not s.mmproj_on_gpu:
            args.append("--no-mmproj-offload")
    if drafter:
        args += ["--spec-type", "draft-mtp", "-md", str(drafter), "--spec-draft-n-max", str(draft_length(s))]
        args += ["-ngld", "all" if s.drafter_on_gpu else "0"]
    args += ["-ngl", "all" if s.n_gpu_layers < 0 else str(s.n_gpu_layers)]
    if s.tensor_overrides:
        args += ["-ot", ",".join(f"{pat}={dev}" for pat, dev in s.tensor_overrides)]
    if s.n_cpu_moe:
        args += ["--n-cpu-moe", str(s.n_cpu_moe)]
    args += ["-c", str(s.n_ctx), "-b", str(s.n_batch), "-ub", str(s.n_ubatch)]
    args += ["-ctk", s.cache_type_k, "-ctv", s.cache_type_v, "-fa", s.flash_attn]
    if s.swa_full:
        args.append("--swa-full")
    if s.threads:
        args += ["-t", str(s.threads)]
    if port is not None:
        args += ["--port", str(port)]
    if placement_fixed:
        args += ["--fit", "off"]
    return args


def server_command(settings: RuntimeSettings, target, drafter=None, mmproj=None, port=None,
                   placement_fixed: bool = True, program: str = "llama-server") -> str:
    """The shell-quoted command line; ``shlex.split`` gives back ``[program, *server_args(...)]``."""
    return shlex.join([program, *server_args(settings, target, drafter, mmproj, port, placement_fixed)])


@dataclass(frozen=True)
class OllamaSetting:
    """A setting a Modelfile cannot hold, and the server environment variable that controls it."""

    comment: str
    env: str | None = None


def ollama_parameters(settings: RuntimeSettings, drafter: bool, n_layers: int | None = None) -> dict[str, object]:
    """The Modelfile PARAMETERs the settings map to (names Ollama accepts)."""
    params: dict[str, object] = {"num_ctx": settings.n_ctx}
    if settings.n_gpu_layers >= 0:
        params["num_gpu"] = settings.n_gpu_layers
    elif n_layers is not None:
        params["num_gpu"] = n_layers + 1  # Ollama counts the output layer too
    if settings.threads:
        params["num_thread"] = settings.threads
    if settings.n_batch != 512:
        params["num_batch"] = settings.n_batch
    if drafter:
        params["draft_num_predict"] = draft_length(settings)
    return params


def ollama_unexpressible(settings: RuntimeSettings) -> list[OllamaSetting]:
    """Settings that a Modelfile cannot express: written as comments, with their server variables."""
    out = []
    overrides = settings.effective_overrides()
    if overrides:
        pats = ", ".join(f"{p}={d}" for p, d in overrides)
        out.append(OllamaSetting(f"tensor overrides ({pats}) are not expressible; Ollama decides placement itself"))
    if not settings.mmproj_on_gpu:
        out.append(OllamaSetting("projector on CPU is not expressible; Ollama offloads it when it fits"))
    if settings.cache_type_k != "f16" or settings.cache_type_v != "f16":
        kv = settings.cache_type_k if settings.cache_type_k == settings.cache_type_v else settings.cache_type_k
        out.append(OllamaSetting(f"KV cache type {kv} (server-wide, needs flash attention)", f"OLLAMA_KV_CACHE_TYPE={kv}"))
    if settings.flash_attn != "auto":
        val = "1" if settings.flash_attn == "on" else "0"
        out.append(OllamaSetting(f"flash attention {settings.flash_attn} (server-wide)", f"OLLAMA_FLASH_ATTENTION={val}"))
    return out
