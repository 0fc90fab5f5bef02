"""llama.cpp's per-tensor quant types as a table (gguf_mtp/quantmix.py), against llama.cpp's own quantizer.

The planner sizes files by these types without running the quantizer, so every registry variant x the presets we
use is checked against llama.cpp's dry run over a full-size sparse skeleton (it reads no tensor data).
"""

from __future__ import annotations

import pytest

from gguf_mtp import quantmix
from gguf_mtp.errors import GgufMtpError
from gguf_mtp.planning.layout import layout_for, mix_model
from gguf_mtp.planning.skeleton import dry_run_types
from gguf_mtp.registry import get_variant

VARIANTS = ("E2B", "E4B", "26B-A4B", "31B")
# what README / docs name for targets (the registry recommends Q4_K_M), and the drafter types docs/quantize.md measures
PRESETS = {"target": ("Q4_K_M", "Q8_0", "Q4_0", "Q6_K", "Q5_K_M", "IQ4_XS", "F16", "BF16"),
           "drafter": ("Q8_0", "Q4_K_M", "F16")}
CASES = [(v, role, q) for v in VARIANTS for role, presets in PRESETS.items() for q in presets]


@pytest.mark.slow
@pytest.mark.parametrize("variant, role, quant", CASES, ids=["-".join(c) for c in CASES])
def test_types_match_llamas_quantizer(skeletons, variant: str, role: str, quant: str) -> None:
    base = layout_for(variant, role)  # BF16, as the skeletons fixture writes it
    got = quantmix.tensor_types([(t.name, t.shape, t.type) for t in base.tensors], quant,
                                mix_model(get_variant(variant), role))
    assert got == dry_run_types(skeletons.get(variant, role), quant)


@pytest.mark.parametrize("n, more_bits", [
    # use_more_bits: the first and last eighth, every third layer between
    (8, [0, 3, 6, 7]),
    (35, [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 31, 32, 33, 34]),
    (60, [0, 1, 2, 3, 4, 5, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 42, 45, 48, 51, 52, 53, 54, 55, 56, 57,
          58, 59]),
])
def test_more_bits_layers(n: int, more_bits: list[int]) -> None:
    tensors = [(f"blk.{i}.ffn_down.weight", (256, 256), "BF16") for i in range(n)]
    types = quantmix.tensor_types(tensors, "Q4_K_M", quantmix.Model(n_layer=n))
    assert [i for i in range(n) if types[f"blk.{i}.ffn_down.weight"] == "Q6_K"] == more_bits


@pytest.mark.parametrize("name, shape, quant, expected", [
    ("blk.0.attn_q.weight", (256, 64), "Q4_K_M", "Q4_K"),
    ("blk.0.attn_q.weight", (128, 64), "Q4_K_M", "Q5_0"),  # rows of half a Q4_K block fall back
    ("blk.0.attn_q.weight", (96, 64), "Q6_K", "Q8_0"),
    ("blk.0.attn_q.weight", (80, 64), "Q8_0", "F16"),  # a 32-element type has nothing smaller
    ("blk.0.attn_q.weight", (128, 64), "IQ4_XS", "IQ4_NL"),
    ("token_embd.weight", (256, 512), "Q4_0", "Q6_K"),  # tied: quantized as the output head
    ("token_embd.weight", (256, 512), "Q8_0", "Q8_0"),
    ("token_embd.weight", (96, 512), "Q4_K_M", "Q8_0"),
    ("per_layer_model_proj.weight", (256, 512), "Q4_K_M", "BF16"),  # never quantized: keeps its type
    ("blk.0.ffn_gate_inp.weight", (256, 8), "Q4_K_M", "F32"),
    ("blk.0.attn_norm.weight", (256,), "Q4_K_M", "F32"),
    ("blk.0.ffn_down_exps.scale", (8,), "Q4_K_M", "F32"),
    ("blk.0.attn_q.weight", (256, 64), "F16", "F16"),
    ("blk.0.attn_q.weight", (256, 64), "Q4_K", "Q4_K"),  # an alias of Q4_K_M
])
def test_one_tensor(name: str, shape: tuple[int, ...], quant: str, expected: str) -> None:
    src = "F32" if len(shape) == 1 or "gate_inp" in name else "BF16"
    assert quantmix.tensor_types([(name, shape, src)], quant, quantmix.Model(n_layer=1))[name] == expected


def test_attn_v_counts_attn_v_tensors_not_layers() -> None:
    """Q4_K_M's attn_v rule reads the rank among attn_v tensors: layers without one (KV-shared, k_eq_v) do not
    count."""
    tensors = [(f"blk.{i}.attn_v.weight", (256, 256), "BF16") for i in range(0, 16, 2)]  # 8 of 16 layers
    types = quantmix.tensor_types(tensors, "Q4_K_M", quantmix.Model(n_layer=16))
    # ranks 0..7 of 8 (by layer index 0..14 of 16 it would be Q6_K at 0, 4, 10, 14)
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(0, 16, 2)] == ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K",
                                                                         "Q4_K", "Q6_K", "Q6_K"]


def test_unknown_preset() -> None:
    with pytest.raises(GgufMtpError, match="Q9_X"):
        quantmix.tensor_types([("blk.0.attn_q.weight", (256, 64), "BF16")], "Q9_X", quantmix.Model(n_layer=1))
