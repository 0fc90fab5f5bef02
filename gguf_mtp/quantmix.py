"""Which type llama.cpp's quantizer gives each tensor of a gemma4 / gemma4-assistant file, per preset, as tables.

The planner sizes a variant's files before they exist, so it needs the per-tensor mix a preset produces (Q6_K on
the tied embedding, Q6_K on some attn_v / ffn_down layers of Q4_K_M, ...) without running the quantizer. These
are llama.cpp's rules (src/llama-quant.cpp: tensor_allows_quantization, tensor_get_category,
llama_tensor_get_type_impl, tensor_type_fallback) restricted to what can fire on Gemma 4 tensor names, for a
run without an importance matrix, no overrides and not ``pure`` -- as `gguf-mtp quantize` runs by default.
Rules that cannot fire here are left out: fused attn_qkv, Falcon, 70B and 8-expert models.
tests/test_quantmix.py checks the tables against llama.cpp's own dry run for every registry variant.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES

from .errors import GgufMtpError
from .planning.memory import ggml_type
from .quanttypes import FTYPE_NAMES, preset

# --- tensors llama.cpp never quantizes: they keep their source type ---------------------------------------------
# (besides tensors of fewer than 2 dimensions and names not ending in "weight")
NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "per_layer_model_proj", ".position_embd", ".patch_embd")
UNQUANTIZED_TYPES = ("F32", "F16", "BF16")  # presets of these types convert; nothing is mixed

# --- categories (tensor_get_category): the first matching row names a tensor's category -------------------------
# ("output": the output head, and the token embeddings of a model without one -- llama.cpp quantizes a tied
# embedding as the head it also is)
CATEGORIES = (
    (re.compile(r"^output\.weight$"), "output"),
    (re.compile(r"^(per_layer_)?token_embd\.weight$"), "token_embd"),
    (re.compile(r"attn_v\.weight"), "attn_v"),
    (re.compile(r"attn_k\.weight"), "attn_k"),
    (re.compile(r"attn_q\.weight"), "attn_q"),
    (re.compile(r"attn_output\.weight"), "attn_output"),
    (re.compile(r"ffn_up"), "ffn_up"),
    (re.compile(r"ffn_gate"), "ffn_gate"),
    (re.compile(r"ffn_down"), "ffn_down"),
)

# presets llama.cpp treats together
VERY_LOW = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")  # its 1-2 bit branch
IQ2_S_M = ("IQ2_S", "IQ2_M")


@dataclass(frozen=True)
class Position:
    """What a rule may look at: where the tensor sits (``i`` of ``n``) and the model's shape."""

    i: int
    n: int
    gqa: int  # n_head / n_head_kv of layer 0 (llama_hparams::n_gqa())
    n_expert: int
    ne2: int  # the tensor's third dimension (experts of a stacked expert tensor)
    partial_block: bool  # the default type's blocks do not tile a row


def _more_bits(p: Position) -> bool:
    """use_more_bits: the first and last eighth, and every third layer between."""
    return p.i < p.n // 8 or p.i >= 7 * p.n // 8 or (p.i - p.n // 8) % 3 == 2


WHEN: dict[str, Callable[[Position], bool]] = {
    "always": lambda p: True,
    "more_bits": _more_bits,
    "first_eighth": lambda p: p.i < p.n // 8,
    "first_sixteenth": lambda p: p.i < p.n // 16,
    "first_two": lambda p: p.i < 2,
    "first_four": lambda p: p.i < 4,
    "middle": lambda p: p.n // 8 <= p.i < 7 * p.n // 8,
    "gqa4": lambda p: p.gqa >= 4,
    "gqa4_or_4_experts": lambda p: p.gqa >= 4 or p.n_expert >= 4,
    "expert_stack": lambda p: p.ne2 > 1,
    "partial_block": lambda p: p.partial_block,
}

# Which counter a category's position rules read: "wv" = rank among attn_v tensors of all attn_v tensors
# (i_attention_wv / n_attention_wv); "layer" = layer_info(): the blk index with experts (else the rank among the
# category's tensors) of the layer count; "rank" = the raw i_ffn_down counter of the layer count.
POSITIONS = {"attn_v": "wv", "ffn_down": "layer", "ffn_gate": "layer", "ffn_up": "layer"}


@dataclass(frozen=True)
class Rule:
    category: str  # "*": every category but the output head's
    presets: tuple[str, ...] | None  # None: every quantized preset
    when: str  # a key of WHEN
    type: str
    at: str | None = None  # position counter, when not the category's (POSITIONS)
    unless: tuple[str, ...] = ()  # presets the rule skips


# llama_tensor_get_type_impl as rows: for each tensor the first row of its category (or "*") whose preset and
# condition match gives the type; no row: the preset's default type. Rows of one category keep llama.cpp's order.
RULES = (
    # the output head (and a tied embedding)
    Rule("output", ("MXFP4_MOE",), "always", "Q8_0"),
    Rule("output", None, "partial_block", "Q8_0"),
    Rule("output", (*VERY_LOW, "IQ3_XXS"), "always", "Q5_K"),
    Rule("output", None, "always", "Q6_K", unless=("Q8_0",)),
    # MXFP4_MOE: experts MXFP4, everything else Q8_0
    Rule("*", ("MXFP4_MOE",), "expert_stack", "MXFP4"),
    Rule("*", ("MXFP4_MOE",), "always", "Q8_0"),
    # untied token embeddings
    Rule("token_embd", ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"), "always", "Q2_K"),
    Rule("token_embd", (*IQ2_S_M, "IQ3_XXS"), "always", "IQ3_S"),
    Rule("token_embd", ("TQ1_0", "TQ2_0", "Q2_0"), "always", "Q4_K"),
    # 1-2 bit presets
    Rule("attn_v", VERY_LOW, "gqa4_or_4_experts", "Q4_K"),
    Rule("attn_v", IQ2_S_M, "always", "IQ3_S"),
    Rule("attn_v", VERY_LOW, "always", "Q2_K"),
    Rule("ffn_down", IQ2_S_M, "first_eighth", "IQ3_S", at="rank"),
    Rule("ffn_down", VERY_LOW, "first_eighth", "Q2_K", at="rank"),
    Rule("attn_output", ("IQ1_S", "IQ1_M"), "always", "IQ2_XXS"),
    Rule("attn_output", IQ2_S_M, "always", "IQ3_S"),
    # attn_v
    Rule("attn_v", ("Q2_K",), "gqa4", "Q4_K"),
    Rule("attn_v", ("Q2_K",), "always", "Q3_K"),
    Rule("attn_v", ("Q2_K_S",), "gqa4", "Q4_K"),
    Rule("attn_v", ("IQ3_XXS",), "gqa4", "Q4_K"),
    Rule("attn_v", ("IQ3_XXS",), "always", "IQ3_S"),  # without an importance matrix
    Rule("attn_v", ("IQ3_XS", "IQ3_S"), "gqa4", "Q4_K"),
    Rule("attn_v", ("IQ3_M",), "always", "Q4_K"),
    Rule("attn_v", ("Q3_K_M",), "first_two", "Q5_K"),
    Rule("attn_v", ("Q3_K_M",), "always", "Q4_K"),
    Rule("attn_v", ("Q3_K_L",), "always", "Q5_K"),
    Rule("attn_v", ("IQ4_NL", "IQ4_XS"), "gqa4", "Q5_K"),
    Rule("attn_v", ("Q4_K_M", "Q5_K_M"), "more_bits", "Q6_K"),
    Rule("attn_v", ("Q4_K_S",), "first_four", "Q5_K"),
    # attn_k, attn_q
    Rule("attn_k", ("IQ3_XS",), "always", "IQ3_XXS"),
    Rule("attn_k", ("IQ3_XXS",), "always", "IQ2_S"),
    Rule("attn_q", ("IQ3_XS",), "always", "IQ3_XXS"),
    Rule("attn_q", ("IQ3_XXS",), "always", "IQ2_S"),
    # ffn_down
    Rule("ffn_down", ("Q2_K",), "always", "Q3_K"),
    Rule("ffn_down", ("Q2_K_S",), "first_eighth", "Q4_K"),
    Rule("ffn_down", ("IQ3_XXS",), "first_eighth", "Q4_K"),  # without an importance matrix
    Rule("ffn_down", ("IQ3_XXS",), "always", "Q3_K"),
    Rule("ffn_down", ("Q3_K_M",), "first_sixteenth", "Q5_K"),
    Rule("ffn_down", ("Q3_K_M",), "always", "Q4_K"),
    Rule("ffn_down", ("IQ3_M",), "first_eighth", "Q4_K"),
    Rule("ffn_down", ("Q3_K_L",), "always", "Q5_K"),
    Rule("ffn_down", ("Q4_K_M", "Q5_K_M"), "more_bits", "Q6_K"),
    Rule("ffn_down", ("IQ4_NL", "IQ4_XS"), "first_eighth", "Q5_K"),  # without an importance matrix
    Rule("ffn_down", ("Q4_K_S",), "first_eighth", "Q5_K"),
    # attn_output
    Rule("attn_output", ("Q2_K",), "always", "Q3_K"),
    Rule("attn_output", ("IQ3_XXS",), "always", "IQ3_S"),
    Rule("attn_output", ("Q3_K_M", "IQ3_M"), "always", "Q4_K"),
    Rule("attn_output", ("Q3_K_L",), "always", "Q5_K"),
    # ffn_gate, ffn_up
    Rule("ffn_gate", ("IQ3_XS",), "middle", "IQ3_XXS"),
    Rule("ffn_up", ("IQ3_XS",), "middle", "IQ3_XXS"),
)

# tensor_type_fallback: a type whose blocks do not tile a row falls back to one whose blocks do (else F16);
# 32-element types have nothing smaller and go to F16 directly
FALLBACK = {
    **dict.fromkeys(("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"), "IQ4_NL"),
    **dict.fromkeys(("Q2_0", "Q2_K", "Q3_K", "TQ1_0", "TQ2_0"), "Q4_0"),
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}

_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class Model:
    """The hyper-parameters llama.cpp's rules read."""

    n_layer: int  # block_count (n_layer_all)
    n_expert: int = 0
    gqa: int = 1


def n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: trailing dimensions of 1 do not count."""
    n = len(shape)
    while n > 1 and shape[n - 1] == 1:
        n -= 1
    return n


def quantizable(name: str, shape: Sequence[int]) -> bool:
    """tensor_allows_quantization, for the names a Gemma 4 file can hold."""
    return n_dims(shape) >= 2 and name.endswith("weight") and not any(s in name for s in NEVER_QUANTIZED)


def category(name: str, tied: bool) -> str:
    cat = next((c for pattern, c in CATEGORIES if pattern.search(name)), "other")
    return "output" if cat == "token_embd" and tied else cat


def block_size(type_name: str) -> int:
    return GGML_QUANT_SIZES[ggml_type(type_name)][0]


def _loader_order(name: str) -> tuple[int, str]:
    """llama_model_loader's weights_map order: by layer (non-layer tensors first), then by name."""
    m = _LAYER.match(name)
    return (int(m.group(1)) if m else -1, name)


def _fallback(type_name: str, ne0: int) -> str:
    if ne0 % block_size(type_name) == 0:
        return type_name
    if type_name in FALLBACK:
        type_name = FALLBACK[type_name]
    elif block_size(type_name) > 32:
        raise GgufMtpError(f"llama.cpp has no fallback for {type_name} on a row of {ne0} elements")
    return type_name if ne0 % block_size(type_name) == 0 else "F16"


def tensor_types(tensors: Sequence[tuple[str, tuple[int, ...], str]], quant: str, model: Model) -> dict[str, str]:
    """name -> the ggml type llama.cpp's quantizer writes for ``quant`` (a preset name), given each tensor's name,
    ggml-order shape and source type."""
    p = preset(quant)
    default, preset_name = p.default_type, FTYPE_NAMES.get(p.ftype, p.name)  # aliases (Q4_K) by the preset they mean
    tied = not any(name == "output.weight" for name, _, _ in tensors)
    out: dict[str, str] = {}
    ranks: dict[str, int] = {}
    counts: dict[str, int] = {}
    todo = []
    for name, shape, src in sorted(tensors, key=lambda t: _loader_order(t[0])):
        if p.only_copy or not quantizable(name, shape):
            out[name] = src
            continue
        if default in UNQUANTIZED_TYPES:
            out[name] = default
            continue
        cat = category(name, tied)
        todo.append((name, shape, cat, ranks.get(cat, 0)))
        ranks[cat] = counts[cat] = ranks.get(cat, 0) + 1
    for name, shape, cat, rank in todo:
        out[name] = _fallback(_rule_type(name, shape, cat, rank, counts[cat], preset_name, default, model),
                              shape[0])
    return out


def _rule_type(name: str, shape: tuple[int, ...], cat: str, rank: int, count: int, quant: str, default: str,
               model: Model) -> str:
    m = _LAYER.match(name)
    layer = int(m.group(1)) if m and model.n_expert > 1 else rank  # layer_info() reads the name only with experts
    counters = {"wv": (rank, count), "layer": (layer, model.n_layer), "rank": (rank, model.n_layer)}
    for rule in RULES:
        if rule.category not in (cat, "*") or (rule.category == "*" and cat == "output"):
            continue
        if (rule.presets is not None and quant not in rule.presets) or quant in rule.unless:
            continue
        i, n = counters.get(rule.at or POSITIONS.get(cat, ""), (0, 0))
        pos = Position(i, n, model.gqa, model.n_expert, shape[2] if len(shape) > 2 else 1,
                       shape[0] % block_size(default) != 0)
        if WHEN[rule.when](pos):
            return rule.type
    return default


__all__ = ["Model", "RULES", "category", "quantizable", "tensor_types"]
