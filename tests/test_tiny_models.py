"""The tiny Gemma 4 checkpoints (gguf_mtp.tiny): layout on disk, determinism, the CLI, that transformers 5.23.0
(patched, gguf_mtp/transformers_reference.py) loads and runs every target, drafter, vision and audio part, and
that the vendored upstream converter (convert_hf_to_gguf.py) accepts them.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gguf_mtp.errors import GgufMtpError
from gguf_mtp.tiny import FAMILIES, build_family, configs, make_tiny_models
from gguf_mtp.tiny.configs import F, LAYOUTS, MULTIMODAL_IDS, S
from gguf_mtp.tiny.tokenizer import BYTE_TOKENS, CHAT_TEMPLATE

REPO = Path(__file__).resolve().parents[1]
ROLES = ("target", "drafter")
STORY = "Tell me a story about the old tower on the hill, the baker and the sea, and what was in the box."


def st_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def weights_by_name(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype, shape, raw bytes) of a safetensors file."""
    header, raw = st_header(path), path.read_bytes()
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    return {k: (v["dtype"], v["shape"], raw[start + v["data_offsets"][0]:start + v["data_offsets"][1]])
            for k, v in header.items() if k != "__metadata__"}


def longest_run(tokens: list[int]) -> int:
    best = run = 1
    for a, b in zip(tokens, tokens[1:]):
        run = run + 1 if a == b else 1
        best = max(best, run)
    return best


# --- on disk (no torch) -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_files_and_configs(tiny_root: Path, family: str):
    spec = FAMILIES[family]
    for role in ROLES:
        d = tiny_root / family / role
        names = {p.name for p in d.iterdir()}
        tok = {"json": "tokenizer.json", "spm": "tokenizer.model"}[spec.tokenizer]
        assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json",
                "chat_template.jinja", tok} <= names
        assert ({"tokenizer.json", "tokenizer.model"} - {tok}).isdisjoint(names)  # one tokenizer form only
        header = st_header(d / "model.safetensors")
        floats = {v["dtype"] for k, v in header.items() if k != "__metadata__" and v["dtype"] != "I64"}
        assert floats == {"BF16" if spec.dtype == "bfloat16" else "F32"}
    target = json.loads((tiny_root / family / "target" / "config.json").read_text())
    drafter = json.loads((tiny_root / family / "drafter" / "config.json").read_text())
    layout = LAYOUTS[spec.layout]
    assert target["architectures"] == [spec.architecture]
    assert drafter["architectures"] == [layout.drafter] and drafter["model_type"] == layout.drafter_model_type
    text = target.get("text_config", target)
    assert drafter["backbone_hidden_size"] == text["hidden_size"] != drafter["text_config"]["hidden_size"]
    assert ("per_layer_config" in text) == (spec.config_style == "resaved")
    gen = json.loads((tiny_root / family / "drafter" / "generation_config.json").read_text())
    assert gen["num_assistant_tokens"] == spec.num_assistant_tokens and "suppress_tokens" not in gen
    target_gen = json.loads((tiny_root / family / "target" / "generation_config.json").read_text())
    assert target_gen.get("suppress_tokens", []) == list(spec.suppress_tokens)
    if spec.multimodal:
        assert target["model_type"] == layout.model_type
        assert (target["vision_config"], target["audio_config"]) == (spec.vision, spec.audio)
    has_proc = (tiny_root / family / "target" / "processor_config.json").is_file()
    assert has_proc == (spec.vision is not None)
    if has_proc:  # transformers 5 nests every sub-processor; llama.cpp's mmproj converter reads the image part
        proc = json.loads((tiny_root / family / "target" / "processor_config.json").read_text())
        assert proc["processor_class"] == layout.processor
        assert proc["image_processor"]["image_mean"] == [0.0, 0.0, 0.0]
        assert proc["image_processor"]["image_processor_type"] == layout.image_processor
        assert proc["video_processor"]["video_processor_type"] == layout.video_processor
        assert ("feature_extractor" in proc) == (spec.audio is not None)


def test_family_table_covers_the_variants():
    """One family per layout the exporters must handle (see gguf_mtp/tiny/__init__.py)."""
    e, dense, moe, q, uni = (FAMILIES[n] for n in ("tiny-e", "tiny-dense", "tiny-moe", "tiny-q", "tiny-unified"))
    assert e.target_text["num_kv_shared_layers"] and e.target_text["hidden_size_per_layer_input"]
    assert e.vision is not None and e.drafter_head["use_ordered_embeddings"]
    assert e.audio["model_type"] == "gemma4_audio" and e.audio["output_proj_dims"] not in (
        e.audio["hidden_size"], e.target_text["hidden_size"])
    assert uni.layout == "gemma4_unified" and uni.multimodal and uni.config_style == "resaved"
    assert uni.target_text["model_type"] == uni.drafter_text["model_type"] == "gemma4_unified_text"
    assert uni.target_text["layer_types"] == [S] * 5 + [F] + [S] * 5 + [F]  # the 12B's 5:1 pattern, twice
    assert uni.target_text["use_bidirectional_attention"] == "vision"
    assert "moe_intermediate_size" in uni.target_text and "hidden_size_per_layer_input" not in uni.target_text
    assert uni.vision["mm_embed_dim"] == uni.vision["output_proj_dims"] != uni.target_text["hidden_size"]
    assert uni.audio["audio_embed_dim"] == 640 and set(uni.suppress_tokens) <= set(MULTIMODAL_IDS.values())
    assert dense.target_text["attention_k_eq_v"] and dense.architecture == "Gemma4ForCausalLM"
    assert dense.target_text["num_global_key_value_heads"] != dense.target_text["num_key_value_heads"]
    assert moe.target_text["enable_moe_block"] and moe.tokenizer == "spm"
    assert q.dtype == "bfloat16" and sum(s.dtype == "bfloat16" for s in FAMILIES.values()) == 1
    for spec in FAMILIES.values():
        t = spec.target_text
        assert t["sliding_window"] <= 16 and t["layer_types"][-2:] == [S, F]
        assert spec.drafter_text["layer_types"][-1] == F


def test_tiny_q_rows_are_k_quant_sized(tiny_root: Path):
    """Every matrix row (ggml ne0 = numpy's last dim) is a multiple of 256: Q4_K / Q6_K apply everywhere."""
    for role in ROLES:
        header = st_header(tiny_root / "tiny-q" / role / "model.safetensors")
        rows = {k: v["shape"][-1] for k, v in header.items() if k != "__metadata__" and len(v["shape"]) >= 2}
        assert rows and all(n % 256 == 0 for n in rows.values()), rows


def test_layout_rule_is_enforced():
    """llama.cpp hard-codes KV reuse: [.., S, F] before the first shared layer and at the end."""
    ok = dict(configs.FAMILIES["tiny-e"].target_text)
    configs.check_layout(ok)
    bad = {**ok, "layer_types": [S, F, S, S, S, F]}  # converts upstream, then aborts in llama.cpp
    with pytest.raises(GgufMtpError, match="before the first shared layer"):
        configs.check_layout(bad)
    with pytest.raises(GgufMtpError, match="last layer"):
        configs.check_layout({**ok, "layer_types": [S, S, F, S, F, S]})
    drafter = {**configs.FAMILIES["tiny-e"].drafter_text, "head_dim": 16}
    with pytest.raises(GgufMtpError, match="head_dim"):
        configs.check_pair(ok, drafter)


def test_audio_tower_leaves_earlier_tensors_unchanged(tiny_root: Path, tmp_path: Path):
    """Per-name generators: adding tiny-e's audio tower changed no byte of its text and vision tensors."""
    from dataclasses import replace

    without = build_family(replace(FAMILIES["tiny-e"], audio=None), tmp_path / "tiny-e")
    for role in ROLES:
        old = weights_by_name(without / role / "model.safetensors")
        new = weights_by_name(tiny_root / "tiny-e" / role / "model.safetensors")
        added = sorted(set(new) - set(old))
        assert set(old) <= set(new) and all(old[k] == new[k] for k in old), role
        assert all(k.startswith(("model.audio_tower.", "model.embed_audio.")) for k in added), added
        assert bool(added) == (role == "target")


def test_tokenizer_layout(tiny_root: Path):
    import sentencepiece as spm
    from tokenizers import Tokenizer

    table = configs.control_token_table()
    tok = Tokenizer.from_file(str(tiny_root / "tiny-e" / "target" / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_file=str(tiny_root / "tiny-moe" / "target" / "tokenizer.model"))
    for vocab in ({i: tok.id_to_token(i) for i in range(512)}, {i: sp.id_to_piece(i) for i in range(512)}):
        assert [vocab[i] for i in range(108)] == table
        assert [vocab[i] for i in range(108, 364)] == BYTE_TOKENS
        assert (vocab[0], vocab[1], vocab[2], vocab[105], vocab[106], vocab[107]) == (
            "<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>", "\n")
    assert tok.get_vocab_size() == sp.get_piece_size() == 512
    text = "Hello  world\nnaïve café 日本 {x}"
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text  # byte fallback round trip
    assert sp.decode(sp.encode(text)) == text
    assert tok.encode("<|turn>user\n", add_special_tokens=False).ids[:1] == [105]


def test_chat_template_renders_gemma4_format(tiny_root: Path):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    tpl = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(CHAT_TEMPLATE)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert tpl.render(messages=msgs, bos_token="<bos>", add_generation_prompt=True, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>Be brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello.<turn|>\n"
        "<|turn>user\n<|image|>What is it?<turn|>\n<|turn>model\n")
    assert tpl.render(messages=msgs[1:2], bos_token="<bos>") == "<bos><|turn>user\nHi<turn|>\n"
    assert tpl.render(messages=msgs[1:2], bos_token="<bos>", enable_thinking=True).startswith(
        "<bos><|turn>system\n<|think|><turn|>\n<|turn>user\n")


def test_same_seed_same_bytes(tiny_root: Path, tmp_path: Path):
    """A fresh process (new hash seeds, tokenizers trained again) writes the same bytes for the same seed."""
    subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_models.py"), str(tmp_path / "a")],
                   check=True, capture_output=True, timeout=120)
    again = {f: tmp_path / "a" / f for f in FAMILIES}
    other = make_tiny_models(tmp_path / "b", seed=1, families=["tiny-e"])
    for family, d in again.items():
        files = sorted(p.relative_to(d) for p in d.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(tiny_root / family) for p in (tiny_root / family).rglob("*")
                               if p.is_file())
        for rel in files:
            assert (d / rel).read_bytes() == (tiny_root / family / rel).read_bytes(), rel
    for role in ROLES:
        new, old = other["tiny-e"] / role, tiny_root / "tiny-e" / role
        assert (new / "model.safetensors").read_bytes() != (old / "model.safetensors").read_bytes()
        assert (new / "tokenizer.json").read_bytes() == (old / "tokenizer.json").read_bytes()


def test_force_replaces_and_refusal_keeps(tmp_path: Path):
    out = make_tiny_models(tmp_path, families=["tiny-dense"])["tiny-dense"]
    before = (out / "target" / "model.safetensors").read_bytes()
    with pytest.raises(GgufMtpError, match="exists"):
        make_tiny_models(tmp_path, seed=3, families=["tiny-dense"])
    assert (out / "target" / "model.safetensors").read_bytes() == before
    make_tiny_models(tmp_path, seed=3, families=["tiny-dense"], force=True)
    assert (out / "target" / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-dense"]  # no temp directories left


def test_speed_pair_refuses_to_overwrite_before_building(tmp_path: Path):
    """The speed pair (gguf-mtp demo, tools/make_speed_pair.py) checks its outputs first: a refusal costs no
    build and leaves nothing behind. (Building it takes seconds and ~250 MB: tests/test_trained_pair.py's demo
    test does that once.)"""
    from gguf_mtp.tiny import speed_pair

    (tmp_path / speed_pair.DRAFTER_FILE).write_bytes(b"earlier")
    with pytest.raises(GgufMtpError, match="exists"):
        speed_pair.make_speed_pair(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [speed_pair.DRAFTER_FILE]
    assert (tmp_path / speed_pair.DRAFTER_FILE).read_bytes() == b"earlier"
    prompts = speed_pair.prompts(3)
    assert len(set(prompts)) == 3 and all(prompts)


@pytest.mark.parametrize("args, message", [
    (["--family", "tiny-x"], "unknown family 'tiny-x'"),
    (["--family", "tiny-dense"], "exists (use --force to overwrite)"),
    (["--seed", "-2"], "seed must be a non-negative integer"),
])
def test_cli_bad_input_is_one_error_line(tmp_path: Path, args: list[str], message: str):
    make_tiny_models(tmp_path, families=["tiny-dense"])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    r = subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_models.py"), str(tmp_path), *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_cli_builds(tmp_path: Path):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import make_tiny_models as cli
    finally:
        sys.path.remove(str(REPO / "tools"))
    assert cli.main([str(tmp_path / "out"), "--family", "tiny-q,tiny-moe", "--seed", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tiny-moe", "tiny-q"]


# --- transformers (the reference) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref():
    return pytest.importorskip("gguf_mtp.transformers_reference", reason="needs the dev extra (torch, transformers)")


@pytest.fixture(scope="module")
def pairs(ref, tiny_root: Path):
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = ref.load_pair(tiny_root / family)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def prompts(ref, tiny_root: Path) -> dict[str, list[int]]:
    """A chat prompt per family, longer than every sliding window."""
    out = {f: ref.encode_chat(tiny_root / f / "target", [{"role": "user", "content": STORY}]) for f in FAMILIES}
    assert all(len(p) > 2 * FAMILIES[f].target_text["sliding_window"] for f, p in out.items())
    return out


@pytest.mark.reference
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_names_match_transformers(ref, tiny_root: Path, family: str):
    """Every tensor we write is one transformers expects, with its shape; none is missing."""
    import torch

    for role in ROLES:
        path = tiny_root / family / role
        arch = json.loads((path / "config.json").read_text())["architectures"][0]
        _, info = ref.ARCHITECTURES[arch].from_pretrained(path, dtype=torch.float32, output_loading_info=True)
        assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                               "error_msgs")), (role, info)


@pytest.mark.reference
@pytest.mark.parametrize("family", FAMILIES)
def test_target_forward_and_greedy(ref, pairs, prompts, family: str):
    target, _ = pairs(family)
    tp = ref.target_pass(target, prompts[family])
    n, vocab = len(prompts[family]), 512
    assert tp.logits.shape == (n, vocab) and np.isfinite(tp.logits).all()
    assert np.abs(tp.logits).max() <= 30.0  # final_logit_softcapping
    assert tp.hidden.shape == (n, ref.text_config(target).hidden_size)
    assert set(tp.shared_kv) == {"sliding_attention", "full_attention"}  # what the drafter reads
    out = ref.greedy(target, prompts[family], 32)
    assert len(set(out)) > 4 and longest_run(out) < 8, out  # not a collapsed model
    gen = ref.generate(target, prompts[family], 8)  # generate() stops at <eos>/<turn|>; the loop does not
    assert gen and gen == out[:len(gen)]


@pytest.mark.reference
@pytest.mark.parametrize("family", FAMILIES)
def test_drafter_runs_on_the_target_kv(ref, pairs, prompts, family: str):
    target, drafter = pairs(family)
    prompt = prompts[family]
    tp = ref.target_pass(target, prompt)
    token = int(tp.logits[-1].argmax())
    step = ref.drafter_step(drafter, target, token, tp.hidden[-1], tp.shared_kv, len(prompt))
    assert step.logits.shape == (512,) and np.isfinite(step.logits).all()
    assert step.hidden.shape == tp.hidden[-1].shape
    head = FAMILIES[family].drafter_head
    if head.get("use_ordered_embeddings"):  # centroid head: top_k clusters scored, the rest min - 1
        scored = head["centroid_intermediate_top_k"] * 512 // head["num_centroids"]
        floor = step.logits.min()
        assert (step.logits > floor).sum() == scored and np.isclose(floor, np.sort(step.logits)[-scored] - 1.0)
    window = FAMILIES[family].target_text["sliding_window"]
    trimmed = ref.drafter_step(drafter, target, token, tp.hidden[-1], tp.shared_kv, len(prompt),
                               sliding_kv_last=window - 1)  # llama.cpp's choice beyond the window
    assert trimmed.logits.shape == (512,)
    drafts = ref.draft_round(target, drafter, prompt, 3)
    assert drafts[0] == token and len(drafts) == 4


@pytest.mark.reference
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_mtp_generation_is_lossless(ref, pairs, prompts, family: str):
    """transformers' own assisted path (SinglePositionMultiTokenCandidateGenerator) runs on the pair."""
    target, drafter = pairs(family)
    plain = ref.generate(target, prompts[family], 16)
    assert ref.generate(target, prompts[family], 16, drafter=drafter) == plain


@pytest.mark.reference
def test_vision_tower_forward(ref, pairs, tiny_root: Path):
    import torch

    target, _ = pairs("tiny-e")
    vision = json.loads((tiny_root / "tiny-e" / "target" / "config.json").read_text())["vision_config"]
    pixels, positions, n_soft = ref.image_inputs(vision, 96, 48)
    assert n_soft == 2
    d = tiny_root / "tiny-e" / "target"
    text = ref.render_chat(d, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}])
    ids = ref.tokenize(d, text.replace("<|image|>", "<|image>" + "<|image|>" * n_soft + "<image|>"))
    with torch.no_grad():
        feats = target.model.get_image_features(pixels, positions).pooler_output
        with_image = target(input_ids=torch.tensor([ids]), pixel_values=pixels, image_position_ids=positions).logits
        text_only = target(input_ids=torch.tensor([ids])).logits
    assert [tuple(f.shape) for f in feats] == [(n_soft, ref.text_config(target).hidden_size)]
    assert torch.isfinite(feats[0]).all()
    first = ids.index(configs.MULTIMODAL_IDS["image_token_id"])
    assert torch.allclose(with_image[0, :first], text_only[0, :first], atol=1e-5)  # causal: nothing before moves
    assert not torch.allclose(with_image[0, first:], text_only[0, first:])


@pytest.mark.reference
def test_hf_tokenizer_agrees(ref, tiny_root: Path):
    """AutoTokenizer (tokenizer.json families) renders and tokenizes chats as reference.encode_chat does."""
    from transformers import AutoTokenizer

    d = tiny_root / "tiny-e" / "target"
    tok = AutoTokenizer.from_pretrained(d)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.image_token_id) == (2, 1, 0, 41)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": STORY}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=True, tokenize=True,
                                  return_dict=True)["input_ids"]
    assert ids == ref.encode_chat(d, msgs, enable_thinking=True)
    assert ids[:2] == [2, 105] and ids[-1] == 107
    spm_dir = tiny_root / "tiny-moe" / "target"  # tokenizer.model only: reference tokenizes with sentencepiece
    assert ref.detokenize(spm_dir, ref.encode_chat(spm_dir, msgs)) == ref.render_chat(d, msgs)


def test_patch_kv_sharing_modes(ref):
    """The kv_sharing_modes fix on the tiny configs (patches/transformers/README.md)."""
    from transformers import Gemma4AssistantConfig, Gemma4TextConfig

    def modes(text: dict) -> list:
        fields = {k: v for k, v in text.items() if k != "model_type"}
        return Gemma4TextConfig(**fields).kv_sharing_modes

    assert modes(FAMILIES["tiny-e"].target_text) == [None, "store", "store", "reuse", "reuse", "reuse"]
    assert modes(FAMILIES["tiny-dense"].target_text) == [None, None, None, None, "store", "store"]
    drafter = Gemma4AssistantConfig(text_config=FAMILIES["tiny-e"].drafter_text, backbone_hidden_size=64)
    assert drafter.text_config.kv_sharing_modes == ["reuse"] * 4


def test_patch_kv_sharing_modes_unified(ref):
    """The same fix on the 12B's own text config class: the last sliding and full layers publish their KV."""
    from transformers import Gemma4UnifiedAssistantConfig, Gemma4UnifiedTextConfig

    spec = FAMILIES["tiny-unified"]
    text = configs.target_config(spec)["text_config"]  # as written: per_layer_config, no global_head_dim
    modes = Gemma4UnifiedTextConfig(**{k: v for k, v in text.items() if k != "model_type"}).kv_sharing_modes
    assert modes == [None] * 10 + ["store", "store"]
    drafter = Gemma4UnifiedAssistantConfig(**{k: v for k, v in configs.drafter_config(spec).items()
                                             if k not in ("architectures", "model_type")})
    assert drafter.text_config.kv_sharing_modes == ["reuse"] * 4


# --- media through transformers ----------------------------------------------------------------------

AUDIO_SECONDS = 0.5
MEDIA_MARKERS = {"image": ("<|image>", "<|image|>", "<image|>"), "audio": ("<|audio>", "<|audio|>", "<audio|>")}


def waveform(seconds: float = AUDIO_SECONDS) -> np.ndarray:
    """A deterministic 16 kHz clip: a rising tone over a little noise."""
    t = np.arange(int(seconds * configs.SAMPLING_RATE)) / configs.SAMPLING_RATE
    tone = 0.5 * np.sin(2 * np.pi * (220 + 440 * t) * t)
    return (tone + 0.05 * np.random.default_rng(0).standard_normal(t.size)).astype(np.float32)


def media_prompt(ref, target_dir: Path, kind: str, n_soft: int) -> list[int]:
    """A user turn with one media part, expanded as the processors do: begin marker, n soft tokens, end marker."""
    begin, soft, end = MEDIA_MARKERS[kind]
    parts = [{"type": kind}, {"type": "text", "text": "What?"}]
    text = ref.render_chat(target_dir, [{"role": "user", "content": parts}])
    return ref.tokenize(target_dir, text.replace(soft, begin + soft * n_soft + end))


def assert_media_moves_only_what_follows(with_media, text_only, ids: list[int], soft_id: int) -> None:
    import torch

    first = ids.index(soft_id)
    assert torch.isfinite(with_media).all()
    assert torch.allclose(with_media[0, :first], text_only[0, :first], atol=1e-5)  # causal: nothing before moves
    assert not torch.allclose(with_media[0, first:], text_only[0, first:])


@pytest.mark.reference
def test_feature_extractors_load_from_processor_config(tiny_root: Path):
    """AutoFeatureExtractor finds the nested feature_extractor in processor_config.json (both layouts)."""
    from transformers import AutoFeatureExtractor

    for family in ("tiny-e", "tiny-unified"):
        fe = AutoFeatureExtractor.from_pretrained(tiny_root / family / "target")
        assert type(fe).__name__ == LAYOUTS[FAMILIES[family].layout].feature_extractor
        assert fe.sampling_rate == configs.SAMPLING_RATE
    fe = AutoFeatureExtractor.from_pretrained(tiny_root / "tiny-unified" / "target")
    out = fe([waveform()], return_tensors="pt")
    frame = FAMILIES["tiny-unified"].audio["audio_embed_dim"]
    assert tuple(out["input_features"].shape) == (1, -(-int(AUDIO_SECONDS * configs.SAMPLING_RATE) // frame), frame)


@pytest.mark.reference
@pytest.mark.parametrize("family", ["tiny-e", "tiny-unified"])
def test_audio_forward(ref, pairs, tiny_root: Path, family: str):
    """A synthetic clip through transformers' own feature extractor, the audio part and the text model."""
    import torch
    from transformers import AutoFeatureExtractor

    target, _ = pairs(family)
    d = tiny_root / family / "target"
    # a list of clips, as the processor passes them: Gemma4AudioFeatureExtractor fails on a bare 1-D array
    feats = AutoFeatureExtractor.from_pretrained(d)([waveform()], return_tensors="pt")
    features, mask = feats["input_features"], feats["input_features_mask"]
    with torch.no_grad():
        audio = target.model.get_audio_features(features, mask)
    n_soft = int(audio.attention_mask.sum())
    # E2B's conformer halves time twice (40 ms per token); the 12B projects each 40 ms frame as it is
    assert n_soft == -(-int(AUDIO_SECONDS * 1000) // 40)
    assert audio.pooler_output.shape[-1] == ref.text_config(target).hidden_size
    ids = media_prompt(ref, d, "audio", n_soft)
    with torch.no_grad():
        with_audio = target(input_ids=torch.tensor([ids]), input_features=features, input_features_mask=mask).logits
        text_only = target(input_ids=torch.tensor([ids])).logits
    assert_media_moves_only_what_follows(with_audio, text_only, ids, MULTIMODAL_IDS["audio_token_id"])


@pytest.mark.reference
def test_unified_image_forward(ref, pairs, tiny_root: Path):
    """The 12B's vision embedder on raw 48x48 patches, with the bidirectional image attention it turns on.

    transformers' Gemma4UnifiedImageProcessor needs torchvision (absent here); at a size it would not resize,
    its patches are reference.image_inputs' rows at patch_size * pooling_kernel_size with no pooling.
    """
    import torch

    target, _ = pairs("tiny-unified")
    vision = FAMILIES["tiny-unified"].vision
    merged = {"patch_size": vision["patch_size"] * vision["pooling_kernel_size"], "pooling_kernel_size": 1}
    pixels, positions, n_soft = ref.image_inputs(merged, 96, 144)
    assert n_soft == 6 and pixels.shape[-1] == 48 * 48 * 3
    d = tiny_root / "tiny-unified" / "target"
    ids = media_prompt(ref, d, "image", n_soft)
    image_id = MULTIMODAL_IDS["image_token_id"]
    types = torch.tensor([[int(t == image_id) for t in ids]])  # what the processor's mm_token_type_ids mark
    inputs = {"input_ids": torch.tensor([ids]), "pixel_values": pixels, "image_position_ids": positions}
    with torch.no_grad():
        feats = target.model.get_image_features(pixels, positions).pooler_output
        with_image = target(**inputs, mm_token_type_ids=types).logits
        causal = target(**inputs).logits
        text_only = target(input_ids=torch.tensor([ids])).logits
    assert [tuple(f.shape) for f in feats] == [(n_soft, ref.text_config(target).hidden_size)]
    assert_media_moves_only_what_follows(with_image, text_only, ids, image_id)
    first = ids.index(image_id)
    # bidirectional on sliding layers: the first image token already sees the later ones
    assert torch.allclose(with_image[0, :first], causal[0, :first], atol=1e-5)
    assert not torch.allclose(with_image[0, first], causal[0, first], atol=1e-4)


# --- the vendored upstream converter -----------------------------------------------------------------


@pytest.mark.upstream
def test_upstream_converter_accepts_unified_and_audio(tiny_root: Path, tmp_path: Path):
    """convert_hf_to_gguf.py (llama-cpp-python 0.3.36 sdist) converts the 12B-style target, its drafter and
    projector (GEMMA4UV + GEMMA4UA), and tiny-e's projector with its audio tower (GEMMA4V + GEMMA4A)."""
    from upstream import converter_tree, read_gguf, run_converter

    lcpp = converter_tree()
    uni, e = tiny_root / "tiny-unified", tiny_root / "tiny-e"
    out = {name: tmp_path / f"{name}.gguf" for name in ("target", "drafter", "mmproj", "e-mmproj")}
    run_converter(lcpp, [(uni / "target", out["target"], "f32"), (uni / "drafter", out["drafter"], "f32")])
    run_converter(lcpp, [(uni / "target", out["mmproj"], "f32"), (e / "target", out["e-mmproj"], "f32")], "--mmproj")
    got = {name: read_gguf(path) for name, path in out.items()}
    kv = {name: {k: v[0] for k, v in g[0].items()} for name, g in got.items()}
    tensors = {name: set(g[1]) for name, g in got.items()}
    assert kv["target"]["general.architecture"] == "gemma4"
    assert kv["drafter"]["general.architecture"] == "gemma4-assistant"
    assert kv["target"]["tokenizer.ggml.suppress_tokens"] == list(FAMILIES["tiny-unified"].suppress_tokens)
    assert kv["target"]["gemma4.block_count"] == 12 and kv["target"]["gemma4.attention.key_length"] == 32
    for name, types in {"mmproj": ("gemma4uv", "gemma4ua"), "e-mmproj": ("gemma4v", "gemma4a")}.items():
        assert (kv[name]["clip.vision.projector_type"], kv[name]["clip.audio.projector_type"]) == types
        assert kv[name]["clip.has_audio_encoder"] is True and "mm.a.input_projection.weight" in tensors[name]
    assert tensors["mmproj"] == {"mm.input_projection.weight", "mm.a.input_projection.weight", "v.patch_embd.weight",
                                 "v.patch_embd.bias", "v.position_embd.weight",
                                 *(f"v.patch_norm.{i}.{w}" for i in (1, 2, 3) for w in ("weight", "bias"))}
    assert any(t.startswith("a.blk.1.") for t in tensors["e-mmproj"])
