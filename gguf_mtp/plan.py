"""Fit a Gemma 4 target + MTP drafter + vision projector into a VRAM budget.

The memory model (numbers from ``memory.py``) follows what llama.cpp does with these files:

- weights: every tensor's exact bytes (from the GGUF, or from the registry plus llama.cpp's quantizer in dry-run
  mode), placed the way llama.cpp's loader places them: the input layer (``token_embd``,
  ``per_layer_token_embd``) always on the CPU, repeating layers from the end (``n_gpu_layers``), the output layer
  (the tied head is a *second copy* of ``token_embd`` there), then tensor overrides (MoE experts to the CPU first);
- KV cache: per owning layer on that layer's device, the sliding part sized to the window, shared-KV layers
  empty, V padded to the widest layer when flash attention is off; the drafter owns none (it views the target's);
- compute buffers of both contexts and of the projector, from the graphs' largest live tensors;
- host memory: CPU-side weights, CPU KV, logits/embedding output buffers.

``plan()`` chooses placement, KV type and the largest context that fits, or says what does not fit and by how
much. The result's ``runtime`` member is exactly ``RuntimeSettings.to_dict()``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import keys, memory, render
from .errors import GgufMtpError
from .memory import AttnLayer, GiB, KVCells, MiB, TextGraph
from .settings import RuntimeSettings
from .skeleton import Layout, TensorSpec

GPU, CPU = "GPU", "CPU"
DEFAULT_VRAM = 24 * GiB
DEFAULT_MARGIN = 1 * GiB
MIN_CTX = 4096  # below this a plan offloads weights rather than shrinking the context further
KV_CHOICES = ("f16", "q8_0", "q4_0")
IMAGE_MAX_TOKENS = 1120  # gemma4v's largest image (llama.cpp: set_limit_image_tokens(70, 1120))
SCHEMA = "gguf-mtp.plan/1"
_SIZE = re.compile(r"^\s*([\d.]+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


# --- sizes ------------------------------------------------------------------------------------------

def parse_size(text: str | int) -> int:
    """'24GiB', '24GB' (decimal), '1024MiB', '1.5G' (binary) -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise GgufMtpError(f"expected a size like 24GiB, 24GB or 1024MiB, got {text!r}")
    value, unit = float(m.group(1)), (m.group(2) or "B").upper()
    scale = {"B": 1, "K": 2**10, "KI": 2**10, "KIB": 2**10, "KB": 10**3, "M": 2**20, "MI": 2**20, "MIB": 2**20,
             "MB": 10**6, "G": 2**30, "GI": 2**30, "GIB": 2**30, "GB": 10**9, "T": 2**40, "TI": 2**40,
             "TIB": 2**40, "TB": 10**12}[unit]
    return int(value * scale)


def fmt_size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.0f} MiB"


# --- what a file holds, as the memory model needs it -----------------------------------------------

def _plain(meta: dict) -> dict:
    """Metadata as plain values (skeleton layouts store (value, type, sub_type) triples)."""
    return {k: (v[0] if isinstance(v, tuple) and len(v) == 3 else v) for k, v in meta.items()}


@dataclass(frozen=True)
class ModelFile:
    """One GGUF's tensors and hyper-parameters (from a file, or from a registry layout before download)."""

    role: str  # target | drafter | mmproj
    arch: str
    source: str
    tensors: tuple[TensorSpec, ...]
    meta: dict[str, Any]

    @classmethod
    def from_gguf(cls, path: str | Path, role: str) -> ModelFile:
        from . import pairing
        from .gguffile import read_gguf

        info = read_gguf(path, tokens=False)
        pairing.check_metadata(info.metadata, info.path)  # integers where the tables below expect them
        tensors = tuple(TensorSpec(t.name, tuple(t.shape), t.type) for t in info.tensors)
        n_layer = info.metadata.get(f"{info.arch}.block_count", 0)
        stray = next((t.name for t in tensors if tensor_slot(t.name)[1] >= n_layer), None)
        if stray is not None:  # llama.cpp refuses such a file too ("wrong number of tensors")
            raise GgufMtpError(f"{path}: tensor {stray} belongs to a layer the file does not have "
                               f"({info.arch}.block_count is {n_layer})")
        meta = dict(info.metadata)
        if info.token_bytes is not None:
            meta["tokenizer.ggml.n_tokens"] = len(info.token_bytes)
            meta[keys.PAIR_VOCAB_SHA256] = keys.vocab_sha256(info.token_bytes)  # what pairing compares
        return cls(role, info.arch, str(path), tensors, meta)

    @classmethod
    def from_layout(cls, layout: Layout, role: str, source: str) -> ModelFile:
        meta = _plain(layout.metadata)
        meta["general.architecture"] = layout.arch
        tokens = meta.pop("tokenizer.ggml.tokens", None)
        if tokens is not None:
            meta["tokenizer.ggml.n_tokens"] = len(tokens)
        for k in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            meta.pop(k, None)
        return cls(role, layout.arch, source, layout.tensors, meta)

    def key(self, name: str, default: Any = None) -> Any:
        return self.meta.get(f"{self.arch}.{name}", default)

    @property
    def weight_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def n_layer(self) -> int:
        return int(self.key("block_count", 0))

    @property
    def n_vocab(self) -> int:
        n = self.meta.get("tokenizer.ggml.n_tokens")
        if n:
            return int(n)
        emb = self.tensor("token_embd.weight")
        return emb.shape[1] if emb and len(emb.shape) > 1 else 0

    @property
    def n_embd(self) -> int:
        return int(self.key("embedding_length", 0))

    @property
    def n_ctx_train(self) -> int:
        return int(self.key("context_length", 0))

    @property
    def n_swa(self) -> int:
        return int(self.key("attention.sliding_window", 0))

    @property
    def quant(self) -> str:
        from .quanttypes import ftype_name

        return ftype_name(self.meta.get("general.file_type")) or "?"

    def tensor(self, name: str) -> TensorSpec | None:
        return next((t for t in self.tensors if t.name == name), None)

    @property
    def tied(self) -> bool:
        return self.tensor("output.weight") is None

    def layer_kinds(self) -> list[bool]:
        """True = sliding, per layer."""
        pattern = self.key("attention.sliding_window_pattern") or []
        return [bool(x) for x in (pattern if isinstance(pattern, list) else [pattern] * self.n_layer)]

    def _per_layer(self, name: str, default: Any = 0) -> list[int]:
        v = self.key(name, default)
        return [int(x) for x in v] if isinstance(v, list) else [int(v)] * self.n_layer

    def attn_layers(self, target: ModelFile | None = None) -> tuple[AttnLayer, ...]:
        """Per-layer attention shapes; a drafter takes KV heads (and owns no KV) from its target's layers."""
        kinds = self.layer_kinds()
        heads = self._per_layer("attention.head_count")
        hd_full = int(self.key("attention.key_length", 0))
        hd_swa = int(self.key("attention.key_length_swa", hd_full))
        kv = self._per_layer("attention.head_count_kv")
        first_shared = self.n_layer - int(self.key("attention.shared_kv_layers", 0) or 0)
        out = []
        for i, sliding in enumerate(kinds):
            owns = self.arch == keys.ARCH_TARGET and i < first_shared
            out.append(AttnLayer(sliding, hd_swa if sliding else hd_full, heads[i], kv[i], owns))
        return tuple(out)

    def graph(self) -> TextGraph:
        moe = None
        if self.key("expert_count"):
            moe = (int(self.key("expert_count")), int(self.key("expert_used_count", 0)),
                   int(self.key("expert_feed_forward_length", 0)))
        backbone = int(self.key("embedding_length_out", 0)) if self.arch == keys.ARCH_DRAFTER else 0
        return TextGraph(self.n_embd, self.n_vocab, self.attn_layers(), tuple(self._per_layer("feed_forward_length")),
                         int(self.key("embedding_length_per_layer_input", 0) or 0), moe, backbone)


# --- weight placement (llama-model.cpp load_tensors + llama-model-loader.cpp create_tensor) -------------

_LAYER = re.compile(r"^blk\.(\d+)\.")
_INPUT = ("token_embd.weight", "per_layer_token_embd.weight", "masked_embd_centroids.weight", "masked_embd_ordering")
_OUTPUT = ("output.weight", "output_norm.weight", "nextn.post_projection.weight")
_LAYER0 = ("per_layer_model_proj.weight", "per_layer_proj_norm.weight", "nextn.pre_projection.weight")


def tensor_slot(name: str) -> tuple[str, int]:
    """("input" | "output" | "layer", layer index) as llama.cpp's tensor info table assigns it."""
    m = _LAYER.match(name)
    if m:
        return "layer", int(m.group(1))
    if name in _INPUT or name.startswith("token_embd"):
        return "input", -1
    if name in _LAYER0:
        return "layer", 0
    if name.startswith("rope_freqs"):
        return "rope", -1
    return "output", -1


def layer_devices(n_layer: int, n_gpu_layers: int) -> tuple[list[str], str]:
    """Devices of the repeating layers and of the output layer: the last ``n_gpu_layers`` of n_layer + 1
    (the output layer counts as one) go to the GPU; negative = all."""
    ngl = n_layer + 1 if n_gpu_layers < 0 else n_gpu_layers
    start = max(n_layer + 1 - ngl, 0)
    return [GPU if i >= start else CPU for i in range(n_layer)], GPU if ngl >= 1 else CPU


@dataclass
class Placement:
    """Bytes per (device, component) of one model's weights, and the tensors on each device."""

    bytes: dict[tuple[str, str], int] = field(default_factory=dict)
    largest_cpu_layer_tensor: int = 0  # what op offload copies to the GPU per matmul (partial offload)

    def add(self, device: str, component: str, n: int) -> None:
        self.bytes[(device, component)] = self.bytes.get((device, component), 0) + n

    def on(self, device: str) -> int:
        return sum(v for (d, _), v in self.bytes.items() if d == device)


def _override(name: str, overrides: list[tuple[str, str]]) -> str | None:
    for pattern, device in overrides:
        if re.search(pattern, name):
            return device
    return None


def _cpu_bytes(t: TensorSpec, slot: str, cpu_amx: bool) -> int:
    """A weight's bytes in CPU memory: its AMX-repacked size where the AMX buffer type takes it."""
    if cpu_amx and slot == "layer" and "norm" not in t.name:
        amx = memory.amx_weight_bytes(t.type, t.shape)
        if amx is not None:
            return amx
    return t.n_bytes


def place_weights(m: ModelFile, n_gpu_layers: int, overrides: list[tuple[str, str]] = (),
                  label: str = "", cpu_amx: bool = False) -> Placement:
    """Where llama.cpp puts each tensor (and the tied output head's extra copy). ``cpu_amx``: the CPU backend
    offers its AMX buffer type (memory.AMX_BLOCK_EXTRA), which resizes CPU-resident matmul weights."""
    label = label or m.role
    layers, out_dev = layer_devices(m.n_layer, n_gpu_layers)
    full_layers = [i for i, s in enumerate(m.layer_kinds()) if not s]
    p = Placement()
    align = {GPU: memory.GPU_TENSOR_ALIGN, CPU: memory.TENSOR_ALIGN}
    for t in m.tensors:
        slot, il = tensor_slot(t.name)
        if slot == "rope":  # one copy per device holding a full-attention layer
            for dev in sorted({layers[i] for i in full_layers} or {out_dev}):
                p.add(dev, f"{label} layers", memory.pad(t.n_bytes, align[dev]))
            continue
        dev = {"input": CPU, "output": out_dev}.get(slot) or layers[il]
        forced = _override(t.name, overrides)
        dev = forced or dev
        comp = {"input": f"{label} embeddings (input)", "output": f"{label} output head"}.get(slot, f"{label} layers")
        if forced == CPU and slot == "layer":
            comp = f"{label} offloaded tensors"
        p.add(dev, comp, memory.pad(_cpu_bytes(t, slot, cpu_amx) if dev == CPU else t.n_bytes, align[dev]))
        if dev == CPU and slot == "layer":
            p.largest_cpu_layer_tensor = max(p.largest_cpu_layer_tensor, t.n_bytes)
    if m.tied and m.role != "mmproj":
        # llama.cpp creates the tied head as a duplicate of token_embd in the output layer's buffer. The target
        # creates it before token_embd, so it is a second copy even on the CPU; the drafter creates token_embd
        # first and reuses it when both land in the same CPU buffer.
        emb = m.tensor("token_embd.weight")
        if emb is not None and not (out_dev == CPU and m.arch == keys.ARCH_DRAFTER):
            p.add(out_dev, f"{label} output head", memory.pad(emb.n_bytes, align[out_dev]))
    return p


# --- the projector's compute graph (clip gemma4v) -----------------------------------------------------

def projector_compute(m: ModelFile, image_tokens: int, flash_attn: bool) -> int:
    """ViT over image_tokens * pool^2 patches: the FFN or attention peak (f32 activations)."""
    w = int(m.meta.get("clip.vision.embedding_length", 0))
    ffn = int(m.meta.get("clip.vision.feed_forward_length", 0))
    heads = int(m.meta.get("clip.vision.attention.head_count", 1))
    patch = int(m.meta.get("clip.vision.patch_size", 16))
    pool = int(m.meta.get("clip.vision.projector.scale_factor", 3) or 3)
    n = image_tokens * pool * pool
    side = int(round(n ** 0.5)) * patch
    raw = 3 * side * side * memory.F32
    act = memory.F32 * w * n
    ffn_peak = 3 * act + 3 * memory.F32 * ffn * n
    attn_peak = 5 * act + (0 if flash_attn else memory.F32 * n * n * heads)
    return max(raw + 2 * act, ffn_peak, attn_peak)


# --- one configuration's memory -----------------------------------------------------------------------

@dataclass(frozen=True)
class Files:
    target: ModelFile
    drafter: ModelFile | None = None
    mmproj: ModelFile | None = None


@dataclass
class Breakdown:
    """Bytes per (device, component) for one set of runtime settings."""

    items: dict[tuple[str, str], int] = field(default_factory=dict)
    cells: KVCells | None = None
    contexts: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, device: str, component: str, n: int) -> None:
        if n:
            self.items[(device, component)] = self.items.get((device, component), 0) + n

    def on(self, device: str) -> int:
        return sum(v for (d, _), v in self.items.items() if d == device)

    def rows(self) -> list[tuple[str, str, int]]:
        return sorted(((d, c, v) for (d, c), v in self.items.items()), key=lambda r: (r[0] != GPU, -r[2]))


def k_max(s: RuntimeSettings) -> int:
    return s.draft_max if s.draft_max is not None else s.draft_cap


def context_shapes(s: RuntimeSettings, drafter: bool) -> dict[str, dict[str, int]]:
    """llama_context_params as gguf-mtp's engine sets them (runtime/engine.py): the target's n_batch is at least
    one verify batch, outputs default to n_batch; the drafter's context decodes one draft row at a time."""
    k = k_max(s) if drafter else 0
    n_batch = max(s.n_batch, k + 1)
    shapes = {"target": {"n_ctx": s.n_ctx, "n_batch": n_batch, "n_ubatch": min(s.n_ubatch, n_batch),
                         "n_outputs_max": 0, "n_seq_max": 1}}
    if drafter:
        shapes["drafter"] = {"n_ctx": s.n_ctx, "n_batch": k + 1, "n_ubatch": k + 1, "n_outputs_max": 0, "n_seq_max": 1}
    return shapes


def breakdown(files: Files, s: RuntimeSettings, image_tokens: int = IMAGE_MAX_TOKENS,
              cpu_amx: bool = False) -> Breakdown:
    """Everything the settings make llama.cpp allocate, per device and component. ``cpu_amx``: figures for a CPU
    whose AMX buffer type llama.cpp uses (and settings that allow repacking); plans assume plain CPU buffers."""
    cpu_amx = cpu_amx and s.repack
    t, d, mm = files.target, files.drafter, files.mmproj
    fa = s.flash_attn != "off"
    b = Breakdown()
    shapes = context_shapes(s, d is not None)
    b.contexts = shapes
    ts = shapes["target"]
    ub_eff = min(ts["n_ubatch"], ts["n_batch"], s.n_ctx)
    cells = memory.kv_cells(s.n_ctx, ub_eff, t.n_swa, 1, False, s.swa_full)
    b.cells = cells

    # weights
    tp = place_weights(t, s.n_gpu_layers, s.effective_overrides(), "target", cpu_amx)
    for (dev, comp), n in tp.bytes.items():
        b.add(dev, comp, n)
    if d is not None:
        dp = place_weights(d, -1 if s.drafter_on_gpu else 0, [], "drafter", cpu_amx)
        for (dev, comp), n in dp.bytes.items():
            b.add(dev, comp, n)
    if mm is not None:
        b.add(GPU if s.mmproj_on_gpu else CPU, "projector weights", mm.weight_bytes)

    # KV cache: each owning layer on its layer's device
    layers, _ = layer_devices(t.n_layer, s.n_gpu_layers)
    attn = t.attn_layers()
    widths = {layer.n_embd_kv for layer in attn}
    v_row = max(widths) if not fa and len(widths) > 1 else None
    for i, layer in enumerate(attn):
        if layer.owns_kv:
            k_b, v_b = memory.kv_layer_bytes(layer, cells.sliding if layer.sliding else cells.full, cells.streams,
                                             s.cache_type_k, s.cache_type_v, v_row)
            b.add(layers[i], "KV cache (sliding layers)" if layer.sliding else "KV cache (full layers)", k_b + v_b)

    # compute buffers
    tg = t.graph()
    shape = memory.graph_shape(s.n_ctx, ts["n_batch"], ts["n_ubatch"], ts["n_outputs_max"], cells, fa)
    graph_bytes = memory.compute_buffer_bytes(tg, shape, quantized_kv=_quantized(s))
    any_gpu = GPU in layers or layer_devices(t.n_layer, s.n_gpu_layers)[1] == GPU
    all_gpu = all(dev == GPU for dev in layers) and not any(dev == CPU for (dev, c) in tp.bytes if "offloaded" in c)
    if any_gpu:
        b.add(GPU, "target compute buffer", graph_bytes)
        b.add(CPU, "target compute buffer (host)", memory.host_compute_bytes(tg, shape) if all_gpu else graph_bytes)
        if not all_gpu and shape.n_tokens >= 32:  # op offload copies CPU weights to the GPU for big batches
            b.add(GPU, "target compute buffer", tp.largest_cpu_layer_tensor)
    else:
        b.add(CPU, "target compute buffer", graph_bytes)
    b.add(CPU, "target output buffer (host)", memory.output_buffer_bytes(
        t.n_vocab, ts["n_batch"] if not ts["n_outputs_max"] else ts["n_outputs_max"],
        t.n_embd if d is not None else 0, ts["n_batch"], nextn_unmasked=True))
    if d is not None:
        dsh = shapes["drafter"]
        dg = TextGraph(d.n_embd, d.n_vocab, d.attn_layers(), tuple(d._per_layer("feed_forward_length")), 0, None,
                       t.n_embd)
        dshape = memory.graph_shape(s.n_ctx, dsh["n_batch"], dsh["n_ubatch"], dsh["n_outputs_max"], cells, fa)
        dbytes = memory.compute_buffer_bytes(dg, dshape, quantized_kv=_quantized(s))
        b.add(GPU if s.drafter_on_gpu else CPU, "drafter compute buffer", dbytes)
        b.add(CPU, "drafter output buffer (host)", memory.output_buffer_bytes(d.n_vocab, dshape.n_outputs, t.n_embd))
    if mm is not None:
        b.add(GPU if s.mmproj_on_gpu else CPU, "projector compute buffer", projector_compute(mm, image_tokens, fa))
    return b


def _quantized(s: RuntimeSettings) -> bool:
    return s.cache_type_k not in ("f16", "f32", "bf16") or s.cache_type_v not in ("f16", "f32", "bf16")


# --- choosing ---------------------------------------------------------------------------------------

@dataclass
class Request:
    files: Files
    vram: int = DEFAULT_VRAM
    margin: int = DEFAULT_MARGIN
    ram: int | None = None  # host RAM budget (None: not checked)
    n_ctx: int | None = None  # fixed context; None: the largest that fits (up to the model's)
    max_ctx: bool = False
    kv_type: str | None = None
    flash_attn: str = "auto"
    image_tokens: int = IMAGE_MAX_TOKENS
    base: RuntimeSettings = field(default_factory=RuntimeSettings)


@dataclass
class Plan:
    request: Request
    settings: RuntimeSettings
    breakdown: Breakdown
    fits: bool
    steps: list[str] = field(default_factory=list)
    shortfall: int = 0
    rank: int = 0  # position in the offload order (0: everything on the GPU)

    @property
    def budget(self) -> int:
        return self.request.vram - self.request.margin

    @property
    def gpu_used(self) -> int:
        return self.breakdown.on(GPU)

    @property
    def host_used(self) -> int:
        return self.breakdown.on(CPU)

    def to_dict(self) -> dict[str, Any]:
        f = self.request.files
        paths = {"target": f.target.source, "drafter": f.drafter.source if f.drafter else None,
                 "mmproj": f.mmproj.source if f.mmproj else None}
        per_device: dict[str, dict[str, Any]] = {}
        for dev, comp, n in self.breakdown.rows():
            entry = per_device.setdefault(dev, {"total": 0, "components": {}})
            entry["components"][comp] = n
            entry["total"] += n
        per_device.setdefault(GPU, {"total": 0, "components": {}})["budget"] = self.budget
        if self.request.ram is not None:
            per_device.setdefault(CPU, {"total": 0, "components": {}})["budget"] = self.request.ram
        return {
            "schema": SCHEMA,
            "fits": self.fits,
            "shortfall_bytes": self.shortfall,
            "files": paths,
            "quants": {"target": f.target.quant, "drafter": f.drafter.quant if f.drafter else None},
            "budget": {"vram": self.request.vram, "margin": self.request.margin, "ram": self.request.ram},
            "runtime": self.settings.to_dict(),
            "contexts": self.breakdown.contexts,
            "kv_cells": {"full": self.breakdown.cells.full, "sliding": self.breakdown.cells.sliding}
            if self.breakdown.cells else None,
            "devices": per_device,
            "steps": self.steps,
            "llama_server": render.server_command(self.settings, paths["target"], paths["drafter"], paths["mmproj"],
                                                  draft_default=_draft_default(f)),
            "ollama": {
                "parameters": render.ollama_parameters(self.settings, f.drafter is not None, f.target.n_layer,
                                                       draft_default=_draft_default(f)),
                "not_expressible": [o.comment for o in render.ollama_unexpressible(self.settings)],
            },
        }


def _draft_default(f: Files) -> int | None:
    try:
        return render.recommended_draft_length(f.target.n_embd, f.target.n_layer)
    except GgufMtpError:
        return None


def _fits(files: Files, s: RuntimeSettings, req: Request) -> tuple[bool, Breakdown]:
    b = breakdown(files, s, req.image_tokens)
    ok = b.on(GPU) <= req.vram - req.margin and (req.ram is None or b.on(CPU) <= req.ram)
    return ok, b


def _largest_ctx(files: Files, s: RuntimeSettings, req: Request, lo: int, hi: int) -> int | None:
    """The largest multiple of 256 in [lo, hi] that fits (memory grows with the context), or None."""
    step = memory.KV_CELL_PAD
    lo, hi = memory.pad(lo, step), hi // step * step
    if hi < lo or not _fits(files, s.replace(n_ctx=lo), req)[0]:
        return None
    while lo < hi:
        mid = (lo + hi + step) // 2 // step * step
        if _fits(files, s.replace(n_ctx=mid), req)[0]:
            lo = mid
        else:
            hi = mid - step
    return lo


def _placements(files: Files, s: RuntimeSettings) -> Iterable[tuple[RuntimeSettings, str]]:
    """Ever less on the GPU: MoE experts layer by layer (like --n-cpu-moe), then the projector, then whole
    layers from the front (n_gpu_layers). At least one repeating layer stays on the GPU: below that the
    budget is too small for anything."""
    t = files.target
    yield s, "everything on the GPU"
    moe_layers = [i for i in range(t.n_layer) if t.tensor(f"blk.{i}.ffn_down_exps.weight")]
    for n in range(1, len(moe_layers) + 1):
        yield s.replace(n_cpu_moe=n), f"MoE experts of the first {n} layer(s) on the CPU (--n-cpu-moe {n})"
    if moe_layers:
        s = s.replace(n_cpu_moe=len(moe_layers))
    if files.mmproj is not None:
        s = s.replace(mmproj_on_gpu=False)
        yield s, "projector on the CPU"
    for ngl in range(t.n_layer, 1, -1):
        yield s.replace(n_gpu_layers=ngl), f"{ngl - 1} of {t.n_layer} layers and the output layer on the GPU (-ngl {ngl})"


def plan(req: Request) -> Plan:
    """Placement, KV type and context for the request; ``fits`` False with the shortfall when nothing fits."""
    files = req.files
    _check_files(files)
    n_train = files.target.n_ctx_train or 131072
    want_max = req.n_ctx is None or req.max_ctx
    if req.n_ctx is not None and req.n_ctx > n_train:
        raise GgufMtpError(f"--ctx {req.n_ctx} exceeds the model's context length ({n_train})")
    floor = req.n_ctx if req.n_ctx is not None and not req.max_ctx else min(MIN_CTX, n_train)
    kv_types = [req.kv_type] if req.kv_type else list(KV_CHOICES[:2])
    base = req.base.replace(flash_attn=req.flash_attn)
    if not req.kv_type:
        base = base.replace(cache_type_k="f16", cache_type_v="f16")
    best: Plan | None = None
    for kv in kv_types:
        fa = "on" if kv not in ("f16", "f32", "bf16") and req.flash_attn == "auto" else req.flash_attn
        if kv not in ("f16", "f32", "bf16") and fa == "off":
            continue  # llama.cpp refuses a quantized V cache without flash attention
        s0 = base.replace(cache_type_k=kv, cache_type_v=kv, flash_attn=fa)
        for rank, (s, step) in enumerate(_placements(files, s0)):
            if best is not None and rank > best.rank:
                break  # more offloading than a plan we already have
            hi = n_train if want_max else req.n_ctx
            ctx = _largest_ctx(files, s, req, floor, hi) if want_max else (
                req.n_ctx if _fits(files, s.replace(n_ctx=req.n_ctx), req)[0] else None)
            if ctx is None:
                continue
            s = s.replace(n_ctx=ctx)
            p = Plan(req, s, breakdown(files, s, req.image_tokens), True, [step], rank=rank)
            if best is None or _better(p, best):
                best = p
            break
    if best is not None:
        return best
    # nothing fits: report the configuration that misses by the least, at the floor context
    kv = kv_types[-1]
    fa = "on" if kv != "f16" and req.flash_attn == "auto" else req.flash_attn
    least: Plan | None = None
    for s, step in _placements(files, base.replace(n_ctx=floor, cache_type_k=kv, cache_type_v=kv, flash_attn=fa)):
        b = breakdown(files, s, req.image_tokens)
        short = max(b.on(GPU) - (req.vram - req.margin), b.on(CPU) - req.ram if req.ram is not None else 0, 1)
        if least is None or short < least.shortfall:
            least = Plan(req, s, b, False, [step], short)
    assert least is not None
    return least


def _better(p: Plan, best: Plan) -> bool:
    """Less offloading wins (offloaded weights cost far more speed than a quantized cache); then context, where
    a quantized cache must buy at least twice the context to beat f16."""
    if p.rank != best.rank:
        return p.rank < best.rank
    a, b = p.settings, best.settings
    quant_a, quant_b = a.cache_type_k != "f16", b.cache_type_k != "f16"
    if quant_a != quant_b:
        return a.n_ctx >= 2 * b.n_ctx if quant_a else 2 * a.n_ctx > b.n_ctx
    return a.n_ctx > b.n_ctx


def _check_files(files: Files) -> None:
    from . import pairing

    if files.target.arch != keys.ARCH_TARGET:
        raise GgufMtpError(f"{files.target.source}: expected a {keys.ARCH_TARGET} target, got "
                           f"{files.target.arch or 'no architecture'}")
    facts = lambda m: pairing.facts_from_metadata(m.meta) if m else None  # noqa: E731
    pairing.require_compatible(facts(files.target), facts(files.drafter), facts(files.mmproj),
                               runtime_centroids=True)


def shortfall_message(p: Plan) -> str:
    """One line: what does not fit, and by how much."""
    b, s = p.breakdown, p.settings
    gpu_over = b.on(GPU) - p.budget
    parts = [f"even with {p.steps[-1] if p.steps else 'the smallest placement'} and a {s.cache_type_k} KV cache"]
    if gpu_over > 0:
        biggest = max(((c, n) for (d, c), n in b.items.items() if d == GPU), key=lambda x: x[1], default=None)
        parts.append(f"the GPU needs {fmt_size(b.on(GPU))} for a {fmt_size(p.budget)} budget "
                     f"(VRAM {fmt_size(p.request.vram)} - margin {fmt_size(p.request.margin)}): "
                     f"{fmt_size(gpu_over)} short at {s.n_ctx} tokens of context"
                     + (f"; largest item: {biggest[0]} {fmt_size(biggest[1])}" if biggest else ""))
    if p.request.ram is not None and b.on(CPU) > p.request.ram:
        parts.append(f"host RAM needs {fmt_size(b.on(CPU))} of {fmt_size(p.request.ram)} "
                     f"({fmt_size(b.on(CPU) - p.request.ram)} short)")
    return "does not fit: " + "; ".join(parts)




# --- building the file set ------------------------------------------------------------------------------

def files_from_paths(target: str | Path, drafter: str | Path | None = None, mmproj: str | Path | None = None) -> Files:
    return Files(ModelFile.from_gguf(target, "target"),
                 ModelFile.from_gguf(drafter, "drafter") if drafter else None,
                 ModelFile.from_gguf(mmproj, "mmproj") if mmproj else None)


def variant_file_names(variant: str, quant: str, drafter_quant: str) -> dict[str, str]:
    """The usual file names for a variant's files (as published GGUF repos name them)."""
    return {"target": f"gemma-4-{variant}-it-{quant}.gguf", "drafter": f"mtp-gemma-4-{variant}-it-{drafter_quant}.gguf",
            "mmproj": f"mmproj-gemma-4-{variant}-it-F16.gguf"}


def files_from_variant(variant: str, quant: str | None = None, drafter_quant: str | None = None,
                       drafter: bool = True, vision: bool = False) -> Files:
    """The file set of a registry variant before download: layouts from the registry, per-tensor quant types from
    llama.cpp's quantizer in dry-run mode over a sparse skeleton."""
    from .registry import get_variant
    from .skeleton import layout_for

    v = get_variant(variant)
    quant = (quant or v.recommended.target_quant).upper()
    dq = (drafter_quant or v.recommended.drafter_quant).upper()
    names = variant_file_names(v.name, quant, dq)
    if vision and v.vision is None:
        raise GgufMtpError(f"{v.name} has no vision tower")
    return Files(
        ModelFile.from_layout(layout_for(v.name, "target", quant), "target", names["target"]),
        ModelFile.from_layout(layout_for(v.name, "drafter", dq), "drafter", names["drafter"]) if drafter else None,
        ModelFile.from_layout(layout_for(v.name, "mmproj"), "mmproj", names["mmproj"]) if vision else None,
    )


def plan_for_files(target: str | Path, drafter: str | Path | None = None, mmproj: str | Path | None = None, *,
                   vram: str | int = DEFAULT_VRAM, margin: str | int = DEFAULT_MARGIN, n_ctx: int | None = None,
                   kv_type: str | None = None) -> Plan:
    """One call for other commands (serve-cmd / modelfile --vram): plan these files for this budget."""
    return plan(Request(files_from_paths(target, drafter, mmproj), parse_size(vram), parse_size(margin),
                        n_ctx=n_ctx, kv_type=kv_type))


def table_rows(p: Plan) -> list[list[str]]:
    """Device, component, size rows for the human table, GPU first, with a total and free line per device."""
    rows: list[list[str]] = []
    for dev in (GPU, CPU):
        items = [(c, n) for d, c, n in p.breakdown.rows() if d == dev]
        for c, n in items:
            rows.append([dev, c, fmt_size(n)])
        total = p.breakdown.on(dev)
        if dev == GPU:
            rows.append([dev, f"total (budget {fmt_size(p.budget)})", f"{fmt_size(total)} ({fmt_size(p.budget - total)} free)"])
        else:
            rows.append([dev, "total host memory" + (f" (budget {fmt_size(p.request.ram)})" if p.request.ram else ""),
                         fmt_size(total)])
    return rows


__all__ = [
    "Breakdown", "CPU", "DEFAULT_MARGIN", "DEFAULT_VRAM", "Files", "GPU", "ModelFile", "Plan", "Request",
    "breakdown", "context_shapes", "files_from_paths", "files_from_variant", "fmt_size", "layer_devices",
    "parse_size", "place_weights", "plan", "plan_for_files", "projector_compute", "shortfall_message", "table_rows",
    "tensor_slot", "variant_file_names",
]
