"""A registry variant's files as layouts -- tensors and metadata, no data -- made by the exporter's own tables.

models.json describes a variant in llama.cpp's terms; ``text_hparams`` / ``drafter_hparams`` / ``vision_hparams``
turn it into the exporter's hyper-parameters (the one adapter from a registry Variant), and from there the
exporter's tensor tables (export/tensors.py ``expected_tensors``, export/projector.py) and metadata writers
(export/metadata.py ``model_keys``, export/projector.py ``projector_keys``) give the tensors and keys a conversion
of that checkpoint writes. Quantized layouts take llama.cpp's per-tensor types from ``quantmix``. The planner plans
from these without writing a file; ``skeleton.py`` writes them as sparse GGUFs; the registry's parameter counts are
sums over them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from gguf import GGMLQuantizationType as Q, TokenType

from .. import keys, quantmix
from ..errors import GgufMtpError
from ..export import metadata as md
from ..export import projector
from ..export.hparams import ASSISTANT_DEFAULTS, DrafterHparams, TextHparams
from ..export.audio import AUDIO_DEFAULTS, UNIFIED_AUDIO_DEFAULTS, AudioHparams, UnifiedAudioHparams
from ..export.projector import (IMAGE_DEFAULTS, UNIFIED_VISION_DEFAULTS, VISION_DEFAULTS, ProjectorHparams,
                                UnifiedVisionHparams, VisionHparams)
from ..export.tables import FILE_TYPES
from ..export.tensors import Expected, expected_tensors
from ..export.tokenizer import Vocab
from ..export.writer import size_label
from ..keys import Keys
from ..quanttypes import preset
from ..registry import SLIDING, Variant, get_variant
from .memory import tensor_bytes

ROLES = ("target", "drafter", "mmproj")
BASE_TYPES = ("BF16", "F16", "F32")  # what the exporters write (--outtype); anything else is llama.cpp's quantizer's
PLE_TABLE = "per_layer_token_embd.weight"  # the per-layer embeddings llama.cpp can keep on the CPU


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a layout: name, ggml-order shape, ggml type name."""

    name: str
    shape: tuple[int, ...]
    type: str

    @functools.cached_property  # read for every tensor of every configuration the search prices
    def n_bytes(self) -> int:
        return tensor_bytes(self.type, self.shape)


@dataclass(frozen=True)
class Layout:
    """What a GGUF holds, without data: arch, metadata (the exporter's key -> KV) and tensors."""

    arch: str
    metadata: md.Metadata
    tensors: tuple[TensorSpec, ...]

    @property
    def n_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)


# --- the adapter: a registry variant in the exporter's terms ----------------------------------------------------------
# What models.json does not say takes the value every Gemma 4 checkpoint has: tied heads, sliding layers rotating
# their whole head, a PLE vocabulary the size of the text vocabulary; a drafter's text config is its target's but for
# its own widths and layers (tiny/configs.py builds drafters the same way); the vision tower's clipped linears
# and per-layer output scale, no standardization, llama.cpp's fixed pixel normalization.

def text_hparams(v: Variant) -> TextHparams:
    t, moe = v.text, v.text.moe
    return TextHparams(
        n_vocab=t.vocab, n_embd=t.hidden, n_ff=t.intermediate, n_layer=t.layers, n_head=t.heads,
        n_head_kv_swa=t.kv_heads.sliding, n_head_kv_full=t.kv_heads.full, head_dim_swa=t.head_dim,
        head_dim_full=t.global_head_dim, kv_override=t.kv_heads.full != t.kv_heads.sliding,
        swa_layers=tuple(kind == SLIDING for kind in t.layer_types()), n_ctx=t.context, eps=t.rms_eps,
        sliding_window=t.sliding_window, rope_base_swa=t.rope.sliding_base, rope_base_full=t.rope.full_base,
        rot_swa=1.0, rot_full=t.rope.full_partial_rotary_factor, softcap=t.final_logit_softcap, ple_dim=t.ple_dim,
        ple_vocab=t.vocab, k_eq_v=t.attention_k_eq_v, n_shared_kv=t.shared_kv_layers, double_wide=t.double_wide_mlp,
        n_expert=moe.experts if moe else 0, n_expert_used=moe.top_k if moe else 0,
        n_ff_exp=moe.expert_ffn if moe else 0, tied=True,
    )


def drafter_hparams(v: Variant) -> DrafterHparams:
    d, head = v.drafter, v.drafter.head
    text = replace(text_hparams(v), n_embd=d.hidden, n_ff=d.intermediate, n_layer=d.layers, n_head=d.heads,
                   swa_layers=tuple(kind == SLIDING for kind in d.layer_types()), ple_dim=0, n_shared_kv=d.layers,
                   double_wide=False, n_expert=0, n_expert_used=0, n_ff_exp=0, n_ctx=d.context or v.text.context)
    return DrafterHparams(
        text=text, backbone=v.text.hidden, ordered_embeddings=head.type == "centroid",
        n_centroids=head.clusters or ASSISTANT_DEFAULTS["num_centroids"],
        centroid_top_k=head.top_k or ASSISTANT_DEFAULTS["centroid_intermediate_top_k"],
    )


def vision_hparams(v: Variant) -> VisionHparams:
    vis = v.vision
    if vis is None:
        raise GgufMtpError(f"{v.name} has no vision tower" + (" (it has embedders)" if v.embedders else ""))
    return VisionHparams(
        n_embd=vis.width, n_ff=vis.ffn, n_layer=vis.layers, n_head=vis.heads, n_head_kv=vis.heads,
        head_dim=vis.head_dim, eps=VISION_DEFAULTS["rms_norm_eps"], patch_size=vis.patch_size,
        pooling=vis.pooling_kernel, n_pos=vis.position_embeddings, clipped=True, standardize=False,
        activation=VISION_DEFAULTS["hidden_activation"], text_hidden=vis.projection_dim,
        image_mean=list(IMAGE_DEFAULTS["image_mean"]), image_std=list(IMAGE_DEFAULTS["image_std"]),
    )


def audio_hparams(v: Variant) -> AudioHparams:
    """E2B/E4B's conformer: models.json's widths, the rest Gemma4AudioConfig's defaults (clipped linears, the
    subsampling convolutions, 128 mel bins), as the released configs have them."""
    a, c = v.audio, AUDIO_DEFAULTS
    if a is None:
        raise GgufMtpError(f"{v.name} has no audio tower")
    ch = c["subsampling_conv_channels"]
    return AudioHparams(n_embd=a.width, n_layer=a.layers, n_head=a.heads, n_out=a.output_dim,
                        n_mel=c["input_feat_size"], channels=(ch[0], ch[1]), kernel=c["conv_kernel_size"],
                        clipped=c["use_clipped_linears"], eps=c["rms_norm_eps"], text_hidden=v.text.hidden)


def projector_hparams(v: Variant, audio: bool = True) -> ProjectorHparams:
    """The projector file's parts: a vision tower or the 12B's image embedder, and (``audio``) the audio tower or
    the 12B's frame embedder, in export/projector.py's terms."""
    e = v.embedders
    vision: VisionHparams | UnifiedVisionHparams | None = vision_hparams(v) if v.vision is not None else None
    if e is not None and e.vision is not None:
        vision = UnifiedVisionHparams(
            n_embd=e.vision.embed_dim, patch_size=e.vision.patch_size, pooling=e.vision.pooling_kernel,
            n_pos=e.vision.position_embeddings, eps=UNIFIED_VISION_DEFAULTS["rms_norm_eps"], text_hidden=v.text.hidden,
            image_mean=list(IMAGE_DEFAULTS["image_mean"]), image_std=list(IMAGE_DEFAULTS["image_std"]))
    sound: AudioHparams | UnifiedAudioHparams | None = audio_hparams(v) if v.audio is not None and audio else None
    if e is not None and e.audio is not None and audio:
        sound = UnifiedAudioHparams(n_embd=e.audio.samples_per_token, eps=UNIFIED_AUDIO_DEFAULTS["rms_norm_eps"],
                                    text_hidden=v.text.hidden)
    if vision is None:  # upstream's converter and clip.cpp pair a projector with its target through the vision part
        raise GgufMtpError(f"{v.name} has no vision part: no projector file")
    return ProjectorHparams(vision=vision, audio=sound)


# --- tensors ----------------------------------------------------------------------------------------------------------

def text_tensors(v: Variant, role: str, outtype: Q, centroids: bool = False) -> list[Expected]:
    """A target's or drafter's tensors as the exporter writes them (numpy-order shapes)."""
    if role == "drafter":
        d = drafter_hparams(v)
        return expected_tensors(d.text, outtype, drafter=d, centroids=centroids)
    return expected_tensors(text_hparams(v), outtype)


# --- metadata ---------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def stand_in_vocab(n_vocab: int) -> Vocab:
    """``n_vocab`` unique tokens with one merge: what llama.cpp's loader needs of a gemma4 vocabulary (tokens,
    scores, types, merges, special ids), without Google's tokenizer files. Shared: do not modify."""
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    base = special + [f"<0x{i:02X}>" for i in range(256)] + ["a", "b", "ab"]
    tokens = base + [f"<unused{i}>" for i in range(n_vocab - len(base))]
    types = ([int(TokenType.CONTROL)] * len(special) + [int(TokenType.BYTE)] * 256
             + [int(TokenType.NORMAL)] * (n_vocab - len(special) - 256))
    return Vocab(tokens, [0.0] * n_vocab, types, ["a b"], {"pad": 0, "eos": 1, "bos": 2, "unk": 3, "mask": 4},
                 add_eos=False)


def _text_metadata(v: Variant, role: str) -> md.Metadata:
    repo = v.hf.drafter if role == "drafter" else v.hf.target
    arch = keys.ARCH_DRAFTER if role == "drafter" else keys.ARCH_TARGET
    d = drafter_hparams(v) if role == "drafter" else None
    return md.model_keys(arch, f"{repo.rsplit('/', 1)[-1]} skeleton", d.text if d else text_hparams(v), d,
                         stand_in_vocab(v.text.vocab), f"skeleton:{repo}", None, role)


def _projector_metadata(v: Variant, hp: ProjectorHparams) -> md.Metadata:
    return projector.projector_file_keys(hp, f"{v.hf.target.rsplit('/', 1)[-1]} mmproj skeleton",
                                         f"skeleton:{v.hf.target}", None)


# --- layouts ----------------------------------------------------------------------------------------------------------

def base_layout(v: Variant, role: str, dtype: str | None = None) -> Layout:
    """A role's file as the exporter writes it (``dtype``: its --outtype; default BF16 text models, F16 projector)."""
    if role not in ROLES:
        raise GgufMtpError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
    dtype = (dtype or ("F16" if role == "mmproj" else "BF16")).upper()
    if dtype not in BASE_TYPES:
        raise GgufMtpError(f"base type must be one of {', '.join(BASE_TYPES)}, got {dtype}")
    outtype = Q[dtype]
    if role == "mmproj":
        hp = projector_hparams(v)
        arch, tensors, meta = keys.ARCH_PROJECTOR, projector.expected_projector_tensors(hp, outtype), _projector_metadata(v, hp)
    else:
        arch = keys.ARCH_DRAFTER if role == "drafter" else keys.ARCH_TARGET
        tensors, meta = text_tensors(v, role, outtype), _text_metadata(v, role)
    meta.finish(FILE_TYPES[outtype], size_label(tensors))
    return Layout(arch, meta, tuple(TensorSpec(e.name, tuple(reversed(e.shape)), e.type.name) for e in tensors))


def mix_model(v: Variant, role: str) -> quantmix.Model:
    """What llama.cpp's per-tensor rules read of a target or drafter."""
    hp = drafter_hparams(v).text if role == "drafter" else text_hparams(v)
    return quantmix.Model(n_layer=hp.n_layer, n_expert=hp.n_expert, gqa=hp.n_head // hp.layer(0).n_head_kv)


def quantized_layout(v: Variant, role: str, quant: str) -> Layout:
    """The role's BF16 file after llama.cpp's quantizer made ``quant`` of it (its per-tensor mix, ``quantmix``)."""
    if role == "mmproj":
        raise GgufMtpError(f"llama.cpp's quantizer does not quantize projectors (use F16, BF16 or F32), got {quant}")
    base, p = base_layout(v, role), preset(quant)
    types = quantmix.tensor_types([(t.name, t.shape, t.type) for t in base.tensors], p.name, mix_model(v, role))
    meta = md.Metadata(base.metadata)
    if not p.only_copy:
        meta.u32(Keys.General.FILE_TYPE, p.ftype)
    return Layout(base.arch, meta, tuple(replace(t, type=types[t.name]) for t in base.tensors))


def layout_for(variant: str | Variant, role: str, quant: str | None = None) -> Layout:
    """The layout of a variant's file at a quant (None: the role's base type). Cached per process by name."""
    quant = quant.upper() if quant else None
    if isinstance(variant, str):
        return _cached_layout(get_variant(variant).name, role, quant)
    if quant is None or quant in BASE_TYPES:
        return base_layout(variant, role, quant)
    return quantized_layout(variant, role, quant)


@functools.lru_cache(maxsize=32)
def _cached_layout(name: str, role: str, quant: str | None) -> Layout:
    return layout_for(get_variant(name), role, quant)


# --- parameter counts -------------------------------------------------------------------------------------------------

def param_counts(v: Variant) -> dict[str, int]:
    """Weights of the target, drafter and projector files as the exporter writes them: checkpoint tensors only (not
    the generated rope_freqs, not the centroid head's integer token ordering), a drafter's centroid head included.
    ``target_ple``: the per-layer-embedding table; ``target_inactive``: experts a token does not use."""
    def count(tensors: list[Expected], keep=lambda e: True) -> int:
        return sum(e.n_elements for e in tensors if e.hf is not None and e.type != Q.I32 and keep(e))

    target, moe = text_tensors(v, "target", Q.BF16), v.text.moe
    parts = projector_hparams(v) if v.has_vision else ProjectorHparams()
    return {
        "target": count(target),
        "target_ple": count(target, lambda e: e.name == PLE_TABLE),
        "target_inactive": count(target, _expert_stack) * (moe.experts - moe.top_k) // moe.experts if moe else 0,
        "drafter": count(text_tensors(v, "drafter", Q.BF16, centroids=v.drafter.head.type == "centroid")),
        "vision": count(projector.expected_projector_tensors(ProjectorHparams(vision=parts.vision), Q.F16))
        if parts.vision else 0,
        "audio": count(projector.expected_projector_tensors(ProjectorHparams(audio=parts.audio), Q.F16))
        if parts.audio else 0,
    }


def _expert_stack(e: Expected) -> bool:
    """A tensor holding every expert's matrix (experts x rows x columns)."""
    return len(e.shape) == 3 and e.row is not None and e.row.shape[0] == "X"


__all__ = [
    "BASE_TYPES", "Layout", "ROLES", "TensorSpec", "base_layout", "drafter_hparams", "layout_for",
    "audio_hparams", "mix_model", "param_counts", "projector_hparams", "quantized_layout", "stand_in_vocab",
    "text_hparams", "vision_hparams",
]
