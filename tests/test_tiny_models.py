"""The tiny Gemma 4 checkpoints (gguf_mtp.tiny): layout on disk, determinism, the CLI, and that
transformers 5.23.0 (patched, gguf_mtp/transformers_reference.py) loads and runs every target, drafter and the
vision tower.
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
from gguf_mtp.tiny import FAMILIES, configs, make_tiny_models
from gguf_mtp.tiny.configs import F, S
from gguf_mtp.tiny.tokenizer import BYTE_TOKENS, CHAT_TEMPLATE

REPO = Path(__file__).resolve().parents[1]
ROLES = ("target", "drafter")
STORY = "Tell me a story about the old tower on the hill, the baker and the sea, and what was in the box."


def st_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


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
    assert target["architectures"] == [spec.architecture]
    assert drafter["architectures"] == ["Gemma4AssistantForCausalLM"]
    text = target.get("text_config", target)
    assert drafter["backbone_hidden_size"] == text["hidden_size"] != drafter["text_config"]["hidden_size"]
    assert ("per_layer_config" in text) == (spec.config_style == "resaved")
    gen = json.loads((tiny_root / family / "drafter" / "generation_config.json").read_text())
    assert gen["num_assistant_tokens"] == spec.num_assistant_tokens
    if spec.vision is not None:
        assert target["vision_config"]["model_type"] == "gemma4_vision"
        proc = json.loads((tiny_root / family / "target" / "processor_config.json").read_text())
        assert proc["image_processor"]["image_mean"] == [0.0, 0.0, 0.0]


def test_family_table_covers_the_variants():
    """One family per layout the exporters must handle (see gguf_mtp/tiny/__init__.py)."""
    e, dense, moe, q = (FAMILIES[n] for n in ("tiny-e", "tiny-dense", "tiny-moe", "tiny-q"))
    assert e.target_text["num_kv_shared_layers"] and e.target_text["hidden_size_per_layer_input"]
    assert e.vision is not None and e.drafter_head["use_ordered_embeddings"]
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
