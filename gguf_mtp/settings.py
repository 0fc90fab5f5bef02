"""Runtime settings: the one description of how target + drafter + projector are placed and run.

A plan file (``gguf-mtp plan --json``) is a JSON object whose ``runtime`` member is exactly
``RuntimeSettings.to_dict()``; ``generate``/``chat``/``serve --plan FILE`` read it back, and ``render.py`` turns it
into llama-server flags and Ollama Modelfile lines. Defaults follow llama-server, not llama_context_default_params
(e.g. ``swa_full`` is false: the sliding-window cache is sized to the window).

``n_parallel`` sequences share one KV pool of ``n_ctx`` cells (a unified cache, as gguf-mtp's batched runtime and
llama-server's ``-c C -np N -kvu`` make it); each may use ``slot_ctx`` = n_ctx // n_parallel positions. ``generate``
and ``chat`` run one sequence: they ignore ``n_parallel`` and give that sequence the whole pool, which needs no more
memory than the plan counted for N (the same full-attention cells, a narrower sliding window, smaller batches).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import GgufMtpError

KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
FLASH_ATTN = ("auto", "on", "off")
DEVICES = ("CPU", "GPU")
MOE_EXPERT_PATTERN = r"blk\.{layer}\.ffn_(up|down|gate|gate_up)_(ch|)exps"
N_CTX_PAD = 256  # llama_context rounds n_ctx up to a multiple of this many cells
MAX_PARALLEL = 256  # llama.cpp's LLAMA_MAX_SEQ
MULTI_DEVICE_FIELDS = ("rpc", "devices", "tensor_split", "drafter_device")


@dataclass
class RuntimeSettings:
    n_gpu_layers: int = -1  # -1: every layer (llama-server's "all"); 0: CPU only
    tensor_overrides: list[tuple[str, str]] = field(default_factory=list)  # (regex, "CPU"/"GPU"), first match wins
    n_cpu_moe: int = 0  # MoE experts of the first N layers on the CPU (llama-server --n-cpu-moe)
    mmproj_on_gpu: bool = True
    drafter_on_gpu: bool = True
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: str = "auto"
    swa_full: bool = False
    repack: bool = True  # CPU weights in llama.cpp's extra buffer types (CPU_REPACK, AMX); llama-server --no-repack
    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    n_parallel: int = 1  # sequences decoded together (serve slots, llama-server -np); n_ctx is their shared pool
    threads: int | None = None  # None: llama.cpp's default
    draft_max: int | None = None  # None: adaptive draft length; K: always draft K tokens
    draft_cap: int = 8  # upper bound on k for the adaptive chooser
    # several devices (llama.cpp split mode layer); all empty: one GPU, as before. Omitted from to_dict when unset.
    rpc: list[str] = field(default_factory=list)  # "host:port" rpc-servers (llama-server --rpc)
    devices: list[str] = field(default_factory=list)  # llama.cpp device names in split order (CUDA0, RPC0...)
    tensor_split: list[float] = field(default_factory=list)  # proportions per device (llama-server -ts)
    drafter_device: str | None = None  # the drafter's device (-devd): the one holding the target's last layers

    def __post_init__(self) -> None:
        self.tensor_overrides = [tuple(o) for o in self.tensor_overrides]  # JSON gives lists
        self.validate()

    def validate(self) -> None:
        problems = []
        if self.n_gpu_layers < -1:
            problems.append(f"n_gpu_layers: expected -1 (all) or >= 0, got {self.n_gpu_layers}")
        for name in ("cache_type_k", "cache_type_v"):
            if getattr(self, name) not in KV_TYPES:
                problems.append(f"{name}: expected one of {', '.join(KV_TYPES)}, got {getattr(self, name)!r}")
        if self.flash_attn not in FLASH_ATTN:
            problems.append(f"flash_attn: expected one of {', '.join(FLASH_ATTN)}, got {self.flash_attn!r}")
        for o in self.tensor_overrides:
            if len(o) != 2 or o[1] not in DEVICES:
                problems.append(f"tensor_overrides: expected (pattern, CPU|GPU), got {list(o)!r}")
        for name in ("n_ctx", "n_batch", "n_ubatch", "draft_cap"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: expected >= 1, got {getattr(self, name)}")
        if not 1 <= self.n_parallel <= MAX_PARALLEL:
            problems.append(f"n_parallel: expected 1..{MAX_PARALLEL}, got {self.n_parallel}")
        if self.n_cpu_moe < 0:
            problems.append(f"n_cpu_moe: expected >= 0, got {self.n_cpu_moe}")
        if self.draft_max is not None and self.draft_max < 0:
            problems.append(f"draft_max: expected >= 0, got {self.draft_max}")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads: expected >= 1, got {self.threads}")
        problems += self._device_problems()
        if problems:
            raise GgufMtpError("runtime settings: " + "; ".join(problems))

    def _device_problems(self) -> list[str]:
        out = [f"rpc: expected host:port, got {r!r}" for r in self.rpc
               if not isinstance(r, str) or not r.rpartition(":")[2].isdigit() or not r.rpartition(":")[0]]
        if self.tensor_split and len(self.tensor_split) != len(self.devices):
            out.append(f"tensor_split: expected one proportion per device ({len(self.devices)}), "
                       f"got {len(self.tensor_split)}")
        if any(x < 0 for x in self.tensor_split):
            out.append(f"tensor_split: expected proportions >= 0, got {self.tensor_split}")
        if self.drafter_device is not None and self.devices and self.drafter_device not in self.devices:
            out.append(f"drafter_device: expected one of {', '.join(self.devices)}, got {self.drafter_device!r}")
        return out

    @property
    def adaptive(self) -> bool:
        return self.draft_max is None

    @property
    def slot_ctx(self) -> int:
        """Positions each of the ``n_parallel`` sequences may use: llama.cpp's pool (n_ctx rounded up to whole
        256-cell blocks) split evenly, as the batched runtime (``BatchEngine.slot_ctx``) splits it."""
        return -(-self.n_ctx // N_CTX_PAD) * N_CTX_PAD // self.n_parallel

    @property
    def output_device(self) -> str | None:
        """With several devices: the one holding the target's last layers and output layer (llama.cpp's layer split
        gives the last device the last layers), where the drafter and the projector go; None with one GPU."""
        return self.devices[-1] if self.devices else None

    def effective_overrides(self) -> list[tuple[str, str]]:
        """Explicit overrides first, then the expert patterns that ``n_cpu_moe`` stands for."""
        moe = [(MOE_EXPERT_PATTERN.format(layer=i), "CPU") for i in range(self.n_cpu_moe)]
        return list(self.tensor_overrides) + moe

    # --- JSON round-trip ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tensor_overrides"] = [list(o) for o in self.tensor_overrides]
        for k in MULTI_DEVICE_FIELDS:  # one-GPU plan files stay as they were
            if not d[k]:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RuntimeSettings:
        if not isinstance(d, dict):
            raise GgufMtpError(f"runtime settings: expected a JSON object, got {type(d).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise GgufMtpError(f"runtime settings: unknown key(s) {', '.join(unknown)}")
        for k, v in d.items():
            if not _type_ok(known[k].type, v):
                raise GgufMtpError(f"runtime settings: {k}: expected {known[k].type}, got {v!r}")
        return cls(**d)

    def replace(self, **changes: Any) -> RuntimeSettings:
        """A copy with the given fields changed (None values are ignored: 'flag not given')."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def _type_ok(annotation: str, value: Any) -> bool:
    if value is None:
        return "None" in annotation
    if annotation.startswith("int"):
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation.startswith("bool"):
        return isinstance(value, bool)
    if annotation.startswith("str"):
        return isinstance(value, str)
    if annotation.startswith("list"):
        return isinstance(value, list | tuple)
    return True


def load_plan_settings(path: str | Path) -> RuntimeSettings:
    """Read the ``runtime`` member of a plan file (or a bare settings object)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise GgufMtpError(f"plan file {p} does not exist") from None
    except json.JSONDecodeError as e:
        raise GgufMtpError(f"plan file {p}: not JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict) and "runtime" in data:
        data = data["runtime"]
    return RuntimeSettings.from_dict(data)
