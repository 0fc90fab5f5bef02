"""Our exporter against llama.cpp's own converter (convert_hf_to_gguf.py from the llama-cpp-python 0.3.36 sdist).

Every tensor (name, type, shape, bytes) and every architecture key must be equal; the only allowed differences
are the ones docs/export.md lists and justifies:
- ``general.name`` (we write the directory or repo name as is) and our own ``gguf_mtp.*`` keys;
- ``tokenizer.ggml.token_type`` of added tokens flagged special that tokenizer_config.json does not name:
  CONTROL in ours, NORMAL upstream (so llama.cpp matches them whole, as HF does);
- tiny-moe ships only a sentencepiece tokenizer.model, which upstream cannot read: it gets a tokenizer.json
  built here (transformers' merges), and only its tensors and architecture keys are compared.
All upstream conversions run in one Python process (tests/upstream.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from gguf import GGUFValueType
from upstream import converter_tree, read_gguf, run_converter

pytestmark = pytest.mark.upstream

FAMILIES = ("tiny-e", "tiny-dense", "tiny-moe", "tiny-q", "tiny-unified")
EXTRA_OUTTYPES = (("tiny-e", "f16"), ("tiny-e", "q8_0"), ("tiny-q", "bf16"), ("tiny-q", "q8_0"),
                  ("tiny-unified", "f16"))


def tokenizer_json_from_sentencepiece(directory: Path) -> None:
    """Replace tokenizer.model by the tokenizer.json transformers would build from it (upstream reads only that)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers.tokenization_utils_base import generate_merges

    from gguf_mtp.export.tokenizer import SP_CONTROL, SP_USER_DEFINED, read_sentencepiece

    _, pieces = read_sentencepiece(directory / "tokenizer.model")
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=generate_merges(vocab), byte_fallback=True, fuse_unk=True,
                               unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_tokens([AddedToken(p, special=t == SP_CONTROL, normalized=False)
                    for p, _, t in pieces if t in (SP_CONTROL, SP_USER_DEFINED)])
    (directory / "tokenizer.json").write_text(tok.to_str())
    (directory / "tokenizer.model").unlink()


@pytest.fixture(scope="module")
def upstream(export_src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str, str], Path]:
    """(family, role, outtype) -> the upstream converter's GGUF."""
    lcpp = converter_tree()
    work = tmp_path_factory.mktemp("upstream")
    moe = work / "tiny-moe"
    shutil.copytree(export_src / "tiny-moe", moe)
    for role in ("target", "drafter"):
        tokenizer_json_from_sentencepiece(moe / role)
    jobs, out = [], {}
    wanted = [(f, r, "f32") for f in FAMILIES for r in ("target", "drafter")]
    wanted += [(f, "target", t) for f, t in EXTRA_OUTTYPES]
    for fam, role, outtype in wanted:
        src = (moe if fam == "tiny-moe" else export_src / fam) / role
        dst = work / f"{fam}-{role}-{outtype}.gguf"
        jobs.append((src, dst, outtype))
        out[fam, role, outtype] = dst
    run_converter(lcpp, jobs)
    return out


def unnamed_special_ids(directory: Path) -> set[int]:
    """Added tokens flagged special that transformers' special-token list does not contain (and that are not
    the chat-parser tokens both converters type USER_DEFINED)."""
    from gguf_mtp.export.tokenizer import VISIBLE_TOKENS, special_tokens

    tok = json.loads((directory / "tokenizer.json").read_text())
    cfg = json.loads((directory / "tokenizer_config.json").read_text())
    named = special_tokens(cfg) | VISIBLE_TOKENS
    return {a["id"] for a in tok["added_tokens"] if a.get("special") and a["content"] not in named}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("role", ["target", "drafter"])
def test_f32_export_equals_upstream(family, role, exports, upstream, export_src):
    ours_kv, ours_t = read_gguf(exports.get(family, role, "f32"))
    up_kv, up_t = read_gguf(upstream[family, role, "f32"])
    assert ours_t.keys() == up_t.keys()
    for name in ours_t:
        assert ours_t[name] == up_t[name], name
    arch = ours_kv["general.architecture"][0]
    arch_keys = {k for k in ours_kv.keys() | up_kv.keys() if k.startswith(arch + ".")}
    for k in arch_keys:
        assert ours_kv.get(k) == up_kv.get(k), k
    differing = {k for k in ours_kv.keys() | up_kv.keys() if ours_kv.get(k) != up_kv.get(k)}
    allowed = {"general.name"} | {k for k in ours_kv if k.startswith("gguf_mtp.")}
    if family == "tiny-moe":
        allowed |= {k for k in differing if k.startswith("tokenizer.")}
    else:
        allowed.add("tokenizer.ggml.token_type")
        ours_types, up_types = ours_kv["tokenizer.ggml.token_type"][0], up_kv["tokenizer.ggml.token_type"][0]
        diff = {i for i, (a, b) in enumerate(zip(ours_types, up_types)) if a != b}
        assert diff == unnamed_special_ids(export_src / family / role)
        assert all(ours_types[i] == 3 and up_types[i] == 1 for i in diff)  # CONTROL here, NORMAL upstream
    assert differing <= allowed, differing - allowed


@pytest.mark.parametrize("family, outtype", EXTRA_OUTTYPES)
def test_reduced_outtypes_equal_upstream(family, outtype, exports, upstream):
    ours_kv, ours_t = read_gguf(exports.get(family, "target", outtype))
    up_kv, up_t = read_gguf(upstream[family, "target", outtype])
    assert ours_kv["general.file_type"] == up_kv["general.file_type"]
    assert ours_t.keys() == up_t.keys()
    for name in ours_t:
        assert ours_t[name] == up_t[name], name


def test_unified_suppress_tokens_equal_upstream(exports, upstream):
    """Gemma4UnifiedModel's one addition: generation_config.json's suppress_tokens (an INT32 array), target only."""
    from gguf_mtp import keys

    key = keys.TOKENIZER_SUPPRESS_TOKENS
    ours = read_gguf(exports.get("tiny-unified", "target", "f32"))[0]
    up = read_gguf(upstream["tiny-unified", "target", "f32"])[0]
    assert ours[key] == up[key] and len(ours[key][0]) > 0
    assert ours[key][1] == [GGUFValueType.ARRAY, GGUFValueType.INT32]
    assert key not in read_gguf(exports.get("tiny-unified", "drafter", "f32"))[0]
