"""Skeleton GGUFs: real Gemma 4 layouts at full size, sparse on disk, loadable by llama.cpp without reading data."""

from __future__ import annotations

import math
import os

import pytest
from click.testing import CliRunner
from fixtures.gguf import EXPORT_FAMILIES
from fixtures.projector import PROJECTOR_FAMILY

from gguf_mtp import keys
from gguf_mtp.cli import main
from gguf_mtp.export.tables import ROPE_FREQS
from gguf_mtp.gguffile import read_gguf
from gguf_mtp.keys import Keys
from gguf_mtp.planning.layout import base_layout, layout_for
from gguf_mtp.planning.skeleton import write_sparse
from gguf_mtp.registry import SCHEMA_VERSION, Variant, get_variant, parse_registry
from gguf_mtp.tiny.configs import FAMILIES, F, S, layer_geometry


@pytest.mark.parametrize("variant", ["E2B", "E4B", "12B", "26B-A4B", "31B"])
def test_layout_matches_registry_parameter_count(variant: str) -> None:
    """The registry's parameter estimate counts the skeleton's tensors (tied head once), all but the generated
    rope_freqs."""
    v = get_variant(variant)
    n = sum(math.prod(t.shape) for t in base_layout(v, "target").tensors if t.name != ROPE_FREQS)
    assert n == v.params_estimate().target


# --- a skeleton is what the exporter writes ----------------------------------------------------------------------
# Each tiny family as models.json would list it, in the registry's terms (layer geometry from the tiny generator's
# own derivation, not the exporter's): its skeleton must hold exactly the tensors and keys the exporter writes
# from the checkpoint. Values may differ only where a skeleton stands in for data it does not have: its name and
# source, its vocabulary (tokens and what is derived from them; no chat template).
STAND_IN = ("general.name", keys.SOURCE, keys.PAIR_VOCAB_SHA256)
NO_STAND_IN = (Keys.Tokenizer.CHAT_TEMPLATE,)
# What models.json does not say of a vision tower: tiny-e's standardizes its output (the registry's do not) and lacks
# the optional per-layer output scale (the registry's have one).
EXPORT_ONLY = ("v.std_bias", "v.std_scale")
SKELETON_ONLY = ".out_scale.weight"


def family_variant(name: str) -> Variant:
    spec = FAMILIES[name]
    t, d = spec.target_text, spec.drafter_text
    sliding, full = (next(g for g in layer_geometry(t) if g.kind == kind) for kind in (S, F))

    def pattern(types: list[str]) -> dict:
        return {"unit": "".join("S" if k == S else "F" for k in types), "repeat": 1}

    vision = spec.vision and {
        "width": spec.vision["hidden_size"], "layers": spec.vision["num_hidden_layers"],
        "heads": spec.vision["num_attention_heads"], "head_dim": spec.vision["head_dim"],
        "ffn": spec.vision["intermediate_size"], "patch_size": spec.vision["patch_size"], "image_size": 224,
        "pooling_kernel": spec.vision["pooling_kernel_size"],
        "position_embeddings": spec.vision["position_embedding_size"], "projection_dim": t["hidden_size"]}
    head = spec.drafter_head
    variant = {
        "hf": {"target": f"tiny/{name}", "drafter": f"tiny/{name}-assistant"},
        "text": {
            "layers": t["num_hidden_layers"], "hidden": t["hidden_size"], "intermediate": t["intermediate_size"],
            "heads": t["num_attention_heads"], "kv_heads": {"sliding": sliding.kv_heads, "full": full.kv_heads},
            "head_dim": sliding.head_dim, "global_head_dim": full.head_dim, "layer_pattern": pattern(t["layer_types"]),
            "sliding_window": t["sliding_window"], "shared_kv_layers": t["num_kv_shared_layers"],
            "ple_dim": t["hidden_size_per_layer_input"], "double_wide_mlp": t["use_double_wide_mlp"],
            "attention_k_eq_v": t["attention_k_eq_v"],
            "moe": {"experts": t["num_experts"], "top_k": t["top_k_experts"], "expert_ffn": t["moe_intermediate_size"]}
            if t["enable_moe_block"] else None,
            "vocab": t["vocab_size"], "context": t["max_position_embeddings"],
            "final_logit_softcap": t["final_logit_softcapping"],
            "rope": {"sliding_base": t["rope_parameters"][S]["rope_theta"],
                     "full_base": t["rope_parameters"][F]["rope_theta"],
                     "full_partial_rotary_factor": t["rope_parameters"][F]["partial_rotary_factor"]},
            "rms_eps": t["rms_norm_eps"],
        },
        "vision": vision or None,
        "audio": None,
        "drafter": {
            "layers": d["num_hidden_layers"], "layer_pattern": pattern(d["layer_types"]), "hidden": d["hidden_size"],
            "intermediate": d["intermediate_size"], "heads": d["num_attention_heads"],
            "head": {"type": "centroid", "clusters": head["num_centroids"], "top_k": head["centroid_intermediate_top_k"]}
            if head["use_ordered_embeddings"] else {"type": "dense"},
        },
        "recommended": {"draft_length": 3, "target_quant": "Q8_0", "drafter_quant": "Q8_0"},
    }
    return parse_registry({"schema_version": SCHEMA_VERSION, "variants": {name: variant}}).get(name)


def _tensors(info, leave_out=()) -> list[tuple[str, tuple[int, ...], str]]:
    return [(t.name, t.shape, t.type) for t in info.tensors if t.name not in leave_out]


def _assert_same_file(skeleton, export) -> None:
    s, e = read_gguf(skeleton, tokens=False), read_gguf(export, tokens=False)
    assert _tensors(s) == _tensors(e)
    assert set(s.metadata) == set(e.metadata) - set(NO_STAND_IN)
    values = lambda m: {k: v for k, v in m.items() if k not in STAND_IN and not k.startswith("tokenizer.")}  # noqa: E731
    assert values(s.metadata) == values(e.metadata)


@pytest.mark.parametrize("outtype", ["auto", "f16"])
@pytest.mark.parametrize("role", ["target", "drafter"])
@pytest.mark.parametrize("family", EXPORT_FAMILIES)
def test_skeleton_is_what_the_exporter_writes(exports, tmp_path, family: str, role: str, outtype: str) -> None:
    dtype = {"auto": "BF16" if FAMILIES[family].dtype == "bfloat16" else "F32", "f16": "F16"}[outtype]
    skeleton = tmp_path / "skeleton.gguf"
    write_sparse(skeleton, base_layout(family_variant(family), role, dtype))
    _assert_same_file(skeleton, exports.get(family, role, outtype))


def test_projector_skeleton_is_what_the_exporter_writes(projectors, tmp_path) -> None:
    """The vision part (tiny-e's audio tower has toy subsampling channels models.json does not describe: the
    registry's conformers take Gemma4AudioConfig's, layout.audio_hparams)."""
    skeleton = tmp_path / "mmproj.gguf"
    write_sparse(skeleton, base_layout(family_variant(PROJECTOR_FAMILY), "mmproj", "F32"))
    s, e = read_gguf(skeleton, tokens=False), read_gguf(projectors.get(audio=False), tokens=False)
    assert _tensors(s, {t.name for t in s.tensors if t.name.endswith(SKELETON_ONLY)}) == _tensors(e, EXPORT_ONLY)
    assert set(s.metadata) == set(e.metadata)
    differ = (*STAND_IN, Keys.General.SIZE_LABEL)  # the size label counts the tensors above
    assert {k: v for k, v in s.metadata.items() if k not in differ} == \
        {k: v for k, v in e.metadata.items() if k not in differ}


def test_shared_kv_layers_have_no_kv_weights() -> None:
    layout = base_layout(get_variant("E2B"), "target")
    names = {t.name for t in layout.tensors}
    assert "blk.14.attn_k.weight" in names and "blk.15.attn_k.weight" not in names  # 35 layers, 20 shared
    layout = base_layout(get_variant("31B"), "target")
    names = {t.name for t in layout.tensors}
    assert "blk.4.attn_v.weight" in names and "blk.5.attn_v.weight" not in names  # k_eq_v on full layers


def test_12b_skeletons_match_the_published_files(tmp_path) -> None:
    """What public copies of the 12B's files show (models.json sources hf-12b-it, hf-12b-assistant): a Q4_K_M
    target of 667 tensors (338 F32, 284 Q4_K, 45 Q6_K), the drafter's BF16 and Q8_0 files 861,520,128 and
    465,109,248 bytes -- ours differ by the same 8,011,232 bytes in both, the real tokenizer's merges our stand-in
    vocabulary lacks -- and an F16 projector (vision and audio embedders) of 116.4 MiB."""
    from collections import Counter

    target = layout_for("12B", "target", "Q4_K_M")
    assert Counter(t.type for t in target.tensors) == {"F32": 338, "Q4_K": 284, "Q6_K": 45}
    names = {t.name for t in target.tensors}
    assert "blk.4.attn_v.weight" in names and "blk.5.attn_v.weight" not in names  # k_eq_v full layers
    header = 8_011_232
    for quant, published in ((None, 861_520_128), ("Q8_0", 465_109_248)):
        assert write_sparse(tmp_path / f"d{quant}.gguf", layout_for("12B", "drafter", quant)) + header == published
    mmproj = layout_for("12B", "mmproj")
    assert round(mmproj.n_bytes / 2**20, 1) == 116.4
    assert {mmproj.metadata.plain()[k] for k in ("clip.vision.projector_type", "clip.audio.projector_type")} == \
        {"gemma4uv", "gemma4ua"}


def test_skeleton_is_sparse_and_readable(tmp_path) -> None:
    out = tmp_path / "31B.gguf"
    size = write_sparse(out, base_layout(get_variant("31B"), "target"))
    st = os.stat(out)
    assert st.st_size == size > 57 * 2**30  # BF16 31B: full apparent size (30.7B weights x 2 bytes)
    assert st.st_blocks * 512 < 64 * 2**20  # header only on disk
    info = read_gguf(out, tokens=False)
    assert info.arch == keys.ARCH_TARGET
    assert len(info.token_bytes) == 262144
    assert info.metadata[keys.ROLE] == "target"


def test_quant_types_follow_llamas_quantizer() -> None:
    """Q4_K_M's mix (llama.cpp's rules, gguf_mtp/quantmix.py): Q6_K for the tied embedding, Q4_K for most."""
    layout = layout_for("E2B", "target", "Q4_K_M")
    types = {t.name: t.type for t in layout.tensors}
    assert types["token_embd.weight"] == "Q6_K"
    assert types["blk.0.attn_q.weight"] == "Q4_K"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["per_layer_model_proj.weight"] == "BF16"  # never quantized by llama.cpp


def test_skeleton_cli(tmp_path) -> None:
    out = tmp_path / "d.gguf"
    runner = CliRunner()
    r = runner.invoke(main, ["skeleton", "E2B", "--role", "drafter", "--quant", "Q8_0", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    info = read_gguf(out, tokens=False)
    assert info.arch == keys.ARCH_DRAFTER
    assert {t.type for t in info.tensors} <= {"Q8_0", "F32"}
    r = runner.invoke(main, ["skeleton", "E2B", "--role", "drafter", "-o", str(out)])
    assert r.exit_code == 2 and "exists" in r.output  # never overwritten without --force
    r = runner.invoke(main, ["skeleton", "E9B", "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code == 2 and "unknown model variant" in r.output
    r = runner.invoke(main, ["skeleton", "E2B", "--quant", "Q9_X", "-o", str(tmp_path / "y.gguf")])
    assert r.exit_code == 2 and "Q9_X" in r.output
    assert not (tmp_path / "y.gguf").exists()
