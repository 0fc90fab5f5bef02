"""Per-family tables for the tiny Gemma 4 checkpoints: data, not branches.

Each family mimics one real Gemma 4 variant at toy size (see docs in ``gguf_mtp/tiny/__init__.py``). The
tables hold the HF config fields exactly as they are written to ``config.json``; the helpers below only
assemble them, check the layout rules llama.cpp hard-codes, and derive per-layer facts the weight
generator needs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from ..errors import GgufMtpError
from ..export.audio import CONFORMER_FIXED

S, F = "sliding_attention", "full_attention"

VOCAB_SIZE = 512

# Gemma 4's control tokens at their real ids (all < 108, so they fit the tiny vocab). The multimodal
# markers live at ids >= 255999 in the real vocab: they are relocated into the unused range 39..45.
CONTROL_TOKENS: dict[int, str] = {
    0: "<pad>",
    1: "<eos>",
    2: "<bos>",
    3: "<unk>",
    4: "<mask>",
    39: "<|image>",  # real 255999
    40: "<|audio>",  # real 256000
    41: "<|image|>",  # real 258880
    42: "<|audio|>",  # real 258881
    43: "<image|>",  # real 258882
    44: "<audio|>",  # real 258883
    45: "<|video|>",  # real 258884
    46: "<|tool>",
    47: "<tool|>",
    48: "<|tool_call>",
    49: "<tool_call|>",
    50: "<|tool_response>",
    51: "<tool_response|>",
    52: '<|"|>',
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    105: "<|turn>",
    106: "<turn|>",
}
NEWLINE_ID = 107  # "\n", an ordinary token right after the control block (as in the real vocab)
FIRST_BYTE_ID = 108  # <0x00>..<0xFF> follow, then the learned BPE pieces up to VOCAB_SIZE
STOP_TOKEN_IDS = [1, 106, 50]  # <eos>, <turn|>, <|tool_response>

# real id -> tiny id, for the Gemma4Config fields that name the multimodal markers
MULTIMODAL_IDS = {
    "boi_token_id": 39,
    "boa_token_id": 40,
    "image_token_id": 41,
    "audio_token_id": 42,
    "eoi_token_id": 43,
    "eoa_token_index": 44,
    "video_token_id": 45,
}


def control_token_table(vocab_size: int = VOCAB_SIZE) -> list[str]:
    """Ids 0..107: the named control tokens, ``<unusedN>`` fillers, then ``"\\n"`` at 107."""
    table, unused = [], 0
    for i in range(NEWLINE_ID):
        if i in CONTROL_TOKENS:
            table.append(CONTROL_TOKENS[i])
        else:
            table.append(f"<unused{unused}>")
            unused += 1
    table.append("\n")
    assert len(table) == FIRST_BYTE_ID <= vocab_size
    return table


ROPE = {
    S: {"rope_type": "default", "rope_theta": 10_000.0},
    F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}

# Fields every tiny text config carries (values as in the real configs).
TEXT_COMMON: dict[str, Any] = {
    "model_type": "gemma4_text",
    "vocab_size": VOCAB_SIZE,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "rope_parameters": ROPE,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "final_logit_softcapping": 30.0,
    "tie_word_embeddings": True,
    "use_cache": True,
    "initializer_range": 0.02,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "use_bidirectional_attention": None,
    "enable_moe_block": False,
    "num_experts": None,
    "top_k_experts": None,
    "moe_intermediate_size": None,
    "use_double_wide_mlp": False,
    "attention_k_eq_v": False,
    "num_kv_shared_layers": 0,
    "hidden_size_per_layer_input": 0,
    "vocab_size_per_layer_input": VOCAB_SIZE,
}

# Gemma4UnifiedTextConfig has no PLE and no MoE fields; the rest is Gemma4TextConfig's. The upstream converter
# (Gemma4Model.set_gguf_parameters, find_hparam without optional) still requires one of
# expert_intermediate_size / moe_intermediate_size to be present, so the key stays, null.
_GEMMA4_ONLY = ("enable_moe_block", "num_experts", "top_k_experts", "hidden_size_per_layer_input",
                "vocab_size_per_layer_input")
UNIFIED_TEXT_COMMON: dict[str, Any] = {
    **{k: v for k, v in TEXT_COMMON.items() if k not in _GEMMA4_ONLY},
    "model_type": "gemma4_unified_text",
    "use_bidirectional_attention": "vision",  # the class default: image tokens see each other on sliding layers
}


@dataclass(frozen=True)
class Layout:
    """What differs between the two Gemma 4 model families in transformers (config and processor classes)."""

    model_type: str  # the multimodal target's config.json model_type
    conditional: str  # the multimodal target's architecture
    drafter: str  # the MTP drafter's architecture
    drafter_model_type: str
    processor: str
    image_processor: str
    feature_extractor: str
    video_processor: str


LAYOUTS = {
    "gemma4": Layout("gemma4", "Gemma4ForConditionalGeneration", "Gemma4AssistantForCausalLM", "gemma4_assistant",
                     "Gemma4Processor", "Gemma4ImageProcessor", "Gemma4AudioFeatureExtractor",
                     "Gemma4VideoProcessor"),
    "gemma4_unified": Layout("gemma4_unified", "Gemma4UnifiedForConditionalGeneration",
                             "Gemma4UnifiedAssistantForCausalLM", "gemma4_unified_assistant",
                             "Gemma4UnifiedProcessor", "Gemma4UnifiedImageProcessor",
                             "Gemma4UnifiedAudioFeatureExtractor", "Gemma4UnifiedVideoProcessor"),
}


@dataclass(frozen=True)
class FamilySpec:
    """One tiny target + drafter pair. ``target_text`` / ``drafter_text`` hold config.json fields."""

    name: str
    mimics: str
    target_text: dict[str, Any]
    drafter_text: dict[str, Any]
    architecture: str = "Gemma4ForCausalLM"  # or LAYOUTS[layout].conditional
    layout: str = "gemma4"  # a key of LAYOUTS
    vision: dict[str, Any] | None = None  # Gemma4VisionConfig / Gemma4UnifiedVisionConfig fields (conditional only)
    audio: dict[str, Any] | None = None  # Gemma4AudioConfig / Gemma4UnifiedAudioConfig fields (conditional only)
    suppress_tokens: tuple[int, ...] = ()  # the target's generation_config.json suppress_tokens (when not empty)
    dtype: str = "float32"  # safetensors dtype of floating tensors: float32 | bfloat16
    tokenizer: str = "json"  # json: tokenizer.json (tokenizers BPE); spm: tokenizer.model (sentencepiece)
    config_style: str = "original"  # original: global_head_dim keys; resaved: per_layer_config (save_pretrained)
    drafter_head: dict[str, Any] = field(default_factory=lambda: {"use_ordered_embeddings": False})
    num_assistant_tokens: int = 3

    @property
    def multimodal(self) -> bool:
        return self.architecture == LAYOUTS[self.layout].conditional


def text_fields(common: dict[str, Any] = TEXT_COMMON, **fields: Any) -> dict[str, Any]:
    out = copy.deepcopy(common)
    out.update(fields)
    out["num_hidden_layers"] = len(out["layer_types"])
    return out


def drafter_text_fields(target: dict[str, Any], common: dict[str, Any] = TEXT_COMMON,
                        **fields: Any) -> dict[str, Any]:
    """A Q-only drafter text config whose attention geometry matches the target's last S/F layers."""
    inherited = {
        k: target[k]
        for k in ("head_dim", "global_head_dim", "num_key_value_heads", "num_global_key_value_heads",
                  "sliding_window", "rope_parameters", "attention_k_eq_v", "max_position_embeddings")
        if k in target
    }
    out = text_fields(common, **inherited, **fields)
    out.update({k: 0 for k in ("hidden_size_per_layer_input", "vocab_size_per_layer_input") if k in out})
    out["num_kv_shared_layers"] = out["num_hidden_layers"]
    return out


_E_TARGET = text_fields(
    layer_types=[S, S, F, S, S, F], num_kv_shared_layers=3, hidden_size=64, intermediate_size=128,
    num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=64, sliding_window=16,
    hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB_SIZE, use_double_wide_mlp=True,
    max_position_embeddings=131_072,
)
_DENSE_TARGET = text_fields(
    layer_types=[S, S, F, S, S, F], hidden_size=64, intermediate_size=128, num_attention_heads=4,
    num_key_value_heads=2, num_global_key_value_heads=1, head_dim=16, global_head_dim=32, sliding_window=8,
    attention_k_eq_v=True, max_position_embeddings=262_144,
)
_MOE_TARGET = text_fields(
    layer_types=[S, S, F, S, S, F], hidden_size=64, intermediate_size=64, num_attention_heads=4,
    num_key_value_heads=2, num_global_key_value_heads=1, head_dim=16, global_head_dim=32, sliding_window=16,
    attention_k_eq_v=True, enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32,
    max_position_embeddings=262_144,
)
_Q_TARGET = text_fields(
    layer_types=[S, F, S, F], hidden_size=512, intermediate_size=256, num_attention_heads=4,
    num_key_value_heads=1, head_dim=64, global_head_dim=128, sliding_window=8, max_position_embeddings=131_072,
)

# gemma-4-12B style: the 5:1 sliding/full pattern twice, so the drafter's "last full layer" is not the only one;
# no PLE, no MoE, no shared KV and V from its own projection (the unified config's defaults: the released 12B's
# config.json is not available offline). config.json in save_pretrained form (per_layer_config), as the
# unified config class writes it.
_UNIFIED_TARGET = text_fields(
    UNIFIED_TEXT_COMMON, layer_types=[S, S, S, S, S, F] * 2, hidden_size=64, intermediate_size=128,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=16,
    max_position_embeddings=262_144,
)

# Gemma4UnifiedVisionConfig: no transformer, raw 48x48 merged patches -> LayerNorm/Dense/LayerNorm, a factorized
# position table, LayerNorm, then RMSNorm + projection into the text model. patch_size and pooling_kernel_size
# are the real ones: llama.cpp's GEMMA4UV reads no merge key (n_merge 3 hard-coded) and sizes images by them.
# mm_embed_dim (= output_proj_dims, which must be equal: the projection reads the mm_embed_dim-wide states) is
# deliberately not the text width, so a transposed projection cannot pass.
_UNIFIED_VISION = {
    "model_type": "gemma4_unified_vision",
    "patch_size": 16,
    "pooling_kernel_size": 3,
    "mm_embed_dim": 48,
    "mm_posemb_size": 1120,  # the real table size: mtmd resizes images up to 1120 soft tokens
    "output_proj_dims": 48,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
}
# Gemma4UnifiedAudioConfig: each soft token is a raw 16 kHz frame of audio_embed_dim samples (40 ms), RMS-normed and
# projected. 640 is what llama.cpp's GEMMA4UA hard-codes as its frame size, so it stays.
_UNIFIED_AUDIO = {
    "model_type": "gemma4_unified_audio",
    "audio_embed_dim": 640,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
}

# Gemma4AudioConfig (E2B's conformer) at toy width. subsampling_conv_channels[0] stays 128: transformers sizes
# input_proj_linear as (channels[0] // 4) * channels[1], which matches the conv stack's output only when
# channels[0] equals the 128 mel bins. Chunking (12 / 13 / 0), the logit cap and kernel size are the real
# values: llama.cpp's gemma4a graph hard-codes them (export/audio.py's CONFORMER_FIXED, which the exporter checks).
# output_proj_dims differs from both widths on purpose.
_TINY_AUDIO = {
    "model_type": "gemma4_audio",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    **CONFORMER_FIXED,
    "subsampling_conv_channels": [128, 8],
    "attention_invalid_logits_value": -1.0e9,
    "use_clipped_linears": True,
    "gradient_clipping": 1e10,
    "output_proj_dims": 48,
    "initializer_range": 0.02,
}

_TINY_VISION = {
    "model_type": "gemma4_vision",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 131_072,
    "rope_parameters": {"rope_type": "axial", "rope_theta": 100.0},
    "patch_size": 16,
    "pooling_kernel_size": 3,  # llama.cpp's gemma4v default n_merge; keep it so no extra key is needed
    "position_embedding_size": 256,
    "use_clipped_linears": True,
    "standardize": True,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
}

FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            name="tiny-e",
            mimics="gemma-4-E2B: PLE, KV-shared layers, double-wide MLP, centroid-head drafter, vision tower",
            target_text=_E_TARGET,
            drafter_text=drafter_text_fields(_E_TARGET, layer_types=[S, S, S, F], hidden_size=32, intermediate_size=64,
                                             num_attention_heads=2),
            architecture="Gemma4ForConditionalGeneration",
            vision=_TINY_VISION,
            audio=_TINY_AUDIO,
            drafter_head={"use_ordered_embeddings": True, "num_centroids": 32, "centroid_intermediate_top_k": 8},
        ),
        FamilySpec(
            name="tiny-dense",
            mimics="gemma-4-31B: attention_k_eq_v full layers, global KV heads != sliding KV heads, text-only",
            target_text=_DENSE_TARGET,
            drafter_text=drafter_text_fields(_DENSE_TARGET, layer_types=[S, F], hidden_size=32, intermediate_size=64,
                                             num_attention_heads=4),
        ),
        FamilySpec(
            name="tiny-moe",
            mimics="gemma-4-26B-A4B: MoE block beside the dense MLP; sentencepiece tokenizer; re-saved config",
            target_text=_MOE_TARGET,
            drafter_text=drafter_text_fields(_MOE_TARGET, layer_types=[S, F], hidden_size=32, intermediate_size=64,
                                             num_attention_heads=4),
            architecture="Gemma4ForConditionalGeneration",  # the published layout, here without a vision tower
            tokenizer="spm",
            config_style="resaved",
        ),
        FamilySpec(
            name="tiny-q",
            mimics="k-quant sized pair: every matrix row a multiple of 256, bf16 safetensors",
            target_text=_Q_TARGET,
            drafter_text=drafter_text_fields(_Q_TARGET, layer_types=[S, F], hidden_size=256, intermediate_size=512,
                                             num_attention_heads=4),
            dtype="bfloat16",
        ),
        FamilySpec(
            name="tiny-unified",
            mimics="gemma-4-12B: Gemma4Unified layout, transformer-less vision and audio embedders, "
                   "bidirectional image attention, suppress_tokens, (5S + 1F) x 2",
            target_text=_UNIFIED_TARGET,
            drafter_text=drafter_text_fields(_UNIFIED_TARGET, UNIFIED_TEXT_COMMON, layer_types=[S, S, S, F],
                                             hidden_size=32, intermediate_size=64, num_attention_heads=4),
            architecture=LAYOUTS["gemma4_unified"].conditional,
            layout="gemma4_unified",
            vision=_UNIFIED_VISION,
            audio=_UNIFIED_AUDIO,
            config_style="resaved",
            # the media placeholders: a model must never emit them (the converter writes the list to GGUF)
            suppress_tokens=tuple(MULTIMODAL_IDS[k] for k in ("image_token_id", "audio_token_id", "video_token_id")),
        ),
    )
}


# --- per-layer facts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerGeometry:
    """What one decoder layer looks like, derived from a text config (same rules as transformers)."""

    kind: str  # sliding_attention | full_attention
    head_dim: int
    kv_heads: int
    shared: bool  # reads K/V of an earlier layer (no k/v projections)
    has_v: bool  # False on attention_k_eq_v full layers (V = K)
    ffn: int


def layer_geometry(text: dict[str, Any]) -> list[LayerGeometry]:
    n = text["num_hidden_layers"]
    first_shared = n - (text.get("num_kv_shared_layers") or 0)
    per_layer = {int(k): v for k, v in (text.get("per_layer_config") or {}).items()}
    out = []
    for i, kind in enumerate(text["layer_types"]):
        full = kind == F
        head_dim, kv_heads = text["head_dim"], text["num_key_value_heads"]
        if full:
            head_dim = per_layer.get(i, {}).get("head_dim", text.get("global_head_dim", head_dim))
            if text.get("attention_k_eq_v"):
                kv_heads = per_layer.get(i, {}).get(
                    "num_key_value_heads", text.get("num_global_key_value_heads") or kv_heads)
        shared = i >= first_shared
        ffn = text["intermediate_size"] * (2 if text.get("use_double_wide_mlp") and shared else 1)
        out.append(LayerGeometry(kind, head_dim, kv_heads, shared, not (full and text.get("attention_k_eq_v")), ffn))
    return out


def check_layout(text: dict[str, Any], what: str = "target") -> None:
    """Refuse a text config llama.cpp or transformers cannot run (llama.cpp aborts the process on some).

    llama.cpp hard-codes Gemma 4 KV reuse: shared sliding layers read layer ``first_shared - 2`` and shared
    full layers ``first_shared - 1``; a drafter reads the target's layers ``n - 2`` (sliding) and ``n - 1``
    (full). So the two layers before the first shared layer, and the last two layers, must be [S, F].
    """
    types = text["layer_types"]
    n = len(types)
    if n != text["num_hidden_layers"]:
        raise GgufMtpError(f"{what}: expected {text['num_hidden_layers']} layer_types, got {n}")
    if types[-1] != F:
        raise GgufMtpError(f"{what}: expected the last layer to be full attention, got {types[-1]}")
    shared = text.get("num_kv_shared_layers") or 0
    if S not in types:
        raise GgufMtpError(f"{what}: expected at least one sliding-attention layer, got none")
    if what == "target":
        if n < 2 or types[-2:] != [S, F]:
            raise GgufMtpError(f"{what}: expected the last two layers to be [sliding, full], got {types[-2:]}")
        if shared:
            first = n - shared
            if first < 2 or types[first - 2:first] != [S, F]:
                raise GgufMtpError(
                    f"{what}: expected [sliding, full] right before the first shared layer {first}, "
                    f"got {types[max(first - 2, 0):first]}")
    heads = text["num_attention_heads"]
    for i, g in enumerate(layer_geometry(text)):
        if heads % g.kv_heads:
            raise GgufMtpError(f"{what}: layer {i}: {heads} heads not divisible by {g.kv_heads} KV heads")
        rope = text["rope_parameters"][g.kind]
        rotated = g.head_dim * rope.get("partial_rotary_factor", 1.0) / 2
        if rotated != int(rotated):
            raise GgufMtpError(f"{what}: layer {i}: partial rotary factor gives {rotated} rotated pairs")


def check_pair(target: dict[str, Any], drafter: dict[str, Any]) -> None:
    """A drafter attends the target's last sliding and last full layer: their geometry must agree."""
    t_geo, d_geo = layer_geometry(target), layer_geometry(drafter)
    source = {S: t_geo[-2], F: t_geo[-1]}
    for i, g in enumerate(d_geo):
        src = source[g.kind]
        if (g.head_dim, g.kv_heads) != (src.head_dim, src.kv_heads):
            raise GgufMtpError(
                f"drafter layer {i} ({g.kind}): expected head_dim/kv heads {src.head_dim}/{src.kv_heads} "
                f"as the target's layer, got {g.head_dim}/{g.kv_heads}")
    for key in ("sliding_window", "rope_parameters", "vocab_size"):
        if target[key] != drafter[key]:
            raise GgufMtpError(f"drafter {key}: expected {target[key]!r} as the target, got {drafter[key]!r}")
    if drafter["num_kv_shared_layers"] != drafter["num_hidden_layers"]:
        raise GgufMtpError("drafter: every layer must read shared KV (num_kv_shared_layers == num_hidden_layers)")


# --- config.json / generation_config.json ----------------------------------------------------------


def _styled(text: dict[str, Any], style: str) -> dict[str, Any]:
    """``resaved``: what transformers' save_pretrained writes (per_layer_config instead of global keys)."""
    out = copy.deepcopy(text)
    if style == "resaved":
        overrides: dict[str, Any] = {"head_dim": out.pop("global_head_dim")}
        global_kv = out.pop("num_global_key_value_heads", None)
        if global_kv is not None and out.get("attention_k_eq_v"):
            overrides["num_key_value_heads"] = global_kv
        out["per_layer_config"] = {str(i): dict(overrides) for i, t in enumerate(out["layer_types"]) if t == F}
    return out


def target_config(spec: FamilySpec) -> dict[str, Any]:
    text = _styled(spec.target_text, spec.config_style)
    common = {"dtype": spec.dtype, "transformers_version": "5.23.0"}
    if not spec.multimodal:
        return {"architectures": [spec.architecture], **text, **common}
    cfg: dict[str, Any] = {"architectures": [spec.architecture], "model_type": LAYOUTS[spec.layout].model_type,
                           "text_config": text, "vision_config": copy.deepcopy(spec.vision),
                           "audio_config": copy.deepcopy(spec.audio)}
    cfg.update(MULTIMODAL_IDS)
    cfg.update(initializer_range=0.02, tie_word_embeddings=True, **common)
    return cfg


def drafter_config(spec: FamilySpec) -> dict[str, Any]:
    layout = LAYOUTS[spec.layout]
    return {
        "architectures": [layout.drafter],
        "model_type": layout.drafter_model_type,
        "backbone_hidden_size": spec.target_text["hidden_size"],
        "num_centroids": 2048,
        "centroid_intermediate_top_k": 32,
        **spec.drafter_head,
        "tie_word_embeddings": True,
        "text_config": _styled(spec.drafter_text, spec.config_style),
        "dtype": spec.dtype,
        "transformers_version": "5.23.0",
    }


def generation_config(spec: FamilySpec, role: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {"bos_token_id": 2, "eos_token_id": list(STOP_TOKEN_IDS), "pad_token_id": 0}
    if role == "drafter":
        cfg.update(num_assistant_tokens=spec.num_assistant_tokens, num_assistant_tokens_schedule="constant")
    elif spec.suppress_tokens:
        cfg["suppress_tokens"] = list(spec.suppress_tokens)
    cfg["transformers_version"] = "5.23.0"
    return cfg


SAMPLING_RATE = 16_000  # both audio front ends (and llama.cpp's mtmd) take 16 kHz mono


def _mel_features(audio: dict[str, Any]) -> dict[str, Any]:
    """Gemma4AudioFeatureExtractor: 128 log-mel bins from 20 ms frames every 10 ms (its defaults)."""
    return {"feature_size": 128, "sampling_rate": SAMPLING_RATE, "padding_value": 0.0, "return_attention_mask": True,
            "frame_length_ms": 20.0, "hop_length_ms": 10.0, "min_frequency": 0.0, "max_frequency": 8000.0,
            "preemphasis": 0.0, "preemphasis_htk_flavor": True, "fft_overdrive": False, "dither": 0.0,
            "input_scale_factor": 1.0, "mel_floor": 1e-3, "per_bin_mean": None, "per_bin_stddev": None}


def _frame_features(audio: dict[str, Any]) -> dict[str, Any]:
    """Gemma4UnifiedAudioFeatureExtractor: the waveform cut into audio_embed_dim-sample frames."""
    n = audio["audio_embed_dim"]
    return {"feature_size": n, "sampling_rate": SAMPLING_RATE, "padding_value": 0.0, "audio_samples_per_token": n}


AUDIO_FEATURES = {"gemma4": _mel_features, "gemma4_unified": _frame_features}


def processor_config(spec: FamilySpec) -> dict[str, Any] | None:
    """processor_config.json as transformers 5 saves it: every sub-processor nested under its own key.

    transformers' Gemma4(Unified)Processor needs all of image processor, feature extractor and video processor;
    llama.cpp's mmproj converter reads image_mean / image_std from the nested image_processor.
    """
    if spec.vision is None:
        return None
    layout, v = LAYOUTS[spec.layout], spec.vision
    patches = {"patch_size": v["patch_size"], "pooling_kernel_size": v["pooling_kernel_size"], "max_soft_tokens": 70}
    out: dict[str, Any] = {
        "processor_class": layout.processor,
        "image_processor": {
            "image_processor_type": layout.image_processor,
            "do_convert_rgb": True, "do_normalize": False, "do_rescale": True, "do_resize": True,
            "rescale_factor": 1 / 255, "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0],
            "resample": 3, **patches,
        },
        "video_processor": {"video_processor_type": layout.video_processor, **patches},
    }
    if spec.audio is not None:
        out["feature_extractor"] = {"feature_extractor_type": layout.feature_extractor,
                                    **AUDIO_FEATURES[spec.layout](spec.audio)}
    return out
