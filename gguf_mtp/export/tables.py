"""HF -> GGUF tensor names, expected shapes and per-family rules, as tables.

One row per tensor kind; ``{bid}`` rows are expanded once per decoder layer. A row's ``when`` names the
conditions (family features) under which the tensor exists, so E2B/E4B (PLE, shared KV, double-wide MLP),
26B-A4B (MoE block beside the dense MLP), 31B (k_eq_v full layers) and the drafters all run through the same
table. Shapes are HF (numpy) order, written as dimension names resolved per layer (see ``tensors.py``).
Names follow llama.cpp's ``src/llama-arch.cpp``; conversion notes are in docs/export.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as Q

from .. import keys


@dataclass(frozen=True)
class Row:
    hf: str  # name under the text model's prefix ("root:" = from the checkpoint root)
    gguf: str
    shape: tuple[str, ...]  # HF shape as dimension names
    when: tuple[str, ...] = ()  # conditions that must all hold for the tensor to exist
    cut_vocab: bool = False  # rows beyond the tokenizer's size are dropped


# --- tensors outside the decoder layers ---------------------------------------------------------------------
GLOBAL = (
    Row("embed_tokens.weight", "token_embd.weight", ("V", "E"), cut_vocab=True),
    Row("embed_tokens_per_layer.weight", "per_layer_token_embd.weight", ("Vp", "PL"), ("ple",), cut_vocab=True),
    Row("per_layer_model_projection.weight", "per_layer_model_proj.weight", ("PL", "E"), ("ple",)),
    Row("per_layer_projection_norm.weight", "per_layer_proj_norm.weight", ("P",), ("ple",)),
    Row("root:pre_projection.weight", "nextn.pre_projection.weight", ("E", "Eb2"), ("drafter",)),
    Row("root:post_projection.weight", "nextn.post_projection.weight", ("Eb", "E"), ("drafter",)),
    Row("root:masked_embedding.centroids.weight", keys.CENTROIDS_TENSOR, ("C", "E"), ("centroids",)),
    Row("root:masked_embedding.token_ordering", keys.ORDERING_TENSOR, ("V",), ("centroids",)),
    Row("norm.weight", "output_norm.weight", ("E",)),
    Row("root:lm_head.weight", "output.weight", ("V", "E"), ("untied",), cut_vocab=True),
)

# --- one decoder layer -----------------------------------------------------------------------------------------
LAYER = (
    # attention
    Row("layers.{bid}.input_layernorm.weight", "blk.{bid}.attn_norm.weight", ("E",)),
    Row("layers.{bid}.self_attn.q_proj.weight", "blk.{bid}.attn_q.weight", ("q", "E")),
    Row("layers.{bid}.self_attn.k_proj.weight", "blk.{bid}.attn_k.weight", ("kv", "E"), ("kv",)),
    Row("layers.{bid}.self_attn.v_proj.weight", "blk.{bid}.attn_v.weight", ("kv", "E"), ("v",)),
    Row("layers.{bid}.self_attn.o_proj.weight", "blk.{bid}.attn_output.weight", ("E", "q")),
    Row("layers.{bid}.self_attn.q_norm.weight", "blk.{bid}.attn_q_norm.weight", ("hd",)),
    Row("layers.{bid}.self_attn.k_norm.weight", "blk.{bid}.attn_k_norm.weight", ("hd",), ("kv",)),
    Row("layers.{bid}.post_attention_layernorm.weight", "blk.{bid}.post_attention_norm.weight", ("E",)),
    # dense MLP (runs alongside the experts in MoE layers)
    Row("layers.{bid}.pre_feedforward_layernorm.weight", "blk.{bid}.ffn_norm.weight", ("E",)),
    Row("layers.{bid}.mlp.gate_proj.weight", "blk.{bid}.ffn_gate.weight", ("F", "E")),
    Row("layers.{bid}.mlp.up_proj.weight", "blk.{bid}.ffn_up.weight", ("F", "E")),
    Row("layers.{bid}.mlp.down_proj.weight", "blk.{bid}.ffn_down.weight", ("E", "F")),
    Row("layers.{bid}.post_feedforward_layernorm.weight", "blk.{bid}.post_ffw_norm.weight", ("E",)),
    # MoE block
    Row("layers.{bid}.router.proj.weight", "blk.{bid}.ffn_gate_inp.weight", ("X", "E"), ("moe",)),
    Row("layers.{bid}.router.scale", "blk.{bid}.ffn_gate_inp.scale", ("E",), ("moe",)),
    Row("layers.{bid}.router.per_expert_scale", "blk.{bid}.ffn_down_exps.scale", ("X",), ("moe",)),
    Row("layers.{bid}.experts.gate_up_proj", "blk.{bid}.ffn_gate_up_exps.weight", ("X", "Fx2", "E"), ("moe",)),
    Row("layers.{bid}.experts.down_proj", "blk.{bid}.ffn_down_exps.weight", ("X", "E", "Fx"), ("moe",)),
    Row("layers.{bid}.pre_feedforward_layernorm_2.weight", "blk.{bid}.pre_ffw_norm_2.weight", ("E",), ("moe",)),
    Row("layers.{bid}.post_feedforward_layernorm_1.weight", "blk.{bid}.post_ffw_norm_1.weight", ("E",), ("moe",)),
    Row("layers.{bid}.post_feedforward_layernorm_2.weight", "blk.{bid}.post_ffw_norm_2.weight", ("E",), ("moe",)),
    # per-layer embeddings (E2B/E4B)
    Row("layers.{bid}.per_layer_input_gate.weight", "blk.{bid}.inp_gate.weight", ("P", "E"), ("ple",)),
    Row("layers.{bid}.per_layer_projection.weight", "blk.{bid}.proj.weight", ("E", "P"), ("ple",)),
    Row("layers.{bid}.post_per_layer_input_norm.weight", "blk.{bid}.post_norm.weight", ("E",), ("ple",)),
    # residual scale
    Row("layers.{bid}.layer_scalar", "blk.{bid}.layer_output_scale.weight", ("1",)),
)

ROPE_FREQS = "rope_freqs.weight"  # generated (proportional RoPE of full layers), F32 {global_head_dim/2}

# Checkpoint tensors we know and deliberately leave out: (pattern under the prefix, condition, why).
# KV-shared layers may still carry (dead) K/V weights; tied heads may be saved twice; the centroid head is
# written only on request; v_norm has no weight.
IGNORED = (
    ("layers.{bid}.self_attn.k_proj.weight", "shared", "KV-shared layer reuses an earlier layer's K/V"),
    ("layers.{bid}.self_attn.v_proj.weight", "shared", "KV-shared layer reuses an earlier layer's K/V"),
    ("layers.{bid}.self_attn.k_norm.weight", "shared", "KV-shared layer reuses an earlier layer's K/V"),
    ("layers.{bid}.self_attn.v_proj.weight", "k_eq_v", "k_eq_v full layer: V is K"),
    ("root:lm_head.weight", "tied", "tied head: llama.cpp reuses token_embd"),
    ("root:masked_embedding.centroids.weight", "no_centroids", "centroid head written only with --centroids"),
    ("root:masked_embedding.token_ordering", "no_centroids", "centroid head written only with --centroids"),
)

# --- tensor types -------------------------------------------------------------------------------------------------
OUTTYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
FILE_TYPES = {Q.F32: 0, Q.F16: 1, Q.Q8_0: 7, Q.BF16: 32}  # llama_ftype: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0, MOSTLY_BF16
SOURCE_TYPES = {"F32": Q.F32, "F64": Q.F32, "F16": Q.F16, "BF16": Q.BF16}  # --outtype auto
ALWAYS_F32 = ("ffn_gate_inp.weight",)  # upstream keeps the router in F32 (so does llama.cpp's quantizer)
FIXED_TYPES = {keys.ORDERING_TENSOR: Q.I32}


def tensor_type(gguf_name: str, n_dims: int, row: int, outtype: Q) -> Q:
    """The GGUF type of one tensor under ``outtype`` (upstream's rules: small and odd tensors stay F32)."""
    if gguf_name in FIXED_TYPES:
        return FIXED_TYPES[gguf_name]
    if gguf_name == keys.CENTROIDS_TENSOR:
        return Q.F32 if outtype == Q.F32 else Q.F16
    if n_dims <= 1 or gguf_name.endswith("_norm.weight") or gguf_name.endswith(ALWAYS_F32):
        return Q.F32
    if not gguf_name.endswith(".weight"):
        return Q.F32
    if outtype == Q.Q8_0 and row % 32:
        return Q.F16  # rows that are not whole Q8_0 blocks (upstream falls back the same way)
    return outtype
