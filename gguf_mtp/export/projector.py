"""Export the vision tower of a multimodal Gemma 4 checkpoint as llama.cpp's projector file (``clip``, gemma4v).

``convert_projector(src, out)`` writes what ``convert_hf_to_gguf.py --mmproj`` writes for
Gemma4ForConditionalGeneration (conversion/gemma.py, Gemma4VisionAudioModel), read by tools/mtmd/clip.cpp and
models/gemma4v.cpp: the encoder (``v.*``), the standardization (``v.std_*``) and the projection into the text
model (``mm.input_projection``). The text model stays in the target GGUF; the audio tower is not exported yet
(left out with a note; a checkpoint with only an audio tower is refused).

Built on the text exporter's pieces: SafetensorsReader (headers checked, data streamed), Metadata, TensorPlan and
write_gguf (atomic, block-streamed). Names and shapes are one table below; differences from upstream are listed
in docs/export.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as Q

from .. import keys, pairing
from ..keys import Keys
from ..errors import GgufMtpError, IncompatiblePair
from ..fsutil import check_output_path
from . import ConvertResult, OUTTYPE_CHOICES, target_facts
from . import metadata as md
from .hparams import _Cfg
from .safetensors import SafetensorsReader
from .source import Source, locate
from .tables import FILE_TYPES
from .tensors import Expected, checked_entry, checkpoint_outtype, count_leftovers
from .writer import ProgressFn, TensorPlan, from_checkpoint, size_label, write_gguf

__all__ = ["VisionHparams", "convert_projector", "describe_projector", "vision_hparams"]

PROJECTOR_TYPE = "gemma4v"
VISION = "model.vision_tower."
EMBED = "model.embed_vision."
AUDIO_PREFIXES = ("model.audio_tower.", "model.embed_audio.")
AUDIO_NOT_SUPPORTED = "audio tower not supported yet"
IMAGE_SIZE = 224  # a placeholder: gemma4v is variable-resolution; clip.cpp requires the key (upstream writes 224)

# Gemma4VisionConfig's defaults (transformers 5.23.0)
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 16,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "head_dim": 64,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "rope_parameters": None,
    "pooling_kernel_size": 3,
    "patch_size": 16,
    "position_embedding_size": 10 * 1024,
    "use_clipped_linears": False,
    "standardize": False,
}
# Gemma4ImageProcessor's defaults, for a checkpoint without processor_config.json / preprocessor_config.json
IMAGE_DEFAULTS: dict[str, Any] = {"image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0], "do_normalize": False,
                                  "do_rescale": True, "rescale_factor": 1 / 255}
# What llama.cpp's gemma4v graph hard-codes; a config that differs cannot run there.
LLAMA_CPP_FIXED = {"rope_theta": 100.0, "attention_bias": False}
# hidden_activation -> the clip.cpp flag that selects it. Upstream writes none, so clip.cpp falls back to
# gelu_quick (x * sigmoid(1.702 x)): tiny-e's image embeddings then miss transformers' by 1.0%, 0.1% with the flag.
ACTIVATION_KEYS = {"gelu_pytorch_tanh": Keys.ClipVision.USE_GELU}
DEFAULT_MERGE = 3  # clip.cpp's gemma4v n_merge when clip.vision.projector.scale_factor is absent
CLAMPS = ("input_min", "input_max", "output_min", "output_max")


@dataclass(frozen=True)
class Row:
    hf: str  # under ``model.``; ``{bid}`` = encoder layer
    gguf: str
    shape: tuple[str, ...]  # HF shape as dimension names (``()``: a 0-d scalar, written as {1})
    when: tuple[str, ...] = ()
    transform: str | None = None  # a key of TRANSFORMS
    optional: bool = False  # written when the checkpoint has it (transformers 5.23.0 has no such module)


def _clippable(hf: str, gguf: str, shape: tuple[str, ...]) -> tuple[Row, ...]:
    """Gemma4ClippableLinear: the weight, plus four 0-d clamp bounds when use_clipped_linears."""
    return (Row(f"{hf}.linear.weight", f"{gguf}.weight", shape),
            *(Row(f"{hf}.{c}", f"{gguf}.{c}", (), ("clipped",)) for c in CLAMPS))


# --- the vision tower, HF -> GGUF (names: gguf-py MODEL_ARCH.MMPROJ, as clip.cpp loads them) ------------------
GLOBAL = (
    Row("vision_tower.patch_embedder.input_proj.weight", "v.patch_embd.weight", ("E", "P3"), transform="patch"),
    Row("vision_tower.patch_embedder.position_embedding_table", "v.position_embd.weight", ("2", "S", "E")),
    Row("vision_tower.std_bias", "v.std_bias", ("E",), ("standardize",)),
    Row("vision_tower.std_scale", "v.std_scale", ("E",), ("standardize",)),
    Row("embed_vision.embedding_projection.weight", "mm.input_projection.weight", ("T", "E")),
)
_L, _B = "vision_tower.encoder.layers.{bid}.", "v.blk.{bid}."
LAYER = (
    Row(_L + "input_layernorm.weight", _B + "ln1.weight", ("E",)),
    *_clippable(_L + "self_attn.q_proj", _B + "attn_q", ("q", "E")),
    *_clippable(_L + "self_attn.k_proj", _B + "attn_k", ("kv", "E")),
    *_clippable(_L + "self_attn.v_proj", _B + "attn_v", ("kv", "E")),
    *_clippable(_L + "self_attn.o_proj", _B + "attn_out", ("E", "q")),
    Row(_L + "self_attn.q_norm.weight", _B + "attn_q_norm.weight", ("hd",)),
    Row(_L + "self_attn.k_norm.weight", _B + "attn_k_norm.weight", ("hd",)),
    Row(_L + "post_attention_layernorm.weight", _B + "attn_post_norm.weight", ("E",)),
    Row(_L + "pre_feedforward_layernorm.weight", _B + "ln2.weight", ("E",)),
    *_clippable(_L + "mlp.gate_proj", _B + "ffn_gate", ("F", "E")),
    *_clippable(_L + "mlp.up_proj", _B + "ffn_up", ("F", "E")),
    *_clippable(_L + "mlp.down_proj", _B + "ffn_down", ("E", "F")),
    Row(_L + "post_feedforward_layernorm.weight", _B + "ffn_post_norm.weight", ("E",)),
    # a per-layer output scale some Gemma 4 vision checkpoints carry; clip.cpp applies it (upstream maps it too)
    Row(_L + "layer_scalar", _B + "out_scale.weight", ("1",), optional=True),
)


def _patch_shape(shape: tuple[int, ...], p: int) -> tuple[int, ...]:
    return (shape[0], 3, p, p)


def _patch_rows(rows: np.ndarray, p: int) -> np.ndarray:
    """input_proj rows are (row, col, channel) pixels; ggml's conv_2d kernel wants (channel, row, col)."""
    return rows.reshape(-1, p, p, 3).transpose(0, 3, 1, 2).reshape(rows.shape[0], -1)


# transform name -> (output shape from the HF shape, per-block function); both get the patch size
TRANSFORMS = {"patch": (_patch_shape, _patch_rows)}

# --- tensor types (upstream's rules for this projector) ------------------------------------------------------
ALWAYS_F32 = ("v.position_embd.weight",)  # Gemma4VisionAudioModel.tensor_force_quant
PATCH_EMBD = "v.patch_embd.weight"  # MmprojModel.tensor_force_quant: F16 in an f16 file, else F32


def tensor_type(gguf_name: str, n_dims: int, row: int, outtype: Q) -> Q:
    if gguf_name in ALWAYS_F32 or n_dims <= 1 or gguf_name.endswith("_norm.weight"):
        return Q.F32
    if not gguf_name.endswith(".weight"):
        return Q.F32
    if gguf_name == PATCH_EMBD:
        return Q.F16 if outtype == Q.F16 else Q.F32
    if outtype == Q.Q8_0 and row % 32:
        return Q.F16
    return outtype


# --- hyper-parameters --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VisionHparams:
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    eps: float
    patch_size: int
    pooling: int
    n_pos: int  # position_embedding_size
    clipped: bool
    standardize: bool
    activation: str
    text_hidden: int  # projection_dim: the text model's hidden size
    image_mean: list[float]
    image_std: list[float]

    def dims(self) -> dict[str, int]:
        return {"E": self.n_embd, "F": self.n_ff, "q": self.n_head * self.head_dim,
                "kv": self.n_head_kv * self.head_dim, "hd": self.head_dim, "S": self.n_pos, "T": self.text_hidden,
                "P3": 3 * self.patch_size ** 2, "2": 2, "1": 1}

    def conditions(self) -> set[str]:
        return {c for c, on in (("clipped", self.clipped), ("standardize", self.standardize)) if on}


def _image_config(path: Path) -> dict[str, Any]:
    """Preprocessing facts: preprocessor_config.json, then processor_config.json's image_processor (upstream's
    order: the latter wins), over Gemma4ImageProcessor's defaults."""
    merged = dict(IMAGE_DEFAULTS)
    for name in ("preprocessor_config.json", "processor_config.json"):
        f = path / name
        if not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise GgufMtpError(f"{f}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise GgufMtpError(f"{f}: expected a JSON object")
        sub = cfg.get("image_processor")
        flat = {**cfg, **(sub if isinstance(sub, dict) else {})}  # processor_config nests the image processor
        merged.update({k: v for k, v in flat.items() if k in IMAGE_DEFAULTS})
    return merged


def _mean_std(img: dict[str, Any], where: str) -> tuple[list[float], list[float]]:
    """llama.cpp always scales pixels by 1/255, then normalizes with mean/std; transformers normalizes only
    with do_normalize, so without it the file says mean 0, std 1 (what the model saw in training)."""
    if img.get("do_rescale") is not True or abs(float(img.get("rescale_factor") or 0) * 255 - 1) > 1e-6:
        raise GgufMtpError(f"{where}: expected do_rescale with rescale_factor 1/255 (llama.cpp's fixed pixel scale), "
                           f"got do_rescale={img.get('do_rescale')!r}, rescale_factor={img.get('rescale_factor')!r}")
    if not img.get("do_normalize"):
        return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    out = []
    for key in ("image_mean", "image_std"):
        v = img[key]
        if isinstance(v, int | float) and not isinstance(v, bool):
            v = [v] * 3
        if not isinstance(v, list) or len(v) != 3 or not all(isinstance(x, int | float) for x in v):
            raise GgufMtpError(f"{where}: {key}: expected 3 numbers, got {v!r}")
        out.append([float(x) for x in v])
    return out[0], out[1]


def vision_hparams(s: Source) -> VisionHparams:
    """The vision tower's hyper-parameters from config.json (+ the image processor's), checked for llama.cpp."""
    where = str(s.path / "config.json")
    if s.kind.name != "target-multimodal":
        what = "an MTP drafter" if s.role == "drafter" else f"a text-only Gemma 4 checkpoint ({s.architecture})"
        raise GgufMtpError(f"{s.path}: --mmproj needs a multimodal Gemma 4 checkpoint "
                           f"(Gemma4ForConditionalGeneration); this is {what}, with no vision tower")
    raw = s.config.get("vision_config")
    if not isinstance(raw, dict):
        if isinstance(s.config.get("audio_config"), dict):
            raise GgufMtpError(f"{where}: {AUDIO_NOT_SUPPORTED} (this checkpoint has an audio tower and no vision "
                               "tower, so --mmproj has nothing to write)")
        raise GgufMtpError(f"{where}: no vision tower (vision_config is null), so --mmproj has nothing to write")
    c = _Cfg(raw, VISION_DEFAULTS, f"{where}: vision_config")
    rope = c.get("rope_parameters") or {}
    theta = rope.get("rope_theta", LLAMA_CPP_FIXED["rope_theta"]) if isinstance(rope, dict) else None
    got = {"rope_theta": theta, "attention_bias": c.get("attention_bias")}
    for key, want in LLAMA_CPP_FIXED.items():
        if got[key] != want:
            raise c.fail(f"{key}: llama.cpp's gemma4v projector runs only {want!r}, got {got[key]!r}")
    act = c.get("hidden_activation")
    if act not in ACTIVATION_KEYS:
        raise c.fail(f"hidden_activation: llama.cpp's gemma4v projector runs only {', '.join(ACTIVATION_KEYS)}, "
                     f"got {act!r}")
    text = s.text_config
    hidden = text.get("hidden_size")
    if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden <= 0:
        raise GgufMtpError(f"{where}: text_config.hidden_size: expected a positive integer, got {hidden!r}")
    n_head, n_head_kv = c.int("num_attention_heads", 1), c.int("num_key_value_heads", 1)
    if n_head % n_head_kv:
        raise c.fail(f"num_attention_heads ({n_head}) is not a multiple of num_key_value_heads ({n_head_kv})")
    mean, std = _mean_std(_image_config(s.path), str(s.path / "processor_config.json"))
    return VisionHparams(
        n_embd=c.int("hidden_size", 1), n_ff=c.int("intermediate_size", 1), n_layer=c.int("num_hidden_layers", 1),
        n_head=n_head, n_head_kv=n_head_kv, head_dim=c.int("head_dim", 1), eps=c.float("rms_norm_eps"),
        patch_size=c.int("patch_size", 1), pooling=c.int("pooling_kernel_size", 1),
        n_pos=c.int("position_embedding_size", 1), clipped=c.bool("use_clipped_linears"),
        standardize=c.bool("standardize"), activation=act, text_hidden=hidden, image_mean=mean, image_std=std,
    )


# --- metadata ----------------------------------------------------------------------------------------------------
def projector_keys(hp: VisionHparams) -> md.Metadata:
    """clip.* keys as clip.cpp reads them; the optional ones only when the config leaves clip.cpp's defaults."""
    m = md.Metadata()
    V = Keys.ClipVision
    m.bool(Keys.Clip.HAS_VISION_ENCODER, True)
    m.bool(ACTIVATION_KEYS[hp.activation], True)
    m.u32(V.PROJECTION_DIM, hp.text_hidden)
    m.u32(V.IMAGE_SIZE, IMAGE_SIZE)
    m.u32(V.PATCH_SIZE, hp.patch_size)
    m.u32(V.EMBEDDING_LENGTH, hp.n_embd)
    m.u32(V.FEED_FORWARD_LENGTH, hp.n_ff)
    m.u32(V.BLOCK_COUNT, hp.n_layer)
    m.u32(V.Attention.HEAD_COUNT, hp.n_head)
    if hp.n_head_kv != hp.n_head:
        m.u32(keys.CLIP_VISION_HEAD_COUNT_KV, hp.n_head_kv)
    if hp.head_dim * hp.n_head != hp.n_embd:  # clip.cpp derives hidden / heads otherwise
        m.u32(keys.CLIP_VISION_HEAD_DIM, hp.head_dim)
    m.array(V.IMAGE_MEAN, hp.image_mean)
    m.array(V.IMAGE_STD, hp.image_std)
    m.string(V.PROJECTOR_TYPE, PROJECTOR_TYPE)
    m.f32(V.Attention.LAYERNORM_EPS, hp.eps)
    if hp.pooling != DEFAULT_MERGE:
        m.u32(V.Projector.SCALE_FACTOR, hp.pooling)
    return m


@dataclass
class DescribedProjector:
    source: Source
    vision: VisionHparams
    metadata: md.Metadata

    def facts(self) -> pairing.ModelFacts:
        return pairing.facts_from_metadata(self.metadata.plain(), None)


def projector_file_keys(hp: VisionHparams, name: str, source: str, revision: str | None) -> md.Metadata:
    """Every key of a projector file, in the order written (file type F32 until the tensors are known)."""
    meta = md.general_keys(keys.ARCH_PROJECTOR, name, FILE_TYPES[Q.F32])
    meta.string(Keys.General.TYPE, "mmproj")
    meta.update(projector_keys(hp))
    meta.update(md.provenance_keys(source, revision, "projector"))
    return meta


def describe_projector(src: str | os.PathLike | Source) -> DescribedProjector:
    """The metadata a projector export of SRC would carry."""
    s = src if isinstance(src, Source) else locate(src)
    hp = vision_hparams(s)
    return DescribedProjector(s, hp, projector_file_keys(hp, s.source.rsplit("/", 1)[-1], s.source, s.revision))


# --- tensors -----------------------------------------------------------------------------------------------------
def expected_projector_tensors(hp: VisionHparams, outtype: Q) -> list[Expected]:
    """Every tensor of a projector file, in the order written, from the vision config alone (optional rows
    included: a checkpoint may lack them, see ``plan_projector``). What a conversion writes, and what skeletons
    and parameter counts are made of."""
    dims, conds, out = hp.dims(), hp.conditions(), []
    rows = [(row, None) for row in GLOBAL] + [(row, bid) for bid in range(hp.n_layer) for row in LAYER]
    for row, bid in rows:
        if not set(row.when) <= conds:
            continue
        shape = tuple(dims[d] for d in row.shape) or (1,)  # 0-d clamp scalars are written as {1}
        if row.transform:
            shape = TRANSFORMS[row.transform][0](shape, hp.patch_size)
        name = row.gguf.format(bid=bid) if bid is not None else row.gguf
        hf = "model." + (row.hf.format(bid=bid) if bid is not None else row.hf)
        out.append(Expected(name, shape, tensor_type(name, len(shape), shape[-1], outtype), row, hf, dims))
    return out


def plan_projector(reader: SafetensorsReader, hp: VisionHparams, outtype: Q) -> tuple[list[TensorPlan], dict[str, int]]:
    """Every tensor the vision config implies, checked against the checkpoint; the rest accounted for."""
    plans, used = [], set()
    for e in expected_projector_tensors(hp, outtype):
        if e.row.optional and e.hf not in reader:
            continue
        checked_entry(reader, e.row, e.hf, e.dims, "vision_config")
        fn = None
        if e.row.transform:
            block_fn, p = TRANSFORMS[e.row.transform][1], hp.patch_size
            fn = lambda rows, block_fn=block_fn: block_fn(rows, p)  # noqa: E731
        plans.append(TensorPlan(e.name, e.shape, e.type, from_checkpoint(reader, e.hf, e.type, transform=fn), e.hf))
        used.add(e.hf)
    return plans, _leftovers(reader, used)


def _leftovers(reader: SafetensorsReader, used: set[str]) -> dict[str, int]:
    """Tensors not written: the text model (the target file's) and the audio tower are counted; an unknown
    vision tensor is an error (it would change what the tower computes)."""
    def reason(name: str) -> str | None:
        if name.startswith((VISION, EMBED)):
            return None
        return AUDIO_NOT_SUPPORTED if name.startswith(AUDIO_PREFIXES) else "the text model (the target GGUF holds it)"

    return count_leftovers(reader, used, reason, "a Gemma 4 vision tower as vision_config describes it")


def convert_projector(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    outtype: str = "auto",
    target: str | os.PathLike | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> ConvertResult:
    """Write SRC's vision projector to ``out`` (``convert SRC --mmproj``); nothing is written unless every check
    passes. ``target`` (a GGUF or HF target): check that the projector's output size is its hidden size."""
    check_output_path(out, force)
    if outtype not in OUTTYPE_CHOICES:
        raise GgufMtpError(f"--outtype: expected one of {', '.join(OUTTYPE_CHOICES)}, got {outtype!r}")
    described = describe_projector(src)
    s, hp = described.source, described.vision
    if target is not None:
        problems = pairing.check_set(target_facts(target), projector=described.facts())
        if problems:
            raise IncompatiblePair(f"{src} --mmproj does not pair with {target}: "
                                   + "; ".join(str(p) for p in problems))
    reader = SafetensorsReader.from_directory(s.path)
    try:
        qtype = checkpoint_outtype(outtype, reader, "model." + GLOBAL[0].hf)  # auto: the patch embedding's dtype
        tensors, ignored = plan_projector(reader, hp, qtype)
        meta = described.metadata
        meta.finish(FILE_TYPES[qtype], size_label(tensors))
        n_bytes = write_gguf(out, meta, tensors, force=force, progress=progress)
    finally:
        reader.close()
    traits = ["vision"] + sorted(hp.conditions())
    return ConvertResult(
        output=str(out), arch=keys.ARCH_PROJECTOR, role="projector", kind=s.kind.name, source=s.source,
        revision=s.revision, outtype=qtype.name, n_tensors=len(tensors), n_bytes=n_bytes, features=traits,
        ignored=ignored, paired_with=os.fspath(target) if target is not None else None,
    )
