"""gguf_mtp.export without a reference model: reader, source location, checks, layout, types, CLI, atomicity.

Every family's default export is built once (``tiny_ggufs``); tests that need a broken input copy one tiny
checkpoint and change one thing in it.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as Q, GGUFReader, TokenType, quants

from gguf_mtp import keys
from gguf_mtp.cli import main
from gguf_mtp.errors import GgufMtpError, IncompatiblePair
from gguf_mtp.export import convert, describe
from gguf_mtp.export import safetensors as st
from gguf_mtp.export.source import locate
from gguf_mtp.fsutil import TMP_PREFIX

S, F = "sliding_attention", "full_attention"


# --- helpers -----------------------------------------------------------------------------------------------------
def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> Path:
    """A safetensors file from (dtype, shape, raw bytes) per name (any header we like, for bad-input tests)."""
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def rewrite_weights(directory: Path, edit) -> None:
    """Load every tensor of a checkpoint (numpy), let ``edit`` change the dict, write it back as one file."""
    reader = st.SafetensorsReader.from_directory(directory)
    tensors = {n: np.array(reader.raw(n)) for n in reader.names()}
    dtypes = {n: reader.entry(n).dtype for n in reader.names()}
    reader.close()
    edit(tensors, dtypes)
    write_safetensors(directory / "model.safetensors",
                      {n: (dtypes.get(n, "F32"), a.shape, a.tobytes()) for n, a in tensors.items()})


def gguf(path: Path) -> tuple[dict, dict]:
    r = GGUFReader(path)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in r.tensors}
    return kv, tensors


def no_leftovers(directory: Path) -> bool:
    return not list(directory.glob(TMP_PREFIX + "*"))


# --- safetensors reader ------------------------------------------------------------------------------------------
def test_reader_reads_rows_in_chunks_and_bf16_bits(tmp_path, monkeypatch):
    a = np.arange(24, dtype=np.float32).reshape(6, 4)
    bf = (a.view(np.uint32) >> 16).astype(np.uint16)  # exact: small integers are bf16-representable
    p = write_safetensors(tmp_path / "m.safetensors", {"a": ("F32", a.shape, a.tobytes()),
                                                       "b": ("BF16", a.shape, bf.tobytes())})
    r = st.SafetensorsReader([p])
    monkeypatch.setattr(st, "CHUNK_BYTES", 32)  # two rows per block
    blocks = list(r.rows("a"))
    assert len(blocks) == 3 and np.array_equal(np.concatenate(blocks), a)
    assert np.array_equal(np.concatenate(list(r.rows("b", n_rows=5))), a[:5])


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:5], "truncated safetensors file"),
    (lambda b: struct.pack("<Q", 10**9) + b[8:], "bad safetensors header length"),
    (lambda b: b[:8] + b"{not json" + b[17:], "not JSON"),
    (lambda b: b[:-8], "past the end of the file"),
])
def test_reader_refuses_corrupt_files(tmp_path, mutate, message):
    a = np.ones((4, 4), np.float32)
    good = write_safetensors(tmp_path / "good.safetensors", {"a": ("F32", a.shape, a.tobytes())}).read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(mutate(good))
    with pytest.raises(GgufMtpError, match=message):
        st.SafetensorsReader([bad])


@pytest.mark.parametrize("entry, message", [
    (("F32", (4, 4), b"\0" * 60), "need 64"),
    (("F8_E4M3", (4,), b"\0" * 4), "unsupported dtype"),
    (("F32", (-1, 4), b""), "bad shape"),
])
def test_reader_refuses_bad_entries(tmp_path, entry, message):
    p = write_safetensors(tmp_path / "m.safetensors", {"w": entry})
    with pytest.raises(GgufMtpError, match=message):
        st.SafetensorsReader([p])


def test_sharded_checkpoint_converts_to_the_same_bytes(export_src, exports, tmp_path):
    """Two shards + model.safetensors.index.json give exactly the single-file output."""
    src = copy_checkpoint(export_src / "tiny-dense" / "target", tmp_path / "target")
    reader = st.SafetensorsReader.from_directory(src)
    names = reader.names()
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, part in shards.items():
        write_safetensors(src / fname, {n: (reader.entry(n).dtype, reader.entry(n).shape,
                                            np.array(reader.raw(n)).tobytes()) for n in part})
    reader.close()
    (src / "model.safetensors").unlink()
    (src / st.INDEX_FILE).write_text(json.dumps({"weight_map": {n: f for f, part in shards.items() for n in part}}))
    out = convert(src, tmp_path / "sharded.gguf")
    assert out.n_tensors == exports.result("tiny-dense", "target").n_tensors
    assert (tmp_path / "sharded.gguf").read_bytes() == exports.get("tiny-dense", "target").read_bytes()
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(GgufMtpError, match="missing"):
        convert(src, tmp_path / "again.gguf")


# --- locating the source -----------------------------------------------------------------------------------------
def test_repo_id_resolves_in_the_hf_cache_offline(export_src, exports, tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-dense"
    shutil.copytree(export_src / "tiny-dense" / "target", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    s = locate("acme/tiny-dense")
    assert (s.source, s.revision, s.role) == ("acme/tiny-dense", commit, "target")
    res = convert("acme/tiny-dense", tmp_path / "t.gguf")
    kv, _ = gguf(tmp_path / "t.gguf")
    assert kv[keys.SOURCE] == "acme/tiny-dense" and kv[keys.SOURCE_REVISION] == commit
    assert res.source == "acme/tiny-dense"
    # HF_HOME/hub is the fallback location
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert locate(f"acme/tiny-dense@{commit}").revision == commit
    with pytest.raises(GgufMtpError, match="offline"):
        locate("acme/absent")


def test_output_does_not_depend_on_where_the_source_lives(export_src, exports, tmp_path):
    moved = copy_checkpoint(export_src / "tiny-e" / "target", tmp_path / "elsewhere" / "target")
    convert(moved, tmp_path / "a.gguf")
    convert(moved, tmp_path / "b.gguf")
    ref = exports.get("tiny-e", "target").read_bytes()
    assert (tmp_path / "a.gguf").read_bytes() == ref == (tmp_path / "b.gguf").read_bytes()


# --- what lands in the file --------------------------------------------------------------------------------------
def test_every_family_has_its_layout(tiny_ggufs):
    kv, t = gguf(tiny_ggufs["tiny-e", "target"])
    assert "per_layer_token_embd.weight" in t and "blk.0.inp_gate.weight" in t
    assert "blk.3.attn_k.weight" not in t and "blk.2.attn_k.weight" in t  # layers 3..5 share KV
    assert list(kv["gemma4.feed_forward_length"]) == [128, 128, 128, 256, 256, 256]  # double-wide on shared
    assert kv["gemma4.attention.shared_kv_layers"] == 3
    kv, t = gguf(tiny_ggufs["tiny-dense", "target"])
    assert "blk.2.attn_v.weight" not in t and "blk.1.attn_v.weight" in t  # k_eq_v full layers
    assert list(kv["gemma4.attention.head_count_kv"]) == [2, 2, 1, 2, 2, 1]
    kv, t = gguf(tiny_ggufs["tiny-moe", "target"])
    assert tuple(t["blk.0.ffn_gate_up_exps.weight"].shape) == (64, 64, 8)  # {E, 2*Fx, X}
    assert t["blk.0.ffn_gate_inp.weight"].tensor_type == Q.F32 and "blk.0.ffn_gate.weight" in t
    assert "blk.0.ffn_down_exps.scale" in t and "blk.0.ffn_gate_inp.scale" in t
    kv, t = gguf(tiny_ggufs["tiny-e", "drafter"])
    assert kv["gemma4-assistant.embedding_length_out"] == 64 and kv["gemma4-assistant.nextn_predict_layers"] == 4
    assert tuple(t["nextn.pre_projection.weight"].shape) == (128, 32)
    assert tuple(t["nextn.post_projection.weight"].shape) == (32, 64)
    assert not any(n.startswith("masked_embd") for n in t)
    assert keys.arch_key(keys.CENTROID_COUNT, "gemma4-assistant") not in kv
    for path in tiny_ggufs.values():
        kv, t = gguf(path)
        arch = kv["general.architecture"]
        freqs = np.asarray(t["rope_freqs.weight"].data)
        n_rot = int(kv[f"{arch}.attention.key_length"] * 0.25 / 2)
        assert np.all(freqs[:n_rot] == 1.0) and np.all(freqs[n_rot:] == 1e30)
        assert kv[keys.ROLE] == ("target" if arch == "gemma4" else "drafter")
        assert kv[keys.VERSION] and kv["general.quantization_version"] == 2


def test_drafters_carry_pairing_keys(tiny_ggufs):
    for fam in ("tiny-e", "tiny-dense"):
        tkv, _ = gguf(tiny_ggufs[fam, "target"])
        dkv, _ = gguf(tiny_ggufs[fam, "drafter"])
        assert dkv[keys.PAIR_TARGET_HIDDEN] == tkv["gemma4.embedding_length"]
        assert dkv[keys.PAIR_VOCAB_SHA256] == keys.vocab_sha256(tkv["tokenizer.ggml.tokens"])
        assert keys.PAIR_TARGET_HIDDEN not in tkv


def test_norms_are_not_shifted(export_src, tiny_ggufs):
    """Gemma 4 RMSNorm multiplies by w, not 1 + w: weights go through unchanged."""
    r = st.SafetensorsReader.from_directory(export_src / "tiny-dense" / "target")
    _, t = gguf(tiny_ggufs["tiny-dense", "target"])
    assert np.array_equal(np.asarray(t["blk.0.attn_norm.weight"].data), r.raw("model.layers.0.input_layernorm.weight"))
    assert np.array_equal(np.asarray(t["output_norm.weight"].data), r.raw("model.norm.weight"))


def test_centroid_head_only_on_request(exports, export_src, tmp_path):
    path = exports.get("tiny-e", "drafter", centroids=True)
    kv, t = gguf(path)
    assert kv["gemma4-assistant.centroid_count"] == 32 and kv["gemma4-assistant.centroid_top_k"] == 8
    c, o = t[keys.CENTROIDS_TENSOR], t[keys.ORDERING_TENSOR]
    assert (c.tensor_type, tuple(c.shape)) == (Q.F32, (32, 32))
    assert (o.tensor_type, tuple(o.shape)) == (Q.I32, (512,))
    r = st.SafetensorsReader.from_directory(export_src / "tiny-e" / "drafter")
    assert np.array_equal(np.asarray(o.data), r.raw("masked_embedding.token_ordering"))
    assert np.array_equal(np.asarray(c.data), r.raw("masked_embedding.centroids.weight"))
    kv16, t16 = gguf(exports.get("tiny-e", "drafter", "f16", centroids=True))
    assert t16[keys.CENTROIDS_TENSOR].tensor_type == Q.F16
    with pytest.raises(GgufMtpError, match="no centroid head"):
        convert(export_src / "tiny-dense" / "drafter", tmp_path / "never.gguf", centroids=True)
    assert not (tmp_path / "never.gguf").exists()


# --- tensor types ------------------------------------------------------------------------------------------------
def test_auto_keeps_the_source_dtype_and_copies_bf16_bits(exports, export_src):
    kv, t = gguf(exports.get("tiny-q", "target"))
    assert kv["general.file_type"] == 32  # MOSTLY_BF16
    r = st.SafetensorsReader.from_directory(export_src / "tiny-q" / "target")
    emb = t["token_embd.weight"]
    assert emb.tensor_type == Q.BF16
    assert np.array_equal(np.asarray(emb.data).view(np.uint16).reshape(512, 512), r.raw("model.embed_tokens.weight"))
    assert t["blk.0.attn_norm.weight"].tensor_type == Q.F32
    kv, _ = gguf(exports.get("tiny-e", "target"))
    assert kv["general.file_type"] == 0  # f32 checkpoints stay F32 (upstream's auto would pick F16)


PRECISION = {Q.F16: 2.0 ** -11, Q.BF16: 2.0 ** -8}


@pytest.mark.parametrize("outtype, family", [("f16", "tiny-e"), ("bf16", "tiny-moe"), ("q8_0", "tiny-e"),
                                             ("q8_0", "tiny-q")])
def test_reduced_types_follow_upstream_rules_and_keep_precision(exports, export_src, outtype, family):
    """1-D tensors and norms stay F32, the router F32, rows that are not whole Q8_0 blocks F16; every
    value is the source value to the type's precision (q8_0: half a step of its block's scale)."""
    kv, t = gguf(exports.get(family, "target", outtype))
    r = st.SafetensorsReader.from_directory(export_src / family / "target")
    prefix = "model.language_model." if "model.language_model.embed_tokens.weight" in r else "model."
    plan = {"token_embd.weight": prefix + "embed_tokens.weight",
            "blk.0.attn_q.weight": prefix + "layers.0.self_attn.q_proj.weight",
            "blk.0.ffn_down.weight": prefix + "layers.0.mlp.down_proj.weight"}
    want = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]
    for gname, hf in plan.items():
        tensor = t[gname]
        src = st.to_f32(np.asarray(r.raw(hf)), r.entry(hf).dtype)
        assert tensor.tensor_type in (want, Q.F16)
        if tensor.tensor_type == Q.F16 and want == Q.Q8_0:
            assert src.shape[-1] % 32  # the fallback only for partial blocks
        got = quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(src.shape)
        if tensor.tensor_type == Q.Q8_0:
            d = np.abs(src.reshape(-1, 32)).max(axis=1, keepdims=True) / 127  # the block scale (stored as f16)
            assert np.all(np.abs(got - src).reshape(-1, 32) <= d * (0.5 + 127 * 2.0 ** -11) + 1e-7)
        else:
            assert np.all(np.abs(got - src) <= np.abs(src) * PRECISION[tensor.tensor_type] + 2.0 ** -25)  # + subnormals
    for name, tensor in t.items():
        if len(tensor.shape) == 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
            assert tensor.tensor_type in (Q.F32, Q.I32), name
    if family == "tiny-e" and outtype == "q8_0":
        assert t["blk.0.proj.weight"].tensor_type == Q.F16  # rows of 8 (the PLE width)


# --- tokenizer ---------------------------------------------------------------------------------------------------
def test_vocab_types_specials_and_template(tiny_ggufs):
    kv, _ = gguf(tiny_ggufs["tiny-e", "target"])
    toks, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    tid = {t: i for i, t in enumerate(toks)}
    assert len(toks) == 512 and kv["tokenizer.ggml.model"] == "gemma4" and kv["tokenizer.ggml.merges"]
    assert types[tid["<|turn>"]] == TokenType.CONTROL and types[tid["<bos>"]] == TokenType.CONTROL
    assert types[tid["<|channel>"]] == TokenType.USER_DEFINED  # rendered for the chat parser
    assert types[tid["<0x41>"]] == TokenType.BYTE and types[tid["\n"]] == TokenType.NORMAL
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"],
            kv["tokenizer.ggml.padding_token_id"], kv["tokenizer.ggml.unknown_token_id"]) == (2, 1, 0, 3)
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_space_prefix"] is False
    assert "<|turn>" in kv["tokenizer.chat_template"]


def _llama_vocab(path: Path):
    import llama_cpp

    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def test_llama_cpp_tokenizes_like_the_checkpoint(tiny_ggufs, export_src):
    """tokenizer.json (tokenizers) and tokenizer.model (sentencepiece, merges derived by us) both agree with
    llama.cpp on the corpus and on chat text with control tokens."""
    import sentencepiece as spm
    from tokenizers import Tokenizer

    from gguf_mtp.tiny.tokenizer import corpus_lines

    lines = corpus_lines()[:30] + ["Hello  world\n\nnew line 123 ünïcödé 日本", "x"]
    chat = "<bos><|turn>user\nHello there<turn|>\n<|turn>model\n<|channel>thought<channel|>ok"
    hf = Tokenizer.from_file(str(export_src / "tiny-e" / "target" / "tokenizer.json"))
    lj = _llama_vocab(tiny_ggufs["tiny-e", "target"])
    for text in [*lines, chat]:
        assert lj.tokenize(text.encode(), add_bos=False, special=True) == hf.encode(text, add_special_tokens=False).ids
    sp = spm.SentencePieceProcessor(model_file=str(export_src / "tiny-moe" / "target" / "tokenizer.model"))
    ls = _llama_vocab(tiny_ggufs["tiny-moe", "target"])
    for text in lines:
        assert ls.tokenize(text.encode(), add_bos=False, special=False) == sp.encode(text)


def test_sentencepiece_merges_match_transformers(export_src):
    pytest.importorskip("transformers")
    from transformers.tokenization_utils_base import generate_merges

    from gguf_mtp.export.tokenizer import load_vocab, read_sentencepiece

    d = export_src / "tiny-moe" / "target"
    _, pieces = read_sentencepiece(d / "tokenizer.model")
    theirs = [f"{a} {b}" for a, b in generate_merges({p: i for i, (p, _, _) in enumerate(pieces)})]
    assert load_vocab(d, {}).merges == theirs


def test_embedding_rows_are_cut_to_the_tokenizer(export_src, tmp_path):
    """A checkpoint padded to 520 rows (vocab_size 520) exports 512 rows and loads."""
    src = copy_checkpoint(export_src / "tiny-dense" / "target", tmp_path / "padded")
    edit_json(src / "config.json", lambda c: c.update(vocab_size=520))

    def pad(tensors, dtypes):
        e = tensors["model.embed_tokens.weight"]
        tensors["model.embed_tokens.weight"] = np.concatenate([e, np.zeros((8, e.shape[1]), e.dtype)])

    rewrite_weights(src, pad)
    convert(src, tmp_path / "cut.gguf")
    _, t = gguf(tmp_path / "cut.gguf")
    assert tuple(t["token_embd.weight"].shape) == (64, 512)
    assert _llama_vocab(tmp_path / "cut.gguf").n_vocab() == 512


# --- refusals: one clear message, nothing written ------------------------------------------------------------------
def _config_path(d: Path) -> Path:
    return d / "config.json"


def _text(cfg: dict) -> dict:
    return cfg.get("text_config", cfg)


BAD_TARGETS = {
    # name: (family, role, edit config, edit weights, expected message)
    "missing config.json": ("tiny-dense", "target", "delete", None, "no config.json"),
    "unknown architecture": ("tiny-dense", "target", lambda c: c.update(architectures=["LlamaForCausalLM"],
                                                                          model_type="llama"), None,
                             "unknown architecture LlamaForCausalLM"),
    "layout llama.cpp aborts on": ("tiny-e", "target", lambda c: _text(c).update(layer_types=[S, F, S, S, S, F]),
                                   None, "layer layout SFSSSF with 3 KV-shared layers"),
    "last layers not S,F": ("tiny-dense", "target", lambda c: _text(c).update(layer_types=[S, S, F, S, F, F]),
                            None, "must end with a sliding then a full layer"),
    "shape disagrees with config": ("tiny-dense", "target", lambda c: _text(c).update(intermediate_size=96), None,
                                    r"has shape \[128, 64\], but config.json implies \[96, 64\]"),
    "missing tensor": ("tiny-dense", "target", None,
                       lambda t, d: t.pop("model.layers.1.self_attn.v_proj.weight"), "is missing"),
    "unexpected tensor": ("tiny-dense", "target", None,
                          lambda t, d: t.update({"model.layers.0.mystery.weight": np.zeros(4, np.float32)}),
                          "unexpected tensor model.layers.0.mystery.weight"),
    "truncated weights": ("tiny-dense", "target", None, "truncate", "past the end of the file"),
    "drafter without sliding layers": ("tiny-dense", "drafter", lambda c: _text(c).update(layer_types=[F, F]), None,
                                       "at least one sliding layer"),
}


@pytest.mark.parametrize("case", list(BAD_TARGETS))
def test_bad_input_is_one_error_line_and_no_file(case, export_src, tmp_path):
    family, role, cfg_edit, weight_edit, message = BAD_TARGETS[case]
    src = copy_checkpoint(export_src / family / role, tmp_path / "src")
    if cfg_edit == "delete":
        _config_path(src).unlink()
    elif cfg_edit is not None:
        edit_json(_config_path(src), cfg_edit)
    if weight_edit == "truncate":
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[:-100])
    elif weight_edit is not None:
        rewrite_weights(src, weight_edit)
    out = tmp_path / "out.gguf"
    res = CliRunner().invoke(main, ["convert", str(src), "-o", str(out)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    import re

    assert re.search(message, lines[0]), lines[0]
    assert not out.exists() and no_leftovers(tmp_path)


def test_output_path_refusals(export_src, tmp_path):
    src = str(export_src / "tiny-dense" / "target")
    res = CliRunner().invoke(main, ["convert", src, "-o", str(tmp_path / "no" / "such" / "dir.gguf")])
    assert res.exit_code == 2 and "does not exist" in res.stderr
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep me")
    res = CliRunner().invoke(main, ["convert", src, "-o", str(out)])
    assert res.exit_code == 2 and "--force" in res.stderr and out.read_bytes() == b"keep me"
    res = CliRunner().invoke(main, ["convert", src, "-o", str(out), "--force", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["arch"] == "gemma4" and out.read_bytes()[:4] == b"GGUF"


def test_interrupt_leaves_nothing(export_src, tmp_path):
    """Ctrl-C in the middle of the tensor data: no output, no temp file (an existing file is kept)."""
    out = tmp_path / "t.gguf"

    def interrupt(ev):
        if ev.done >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(export_src / "tiny-e" / "target", out, progress=interrupt)
    assert not out.exists() and no_leftovers(tmp_path)
    out.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        convert(export_src / "tiny-e" / "target", out, force=True, progress=interrupt)
    assert out.read_bytes() == b"old" and no_leftovers(tmp_path)


def test_progress_reports_tensors_and_bytes(export_src, tmp_path):
    events = []
    res = convert(export_src / "tiny-dense" / "drafter", tmp_path / "d.gguf", progress=events.append)
    assert events[-1].done == events[-1].total == res.n_tensors
    assert events[-1].bytes_done == events[-1].bytes_total <= res.n_bytes


# --- pairing at export time --------------------------------------------------------------------------------------
def test_pair_check_against_gguf_and_hf_targets(export_src, tiny_ggufs, tmp_path):
    drafter = export_src / "tiny-dense" / "drafter"
    res = convert(drafter, tmp_path / "a.gguf", target=tiny_ggufs["tiny-dense", "target"])
    assert res.paired_with == str(tiny_ggufs["tiny-dense", "target"])
    convert(drafter, tmp_path / "b.gguf", target=export_src / "tiny-dense" / "target")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()  # the check writes nothing
    with pytest.raises(IncompatiblePair, match="head_dim_swa"):
        convert(export_src / "tiny-e" / "drafter", tmp_path / "c.gguf", target=export_src / "tiny-dense" / "target")
    assert not (tmp_path / "c.gguf").exists()
    with pytest.raises(GgufMtpError, match="pairs a drafter"):
        convert(export_src / "tiny-dense" / "target", tmp_path / "d.gguf", target=tiny_ggufs["tiny-dense", "target"])


def test_backbone_mismatch_is_refused(export_src, tmp_path):
    src = copy_checkpoint(export_src / "tiny-dense" / "drafter", tmp_path / "drafter")
    edit_json(src / "config.json", lambda c: c.update(backbone_hidden_size=48))
    res = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "d.gguf"), "--target",
                                    str(export_src / "tiny-dense" / "target")])
    assert res.exit_code == 1 and "hidden_size: drafter expects a target hidden size of 48" in res.stderr
    assert not (tmp_path / "d.gguf").exists()


def test_vocab_mismatch_is_refused(export_src, tmp_path):
    src = copy_checkpoint(export_src / "tiny-dense" / "drafter", tmp_path / "drafter")

    def rename(tok):
        vocab = tok["model"]["vocab"]
        vocab["▁zzz"] = vocab.pop(next(t for t, i in vocab.items() if i == 500))

    edit_json(src / "tokenizer.json", rename)
    with pytest.raises(IncompatiblePair, match="vocab: target and drafter token lists differ"):
        convert(src, tmp_path / "d.gguf", target=export_src / "tiny-dense" / "target")


def test_describe_builds_metadata_without_weights(export_src, tmp_path):
    src = copy_checkpoint(export_src / "tiny-moe" / "target", tmp_path / "t")
    (src / "model.safetensors").unlink()
    d = describe(src)
    facts = d.facts()
    assert (facts.arch, facts.hidden_size, facts.layer_layout, facts.kv_heads_full) == ("gemma4", 64, "SSFSSF", 1)
    assert d.metadata.plain()["gemma4.expert_count"] == 8
