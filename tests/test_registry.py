"""models.json and gguf_mtp.registry: the family's facts, name lookup, and one-line errors for bad files."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from gguf_mtp.errors import GgufMtpError
from gguf_mtp.registry import (
    ENV_MODELS,
    SCHEMA,
    LayerPattern,
    Registry,
    RegistryError,
    Variant,
    get_variant,
    load_registry,
    name_key,
)
from gguf_mtp.registry_config import CONFIG_CHECKS, check_config, config_mismatches, variant_for_config

MODELS_JSON = Path(__file__).resolve().parent.parent / "models.json"
VARIANTS = ["E2B", "E4B", "12B", "26B-A4B", "31B"]


@pytest.fixture(scope="module")
def reg() -> Registry:
    return load_registry(MODELS_JSON)


@pytest.fixture(scope="module")
def raw() -> dict:
    return json.loads(MODELS_JSON.read_text())


# --- facts from the public configs ----------------------------------------------------------------------


def test_family_and_order(reg: Registry) -> None:
    assert reg.schema_version == 1
    assert reg.names == VARIANTS
    assert len(reg) == 5 and "31b" in reg and "12b" in reg and "e3b" not in reg


def test_31b_facts(reg: Registry) -> None:
    v = reg.get("31B")
    t = v.text
    assert (t.layers, t.hidden, t.intermediate, t.heads) == (60, 5376, 21504, 32)
    assert (t.kv_heads.sliding, t.kv_heads.full) == (16, 4)
    assert (t.head_dim, t.global_head_dim, t.sliding_window, t.context) == (256, 512, 1024, 262144)
    assert t.attention_k_eq_v and t.moe is None and t.ple_dim == 0 and t.shared_kv_layers == 0
    types = v.layer_types()
    assert [i for i, k in enumerate(types) if k == "full"] == list(range(5, 60, 6))
    assert v.kv_layers() == list(range(60))
    assert (v.drafter.hidden, v.drafter.heads, v.drafter.head.type) == (1024, 32, "dense")
    assert v.audio is None and v.vision is not None and v.vision.width == 1152


def test_e2b_facts(reg: Registry) -> None:
    v = reg.get("E2B")
    t = v.text
    assert (t.layers, t.hidden, t.shared_kv_layers, t.ple_dim) == (35, 1536, 20, 256)
    assert (t.kv_heads.sliding, t.kv_heads.full) == (1, 1)
    assert t.double_wide_mlp and not t.attention_k_eq_v
    assert v.kv_layers() == list(range(15))
    assert t.layer_types()[:5] == ["sliding"] * 4 + ["full"]
    # shared layers read the last owning layer of their type; their MLP is twice as wide
    assert (t.kv_source(3), t.kv_source(15), t.kv_source(19), t.kv_source(34)) == (3, 13, 14, 14)
    assert (t.ffn_of(14), t.ffn_of(15)) == (6144, 12288)
    assert (t.head_dim_of(0), t.head_dim_of(4)) == (256, 512)
    head = v.drafter.head
    assert (head.type, head.clusters, head.top_k) == ("centroid", 2048, 32)
    assert (v.drafter.hidden, v.drafter.intermediate, v.drafter.heads) == (256, 2048, 4)
    assert v.audio is not None and v.audio.width == 1024


def test_12b_facts(reg: Registry) -> None:
    """Gemma4Unified: a dense text model with 1-KV-head k_eq_v full layers, embedders instead of towers."""
    v = reg.get("google/gemma-4-12B-it")
    t = v.text
    assert (t.layers, t.hidden, t.intermediate, t.heads) == (48, 3840, 15360, 16)
    assert (t.kv_heads.sliding, t.kv_heads.full, t.head_dim, t.global_head_dim) == (8, 1, 256, 512)
    assert (t.sliding_window, t.context, t.shared_kv_layers, t.ple_dim) == (1024, 262144, 0, 0)
    assert t.attention_k_eq_v and t.moe is None
    assert [i for i, k in enumerate(v.layer_types()) if k == "full"] == list(range(5, 48, 6))
    assert (v.hf.target_architecture, v.hf.drafter_architecture) == (
        "Gemma4UnifiedForConditionalGeneration", "Gemma4UnifiedAssistantForCausalLM")
    assert reg.get("E2B").hf.target_architecture == "Gemma4ForConditionalGeneration"  # the default
    assert v.vision is None and v.audio is None and v.has_vision and v.has_audio
    e = v.embedders
    assert e is not None and e.vision is not None and e.audio is not None
    assert (e.vision.patch_size * e.vision.pooling_kernel, e.vision.embed_dim, e.vision.position_embeddings) == (
        48, 3840, 1120)
    assert e.audio.samples_per_token * 1000 // e.audio.sample_rate == 40  # 40 ms frames
    d = v.drafter
    assert (d.hidden, d.intermediate, d.heads, d.head.type, d.context) == (1024, 8192, 16, "dense", 131072)
    assert reg.get("31B").drafter.context is None  # the target's
    assert not v.is_confirmed("drafter.head.type") and v.is_confirmed("drafter.hidden")


def test_e4b_and_26b_facts(reg: Registry) -> None:
    e4b = reg.get("E4B").text
    assert (e4b.layers, e4b.hidden, e4b.shared_kv_layers, e4b.kv_heads.full) == (42, 2560, 18, 2)
    assert reg.get("E4B").kv_layers() == list(range(24))
    moe = reg.get("26B-A4B")
    assert moe.text.moe is not None
    assert (moe.text.moe.experts, moe.text.moe.top_k, moe.text.moe.expert_ffn) == (128, 8, 704)
    assert (moe.text.kv_heads.sliding, moe.text.kv_heads.full) == (8, 2)
    assert moe.audio is None


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_is_consistent(reg: Registry, name: str) -> None:
    v = reg.get(name)
    assert len(v.layer_types()) == v.text.layers and v.layer_types()[-1] == "full"
    assert v.drafter.layer_types() == ["sliding", "sliding", "sliding", "full"]
    assert v.hf.target == f"google/gemma-4-{name}-it"
    assert v.hf.drafter == v.hf.target + "-assistant"
    assert v.text.vocab == 262144 and v.text.final_logit_softcap == 30.0
    assert (v.recommended.target_quant, v.recommended.drafter_quant) == ("Q4_K_M", "Q8_0")
    assert v.sources and all(s in reg.sources for s in v.sources)


def test_unconfirmed_values_are_marked(reg: Registry) -> None:
    moe = reg.get("26B-A4B")
    assert "drafter.hidden" in moe.unconfirmed
    assert not moe.is_confirmed("drafter.hidden") and moe.is_confirmed("text.hidden")
    assert reg.get("E2B").is_confirmed("drafter.head.clusters")


def test_params_estimates_match_published_sizes(reg: Registry) -> None:
    def near(x: int, want: float, tol: float = 0.03) -> bool:
        return abs(x - want) <= tol * want

    p31 = reg.get("31B").params_estimate()
    assert near(p31.target, 30.7e9, 0.01) and p31.target_active == p31.target
    # the 31B drafter's bf16 model.safetensors is 939,042,560 bytes
    assert near(2 * p31.drafter, 939_042_560, 0.001)
    p26 = reg.get("26B-A4B").params_estimate()
    assert near(p26.target, 25.2e9, 0.01) and near(p26.target_active, 3.8e9)
    pe2 = reg.get("E2B").params_estimate()
    assert near(pe2.target_active, 2.3e9) and near(pe2.total, 5.1e9)
    assert near(reg.get("E4B").params_estimate().drafter, 78.518e6, 0.001)
    assert near(pe2.vision, 150e6, 0.15) and near(p31.vision, 550e6, 0.1) and p31.audio == 0
    assert near(pe2.audio, 300e6, 0.05)  # the conformer, from export/projector.py's (audio.py's) table
    # the 12B: 11.95B on its model card (embedders included), a 423M drafter
    p12 = reg.get("12B").params_estimate()
    assert near(p12.target + p12.vision + p12.audio, 11.95e9, 0.002) and near(p12.drafter, 423e6, 0.002)
    assert p12.audio == 640 * 3840 and p12.target_active == p12.target


def test_layer_pattern_expands() -> None:
    assert LayerPattern("SSF", 2).expand() == ["sliding", "sliding", "full"] * 2
    assert len(LayerPattern("SSSSSF", 10)) == 60


def test_dataclasses_are_frozen(reg: Registry) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        reg.get("31B").text.layers = 61  # type: ignore[misc]


def test_schema_tables_cover_the_dataclasses() -> None:
    for section, (cls, fields) in SCHEMA.items():
        if cls is None:
            continue
        declared = {f.name for f in dataclasses.fields(cls)} - ({"name"} if cls is Variant else set())
        assert declared == {f.name for f in fields}, section


# --- a real config.json against the registry (the exporter's guard) ----------------------------------------------


def released_12b_config() -> tuple[dict, dict]:
    """The 12B's config.json and its assistant's, as the public sources describe them (transformers 5.23.0's
    serialization: full layers' head size and KV heads in per_layer_config)."""
    types = (["sliding_attention"] * 5 + ["full_attention"]) * 8
    full = {str(i): {"head_dim": 512, "num_key_value_heads": 1} for i, k in enumerate(types) if k == "full_attention"}
    text = {"hidden_size": 3840, "num_hidden_layers": 48, "intermediate_size": 15360, "num_attention_heads": 16,
            "num_key_value_heads": 8, "head_dim": 256, "layer_types": types, "per_layer_config": full,
            "sliding_window": 1024, "num_kv_shared_layers": 0, "attention_k_eq_v": True, "vocab_size": 262144,
            "max_position_embeddings": 262144, "final_logit_softcapping": 30.0, "use_double_wide_mlp": True}
    target = {"architectures": ["Gemma4UnifiedForConditionalGeneration"], "text_config": text,
              "vision_config": {"patch_size": 16, "pooling_kernel_size": 3, "mm_embed_dim": 3840,
                                "mm_posemb_size": 1120},
              "audio_config": {"audio_embed_dim": 640}}
    dtypes = ["sliding_attention"] * 3 + ["full_attention"]
    drafter = {"architectures": ["Gemma4UnifiedAssistantForCausalLM"], "backbone_hidden_size": 3840,
               "use_ordered_embeddings": True,
               "text_config": {"hidden_size": 1024, "num_hidden_layers": 4, "intermediate_size": 8192,
                               "num_attention_heads": 16, "layer_types": dtypes, "max_position_embeddings": 131072}}
    return target, drafter


def test_released_configs_pass_and_are_found(reg: Registry) -> None:
    target, drafter = released_12b_config()
    # found by shape (a local directory) and by repo id; use_double_wide_mlp and the centroid head are unconfirmed,
    # so the values above that differ from the registry's are not refused
    assert check_config(target, "target", registry=reg).name == "12B"
    assert check_config(drafter, "drafter", "google/gemma-4-12B-it-assistant", reg).name == "12B"
    tiny = {"architectures": ["Gemma4ForConditionalGeneration"],
            "text_config": {"hidden_size": 64, "num_hidden_layers": 4}}
    assert variant_for_config(tiny, "target", registry=reg) is None


@pytest.mark.parametrize(("role", "edit", "path"), [
    ("target", lambda c: c["text_config"].update(intermediate_size=16384), "text.intermediate"),
    ("target", lambda c: c["text_config"]["per_layer_config"]["5"].update(num_key_value_heads=2), "text.kv_heads.full"),
    ("target", lambda c: c["text_config"]["layer_types"].__setitem__(0, "full_attention"), "text.layer_pattern"),
    ("target", lambda c: c["vision_config"].update(mm_posemb_size=2048), "embedders.vision.position_embeddings"),
    ("target", lambda c: c.update(architectures=["Gemma4ForConditionalGeneration"]), "hf.target_architecture"),
    ("drafter", lambda c: c["text_config"].update(num_attention_heads=32), "drafter.heads"),
    ("drafter", lambda c: c["text_config"].update(max_position_embeddings=262144), "drafter.context"),
])
def test_a_config_that_contradicts_a_confirmed_fact_is_refused(reg: Registry, role, edit, path) -> None:
    configs = dict(zip(("target", "drafter"), released_12b_config()))
    cfg = configs[role]
    edit(cfg)
    v = reg.get("12B")
    assert [m.path for m in config_mismatches(v, role, cfg)] == [path]
    with pytest.raises(GgufMtpError, match=path.replace(".", r"\.")):
        check_config(cfg, role, v.hf.target if role == "target" else v.hf.drafter, reg)


def test_every_check_names_a_field_and_a_role() -> None:
    from gguf_mtp.registry import _schema_has

    for path, role, _, _ in CONFIG_CHECKS:
        assert _schema_has(path) and role in ("target", "drafter"), path


# --- name lookup ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "name"),
    [
        ("e2b", "E2B"),
        ("gemma-4-e2b", "E2B"),
        ("GEMMA-4-E2B-IT", "E2B"),
        ("google/gemma-4-E4B-it-assistant", "E4B"),
        ("31b", "31B"),
        ("Gemma4-31B", "31B"),
        ("26b", "26B-A4B"),
        ("26B_A4B", "26B-A4B"),
        ("google/gemma-4-26B-A4B-it", "26B-A4B"),
        ("google/gemma-4-12B-it-assistant", "12B"),
        ("gemma-4-12b-unified", "12B"),
    ],
)
def test_lookup_accepts_names_and_aliases(reg: Registry, spelling: str, name: str) -> None:
    assert reg.get(spelling).name == name
    assert get_variant(spelling, reg).name == name


def test_unknown_variant_lists_valid_names(reg: Registry) -> None:
    with pytest.raises(GgufMtpError) as e:
        reg.get("e3b")
    assert str(e.value) == "unknown model variant 'e3b' (valid: E2B, E4B, 12B, 26B-A4B, 31B)"


def test_name_key() -> None:
    assert name_key(" google/Gemma-4-26B_A4B-it ") == "26b-a4b"
    assert name_key("gemma4") == "gemma4"


def test_default_path_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raw: dict) -> None:
    monkeypatch.delenv(ENV_MODELS, raising=False)
    assert load_registry().path == MODELS_JSON
    assert get_variant("31b").name == "31B"
    data = copy.deepcopy(raw)
    data["variants"] = {"31B": data["variants"]["31B"]}
    other = tmp_path / "mine.json"
    other.write_text(json.dumps(data))
    monkeypatch.setenv(ENV_MODELS, str(other))
    assert load_registry().names == ["31B"]
    monkeypatch.setenv(ENV_MODELS, str(tmp_path / "absent.json"))
    with pytest.raises(GgufMtpError, match=r"model registry not found \(set by \$GGUF_MTP_MODELS\)"):
        load_registry()


# --- bad files: one clear line each ---------------------------------------------------------------------


def _text(d: dict, v: str = "31B") -> dict:
    return d["variants"][v]["text"]


def _drafter(d: dict, v: str = "31B") -> dict:
    return d["variants"][v]["drafter"]


def _rename(d: dict, old: str, new: str) -> None:
    d[new] = d.pop(old)


BAD_EDITS = {
    "unknown key": (
        lambda d: _rename(_text(d), "hidden", "hiden"),
        "variants.31B.text.hiden: unknown key (did you mean 'hidden'?)",
    ),
    "unknown top-level key": (lambda d: d.update(variantz={}), "variantz: unknown key (did you mean 'variants'?)"),
    "missing field": (lambda d: _text(d).pop("vocab"), "variants.31B.text.vocab: missing field"),
    "missing section": (lambda d: d["variants"]["E2B"].pop("drafter"), "variants.E2B.drafter: missing field"),
    "wrong type": (
        lambda d: _text(d).update(hidden="5376"),
        'variants.31B.text.hidden: expected an integer, got string "5376"',
    ),
    "bool for int": (
        lambda d: _text(d).update(layers=True),
        "variants.31B.text.layers: expected an integer, got boolean",
    ),
    "float for int": (
        lambda d: _text(d).update(layers=60.0),
        "variants.31B.text.layers: expected an integer, got number",
    ),
    "null section": (
        lambda d: d["variants"]["31B"].update(drafter=None),
        "variants.31B.drafter: expected an object, got null",
    ),
    "list for section": (
        lambda d: _text(d).update(rope=[1, 2]),
        "variants.31B.text.rope: expected an object, got list",
    ),
    "below minimum": (
        lambda d: _text(d).update(shared_kv_layers=-1),
        "variants.31B.text.shared_kv_layers: must be at least 0, got -1",
    ),
    "pattern length": (
        lambda d: _text(d)["layer_pattern"].update(repeat=9),
        "variants.31B.text.layer_pattern: covers 54 layers ('SSSSSF' x 9) but text.layers is 60",
    ),
    "last layer not full": (
        lambda d: _text(d)["layer_pattern"].update(unit="SSSSFS"),
        "variants.31B.text.layer_pattern: the last layer must be a full-attention layer",
    ),
    "bad pattern letter": (
        lambda d: _text(d)["layer_pattern"].update(unit="SSSSSX"),
        "variants.31B.text.layer_pattern.unit: must be a non-empty string of S (sliding) and F (full)",
    ),
    "heads vs kv heads": (
        lambda d: _text(d)["kv_heads"].update(full=5),
        "variants.31B.text.kv_heads.full: text.heads (32) is not divisible by full kv heads (5)",
    ),
    "shared kv covers all layers": (
        lambda d: _text(d, "E2B").update(shared_kv_layers=35),
        "variants.E2B.text.shared_kv_layers: must be below text.layers (35), got 35",
    ),
    "shared kv without an owner": (
        lambda d: _text(d, "E2B").update(shared_kv_layers=31),
        "variants.E2B.text.shared_kv_layers: no earlier full layer owns the KV",
    ),
    "moe top_k": (
        lambda d: _text(d, "26B-A4B")["moe"].update(top_k=129),
        "variants.26B-A4B.text.moe.top_k: top_k (129) exceeds experts (128)",
    ),
    "rotary factor": (
        lambda d: _text(d)["rope"].update(full_partial_rotary_factor=1.5),
        "variants.31B.text.rope.full_partial_rotary_factor: must be in (0, 1]",
    ),
    "centroid top_k": (
        lambda d: _drafter(d, "E2B")["head"].update(top_k=4096),
        "variants.E2B.drafter.head.top_k: top_k (4096) exceeds clusters (2048)",
    ),
    "centroid without clusters": (
        lambda d: _drafter(d, "E2B")["head"].pop("clusters"),
        "variants.E2B.drafter.head.clusters: missing field (centroid head)",
    ),
    "clusters not dividing vocab": (
        lambda d: _drafter(d, "E2B")["head"].update(clusters=3000),
        "variants.E2B.drafter.head.clusters: text.vocab (262144) is not divisible by clusters (3000)",
    ),
    "dense head with clusters": (
        lambda d: _drafter(d)["head"].update(clusters=2048),
        "variants.31B.drafter.head.clusters: only a centroid head has clusters/top_k",
    ),
    "unknown head type": (
        lambda d: _drafter(d)["head"].update(type="sparse"),
        "variants.31B.drafter.head.type: must be one of centroid, dense, got 'sparse'",
    ),
    "drafter pattern length": (
        lambda d: _drafter(d).update(layers=5),
        "variants.31B.drafter.layer_pattern: covers 4 layers ('SSSF' x 1) but drafter.layers is 5",
    ),
    "drafter all full": (
        lambda d: _drafter(d)["layer_pattern"].update(unit="FFFF"),
        "variants.31B.drafter.layer_pattern: needs at least one sliding layer",
    ),
    "drafter heads vs target kv heads": (
        lambda d: _drafter(d).update(heads=24),
        "variants.31B.drafter.heads: drafter.heads (24) is not divisible by the target's sliding kv heads (16)",
    ),
    "projection dim": (
        lambda d: d["variants"]["E2B"]["vision"].update(projection_dim=2560),
        "variants.E2B.vision.projection_dim: must equal text.hidden (1536), got 2560",
    ),
    "repo id": (
        lambda d: d["variants"]["31B"]["hf"].update(target="gemma-4-31B-it"),
        "variants.31B.hf.target: expected an 'owner/name' repo id, got 'gemma-4-31B-it'",
    ),
    "quant typo": (
        lambda d: d["variants"]["31B"]["recommended"].update(target_quant="Q4_KM"),
        "variants.31B.recommended.target_quant: unknown quant type 'Q4_KM' (did you mean 'Q4_K_M'?)",
    ),
    "unconfirmed typo": (
        lambda d: d["variants"]["31B"].update(unconfirmed=["drafter.hiden"]),
        "variants.31B.unconfirmed[0]: 'drafter.hiden' names no field of a variant",
    ),
    "unknown source": (
        lambda d: d["variants"]["31B"].update(sources=["hf-31b-it", "nowhere"]),
        "variants.31B.sources[0]: unknown source 'hf-31b-it' (not in top-level sources)",
    ),
    "alias clash": (
        lambda d: d["variants"]["31B"]["aliases"].append("e2b"),
        "variants.31B: name or alias 'e2b' also names E2B",
    ),
    "no variants": (lambda d: d.update(variants={}), "variants: is empty"),
    "newer schema": (
        lambda d: d.update(schema_version=2, shiny_new_key=1),
        "schema_version: is 2, this gguf-mtp reads version 1",
    ),
}


@pytest.mark.parametrize("case", list(BAD_EDITS))
def test_bad_registry_gives_one_line_error(tmp_path: Path, raw: dict, case: str) -> None:
    edit, expected = BAD_EDITS[case]
    data = copy.deepcopy(raw)
    edit(data)
    path = tmp_path / "models.json"
    path.write_text(json.dumps(data, indent=2))
    with pytest.raises(RegistryError) as e:
        load_registry(path)
    message = str(e.value)
    assert isinstance(e.value, GgufMtpError)
    assert "\n" not in message
    assert message.startswith(f"{path}: {expected}"), message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"schema_version": 1,', "invalid JSON at line 1 column"),
        ("[1, 2]", "expected an object, got list"),
    ],
)
def test_unreadable_files(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "models.json"
    path.write_text(content)
    with pytest.raises(GgufMtpError, match=expected):
        load_registry(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GgufMtpError, match="model registry not found"):
        load_registry(tmp_path / "nope.json")
