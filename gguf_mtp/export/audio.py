"""The audio part of a Gemma 4 projector file: E2B/E4B's conformer (gemma4a) and the 12B's frame embedder (gemma4ua).

What ``convert_hf_to_gguf.py --mmproj`` writes for them (conversion/gemma.py: Gemma4VisionAudioModel,
Gemma4UnifiedVisionAudioModel; names from gguf-py's tensor_mapping.py), read by tools/mtmd/clip.cpp and
models/gemma4a.cpp / gemma4ua.cpp. Rows and hyper-parameters only; projector.py puts the parts together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..keys import Keys
from . import metadata as md
from .hparams import _Cfg
from .source import Source
from .towers import Row, Tower, clippable, text_hidden

__all__ = ["AUDIO", "AudioHparams", "UNIFIED_AUDIO", "UnifiedAudioHparams", "audio_hparams", "unified_audio_hparams"]

# Gemma4AudioConfig's defaults (transformers 5.23.0); input_feat_size is upstream's name for the mel bins (the
# feature extractor's feature_size, 128), absent from the config class.
AUDIO_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "hidden_act": "silu",
    "subsampling_conv_channels": [128, 32],
    "conv_kernel_size": 5,
    "residual_weight": 0.5,
    "attention_chunk_size": 12,
    "attention_context_left": 13,
    "attention_context_right": 0,
    "attention_logit_cap": 50.0,
    "use_clipped_linears": True,
    "rms_norm_eps": 1e-6,
    "output_proj_dims": 1536,
    "input_feat_size": 128,
}
# What llama.cpp's gemma4a graph hard-codes (models/gemma4a.cpp, clip.cpp); a config that differs cannot run there.
CONFORMER_FIXED: dict[str, Any] = {
    "hidden_act": "silu",
    "conv_kernel_size": 5,  # the causal depthwise conv's left padding of 4
    "residual_weight": 0.5,
    "attention_chunk_size": 12,
    "attention_context_left": 13,
    "attention_context_right": 0,
    "attention_logit_cap": 50.0,
    "rms_norm_eps": 1e-6,
}
FEED_FORWARD_FACTOR = 4  # Gemma4AudioFeedForward: hidden -> 4 x hidden -> hidden
# Gemma4UnifiedAudioConfig's defaults
UNIFIED_AUDIO_DEFAULTS: dict[str, Any] = {"audio_embed_dim": 640, "rms_norm_eps": 1e-6}
UNIFIED_FRAME = 640  # clip.cpp's gemma4ua reads 640-sample frames whatever the file says
# clip.audio.num_mel_bins for gemma4ua: upstream writes the conformer's default; clip.cpp overrides it with the frame
UNIFIED_MEL_BINS = 128


# --- the conformer, HF (under model.) -> GGUF ---------------------------------------------------------------------
_T, _C = "audio_tower.", "audio_tower.subsample_conv_projection."
CONFORMER_GLOBAL = (
    Row(_C + "layer0.conv.weight", "a.conv1d.0.weight", ("c0", "1", "3", "3"), force="f32"),
    Row(_C + "layer0.norm.weight", "a.conv1d.0.norm.weight", ("c0",)),
    Row(_C + "layer1.conv.weight", "a.conv1d.1.weight", ("c1", "c0", "3", "3"), force="f32"),
    Row(_C + "layer1.norm.weight", "a.conv1d.1.norm.weight", ("c1",)),
    Row(_C + "input_proj_linear.weight", "a.input_projection.weight", ("E", "S"), force="f32"),
    Row(_T + "output_proj.weight", "a.pre_encode.out.weight", ("O", "E")),
    Row(_T + "output_proj.bias", "a.pre_encode.out.bias", ("O",)),
    Row("embed_audio.embedding_projection.weight", "mm.a.input_projection.weight", ("T", "O")),
)
_L, _B = "audio_tower.layers.{bid}.", "a.blk.{bid}."
CONFORMER_LAYER = (
    # the first half-step feed-forward
    Row(_L + "feed_forward1.pre_layer_norm.weight", _B + "ffn_norm.weight", ("E",)),
    *clippable(_L + "feed_forward1.ffw_layer_1", _B + "ffn_up", ("F", "E")),
    *clippable(_L + "feed_forward1.ffw_layer_2", _B + "ffn_down", ("E", "F")),
    Row(_L + "feed_forward1.post_layer_norm.weight", _B + "ffn_post_norm.weight", ("E",)),
    # chunked local attention with relative positions
    Row(_L + "norm_pre_attn.weight", _B + "attn_pre_norm.weight", ("E",)),
    *clippable(_L + "self_attn.q_proj", _B + "attn_q", ("E", "E")),
    *clippable(_L + "self_attn.k_proj", _B + "attn_k", ("E", "E")),
    *clippable(_L + "self_attn.v_proj", _B + "attn_v", ("E", "E")),
    *clippable(_L + "self_attn.post", _B + "attn_out", ("E", "E")),
    Row(_L + "self_attn.relative_k_proj.weight", _B + "attn_k_rel.weight", ("E", "E")),
    Row(_L + "self_attn.per_dim_scale", _B + "per_dim_scale.weight", ("hd",), transform="softplus"),
    Row(_L + "norm_post_attn.weight", _B + "attn_post_norm.weight", ("E",)),
    # the light convolution; the two norms' GGUF names are crossed in tensor_mapping.py and clip.cpp reads them so
    Row(_L + "lconv1d.pre_layer_norm.weight", _B + "conv_norm.weight", ("E",)),
    *clippable(_L + "lconv1d.linear_start", _B + "conv_pw1", ("E2", "E")),
    Row(_L + "lconv1d.depthwise_conv1d.weight", _B + "conv_dw.weight", ("E", "1", "K"), out=("E", "K"),
        force="f32"),
    Row(_L + "lconv1d.conv_norm.weight", _B + "norm_conv.weight", ("E",)),
    *clippable(_L + "lconv1d.linear_end", _B + "conv_pw2", ("E", "E")),
    # the second half-step feed-forward, and the layer's output norm
    Row(_L + "feed_forward2.pre_layer_norm.weight", _B + "ffn_norm_1.weight", ("E",)),
    *clippable(_L + "feed_forward2.ffw_layer_1", _B + "ffn_up_1", ("F", "E")),
    *clippable(_L + "feed_forward2.ffw_layer_2", _B + "ffn_down_1", ("E", "F")),
    Row(_L + "feed_forward2.post_layer_norm.weight", _B + "ffn_post_norm_1.weight", ("E",)),
    Row(_L + "norm_out.weight", _B + "ln2.weight", ("E",)),
)
AUDIO = Tower("audio", "gemma4a", CONFORMER_GLOBAL, CONFORMER_LAYER, ("model.audio_tower.", "model.embed_audio."))

# --- the 12B's audio embedder: raw frames, RMS-normed (no weight) and projected -----------------------------------
UNIFIED_AUDIO = Tower("audio", "gemma4ua", (
    Row("embed_audio.embedding_projection.weight", "mm.a.input_projection.weight", ("T", "A")),
), (), ("model.embed_audio.",))


def subsampled(n: int) -> int:
    """Rows left after one 3x3, stride-2, padding-1 convolution."""
    return (n + 1) // 2


@dataclass(frozen=True)
class AudioHparams:
    TOWER: ClassVar[Tower] = AUDIO
    n_embd: int
    n_layer: int
    n_head: int
    n_out: int  # output_proj_dims: what the embedder projects into the text model
    n_mel: int
    channels: tuple[int, int]  # the two subsampling convolutions' output channels
    kernel: int
    clipped: bool
    eps: float
    text_hidden: int

    def dims(self) -> dict[str, int]:
        # the subsampled mel axis times the last conv's channels feed input_proj_linear (clip.cpp flattens them so)
        sub = subsampled(subsampled(self.n_mel)) * self.channels[1]
        return {"E": self.n_embd, "E2": 2 * self.n_embd, "F": FEED_FORWARD_FACTOR * self.n_embd,
                "hd": self.n_embd // self.n_head, "O": self.n_out, "T": self.text_hidden, "S": sub,
                "c0": self.channels[0], "c1": self.channels[1], "K": self.kernel, "1": 1, "3": 3}

    def conditions(self) -> set[str]:
        return {"clipped"} if self.clipped else set()

    def keys(self) -> md.Metadata:
        return _audio_keys(self, FEED_FORWARD_FACTOR * self.n_embd, self.n_layer, self.n_head, self.n_mel)


@dataclass(frozen=True)
class UnifiedAudioHparams:
    TOWER: ClassVar[Tower] = UNIFIED_AUDIO
    n_embd: int  # audio_embed_dim: samples per frame (soft token)
    eps: float
    text_hidden: int
    n_layer: int = 0

    def dims(self) -> dict[str, int]:
        return {"A": self.n_embd, "T": self.text_hidden}

    def conditions(self) -> set[str]:
        return set()

    def keys(self) -> md.Metadata:
        return _audio_keys(self, 0, 0, 0, UNIFIED_MEL_BINS)  # transformer-less: upstream writes 0s too


def _audio_keys(hp: AudioHparams | UnifiedAudioHparams, n_ff: int, n_layer: int, n_head: int,
                n_mel: int) -> md.Metadata:
    """An audio part's clip.* keys in upstream's order: MmprojModel's for every audio encoder, then the Gemma 4
    models' projector type, mel bins and epsilon."""
    A, m = Keys.ClipAudio, md.Metadata()
    m.bool(Keys.Clip.HAS_AUDIO_ENCODER, True)
    m.u32(A.PROJECTION_DIM, hp.text_hidden)
    m.u32(A.EMBEDDING_LENGTH, hp.n_embd)
    m.u32(A.FEED_FORWARD_LENGTH, n_ff)
    m.u32(A.BLOCK_COUNT, n_layer)
    m.u32(A.Attention.HEAD_COUNT, n_head)
    m.string(A.PROJECTOR_TYPE, hp.TOWER.projector_type)
    m.u32(A.NUM_MEL_BINS, n_mel)
    m.f32(A.Attention.LAYERNORM_EPS, hp.eps)
    return m


def _section(s: Source, defaults: dict[str, Any]) -> _Cfg:
    return _Cfg(s.config["audio_config"], defaults, f"{s.path / 'config.json'}: audio_config")


def audio_hparams(s: Source) -> AudioHparams:
    """The conformer's hyper-parameters from config.json's audio_config, checked for llama.cpp's gemma4a graph."""
    c = _section(s, AUDIO_DEFAULTS)
    for key, want in CONFORMER_FIXED.items():
        got = c.get(key)
        if got != want:
            raise c.fail(f"{key}: llama.cpp's gemma4a audio encoder runs only {want!r}, got {got!r}")
    channels = c.get("subsampling_conv_channels")
    if (not isinstance(channels, list) or len(channels) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in channels)):
        raise c.fail(f"subsampling_conv_channels: expected two positive integers, got {channels!r}")
    hidden, n_head = c.int("hidden_size", 1), c.int("num_attention_heads", 1)
    if hidden % n_head:
        raise c.fail(f"hidden_size ({hidden}) is not a multiple of num_attention_heads ({n_head})")
    return AudioHparams(
        n_embd=hidden, n_layer=c.int("num_hidden_layers", 1), n_head=n_head, n_out=c.int("output_proj_dims", 1),
        n_mel=c.int("input_feat_size", 1), channels=(channels[0], channels[1]), kernel=c.int("conv_kernel_size", 1),
        clipped=c.bool("use_clipped_linears"), eps=c.float("rms_norm_eps"), text_hidden=text_hidden(s),
    )


def unified_audio_hparams(s: Source) -> UnifiedAudioHparams:
    """The 12B's audio embedder from config.json's audio_config."""
    c = _section(s, UNIFIED_AUDIO_DEFAULTS)
    frame = c.int("audio_embed_dim", 1)
    if frame != UNIFIED_FRAME:
        raise c.fail(f"audio_embed_dim: llama.cpp's gemma4ua embedder reads {UNIFIED_FRAME}-sample frames only, "
                     f"got {frame}")
    return UnifiedAudioHparams(n_embd=frame, eps=c.float("rms_norm_eps"), text_hidden=text_hidden(s))
