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
GPU_BUFFER = "CUDA0"  # -ot names a backend buffer type (CPU, CUDA0, Metal, Vulkan0...), never a bare "GPU"

# Why serve-cmd does (or does not) add --fit off; printed beside the command.
FIT_OFF_REASON = ("--fit off: the plan already fixed layers, context and tensor placement; llama-server's fitter "
                  "would re-decide them without counting the drafter's memory")
FIT_ON_REASON = ("no --fit off: no plan was given; llama-server's fitter adjusts only the settings this command "
                 "leaves unset and does not count the drafter's memory (gguf-mtp plan does)")


def draft_length(settings: RuntimeSettings, default: int | None = DEFAULT_DRAFT) -> int:
    """Servers take a fixed draft length; adaptive settings fall back to ``default`` (capped)."""
    default = DEFAULT_DRAFT if default is None else default
    return settings.draft_max if settings.draft_max is not None else min(default, settings.draft_cap)


def recommended_draft_length(hidden_size: int | None, n_layers: int | None) -> int | None:
    """The registry's draft length for the variant with this target shape (None when no variant matches).

    Servers take one fixed length, so an adaptive plan needs a number; the registry's recommendation
    (measured per variant) beats llama-server's generic default.
    """
    from .registry import load_registry

    for v in load_registry():
        if v.text.hidden == hidden_size and v.text.layers == n_layers:
            return v.recommended.draft_length
    return None


def server_args(
    settings: RuntimeSettings,
    target: str | Path,
    drafter: str | Path | None = None,
    mmproj: str | Path | None = None,
    port: int | None = None,
    placement_fixed: bool = True,
    draft_default: int | None = None,
    gpu_buffer: str = GPU_BUFFER,
) -> list[str]:
    """llama-server's argument list (without the program name).

    ``placement_fixed`` adds ``--fit off``: a plan already chose layers and context, and llama-server's
    fitter would otherwise re-decide them without counting the drafter. ``draft_default`` is the draft
    length used when the settings are adaptive; ``gpu_buffer`` is the buffer type a "GPU" override names.
    """
    s = settings
    args = ["-m", str(target)]
    if mmproj:
        args += ["--mmproj", str(mmproj)]
        if not s.mmproj_on_gpu:
            args.append("--no-mmproj-offload")
    if drafter:
        args += ["--spec-type", "draft-mtp", "-md", str(drafter)]
        args += ["--spec-draft-n-max", str(draft_length(s, draft_default))]
        args += ["-ngld", "all" if s.drafter_on_gpu else "0"]
    args += ["-ngl", "all" if s.n_gpu_layers < 0 else str(s.n_gpu_layers)]
    args += device_args(s, drafter is not None, mmproj is not None)
    if s.tensor_overrides:
        buffers = {"CPU": "CPU", "GPU": gpu_buffer}
        args += ["-ot", ",".join(f"{pat}={buffers[dev]}" for pat, dev in s.tensor_overrides)]
    if s.n_cpu_moe:
        args += ["--n-cpu-moe", str(s.n_cpu_moe)]
    # the plan's slots, always given: llama-server's default (-np auto) is 4 slots in a unified cache, whose
    # sliding-window cache is four windows wide. Several slots share the plan's pool as gguf-mtp's batched runtime
    # does: one unified cache (-kvu; an explicit -np turns llama-server's own default off), each slot capped at
    # its share (without the cap every slot may grow into the whole pool)
    args += ["-c", str(s.n_ctx), "-np", str(s.n_parallel)]
    if s.n_parallel > 1:
        args += ["-kvu", "--kv-unified-per-slot", str(s.slot_ctx)]
    args += ["-b", str(s.n_batch), "-ub", str(s.n_ubatch)]
    args += ["-ctk", s.cache_type_k, "-ctv", s.cache_type_v, "-fa", s.flash_attn]
    if s.swa_full:
        args.append("--swa-full")
    if not s.repack:
        args.append("--no-repack")
    if s.threads:
        args += ["-t", str(s.threads)]
    if port is not None:
        args += ["--port", str(port)]
    if placement_fixed:
        args += ["--fit", "off"]
    return args


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def device_args(s: RuntimeSettings, drafter: bool, mmproj: bool) -> list[str]:
    """Several devices: --rpc registers the rpc-servers (before --device names them), --device fixes the split
    order, -sm layer -ts the layers per device; the drafter (-devd) and the projector (-mmdev) on the output device."""
    if not s.devices:
        return []
    args = ["--rpc", ",".join(s.rpc)] if s.rpc else []
    args += ["--device", ",".join(s.devices), "-sm", "layer"]
    if s.tensor_split:
        args += ["-ts", ",".join(_num(x) for x in s.tensor_split)]
    if drafter and s.drafter_on_gpu:
        args += ["-devd", s.drafter_device or s.output_device]
    if mmproj and s.mmproj_on_gpu:
        args += ["-mmdev", s.output_device]
    return args


def server_command(settings: RuntimeSettings, target, drafter=None, mmproj=None, port=None,
                   placement_fixed: bool = True, program: str = "llama-server", draft_default: int | None = None,
                   gpu_buffer: str = GPU_BUFFER) -> str:
    """The shell-quoted command line; ``shlex.split`` gives back ``[program, *server_args(...)]``."""
    args = server_args(settings, target, drafter, mmproj, port, placement_fixed, draft_default, gpu_buffer)
    return shlex.join([program, *args])


@dataclass(frozen=True)
class OllamaSetting:
    """A setting a Modelfile cannot hold, and the server environment variable that controls it."""

    comment: str
    env: str | None = None
    lost: str = ""  # what the model runs without when the setting cannot be carried over


def ollama_parameters(settings: RuntimeSettings, drafter: bool, n_layers: int | None = None,
                      draft_default: int | None = None) -> dict[str, object]:
    """The Modelfile PARAMETERs the settings map to (names Ollama accepts). Ollama's num_ctx is one request's
    context (its server allocates num_ctx x OLLAMA_NUM_PARALLEL), so parallel settings give it one slot's."""
    params: dict[str, object] = {"num_ctx": settings.n_ctx if settings.n_parallel == 1 else settings.slot_ctx}
    if settings.n_gpu_layers >= 0:
        params["num_gpu"] = settings.n_gpu_layers
    elif n_layers is not None:
        params["num_gpu"] = n_layers + 1  # Ollama counts the output layer too
    if settings.threads:
        params["num_thread"] = settings.threads
    if settings.n_batch != 512:
        params["num_batch"] = settings.n_batch
    if drafter:
        params["draft_num_predict"] = draft_length(settings, draft_default)
    return params


def ollama_unexpressible(settings: RuntimeSettings) -> list[OllamaSetting]:
    """Settings that a Modelfile cannot express: written as comments, with their server variables."""
    out = []
    overrides = settings.effective_overrides()
    if overrides:
        pats = ", ".join(f"{p}={d}" for p, d in overrides)
        out.append(OllamaSetting(f"tensor overrides ({pats}) are not expressible; Ollama decides placement itself",
                                 lost="per-tensor placement: Ollama offloads whole layers (num_gpu) instead"))
    if not settings.mmproj_on_gpu:
        out.append(OllamaSetting("projector on CPU is not expressible; Ollama offloads it when it fits",
                                 lost="the projector's VRAM saving"))
    if not settings.drafter_on_gpu:
        out.append(OllamaSetting("drafter on CPU is not expressible; Ollama places the drafter itself",
                                 lost="the drafter's VRAM saving"))
    if settings.swa_full:
        out.append(OllamaSetting("full-size sliding-window cache (swa_full) is not expressible",
                                 lost="the plan's sliding-window cache layout"))
    if not settings.repack:
        out.append(OllamaSetting("weight repacking off (--no-repack) is not expressible; Ollama repacks CPU weights "
                                 "where its CPU backend can", lost="nothing on the GPU; CPU-resident weights are repacked"))
    if settings.cache_type_k != "f16" or settings.cache_type_v != "f16":
        kv = settings.cache_type_k if settings.cache_type_k == settings.cache_type_v else settings.cache_type_k
        out.append(OllamaSetting(f"KV cache type {kv} (server-wide, needs flash attention)",
                                 f"OLLAMA_KV_CACHE_TYPE={kv}",
                                 lost="the quantized KV cache: f16 KV needs more VRAM per context token"))
    if settings.n_parallel > 1:
        out.append(OllamaSetting(f"{settings.n_parallel} parallel sequences (server-wide)",
                                 f"OLLAMA_NUM_PARALLEL={settings.n_parallel}",
                                 lost=f"{settings.n_parallel} requests decoded together: Ollama uses its own "
                                      "default number of parallel requests"))
    if settings.devices:
        split = ", ".join(f"{d} {_num(x)}" for d, x in zip(settings.devices, settings.tensor_split or [1] * 99))
        out.append(OllamaSetting(f"the layer split ({split}) is not expressible; Ollama splits layers across the GPUs "
                                 "it sees by their free memory, and only spreads a model that fits on one GPU when "
                                 "told to", "CUDA_VISIBLE_DEVICES / OLLAMA_SCHED_SPREAD=1 / OLLAMA_GPU_OVERHEAD",
                                 lost="the plan's per-device proportions, the drafter's device and the projector's"))
    if settings.rpc:
        out.append(OllamaSetting(f"rpc-servers ({', '.join(settings.rpc)}) are not expressible; Ollama has no RPC "
                                 "backend", lost="the remote devices: the model must fit the local GPUs"))
    if settings.flash_attn != "auto":
        val = "1" if settings.flash_attn == "on" else "0"
        out.append(OllamaSetting(f"flash attention {settings.flash_attn} (server-wide)",
                                 f"OLLAMA_FLASH_ATTENTION={val}", lost=f"flash attention {settings.flash_attn}: Ollama chooses it per model"))
    return out
