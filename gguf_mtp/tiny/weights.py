"""Tensor names, shapes and random values for the tiny checkpoints, and a small safetensors writer.

Names and shapes follow transformers 5.23.0's Gemma 4 modules (checked by tests/test_tiny_models.py
against the real module tree). Values are re-randomized so tiny models are not degenerate: transformers'
default init gives near-zero logits and greedy output that repeats one token. Every tensor draws from its
own generator seeded by (seed, family, role, name), so outputs are byte-identical for a seed and adding a
tensor leaves the others unchanged. No torch: numpy only.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .configs import FamilySpec, layer_geometry


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    init: str  # a key of INITS


def _normal(std: float):
    return lambda rng, shape: rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def _uniform(lo: float, hi: float):
    return lambda rng, shape: rng.uniform(lo, hi, shape).astype(np.float32)


def _linear(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """N(0, 1/fan_in): keeps activations at unit scale through every projection."""
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(shape[-1] ** -0.5)


def _post_norm(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Post-norm gains ~ sqrt(hidden), the rms of the scaled embedding each layer's output must move."""
    return (rng.uniform(0.75, 1.5, shape) * shape[0] ** 0.5).astype(np.float32)


def _signed_norm(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Final-norm gains of random sign: with a tied head, all-positive gains make every token's own
    embedding dominate its logits (greedy output then repeats the last token)."""
    return (rng.uniform(0.8, 1.2, shape) * rng.choice([-1.0, 1.0], shape)).astype(np.float32)


def _conv(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """N(0, 1/fan_in) for a conv kernel [out, in, *window]: fan_in is everything but the output channels."""
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(np.prod(shape[1:]) ** -0.5)


def _permutation(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.permutation(shape[0]).astype(np.int64)


# init kind -> fn(rng, shape). Post-norms are large so each layer moves the residual stream (which
# starts at rms sqrt(hidden) from the scaled embedding); otherwise every token predicts itself.
INITS = {
    "embed": _normal(1.0),
    "linear": _linear,
    "norm": _uniform(0.8, 1.2),
    "post_norm": _post_norm,
    "final_norm": _signed_norm,
    "layer_scalar": _uniform(0.7, 1.0),
    "scale": _uniform(0.8, 1.2),
    "pos_table": _normal(0.5),
    "clamp_min": _uniform(-12.0, -8.0),
    "clamp_max": _uniform(8.0, 12.0),
    "std_bias": _normal(0.1),
    "bias": _normal(0.1),
    "conv": _conv,
    "per_dim_scale": _normal(0.5),  # softplus-ed by the model (zeros upstream: scale log(2) everywhere)
    "ordering": _permutation,
}

_NORM = ("input_layernorm", "pre_feedforward_layernorm")
_POST_NORM = ("post_attention_layernorm", "post_feedforward_layernorm")


# --- names and shapes -------------------------------------------------------------------------------


def text_model_specs(text: dict[str, Any], prefix: str) -> list[TensorSpec]:
    """A Gemma4TextModel (target or drafter backbone) under ``prefix`` (e.g. ``model.``)."""
    h, vocab, n = text["hidden_size"], text["vocab_size"], text["num_hidden_layers"]
    heads, ple = text["num_attention_heads"], text.get("hidden_size_per_layer_input") or 0
    specs = [TensorSpec(f"{prefix}embed_tokens.weight", (vocab, h), "embed"),
             TensorSpec(f"{prefix}norm.weight", (h,), "final_norm")]
    if ple:
        specs += [
            TensorSpec(f"{prefix}embed_tokens_per_layer.weight", (text["vocab_size_per_layer_input"], n * ple),
                       "embed"),
            TensorSpec(f"{prefix}per_layer_model_projection.weight", (n * ple, h), "linear"),
            TensorSpec(f"{prefix}per_layer_projection_norm.weight", (ple,), "norm"),
        ]
    for i, g in enumerate(layer_geometry(text)):
        p = f"{prefix}layers.{i}."
        specs += [
            TensorSpec(p + "self_attn.q_proj.weight", (heads * g.head_dim, h), "linear"),
            TensorSpec(p + "self_attn.q_norm.weight", (g.head_dim,), "norm"),
            TensorSpec(p + "self_attn.o_proj.weight", (h, heads * g.head_dim), "linear"),
            TensorSpec(p + "mlp.gate_proj.weight", (g.ffn, h), "linear"),
            TensorSpec(p + "mlp.up_proj.weight", (g.ffn, h), "linear"),
            TensorSpec(p + "mlp.down_proj.weight", (h, g.ffn), "linear"),
            TensorSpec(p + "layer_scalar", (1,), "layer_scalar"),
        ]
        specs += [TensorSpec(p + name + ".weight", (h,), "norm") for name in _NORM]
        specs += [TensorSpec(p + name + ".weight", (h,), "post_norm") for name in _POST_NORM]
        if not g.shared:
            specs += [TensorSpec(p + "self_attn.k_proj.weight", (g.kv_heads * g.head_dim, h), "linear"),
                      TensorSpec(p + "self_attn.k_norm.weight", (g.head_dim,), "norm")]
            if g.has_v:
                specs.append(TensorSpec(p + "self_attn.v_proj.weight", (g.kv_heads * g.head_dim, h), "linear"))
        if ple:
            specs += [TensorSpec(p + "per_layer_input_gate.weight", (ple, h), "linear"),
                      TensorSpec(p + "per_layer_projection.weight", (h, ple), "linear"),
                      TensorSpec(p + "post_per_layer_input_norm.weight", (h,), "post_norm")]
        if text.get("enable_moe_block"):
            experts, ffn = text["num_experts"], text["moe_intermediate_size"]
            specs += [
                TensorSpec(p + "router.proj.weight", (experts, h), "linear"),
                TensorSpec(p + "router.scale", (h,), "scale"),
                TensorSpec(p + "router.per_expert_scale", (experts,), "scale"),
                TensorSpec(p + "experts.gate_up_proj", (experts, 2 * ffn, h), "linear"),
                TensorSpec(p + "experts.down_proj", (experts, h, ffn), "linear"),
                TensorSpec(p + "pre_feedforward_layernorm_2.weight", (h,), "norm"),
                TensorSpec(p + "post_feedforward_layernorm_1.weight", (h,), "post_norm"),
                TensorSpec(p + "post_feedforward_layernorm_2.weight", (h,), "post_norm"),
            ]
    return specs


def _clippable(name: str, shape: tuple[int, int], clipped: bool) -> list[TensorSpec]:
    """Gemma4ClippableLinear: ``.linear.weight`` plus 0-d clamp buffers when clipping is on."""
    specs = [TensorSpec(f"{name}.linear.weight", shape, "linear")]
    if clipped:
        specs += [TensorSpec(f"{name}.{b}", (), "clamp_min" if b.endswith("min") else "clamp_max")
                  for b in ("input_min", "input_max", "output_min", "output_max")]
    return specs


def vision_specs(vision: dict[str, Any], text_hidden: int, prefix: str = "model.") -> list[TensorSpec]:
    """Gemma4VisionModel under ``model.vision_tower.`` and its projector ``model.embed_vision.``."""
    h, ffn, hd = vision["hidden_size"], vision["intermediate_size"], vision["head_dim"]
    heads, kv, clip = vision["num_attention_heads"], vision["num_key_value_heads"], vision["use_clipped_linears"]
    vt = prefix + "vision_tower."
    specs = [TensorSpec(vt + "patch_embedder.input_proj.weight", (h, 3 * vision["patch_size"] ** 2), "linear"),
             TensorSpec(vt + "patch_embedder.position_embedding_table", (2, vision["position_embedding_size"], h),
                        "pos_table")]
    for i in range(vision["num_hidden_layers"]):
        p = f"{vt}encoder.layers.{i}."
        for proj, shape in (("q_proj", (heads * hd, h)), ("k_proj", (kv * hd, h)), ("v_proj", (kv * hd, h)),
                            ("o_proj", (h, heads * hd))):
            specs += _clippable(p + "self_attn." + proj, shape, clip)
        for proj, shape in (("gate_proj", (ffn, h)), ("up_proj", (ffn, h)), ("down_proj", (h, ffn))):
            specs += _clippable(p + "mlp." + proj, shape, clip)
        specs += [TensorSpec(p + "self_attn.q_norm.weight", (hd,), "norm"),
                  TensorSpec(p + "self_attn.k_norm.weight", (hd,), "norm")]
        specs += [TensorSpec(p + n + ".weight", (h,), "norm") for n in _NORM]
        specs += [TensorSpec(p + n + ".weight", (h,), "norm") for n in _POST_NORM]
    if vision.get("standardize"):
        specs += [TensorSpec(vt + "std_bias", (h,), "std_bias"), TensorSpec(vt + "std_scale", (h,), "scale")]
    specs.append(TensorSpec(prefix + "embed_vision.embedding_projection.weight", (text_hidden, h), "linear"))
    return specs


def unified_vision_specs(vision: dict[str, Any], text_hidden: int, prefix: str = "model.") -> list[TensorSpec]:
    """Gemma4UnifiedVisionEmbedder in the released checkpoint's names (``vision_embedder.*`` plus
    ``embed_vision.embedding_projection``): what llama.cpp's converter maps; transformers renames them on load
    (conversion_mapping.py, "gemma4_unified")."""
    d, p = vision["mm_embed_dim"], (vision["patch_size"] * vision["pooling_kernel_size"]) ** 2 * 3
    ve = prefix + "vision_embedder."
    specs = [TensorSpec(ve + "patch_ln1.weight", (p,), "norm"), TensorSpec(ve + "patch_ln1.bias", (p,), "bias"),
             TensorSpec(ve + "patch_dense.weight", (d, p), "linear"), TensorSpec(ve + "patch_dense.bias", (d,), "bias"),
             TensorSpec(ve + "pos_embedding", (vision["mm_posemb_size"], 2, d), "pos_table")]
    for norm in ("patch_ln2", "pos_norm"):
        specs += [TensorSpec(f"{ve}{norm}.weight", (d,), "norm"), TensorSpec(f"{ve}{norm}.bias", (d,), "bias")]
    specs.append(TensorSpec(prefix + "embed_vision.embedding_projection.weight",
                            (text_hidden, vision["output_proj_dims"]), "linear"))
    return specs


def unified_audio_specs(audio: dict[str, Any], text_hidden: int, prefix: str = "model.") -> list[TensorSpec]:
    """Gemma4Unified's audio embedder: raw frames RMS-normed (no weight) and projected."""
    return [TensorSpec(prefix + "embed_audio.embedding_projection.weight", (text_hidden, audio["audio_embed_dim"]),
                       "linear")]


def audio_specs(audio: dict[str, Any], text_hidden: int, prefix: str = "model.") -> list[TensorSpec]:
    """Gemma4AudioModel (the conformer) under ``model.audio_tower.`` and its projector ``model.embed_audio.``."""
    h, heads, clip = audio["hidden_size"], audio["num_attention_heads"], audio["use_clipped_linears"]
    c0, c1 = audio["subsampling_conv_channels"]
    at = prefix + "audio_tower."
    sub = at + "subsample_conv_projection."
    specs = [TensorSpec(sub + "layer0.conv.weight", (c0, 1, 3, 3), "conv"),
             TensorSpec(sub + "layer0.norm.weight", (c0,), "norm"),
             TensorSpec(sub + "layer1.conv.weight", (c1, c0, 3, 3), "conv"),
             TensorSpec(sub + "layer1.norm.weight", (c1,), "norm"),
             TensorSpec(sub + "input_proj_linear.weight", (h, c0 // 4 * c1), "linear")]
    for i in range(audio["num_hidden_layers"]):
        p = f"{at}layers.{i}."
        for ff in ("feed_forward1.", "feed_forward2."):
            specs += _clippable(p + ff + "ffw_layer_1", (4 * h, h), clip)
            specs += _clippable(p + ff + "ffw_layer_2", (h, 4 * h), clip)
            specs += [TensorSpec(p + ff + "pre_layer_norm.weight", (h,), "norm"),
                      TensorSpec(p + ff + "post_layer_norm.weight", (h,), "norm")]
        for proj in ("q_proj", "k_proj", "v_proj", "post"):
            specs += _clippable(p + "self_attn." + proj, (h, h), clip)
        specs += [TensorSpec(p + "self_attn.per_dim_scale", (h // heads,), "per_dim_scale"),
                  TensorSpec(p + "self_attn.relative_k_proj.weight", (h, h), "linear")]
        specs += _clippable(p + "lconv1d.linear_start", (2 * h, h), clip)
        specs += _clippable(p + "lconv1d.linear_end", (h, h), clip)
        specs += [TensorSpec(p + "lconv1d.depthwise_conv1d.weight", (h, 1, audio["conv_kernel_size"]), "conv"),
                  TensorSpec(p + "lconv1d.pre_layer_norm.weight", (h,), "norm"),
                  TensorSpec(p + "lconv1d.conv_norm.weight", (h,), "norm")]
        specs += [TensorSpec(f"{p}{n}.weight", (h,), "norm") for n in ("norm_pre_attn", "norm_post_attn", "norm_out")]
    out = audio["output_proj_dims"]
    specs += [TensorSpec(at + "output_proj.weight", (out, h), "linear"),
              TensorSpec(at + "output_proj.bias", (out,), "bias"),
              TensorSpec(prefix + "embed_audio.embedding_projection.weight", (text_hidden, out), "linear")]
    return specs


# layout -> (vision part, audio part) tensor builders
MEDIA_SPECS = {
    "gemma4": (vision_specs, audio_specs),
    "gemma4_unified": (unified_vision_specs, unified_audio_specs),
}


def target_specs(spec: FamilySpec) -> list[TensorSpec]:
    prefix = "model.language_model." if spec.multimodal else "model."
    specs = text_model_specs(spec.target_text, prefix)
    for part, make in zip((spec.vision, spec.audio), MEDIA_SPECS[spec.layout]):
        if part is not None:
            specs += make(part, spec.target_text["hidden_size"])
    return specs


def drafter_specs(spec: FamilySpec) -> list[TensorSpec]:
    text, backbone = spec.drafter_text, spec.target_text["hidden_size"]
    h = text["hidden_size"]
    specs = text_model_specs(text, "model.")
    specs += [TensorSpec("pre_projection.weight", (h, 2 * backbone), "linear"),
              TensorSpec("post_projection.weight", (backbone, h), "linear")]
    if spec.drafter_head.get("use_ordered_embeddings"):
        specs += [TensorSpec("masked_embedding.centroids.weight", (spec.drafter_head["num_centroids"], h), "linear"),
                  TensorSpec("masked_embedding.token_ordering", (text["vocab_size"],), "ordering")]
    return specs


# --- values -----------------------------------------------------------------------------------------


def materialize(specs: list[TensorSpec], seed: int, stream: str) -> dict[str, np.ndarray]:
    """Draw every tensor from its own generator: (seed, crc32(stream/name))."""
    out = {}
    for s in specs:
        rng = np.random.default_rng([seed, zlib.crc32(f"{stream}/{s.name}".encode())])
        value = np.array(INITS[s.init](rng, s.shape), order="C")  # not ascontiguousarray: keeps 0-d
        assert value.shape == s.shape, (s.name, value.shape)
        out[s.name] = value
    return out


# --- safetensors ------------------------------------------------------------------------------------

_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64", np.dtype(np.float16): "F16"}


def to_bf16_bytes(a: np.ndarray) -> bytes:
    """float32 -> bfloat16 with round-to-nearest-even (numpy has no bfloat16 dtype)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return rounded.astype("<u2").tobytes()


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], float_dtype: str = "float32") -> None:
    """A byte-stable safetensors file: tensors sorted by name, header padded to 8 bytes.

    Floating tensors are written as F32 or BF16 (``float_dtype``); integer tensors keep their type.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    chunks, offset = [], 0
    for name in sorted(tensors):
        a = tensors[name]
        if a.dtype.kind == "f" and float_dtype == "bfloat16":
            data, dtype = to_bf16_bytes(a), "BF16"
        else:
            data, dtype = a.astype(a.dtype.newbyteorder("<"), order="C").tobytes(), _ST_DTYPES[a.dtype]
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for c in chunks:
            f.write(c)
