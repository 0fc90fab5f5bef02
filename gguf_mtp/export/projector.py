"""Export the media parts of a multimodal Gemma 4 checkpoint as llama.cpp's projector file (``clip``).

``convert_projector(src, out)`` writes what ``convert_hf_to_gguf.py --mmproj`` writes (conversion/gemma.py), read by
tools/mtmd/clip.cpp: for Gemma4ForConditionalGeneration (E2B/E4B/26B/31B, Gemma4VisionAudioModel) the vision
encoder (gemma4v: ``v.*``, ``mm.input_projection``) and, where the checkpoint has one, the audio conformer
(gemma4a: ``a.*``, ``mm.a.*``, audio.py); for Gemma4UnifiedForConditionalGeneration (the 12B,
Gemma4UnifiedVisionAudioModel) the transformer-less embedders (gemma4uv, gemma4ua). ``audio=False`` (``--no-audio``)
leaves the audio part out. The text model stays in the target GGUF.

Built on the text exporter's pieces (SafetensorsReader, Metadata, write_gguf) and towers.py (rows, types,
transforms). Each part is a table; differences from upstream are listed in docs/export.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, ClassVar

from gguf import GGMLQuantizationType as Q

from .. import keys, pairing
from ..keys import Keys
from ..errors import GgufMtpError, IncompatiblePair
from ..fsutil import check_output_path
from . import ConvertResult, OUTTYPE_CHOICES, target_facts
from . import metadata as md
from .audio import AudioHparams, UnifiedAudioHparams, audio_hparams, unified_audio_hparams
from .hparams import _Cfg
from .safetensors import SafetensorsReader
from .source import Source, locate
from .tables import FILE_TYPES
from .tensors import Expected, checkpoint_outtype, count_leftovers
from .towers import PartHparams, Row, Tower, clippable, expected_part, plan_part, text_hidden
from .writer import ProgressFn, size_label, write_gguf

__all__ = ["ProjectorHparams", "UnifiedVisionHparams", "VisionHparams", "convert_projector", "describe_projector",
           "expected_projector_tensors", "projector_file_keys", "projector_hparams", "vision_hparams"]

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
# Gemma4UnifiedVisionConfig's defaults
UNIFIED_VISION_DEFAULTS: dict[str, Any] = {
    "patch_size": 16,
    "pooling_kernel_size": 3,
    "mm_embed_dim": 3840,
    "mm_posemb_size": 1120,
    "rms_norm_eps": 1e-6,
    "output_proj_dims": 3840,
}
# Gemma4ImageProcessor's (and Gemma4UnifiedImageProcessor's) defaults, for a checkpoint without
# processor_config.json / preprocessor_config.json
IMAGE_DEFAULTS: dict[str, Any] = {"image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0], "do_normalize": False,
                                  "do_rescale": True, "rescale_factor": 1 / 255}
# What llama.cpp's gemma4v graph hard-codes; a config that differs cannot run there.
LLAMA_CPP_FIXED = {"rope_theta": 100.0, "attention_bias": False}
# hidden_activation -> the clip.cpp flag that selects it. Upstream writes none, so clip.cpp falls back to
# gelu_quick (x * sigmoid(1.702 x)): tiny-e's image embeddings then miss transformers' by 1.0%, 0.1% with the flag.
ACTIVATION_KEYS = {"gelu_pytorch_tanh": Keys.ClipVision.USE_GELU}
DEFAULT_MERGE = 3  # clip.cpp's gemma4v / gemma4uv n_merge when clip.vision.projector.scale_factor is absent


# --- the vision tower, HF -> GGUF (names: gguf-py MODEL_ARCH.MMPROJ, as clip.cpp loads them) ------------------
GLOBAL = (
    Row("vision_tower.patch_embedder.input_proj.weight", "v.patch_embd.weight", ("E", "P3"), out=("E", "3", "p", "p"),
        transform="hwc_to_chw", force="patch"),
    Row("vision_tower.patch_embedder.position_embedding_table", "v.position_embd.weight", ("2", "S", "E"),
        force="f32"),
    Row("vision_tower.std_bias", "v.std_bias", ("E",), ("standardize",)),
    Row("vision_tower.std_scale", "v.std_scale", ("E",), ("standardize",)),
    Row("embed_vision.embedding_projection.weight", "mm.input_projection.weight", ("T", "E")),
)
_L, _B = "vision_tower.encoder.layers.{bid}.", "v.blk.{bid}."
LAYER = (
    Row(_L + "input_layernorm.weight", _B + "ln1.weight", ("E",)),
    *clippable(_L + "self_attn.q_proj", _B + "attn_q", ("q", "E")),
    *clippable(_L + "self_attn.k_proj", _B + "attn_k", ("kv", "E")),
    *clippable(_L + "self_attn.v_proj", _B + "attn_v", ("kv", "E")),
    *clippable(_L + "self_attn.o_proj", _B + "attn_out", ("E", "q")),
    Row(_L + "self_attn.q_norm.weight", _B + "attn_q_norm.weight", ("hd",)),
    Row(_L + "self_attn.k_norm.weight", _B + "attn_k_norm.weight", ("hd",)),
    Row(_L + "post_attention_layernorm.weight", _B + "attn_post_norm.weight", ("E",)),
    Row(_L + "pre_feedforward_layernorm.weight", _B + "ln2.weight", ("E",)),
    *clippable(_L + "mlp.gate_proj", _B + "ffn_gate", ("F", "E")),
    *clippable(_L + "mlp.up_proj", _B + "ffn_up", ("F", "E")),
    *clippable(_L + "mlp.down_proj", _B + "ffn_down", ("E", "F")),
    Row(_L + "post_feedforward_layernorm.weight", _B + "ffn_post_norm.weight", ("E",)),
    # a per-layer output scale some Gemma 4 vision checkpoints carry; clip.cpp applies it (upstream maps it too)
    Row(_L + "layer_scalar", _B + "out_scale.weight", ("1",), optional=True),
)
VISION = Tower("vision", "gemma4v", GLOBAL, LAYER, ("model.vision_tower.", "model.embed_vision."))

# --- the 12B's vision embedder: LN -> Dense -> LN on merged pixel patches, + 2-D positions -> LN -> RMS -> Linear ----
# clip.cpp's im2col hands the patch over channel-first, so the per-pixel weights are permuted (Gemma4Unified-
# VisionAudioModel); the position table goes axis-first; pos_norm is the third patch norm (gemma4uv.cpp).
_U = "vision_embedder."
UNIFIED_GLOBAL = (
    Row(_U + "patch_ln1.weight", "v.patch_norm.1.weight", ("P3",), transform="hwc_to_chw"),
    Row(_U + "patch_ln1.bias", "v.patch_norm.1.bias", ("P3",), transform="hwc_to_chw"),
    Row(_U + "patch_dense.weight", "v.patch_embd.weight", ("E", "P3"), transform="hwc_to_chw", force="patch"),
    Row(_U + "patch_dense.bias", "v.patch_embd.bias", ("E",)),
    Row(_U + "patch_ln2.weight", "v.patch_norm.2.weight", ("E",)),
    Row(_U + "patch_ln2.bias", "v.patch_norm.2.bias", ("E",)),
    Row(_U + "pos_embedding", "v.position_embd.weight", ("S", "2", "E"), out=("2", "S", "E"), transform="axes_first",
        force="f32"),
    Row(_U + "pos_norm.weight", "v.patch_norm.3.weight", ("E",)),
    Row(_U + "pos_norm.bias", "v.patch_norm.3.bias", ("E",)),
    Row("embed_vision.embedding_projection.weight", "mm.input_projection.weight", ("T", "E")),
)
UNIFIED_VISION = Tower("vision", "gemma4uv", UNIFIED_GLOBAL, (), ("model.vision_embedder.", "model.embed_vision."))


# --- hyper-parameters --------------------------------------------------------------------------------------------
def _vision_basics(hp: VisionHparams | UnifiedVisionHparams, n_ff: int, n_layer: int, n_head: int) -> md.Metadata:
    """The keys MmprojModel writes for every vision encoder, in its order."""
    m, V = md.Metadata(), Keys.ClipVision
    m.bool(Keys.Clip.HAS_VISION_ENCODER, True)
    m.u32(V.PROJECTION_DIM, hp.text_hidden)
    m.u32(V.IMAGE_SIZE, IMAGE_SIZE)
    m.u32(V.PATCH_SIZE, hp.patch_size)
    m.u32(V.EMBEDDING_LENGTH, hp.n_embd)
    m.u32(V.FEED_FORWARD_LENGTH, n_ff)
    m.u32(V.BLOCK_COUNT, n_layer)
    m.u32(V.Attention.HEAD_COUNT, n_head)
    return m


def _vision_tail(m: md.Metadata, hp: VisionHparams | UnifiedVisionHparams) -> md.Metadata:
    """Preprocessing, projector type, eps and the merge: what follows the basics for both vision parts."""
    V = Keys.ClipVision
    m.array(V.IMAGE_MEAN, hp.image_mean)
    m.array(V.IMAGE_STD, hp.image_std)
    m.string(V.PROJECTOR_TYPE, hp.TOWER.projector_type)
    m.f32(V.Attention.LAYERNORM_EPS, hp.eps)
    if hp.pooling != DEFAULT_MERGE:  # upstream never writes it: clip.cpp would merge 3x3 whatever the config says
        m.u32(V.Projector.SCALE_FACTOR, hp.pooling)
    return m


@dataclass(frozen=True)
class VisionHparams:
    TOWER: ClassVar[Tower] = VISION
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

    @property
    def pixel_patch(self) -> int:
        return self.patch_size

    def dims(self) -> dict[str, int]:
        return {"E": self.n_embd, "F": self.n_ff, "q": self.n_head * self.head_dim,
                "kv": self.n_head_kv * self.head_dim, "hd": self.head_dim, "S": self.n_pos, "T": self.text_hidden,
                "P3": 3 * self.patch_size ** 2, "p": self.patch_size, "3": 3, "2": 2, "1": 1}

    def conditions(self) -> set[str]:
        return {c for c, on in (("clipped", self.clipped), ("standardize", self.standardize)) if on}

    def keys(self) -> md.Metadata:
        """clip.* keys as clip.cpp reads them; the optional ones only when the config leaves clip.cpp's defaults."""
        m = _vision_basics(self, self.n_ff, self.n_layer, self.n_head)
        m.bool(ACTIVATION_KEYS[self.activation], True)
        if self.n_head_kv != self.n_head:
            m.u32(keys.CLIP_VISION_HEAD_COUNT_KV, self.n_head_kv)
        if self.head_dim * self.n_head != self.n_embd:  # clip.cpp derives hidden / heads otherwise
            m.u32(keys.CLIP_VISION_HEAD_DIM, self.head_dim)
        return _vision_tail(m, self)


@dataclass(frozen=True)
class UnifiedVisionHparams:
    TOWER: ClassVar[Tower] = UNIFIED_VISION
    n_embd: int  # mm_embed_dim
    patch_size: int
    pooling: int
    n_pos: int  # mm_posemb_size: rows per axis of the position table
    eps: float  # the RMS norm before the projection
    text_hidden: int
    image_mean: list[float]
    image_std: list[float]
    n_layer: int = 0

    @property
    def pixel_patch(self) -> int:
        """Side of one soft token's pixel square: the pooling is folded into the patch (no merge step)."""
        return self.patch_size * self.pooling

    def dims(self) -> dict[str, int]:
        return {"E": self.n_embd, "P3": 3 * self.pixel_patch ** 2, "S": self.n_pos, "T": self.text_hidden, "2": 2}

    def conditions(self) -> set[str]:
        return set()

    def keys(self) -> md.Metadata:
        return _vision_tail(_vision_basics(self, 0, 0, 0), self)  # transformer-less: upstream writes 0s too


def _image_config(path) -> dict[str, Any]:
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


def _mean_std(s: Source) -> tuple[list[float], list[float]]:
    """llama.cpp always scales pixels by 1/255, then normalizes with mean/std; transformers normalizes only
    with do_normalize, so without it the file says mean 0, std 1 (what the model saw in training)."""
    img, where = _image_config(s.path), str(s.path / "processor_config.json")
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
    c = _Cfg(s.config["vision_config"], VISION_DEFAULTS, f"{s.path / 'config.json'}: vision_config")
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
    n_head, n_head_kv = c.int("num_attention_heads", 1), c.int("num_key_value_heads", 1)
    if n_head % n_head_kv:
        raise c.fail(f"num_attention_heads ({n_head}) is not a multiple of num_key_value_heads ({n_head_kv})")
    mean, std = _mean_std(s)
    return VisionHparams(
        n_embd=c.int("hidden_size", 1), n_ff=c.int("intermediate_size", 1), n_layer=c.int("num_hidden_layers", 1),
        n_head=n_head, n_head_kv=n_head_kv, head_dim=c.int("head_dim", 1), eps=c.float("rms_norm_eps"),
        patch_size=c.int("patch_size", 1), pooling=c.int("pooling_kernel_size", 1),
        n_pos=c.int("position_embedding_size", 1), clipped=c.bool("use_clipped_linears"),
        standardize=c.bool("standardize"), activation=act, text_hidden=text_hidden(s), image_mean=mean,
        image_std=std,
    )


def unified_vision_hparams(s: Source) -> UnifiedVisionHparams:
    """The 12B's vision embedder from config.json's vision_config (+ the image processor's)."""
    c = _Cfg(s.config["vision_config"], UNIFIED_VISION_DEFAULTS, f"{s.path / 'config.json'}: vision_config")
    width, out = c.int("mm_embed_dim", 1), c.int("output_proj_dims", 1)
    if out != width:  # the projection reads pos_norm's output: transformers and clip.cpp both need them equal
        raise c.fail(f"output_proj_dims ({out}) must equal mm_embed_dim ({width})")
    mean, std = _mean_std(s)
    return UnifiedVisionHparams(
        n_embd=width, patch_size=c.int("patch_size", 1), pooling=c.int("pooling_kernel_size", 1),
        n_pos=c.int("mm_posemb_size", 1), eps=c.float("rms_norm_eps"), text_hidden=text_hidden(s),
        image_mean=mean, image_std=std,
    )


# checkpoint kind -> how to read each part's hyper-parameters from its config section
PART_READERS = {
    "target-multimodal": {"vision": vision_hparams, "audio": audio_hparams},
    "target-unified": {"vision": unified_vision_hparams, "audio": unified_audio_hparams},
}
ALL_TOWERS = (VISION, UNIFIED_VISION, AudioHparams.TOWER, UnifiedAudioHparams.TOWER)
NO_AUDIO = "the audio part (--no-audio)"


@dataclass(frozen=True)
class ProjectorHparams:
    """A projector file's parts (either may be absent: no such tower in the checkpoint, or left out)."""

    vision: VisionHparams | UnifiedVisionHparams | None = None
    audio: AudioHparams | UnifiedAudioHparams | None = None

    def parts(self) -> list[PartHparams]:
        return [p for p in (self.vision, self.audio) if p is not None]


def projector_hparams(s: Source, audio: bool = True) -> ProjectorHparams:
    """The parts a projector export of ``s`` writes, each checked for llama.cpp (``audio``: keep the audio part)."""
    readers = PART_READERS.get(s.kind.name)
    if readers is None:
        what = "an MTP drafter" if s.role == "drafter" else f"a text-only Gemma 4 checkpoint ({s.architecture})"
        raise GgufMtpError(f"{s.path}: --mmproj needs a multimodal Gemma 4 checkpoint "
                           f"(Gemma4ForConditionalGeneration or Gemma4UnifiedForConditionalGeneration); this is "
                           f"{what}, with no vision or audio tower")
    present = {part: isinstance(s.config.get(f"{part}_config"), dict) for part in readers}
    where = s.path / "config.json"
    if not present["vision"]:
        # clip.cpp pairs a projector with its target through the vision keys; upstream's converter asserts a
        # vision config too
        has_audio = " (it has an audio tower, but an audio-only projector is not supported)" if present["audio"] else ""
        raise GgufMtpError(f"{where}: no vision tower (vision_config is null), so --mmproj has nothing to write"
                           + has_audio)
    parts = {part: read(s) for part, read in readers.items() if present[part] and (audio or part != "audio")}
    return ProjectorHparams(**parts)


# --- metadata ----------------------------------------------------------------------------------------------------
@dataclass
class DescribedProjector:
    source: Source
    hparams: ProjectorHparams
    metadata: md.Metadata

    def facts(self) -> pairing.ModelFacts:
        return pairing.facts_from_metadata(self.metadata.plain(), None)


def projector_file_keys(hp: ProjectorHparams, name: str, source: str, revision: str | None) -> md.Metadata:
    """Every key of a projector file, in the order written (file type F32 until the tensors are known)."""
    meta = md.general_keys(keys.ARCH_PROJECTOR, name, FILE_TYPES[Q.F32])
    meta.string(Keys.General.TYPE, "mmproj")
    for part in hp.parts():
        meta.update(part.keys())
    meta.update(md.provenance_keys(source, revision, "projector"))
    return meta


def describe_projector(src: str | os.PathLike | Source, audio: bool = True) -> DescribedProjector:
    """The metadata a projector export of SRC would carry."""
    s = src if isinstance(src, Source) else locate(src)
    hp = projector_hparams(s, audio)
    return DescribedProjector(s, hp, projector_file_keys(hp, s.source.rsplit("/", 1)[-1], s.source, s.revision))


# --- tensors -----------------------------------------------------------------------------------------------------
def expected_projector_tensors(hp: ProjectorHparams, outtype: Q) -> list[Expected]:
    """Every tensor of a projector file, in the order written (vision part, then audio part), from the
    hyper-parameters alone (optional rows included: a checkpoint may lack them). What a conversion writes, and what
    skeletons and parameter counts are made of; ``ProjectorHparams(audio=...)`` alone gives the audio part's."""
    return [e for part in hp.parts() for e in expected_part(part, outtype)]


def _leftover_reason(audio: bool):
    """Why a checkpoint tensor is not written: another file's (the text model), or the audio part left out
    (``audio`` off). Any other media tensor no written row names is an error (an audio tower without an
    audio_config, a stray tensor in a tower: it would change what the part computes)."""
    media = tuple(p for tower in ALL_TOWERS for p in tower.prefixes)
    left_out = tuple(p for tower in ALL_TOWERS if tower.part == "audio" for p in tower.prefixes)

    def reason(name: str) -> str | None:
        if not audio and name.startswith(left_out):
            return NO_AUDIO
        return None if name.startswith(media) else "the text model (the target GGUF holds it)"

    return reason


def convert_projector(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    outtype: str = "auto",
    target: str | os.PathLike | None = None,
    audio: bool = True,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> ConvertResult:
    """Write SRC's projector (vision, and audio unless ``audio`` is off) to ``out`` (``convert SRC --mmproj``);
    nothing is written unless every check passes. ``target`` (a GGUF or HF target): check that the projector's
    output size is its hidden size."""
    check_output_path(out, force)
    if outtype not in OUTTYPE_CHOICES:
        raise GgufMtpError(f"--outtype: expected one of {', '.join(OUTTYPE_CHOICES)}, got {outtype!r}")
    described = describe_projector(src, audio)
    s, hp = described.source, described.hparams
    if target is not None:
        problems = pairing.check_set(target_facts(target), projector=described.facts())
        if problems:
            raise IncompatiblePair(f"{src} --mmproj does not pair with {target}: "
                                   + "; ".join(str(p) for p in problems))
    reader = SafetensorsReader.from_directory(s.path)
    try:
        # auto: the dtype of the vision part's first tensor (the checkpoint's dtype)
        qtype = checkpoint_outtype(outtype, reader, "model." + hp.vision.TOWER.global_rows[0].hf)
        tensors, used = [], set()
        for part in hp.parts():
            plans, names = plan_part(reader, part, qtype, f"{part.TOWER.part}_config")
            tensors += plans
            used |= names
        ignored = count_leftovers(reader, used, _leftover_reason(audio), "the vision / audio parts config.json describes")
        meta = described.metadata
        meta.finish(FILE_TYPES[qtype], size_label(tensors))
        n_bytes = write_gguf(out, meta, tensors, force=force, progress=progress)
    finally:
        reader.close()
    traits = [part.TOWER.part for part in hp.parts()] + sorted(set().union(*(p.conditions() for p in hp.parts())))
    return ConvertResult(
        output=str(out), arch=keys.ARCH_PROJECTOR, role="projector", kind=s.kind.name, source=s.source,
        revision=s.revision, outtype=qtype.name, n_tensors=len(tensors), n_bytes=n_bytes, features=traits,
        ignored=ignored, paired_with=os.fspath(target) if target is not None else None,
    )
