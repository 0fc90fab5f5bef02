"""The 12B-style pair (tiny-unified: Gemma4UnifiedForConditionalGeneration + Gemma4UnifiedAssistantForCausalLM).

What is particular to it: its kind (text weights under ``model.language_model.``, the transformer-less vision and
audio embedders left to the projector file), Gemma4UnifiedTextConfig's defaults and missing fields, generation
config's suppress tokens in the target GGUF, pairing, logits against transformers, and the MTP loop. Equality with
convert_hf_to_gguf.py is in test_export_upstream.py, golden files in test_export_golden.py (both cover
tiny-unified with every other family).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fixtures.unified import UNIFIED
from gguf import GGUFReader, GGUFValueType

from gguf_mtp import keys
from gguf_mtp.cli import main
from gguf_mtp.errors import GgufMtpError, IncompatiblePair
from gguf_mtp.export import convert, describe
from gguf_mtp.export.safetensors import SafetensorsReader
from gguf_mtp.export.source import KINDS

EMBEDDERS = KINDS["Gemma4UnifiedForConditionalGeneration"].skip_prefixes


def unified_copy(export_src: Path, role: str, dst: Path) -> Path:
    """A copy of one tiny-unified checkpoint to edit (the weights are linked, not copied)."""
    src = export_src / UNIFIED / role
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            (dst / f.name).symlink_to(f)
        else:
            shutil.copy(f, dst / f.name)
    return dst


def field(path: Path, key: str):
    f = GGUFReader(path).fields.get(key)
    return None if f is None else (f.contents(), [GGUFValueType(t) for t in f.types])


def edit_generation_config(directory: Path, edit) -> None:
    p = directory / "generation_config.json"
    cfg = json.loads(p.read_text())
    edit(cfg)
    p.write_text(json.dumps(cfg))


# --- kind, keys, tensors -------------------------------------------------------------------------------------------
def test_unified_kinds_and_text_model(export_src):
    t, d = describe(export_src / UNIFIED / "target"), describe(export_src / UNIFIED / "drafter")
    assert (t.source.kind.name, t.arch, d.source.kind.name, d.arch) == \
        ("target-unified", keys.ARCH_TARGET, "drafter-unified", keys.ARCH_DRAFTER)
    assert t.text.ple_dim == 0 and not t.text.moe and t.text.layout == "SSSSSFSSSSSF"
    assert d.drafter.backbone == t.text.n_embd


def test_suppress_tokens_come_from_generation_config(exports, export_src):
    want = json.loads((export_src / UNIFIED / "target" / "generation_config.json").read_text())["suppress_tokens"]
    assert want  # the tiny checkpoint carries some, or this test proves nothing
    # llama.cpp refuses the key unless it is an INT32 array
    assert field(exports.get(UNIFIED, "target"), keys.TOKENIZER_SUPPRESS_TOKENS) == \
        (want, [GGUFValueType.ARRAY, GGUFValueType.INT32])
    assert field(exports.get(UNIFIED, "drafter"), keys.TOKENIZER_SUPPRESS_TOKENS) is None  # as upstream


def test_suppress_tokens_only_for_the_unified_target(export_src, tmp_path):
    """tiny-e's Gemma4ForConditionalGeneration writes none even with a list (upstream: Gemma4UnifiedModel only);
    a unified target without the file, or with an empty list, writes no key."""
    e = shutil.copytree(export_src / "tiny-e" / "target", tmp_path / "e")
    edit_generation_config(e, lambda c: c.update(suppress_tokens=[3, 4]))
    convert(e, tmp_path / "e.gguf")
    assert field(tmp_path / "e.gguf", keys.TOKENIZER_SUPPRESS_TOKENS) is None
    src = unified_copy(export_src, "target", tmp_path / "u")
    edit_generation_config(src, lambda c: c.update(suppress_tokens=[]))
    convert(src, tmp_path / "empty.gguf")
    (src / "generation_config.json").unlink()
    convert(src, tmp_path / "none.gguf")
    for name in ("empty", "none"):
        assert field(tmp_path / f"{name}.gguf", keys.TOKENIZER_SUPPRESS_TOKENS) is None


@pytest.mark.parametrize("bad", [["3"], [-1], [True], 7, [2**31]])
def test_bad_suppress_tokens_are_refused(bad, export_src, tmp_path):
    src = unified_copy(export_src, "target", tmp_path / "u")
    edit_generation_config(src, lambda c: c.update(suppress_tokens=bad))
    with pytest.raises(GgufMtpError, match="suppress_tokens: expected a list of token ids"):
        convert(src, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_embedders_are_left_to_the_projector(exports, export_src):
    reader = SafetensorsReader.from_directory(export_src / UNIFIED / "target")
    embedders = [n for n in reader.names() if n.startswith(EMBEDDERS)]
    reader.close()
    # the released layout: vision_embedder.* + embed_vision/embed_audio projections, all present in the tiny one
    assert {p for p in EMBEDDERS if any(n.startswith(p) for n in embedders)} == set(EMBEDDERS)
    result = exports.result(UNIFIED, "target")
    assert result.ignored == {"the projector file's (vision/audio towers or embedders)": len(embedders)}
    names = {t.name for t in GGUFReader(exports.get(UNIFIED, "target")).tensors}
    assert not any(n.startswith(("per_layer_", "v.", "mm.", "a.")) or "_exps" in n for n in names)
    assert field(exports.get(UNIFIED, "target"), "gemma4.embedding_length_per_layer_input")[0] == 0


# --- refusals -----------------------------------------------------------------------------------------------------
BAD = {
    # name: (role, edit of config.json, message)
    "per-layer embeddings": ("target", lambda c: c["text_config"].update(hidden_size_per_layer_input=8),
                             "hidden_size_per_layer_input: gemma4_unified_text has no per-layer embeddings"),
    "MoE block": ("target", lambda c: c["text_config"].update(enable_moe_block=True),
                  "enable_moe_block: gemma4_unified_text has no MoE block"),
    "drafter text model of another class": (
        "drafter", lambda c: c["text_config"].update(model_type="gemma4_text"),
        "text_config.model_type: Gemma4UnifiedAssistantForCausalLM has a gemma4_unified_text text model"),
    "drafter with PLE": ("drafter", lambda c: c["text_config"].update(hidden_size_per_layer_input=4),
                         "hidden_size_per_layer_input: gemma4_unified_text has no per-layer embeddings"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_what_the_12b_cannot_have_is_refused(case, export_src, tmp_path):
    role, edit, message = BAD[case]
    src = unified_copy(export_src, role, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    edit(cfg)
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out.gguf"
    res = CliRunner().invoke(main, ["convert", str(src), "-o", str(out)])
    lines = [ln for ln in res.stderr.splitlines() if ln]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert re.search(re.escape(message), lines[0]), lines[0]
    assert not out.exists()


def test_config_defaults_are_gemma4_unified_texts(export_src, tmp_path):
    """Fields left out of config.json take Gemma4UnifiedTextConfig's defaults, not Gemma4TextConfig's."""
    src = unified_copy(export_src, "target", tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    for k in ("max_position_embeddings", "sliding_window", "use_bidirectional_attention"):
        cfg["text_config"].pop(k, None)
    (src / "config.json").write_text(json.dumps(cfg))
    text = describe(src).text
    assert (text.n_ctx, text.sliding_window, text.ple_dim) == (262_144, 1024, 0)


def test_a_released_config_that_contradicts_the_registry_is_refused_before_writing(tmp_path):
    """The exporter asks the registry (registry_config.check_config) as it locates a checkpoint: a 12B-shaped
    config.json stating a confirmed fact otherwise is one error line naming the fact, and nothing is written."""
    from test_registry import released_12b_config

    target, _ = released_12b_config()
    target["text_config"]["sliding_window"] = 4096
    src = tmp_path / "gemma-4-12B-it"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(target))
    r = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "out.gguf")])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "text.sliding_window" in lines[0] and "12B" in lines[0], r.output
    assert not (tmp_path / "out.gguf").exists()


# --- pairing --------------------------------------------------------------------------------------------------------
def test_drafter_pairs_with_its_target_only(exports, export_src, tmp_path):
    drafter = export_src / UNIFIED / "drafter"
    assert convert(drafter, tmp_path / "hf.gguf", target=export_src / UNIFIED / "target").paired_with
    with pytest.raises(IncompatiblePair, match="head_dim_swa"):
        convert(drafter, tmp_path / "bad.gguf", target=exports.get("tiny-e", "target"))
    assert not (tmp_path / "bad.gguf").exists()


# --- the MTP loop on the exported pair ------------------------------------------------------------------------------
def test_greedy_mtp_equals_the_target_alone_on_a_text_prompt(unified_engines):
    from fixtures.runtime import assert_greedy_equivalent

    from gguf_mtp.runtime.adaptive import FixedK
    from gguf_mtp.runtime.chat_template import user_prompt
    from gguf_mtp.runtime.drafters import OracleDrafter
    from gguf_mtp.runtime.loop import generate

    eng = unified_engines.get(UNIFIED)
    prompt = user_prompt(eng, "Tell me about the old tower on the hill and the baker.")
    ref = generate(eng, prompt, 48, chooser=FixedK(0), ignore_eog=True)
    for k in (1, 3, 6):
        g = generate(eng, prompt, 48, chooser=FixedK(k), ignore_eog=True)
        assert_greedy_equivalent(eng, prompt, g.tokens, ref.tokens)
        assert g.stats.proposed > 0 and g.stats.tokens == len(g.tokens) == 48
    # the tiny drafter is random and rarely right: an oracle (every 3rd draft wrong) makes rounds keep drafts too
    oracle = OracleDrafter(prompt + ref.tokens, eng.n_vocab, corrupt_every=3)
    g = generate(eng, prompt, 40, chooser=FixedK(4), drafter=oracle, ignore_eog=True)
    assert g.tokens == ref.tokens[:40] and g.stats.accepted > 0


def test_suppress_tokens_are_never_generated(unified_engines, unified_ggufs, export_src, tmp_path):
    """The runtime masks the GGUF's suppress tokens as llama.cpp's common sampler does, in the target's and the
    drafter's logits: suppressing the tokens the target alone would emit first changes its output, and neither the
    target alone nor MTP emits them."""
    from fixtures.runtime import assert_greedy_equivalent

    from gguf_mtp.runtime.adaptive import FixedK
    from gguf_mtp.runtime.chat_template import user_prompt
    from gguf_mtp.runtime.engine import Engine
    from gguf_mtp.runtime.loop import generate

    eng = unified_engines.get(UNIFIED)
    shipped = sorted(json.loads((export_src / UNIFIED / "target" / "generation_config.json").read_text())
                     ["suppress_tokens"])
    assert sorted(eng.suppressed.tolist()) == shipped
    prompt = user_prompt(eng, "Tell me about the old tower on the hill and the baker.")
    free = generate(eng, prompt, 24, chooser=FixedK(0), ignore_eog=True).tokens
    banned = sorted(set(free[:3]))
    src = unified_copy(export_src, "target", tmp_path / "target")
    edit_generation_config(src, lambda c: c.update(suppress_tokens=banned))
    target = convert(src, tmp_path / "banned.gguf").output
    with Engine.load(target, unified_ggufs["drafter"]) as banned_eng:
        banned_eng.decode(prompt)
        assert np.isneginf(banned_eng.logits(1)[0, banned]).all()
        banned_eng.truncate(0)
        ref = generate(banned_eng, prompt, 24, chooser=FixedK(0), ignore_eog=True).tokens
        mtp = generate(banned_eng, prompt, 24, chooser=FixedK(3), ignore_eog=True)
        assert not set(ref) & set(banned) and ref != free
        assert not set(mtp.tokens) & set(banned) and mtp.stats.proposed > 0
        assert_greedy_equivalent(banned_eng, prompt, mtp.tokens, ref)
    from gguf_mtp.runtime.batch_engine import BatchEngine, Part

    with BatchEngine.load(target, unified_ggufs["drafter"], n_seq=2) as batch:  # served / batched decoding
        parts = [Part(0, prompt), Part(1, prompt[:-2])]
        batch.decode(parts)
        rows = batch.logits(0, len(prompt) + len(prompt) - 2)
        assert np.isneginf(rows[:, banned]).all() and np.isfinite(np.delete(rows, banned, axis=1)).all()


# --- against transformers (marker reference) ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf(export_src):
    """transformers' tiny-unified pair: as shipped, and with ggml's f16-table GELU (see use_ggml_gelu)."""
    reference = pytest.importorskip("gguf_mtp.transformers_reference", reason="needs the dev extra")
    cache: dict[tuple[str, bool], object] = {}

    def get(role: str = "target", ggml_gelu: bool = False):
        if (role, ggml_gelu) not in cache:
            model = reference.load_model(export_src / UNIFIED / role)
            cache[role, ggml_gelu] = reference.use_ggml_gelu(model) if ggml_gelu else model
        return cache[role, ggml_gelu]

    get.reference = reference
    return get


@pytest.mark.reference
def test_f32_target_logits_match_transformers(exports, hf):
    """The standard bound (rel L2 < 1%, max-abs < 5% of the largest logit, no real argmax flip) against transformers
    with ggml's GELU; against transformers as shipped the 12-layer tiny model amplifies the f16 GELU table to ~1.5%
    (docs/export.md), so there only argmax and a 3% bound are asserted."""
    from test_export_reference import PROMPT, compare, llama_logits

    got = llama_logits(exports.get(UNIFIED, "target", "f32"), PROMPT)
    for ggml_gelu, max_rel in ((True, 0.01), (False, 0.03)):
        want = hf.reference.target_logits(hf("target", ggml_gelu), PROMPT)
        rel, mx, agree, real = compare(got, want)
        print(f"{UNIFIED} f32 (ggml GELU: {ggml_gelu}): rel L2 {rel:.2%}, max-abs {mx:.3f} of "
              f"{np.abs(want).max():.1f}, argmax {agree:.0%}")
        assert rel < max_rel and real == 0
        if ggml_gelu:
            assert mx < 0.05 * np.abs(want).max()


@pytest.mark.reference
def test_f16_target_logits_stay_close(exports, hf):
    """tiny-moe's bound: rounding only the weights to f16 inside transformers already moves them by 5.4%."""
    from test_export_reference import PROMPT, compare, llama_logits

    got = llama_logits(exports.get(UNIFIED, "target", "f16"), PROMPT)
    rel, mx, agree, _ = compare(got, hf.reference.target_logits(hf("target"), PROMPT))
    print(f"{UNIFIED} f16: rel L2 {rel:.2%}, max-abs {mx:.3f}, argmax {agree:.0%}")
    assert rel < 0.1 and agree >= 0.9


@pytest.mark.reference
def test_drafter_first_step_matches_transformers(exports, hf):
    from test_export_reference import PROMPT, compare, mtp_first_step

    tokens = PROMPT[:12]  # shorter than the sliding window (16)
    ref = hf.reference
    for ggml_gelu, max_rel in ((True, 0.01), (False, 0.03)):
        target, drafter = hf("target", ggml_gelu), hf("drafter", ggml_gelu)
        tp = ref.target_pass(target, tokens)
        token = int(tp.logits[-1].argmax())
        got, h = mtp_first_step(exports.get(UNIFIED, "target", "f32"), exports.get(UNIFIED, "drafter", "f32"),
                                tokens, token)
        want = ref.drafter_step(drafter, target, token, h, tp.shared_kv, len(tokens)).logits
        rel, mx, _, _ = compare(got[None], want[None])
        print(f"{UNIFIED} drafter (ggml GELU: {ggml_gelu}): rel L2 {rel:.2%}, max-abs {mx:.3f} of "
              f"{np.abs(want).max():.1f}, nextn row {np.abs(h - tp.hidden[-1]).max():.4f}")
        assert rel < max_rel and int(got.argmax()) == int(want.argmax())
        if ggml_gelu:
            assert np.abs(h - tp.hidden[-1]).max() < 0.02
