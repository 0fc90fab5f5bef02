"""What llama.cpp allocates for a set of files and runtime settings, per device and component.

The memory model (numbers from ``memory.py``) follows what llama.cpp does with these files:

- weights: every tensor's exact bytes (from the GGUF, or from a registry variant's layout, ``layout.py``), placed
  the way llama.cpp's loader places them: the input layer (``token_embd``, ``per_layer_token_embd``) always on the
  CPU, repeating layers from the end (``n_gpu_layers``), the output layer (the tied head is a *second copy* of
  ``token_embd`` there), then tensor overrides (MoE experts to the CPU first);
- KV cache: per owning layer on that layer's device, the sliding part sized to the window, shared-KV layers
  empty, V padded to the widest layer when flash attention is off; the drafter owns none (it views the target's);
- compute buffers of both contexts and of the projector, from the graphs' largest live tensors;
- host memory: CPU-side weights, CPU KV, logits/embedding output buffers.

``breakdown()`` is one configuration's bill; ``search.py`` chooses the configuration.
"""

from __future__ import annotations

import bisect
import functools
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import keys
from ..errors import GgufMtpError
from ..export.audio import AUDIO, AUDIO_DEFAULTS, UNIFIED_AUDIO, UNIFIED_FRAME, subsampled
from ..export.projector import UNIFIED_VISION
from ..keys import Keys
from ..settings import RuntimeSettings
from . import memory
from .layout import Layout, TensorSpec
from .memory import AttnLayer, KVCells, TextGraph

GPU, CPU = "GPU", "CPU"
IMAGE_MAX_TOKENS = 1120  # gemma4v's largest image (llama.cpp: set_limit_image_tokens(70, 1120))


# --- what a file holds, as the memory model needs it -----------------------------------------------

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
        from .. import pairing
        from ..gguffile import read_gguf

        info = read_gguf(path, tokens=False)
        pairing.check_metadata(info.metadata, info.path)  # integers where the tables below expect them
        tensors = tuple(TensorSpec(t.name, tuple(t.shape), t.type) for t in info.tensors)
        n_layer = info.metadata.get(keys.arch_key(Keys.LLM.BLOCK_COUNT, info.arch), 0)
        stray = next((t.name for t in tensors if tensor_slot(t.name)[1] >= n_layer), None)
        if stray is not None:  # llama.cpp refuses such a file too ("wrong number of tensors")
            raise GgufMtpError(f"{path}: tensor {stray} belongs to a layer the file does not have "
                               f"({keys.arch_key(Keys.LLM.BLOCK_COUNT, info.arch)} is {n_layer})")
        meta = dict(info.metadata)
        if info.token_bytes is not None:
            meta[keys.N_TOKENS] = len(info.token_bytes)
            meta[keys.PAIR_VOCAB_SHA256] = keys.vocab_sha256(info.token_bytes)  # what pairing compares
        return cls(role, info.arch, str(path), tensors, meta)

    @classmethod
    def from_layout(cls, layout: Layout, role: str, source: str) -> ModelFile:
        meta = layout.metadata.plain()
        tokens = meta.pop(Keys.Tokenizer.LIST, None)
        if tokens is not None:
            meta[keys.N_TOKENS] = len(tokens)
        for k in (Keys.Tokenizer.SCORES, Keys.Tokenizer.TOKEN_TYPE):
            meta.pop(k, None)
        return cls(role, layout.arch, source, layout.tensors, meta)

    def key(self, template: str, default: Any = None) -> Any:
        """The value of a key template (keys.Keys) for this file's architecture."""
        return self.meta.get(keys.arch_key(template, self.arch), default)

    @functools.cached_property
    def weight_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def n_layer(self) -> int:
        return int(self.key(Keys.LLM.BLOCK_COUNT, 0))

    @property
    def n_vocab(self) -> int:
        n = self.meta.get(keys.N_TOKENS)
        if n:
            return int(n)
        emb = self.tensor("token_embd.weight")
        return emb.shape[1] if emb and len(emb.shape) > 1 else 0

    @property
    def n_embd(self) -> int:
        return int(self.key(Keys.LLM.EMBEDDING_LENGTH, 0))

    @property
    def n_ctx_train(self) -> int:
        return int(self.key(Keys.LLM.CONTEXT_LENGTH, 0))

    @property
    def n_swa(self) -> int:
        return int(self.key(Keys.Attention.SLIDING_WINDOW, 0))

    @property
    def quant(self) -> str:
        from ..quanttypes import ftype_name

        return ftype_name(self.meta.get(Keys.General.FILE_TYPE)) or "?"

    def tensor(self, name: str) -> TensorSpec | None:
        return next((t for t in self.tensors if t.name == name), None)

    @property
    def tied(self) -> bool:
        return self.tensor("output.weight") is None

    def layer_kinds(self) -> list[bool]:
        """True = sliding, per layer."""
        pattern = self.key(Keys.Attention.SLIDING_WINDOW_PATTERN) or []
        return [bool(x) for x in (pattern if isinstance(pattern, list) else [pattern] * self.n_layer)]

    def _per_layer(self, template: str, default: Any = 0) -> list[int]:
        v = self.key(template, default)
        return [int(x) for x in v] if isinstance(v, list) else [int(v)] * self.n_layer

    def attn_layers(self, target: ModelFile | None = None) -> tuple[AttnLayer, ...]:
        """Per-layer attention shapes; a drafter takes KV heads (and owns no KV) from its target's layers."""
        kinds = self.layer_kinds()
        heads = self._per_layer(Keys.Attention.HEAD_COUNT)
        hd_full = int(self.key(Keys.Attention.KEY_LENGTH, 0))
        hd_swa = int(self.key(Keys.Attention.KEY_LENGTH_SWA, hd_full))
        kv = self._per_layer(Keys.Attention.HEAD_COUNT_KV)
        first_shared = self.n_layer - int(self.key(Keys.Attention.SHARED_KV_LAYERS, 0) or 0)
        out = []
        for i, sliding in enumerate(kinds):
            owns = self.arch == keys.ARCH_TARGET and i < first_shared
            out.append(AttnLayer(sliding, hd_swa if sliding else hd_full, heads[i], kv[i], owns))
        return tuple(out)

    def graph(self) -> TextGraph:
        moe = None
        if self.key(Keys.LLM.EXPERT_COUNT):
            moe = (int(self.key(Keys.LLM.EXPERT_COUNT)), int(self.key(Keys.LLM.EXPERT_USED_COUNT, 0)),
                   int(self.key(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, 0)))
        backbone = int(self.key(Keys.LLM.EMBEDDING_LENGTH_OUT, 0)) if self.arch == keys.ARCH_DRAFTER else 0
        return TextGraph(self.n_embd, self.n_vocab, self.attn_layers(),
                         tuple(self._per_layer(Keys.LLM.FEED_FORWARD_LENGTH)),
                         int(self.key(Keys.LLM.EMBD_LENGTH_PER_LAYER_INP, 0) or 0), moe, backbone)


# --- weight placement (llama-model.cpp load_tensors + llama-model-loader.cpp create_tensor) -------------

_LAYER = re.compile(r"^blk\.(\d+)\.")
_INPUT = ("token_embd.weight", "per_layer_token_embd.weight", keys.CENTROIDS_TENSOR, keys.ORDERING_TENSOR)
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


def layer_devices(n_layer: int, n_gpu_layers: int, devices: Sequence[str] = (),
                  tensor_split: Sequence[float] = ()) -> tuple[list[str], str]:
    """Devices of the repeating layers and of the output layer: the last ``n_gpu_layers`` of n_layer + 1
    (the output layer counts as one) go to the GPU; negative = all. With ``devices`` (several, split mode layer)
    the offloaded layers go to them as llama.cpp's ``load_tensors`` splits them (``split_device``)."""
    ngl = n_layer + 1 if n_gpu_layers < 0 else n_gpu_layers
    start = max(n_layer + 1 - ngl, 0)
    if not devices:
        return [GPU if i >= start else CPU for i in range(n_layer)], GPU if ngl >= 1 else CPU
    act = min(ngl, n_layer + 1)
    splits = split_points(tensor_split, len(devices))
    devs = [CPU if i < start or i - start >= act else devices[split_device(splits, i - start, act)]
            for i in range(n_layer + 1)]
    return devs[:n_layer], devs[n_layer]


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def split_points(tensor_split: Sequence[float], n_devices: int) -> list[float]:
    """llama.cpp's cumulative, normalized split points, in float32 as it computes them. All zero (or none) means
    'by free memory' there; the plan always gives proportions, so that case splits evenly here."""
    ts = list(tensor_split)[:n_devices] + [0.0] * (n_devices - len(tensor_split))
    if not any(ts):
        ts = [1.0] * n_devices
    acc, cum = 0.0, []
    for x in ts:
        acc = _f32(acc + _f32(x))
        cum.append(acc)
    return [_f32(c / acc) for c in cum]


def split_device(splits: Sequence[float], i: int, act_gpu_layers: int) -> int:
    """The device of offloaded layer ``i`` (0 = the first offloaded): std::upper_bound(splits, float(i) / act)."""
    return bisect.bisect_right(splits, _f32(_f32(float(i)) / _f32(float(act_gpu_layers))))


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
                  label: str = "", cpu_amx: bool = False, devices: Sequence[str] = (),
                  tensor_split: Sequence[float] = ()) -> Placement:
    """Where llama.cpp puts each tensor (and the tied output head's extra copy). ``cpu_amx``: the CPU backend
    offers its AMX buffer type (memory.AMX_BLOCK_EXTRA), which resizes CPU-resident matmul weights."""
    label = label or m.role
    layers, out_dev = layer_devices(m.n_layer, n_gpu_layers, devices, tensor_split)
    full_layers = [i for i, s in enumerate(m.layer_kinds()) if not s]
    p = Placement()
    align = _Align()
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


class _Align(dict):
    """Tensor alignment per device: the CPU's, or a GPU's (every device that is not the CPU)."""

    def __missing__(self, dev: str) -> int:
        return memory.TENSOR_ALIGN if dev == CPU else memory.GPU_TENSOR_ALIGN


# --- the projector's compute graph (clip gemma4v / gemma4uv) -----------------------------------------------------

def _vit_compute(w: int, ffn: int, heads: int, patch: int, pool: int, image_tokens: int, flash_attn: bool) -> int:
    """gemma4v: a ViT over image_tokens * pool^2 patches: the FFN or attention peak (f32 activations)."""
    n = image_tokens * pool * pool
    side = int(round(n ** 0.5)) * patch
    raw = 3 * side * side * memory.F32
    act = memory.F32 * w * n
    ffn_peak = 3 * act + 3 * memory.F32 * ffn * n
    attn_peak = 5 * act + (0 if flash_attn else memory.F32 * n * n * heads)
    return max(raw + 2 * act, ffn_peak, attn_peak)


def _embedder_compute(w: int, patch: int, pool: int, image_tokens: int, text: int) -> int:
    """gemma4uv (the 12B's embedder, models/gemma4uv.cpp): the image, and one row of (patch * pool)^2 * 3 pixels per
    soft token (im2col), then Dense, norms and the text projection (small beside them)."""
    px = 3 * (patch * pool) ** 2
    side = int(round(image_tokens ** 0.5)) * patch * pool
    raw = 3 * side * side * memory.F32
    return max(raw + memory.F32 * px * image_tokens, memory.F32 * image_tokens * (3 * w + text))


AUDIO_WARMUP_FRAMES = 3000  # clip-model.h warmup_audio_size: libmtmd sizes the audio graph for this many frames


def _conformer_compute(m: ModelFile, frames: int) -> int:
    """gemma4a (E2B/E4B's conformer): the peak is its subsampling -- the first 3x3 stride-2 convolution's output
    next to the second's f16 im2col (models/gemma4a.cpp), measured 1.2% under libmtmd's."""
    n_mel = int(m.meta.get(Keys.ClipAudio.NUM_MEL_BINS, AUDIO_DEFAULTS["input_feat_size"]))
    conv0 = m.tensor("a.conv1d.0.weight")
    c0 = conv0.shape[-1] if conv0 else AUDIO_DEFAULTS["subsampling_conv_channels"][0]
    h1, w1 = subsampled(frames), subsampled(n_mel)
    h2, w2 = subsampled(h1), subsampled(w1)
    return memory.F32 * frames * n_mel + memory.F32 * c0 * h1 * w1 + 2 * h2 * w2 * c0 * 9


def _frame_embedder_compute(m: ModelFile, frames: int) -> int:
    """gemma4ua (the 12B's audio embedder): raw frames (in, transposed, normed) and the projected rows (twice)."""
    a = int(m.meta.get(Keys.ClipAudio.EMBEDDING_LENGTH, UNIFIED_FRAME))
    t = int(m.meta.get(Keys.ClipAudio.PROJECTION_DIM, 0))
    return 3 * memory.F32 * frames * a + 2 * memory.F32 * frames * t


AUDIO_COMPUTE = {AUDIO.projector_type: _conformer_compute, UNIFIED_AUDIO.projector_type: _frame_embedder_compute}


def projector_compute(m: ModelFile, image_tokens: int, flash_attn: bool) -> int:
    """The projector's graphs, each sized as libmtmd sizes it: the largest image (by projector type: gemma4v's ViT,
    gemma4uv's embedder), plus the audio part's own context at libmtmd's warm-up length (an audio clip longer than
    that grows it)."""
    V = Keys.ClipVision
    w = int(m.meta.get(V.EMBEDDING_LENGTH, 0))
    patch = int(m.meta.get(V.PATCH_SIZE, 16))
    pool = int(m.meta.get(V.Projector.SCALE_FACTOR, 3) or 3)
    if m.meta.get(V.PROJECTOR_TYPE) == UNIFIED_VISION.projector_type:
        image = _embedder_compute(w, patch, pool, image_tokens, int(m.meta.get(V.PROJECTION_DIM, w)))
    else:
        image = _vit_compute(w, int(m.meta.get(V.FEED_FORWARD_LENGTH, 0)), int(m.meta.get(V.Attention.HEAD_COUNT, 1)),
                             patch, pool, image_tokens, flash_attn)
    audio = AUDIO_COMPUTE.get(m.meta.get(Keys.ClipAudio.PROJECTOR_TYPE))
    return image + (audio(m, AUDIO_WARMUP_FRAMES) if audio else 0)


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
    gpus: list[str] = field(default_factory=lambda: [GPU])  # the GPU devices in split order
    layers: dict[str, int] = field(default_factory=dict)  # target layers per device (the output layer counts one)

    def add(self, device: str, component: str, n: int) -> None:
        if n:
            self.items[(device, component)] = self.items.get((device, component), 0) + n

    def on(self, device: str) -> int:
        return sum(v for (d, _), v in self.items.items() if d == device)

    def rows(self) -> list[tuple[str, str, int]]:
        order = {d: i for i, d in enumerate(self.gpus)}
        return sorted(((d, c, v) for (d, c), v in self.items.items()), key=lambda r: (order.get(r[0], len(order)), -r[2]))

    def on_gpus(self) -> int:
        return sum(self.on(d) for d in self.gpus)


def k_max(s: RuntimeSettings) -> int:
    return s.draft_max if s.draft_max is not None else s.draft_cap


def context_shapes(s: RuntimeSettings, drafter: bool) -> dict[str, dict[str, int]]:
    """llama_context_params as gguf-mtp's engine sets them (runtime/engine.py ``_context_params``): both contexts
    hold ``n_parallel`` sequences, in one unified KV pool when there are several; the target's n_batch takes one
    verify batch of every sequence (n_parallel x (k + 1) rows), outputs default to n_batch; the drafter's context
    decodes the k + 1 draft rows of one sequence or one row per sequence, whichever is more."""
    k, n = k_max(s), s.n_parallel

    def shape(n_batch: int, n_ubatch: int) -> dict[str, int]:
        return {"n_ctx": s.n_ctx, "n_batch": n_batch, "n_ubatch": n_ubatch, "n_outputs_max": 0, "n_seq_max": n,
                "kv_unified": n > 1}

    n_batch = max(s.n_batch, n * (k + 1))
    shapes = {"target": shape(n_batch, min(s.n_ubatch, n_batch))}
    if drafter:
        shapes["drafter"] = shape(max(k + 1, n), max(k + 1, n))
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
    ts_ = shapes["target"]
    ub_eff = min(ts_["n_ubatch"], ts_["n_batch"], s.n_ctx)
    cells = memory.kv_cells(s.n_ctx, ub_eff, t.n_swa, ts_["n_seq_max"], ts_["kv_unified"], s.swa_full)
    b.cells = cells

    # weights
    devs, ts = s.devices, s.tensor_split
    b.gpus = list(devs) or [GPU]
    side = s.output_device or GPU  # the drafter's and the projector's device
    tp = place_weights(t, s.n_gpu_layers, s.effective_overrides(), "target", cpu_amx, devs, ts)
    for (dev, comp), n in tp.bytes.items():
        b.add(dev, comp, n)
    if d is not None:
        dd = s.drafter_device or side
        dp = place_weights(d, -1 if s.drafter_on_gpu else 0, [], "drafter", cpu_amx, [dd] if devs else ())
        for (dev, comp), n in dp.bytes.items():
            b.add(dev, comp, n)
    if mm is not None:
        b.add(side if s.mmproj_on_gpu else CPU, "projector weights", mm.weight_bytes)

    # KV cache: each owning layer on its layer's device
    layers, out_dev = layer_devices(t.n_layer, s.n_gpu_layers, devs, ts)
    for dev in [*layers, out_dev]:
        if dev != CPU:
            b.layers[dev] = b.layers.get(dev, 0) + 1
    attn = t.attn_layers()
    for dev, layer, n in zip(layers, attn, memory.kv_bytes(attn, cells, s.cache_type_k, s.cache_type_v, fa)):
        b.add(dev, "KV cache (sliding layers)" if layer.sliding else "KV cache (full layers)", n)

    # compute buffers: one per device holding layers; the logits only on the output layer's
    tg = t.graph()
    shape = memory.graph_shape(s.n_ctx, ts_["n_batch"], ts_["n_ubatch"], ts_["n_outputs_max"], cells, fa, ts_["n_seq_max"])
    graph_bytes = memory.compute_buffer_bytes(tg, shape, quantized_kv=_quantized(s))
    gpu_devs = [g for g in b.gpus if g in layers or g == out_dev]
    all_gpu = CPU not in layers and not any(dev == CPU for (dev, c) in tp.bytes if "offloaded" in c)
    if gpu_devs:
        if len(gpu_devs) == 1:
            b.add(gpu_devs[0], "target compute buffer", graph_bytes)
        else:
            inner = memory.compute_buffer_bytes(tg, shape, _quantized(s), output=False)
            # pipeline parallelism (llama_context: several devices, all layers offloaded, no tensor overrides)
            # keeps GGML_SCHED_MAX_COPIES copies of each device's graph inputs
            pipe = all_gpu and out_dev != CPU and not s.effective_overrides()
            extra = (memory.SCHED_MAX_COPIES - 1) * memory.graph_input_bytes(tg, shape) if pipe else 0
            for g in gpu_devs:
                b.add(g, "target compute buffer", (graph_bytes if g == out_dev else inner) + extra)
        # the CPU's first layers without the logits when the output layer is on another device (measured over RPC
        # devices, tests/test_rpc.py); one GPU with a partial offload keeps the whole graph's size (not measured yet)
        cpu_graph = inner if len(gpu_devs) > 1 and out_dev != CPU else graph_bytes
        b.add(CPU, "target compute buffer (host)", memory.host_compute_bytes(tg, shape) if all_gpu else cpu_graph)
        # op offload copies CPU weights to the GPU for big batches (not to an rpc-server: RPC has no offload_op)
        if not all_gpu and shape.n_tokens >= 32 and not gpu_devs[0].startswith("RPC"):
            b.add(gpu_devs[0], "target compute buffer", tp.largest_cpu_layer_tensor)
    else:
        b.add(CPU, "target compute buffer", graph_bytes)
    b.add(CPU, "target output buffer (host)", memory.output_buffer_bytes(
        t.n_vocab, ts_["n_batch"] if not ts_["n_outputs_max"] else ts_["n_outputs_max"],
        t.n_embd if d is not None else 0, ts_["n_batch"], nextn_unmasked=True))
    if d is not None:
        dsh = shapes["drafter"]
        dg = TextGraph(d.n_embd, d.n_vocab, d.attn_layers(), tuple(d._per_layer(Keys.LLM.FEED_FORWARD_LENGTH)), 0, None,
                       t.n_embd)
        dshape = memory.graph_shape(s.n_ctx, dsh["n_batch"], dsh["n_ubatch"], dsh["n_outputs_max"], cells, fa, dsh["n_seq_max"])
        dbytes = memory.compute_buffer_bytes(dg, dshape, quantized_kv=_quantized(s))
        b.add((s.drafter_device or side) if s.drafter_on_gpu else CPU, "drafter compute buffer", dbytes)
        b.add(CPU, "drafter output buffer (host)", memory.output_buffer_bytes(d.n_vocab, dshape.n_outputs, t.n_embd))
    if mm is not None:
        b.add(side if s.mmproj_on_gpu else CPU, "projector compute buffer", projector_compute(mm, image_tokens, fa))
    return b


FLOAT_KV = ("f16", "f32", "bf16")  # cache types llama.cpp runs without flash attention


def quantized_kv(kv: str) -> bool:
    """A quantized cache type: llama.cpp needs flash attention for it (a quantized V cache) and sizes the graph so."""
    return kv not in FLOAT_KV


def _quantized(s: RuntimeSettings) -> bool:
    return quantized_kv(s.cache_type_k) or quantized_kv(s.cache_type_v)


# --- a file set from GGUFs --------------------------------------------------------------------------------------

def files_from_paths(target: str | Path, drafter: str | Path | None = None, mmproj: str | Path | None = None) -> Files:
    return Files(ModelFile.from_gguf(target, "target"),
                 ModelFile.from_gguf(drafter, "drafter") if drafter else None,
                 ModelFile.from_gguf(mmproj, "mmproj") if mmproj else None)


__all__ = [
    "Breakdown", "CPU", "Files", "GPU", "IMAGE_MAX_TOKENS", "ModelFile", "Placement", "breakdown", "context_shapes",
    "files_from_paths", "layer_devices", "place_weights", "projector_compute", "split_device", "split_points",
    "tensor_slot",
]
