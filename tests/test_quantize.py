"""``quantize`` / ``quantize-pair``: llama.cpp's quantizer on the tiny families, drafter-aware, atomic.

Quantized pairs must still run the MTP loop with output identical to their own target-only greedy output.
"""

from __future__ import annotations

import ctypes
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fixtures.quant import quantize_each, write_gguf
from fixtures.runtime import NEAR_TIE, TEST_SETTINGS, rescore_gaps
from gguf_mtp import quanttypes
from gguf_mtp.cli import main
from gguf_mtp.errors import GgufMtpError, IncompatiblePair
from gguf_mtp.fsutil import TMP_PREFIX
from gguf_mtp.gguffile import read_gguf
from gguf_mtp.inspect import inspect_gguf
from gguf_mtp.quantize import check_provenance, load_imatrix, output_name, quantize, quantize_pair

PAIR_TYPES = ("Q8_0", "Q4_K_M", "Q4_0")


def types_of(path: Path) -> dict[str, str]:
    return {t.name: t.type for t in read_gguf(path, tokens=False).tensors}


def no_temps(directory: Path) -> bool:
    return not list(directory.glob(TMP_PREFIX + "*"))


@pytest.fixture(scope="module")
def quantized_q(tiny_q, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """tiny-q target and drafter, each quantized to each of PAIR_TYPES."""
    return quantize_each(tiny_q, PAIR_TYPES, tmp_path_factory.mktemp("quantized-q"))


# --- tables --------------------------------------------------------------------------------------------
def test_tables_match_the_bindings():
    import gguf
    import llama_cpp.llama_cpp as lib

    for p in quanttypes.PRESETS.values():
        if not p.note.startswith("alias") and not p.only_copy:
            const = "LLAMA_FTYPE_ALL_F32" if p.name == "F32" else f"LLAMA_FTYPE_MOSTLY_{p.name}"
            assert getattr(lib, const) == p.ftype, p.name
    for name, value in quanttypes.GGML_TYPES.items():
        if hasattr(lib, f"GGML_TYPE_{name}"):
            assert getattr(lib, f"GGML_TYPE_{name}") == value, name
        if name in gguf.GGMLQuantizationType.__members__:
            assert int(gguf.GGMLQuantizationType[name]) == value, name
    assert quanttypes.ftype_name(15) == "Q4_K_M" and quanttypes.preset("q4_k").ftype == 15


def test_presets_are_llama_quantizes_list():
    """Every name tools/quantize accepts (read from the sdist), no more, no less."""
    from upstream import llama_cpp_dir

    src = (llama_cpp_dir() / "tools" / "quantize" / "quantize.cpp").read_text()
    table = src[src.index("QUANT_OPTIONS"):src.index("};", src.index("QUANT_OPTIONS"))]
    upstream = dict(re.findall(r'\{\s*"(\w+)",\s*LLAMA_FTYPE_(\w+),', table))
    assert set(upstream) == set(quanttypes.PRESETS)
    header = (llama_cpp_dir() / "include" / "llama.h").read_text()
    for name, const in upstream.items():
        value = int(re.search(rf"LLAMA_FTYPE_{const}\s*=\s*(\d+)", header)[1])
        assert quanttypes.PRESETS[name].ftype == value, name


# --- quantized pairs run, and k-quants are real -----------------------------------------------------------
def test_kquants_are_real_on_tiny_q(quantized_q):
    by_type = {q: {s.type for s in inspect_gguf(t).by_type} for q, (t, _) in quantized_q.items()}
    assert {"Q4_K", "Q6_K"} <= by_type["Q4_K_M"]
    assert by_type["Q8_0"] == {"Q8_0", "F32"}
    assert "Q4_0" in by_type["Q4_0"]
    assert inspect_gguf(quantized_q["Q4_K_M"][0]).file_type == "Q4_K_M"
    assert {s.type for s in inspect_gguf(quantized_q["Q4_K_M"][1]).by_type} >= {"Q4_K"}  # the drafter too


# Flash attention off: its CPU kernels round differently for one token than for a batch, and on these random tiny
# models that moves logits by several units. With it off, Q8_0 / Q4_0 / f32 give bit-identical logits either way,
# so MTP output must equal plain greedy output exactly. K-quant kernels (Q4_K, Q6_K) still differ between one
# token and a batch (measured up to ~4 logits on tiny-q Q4_K_M), so there the MTP output must be the greedy path
# under batched numerics, and may part from plain greedy only where the two numerics disagree on the argmax.
QUANT_SETTINGS = {"flash_attn": "off"}


def assert_same_greedy(eng, prompt: list[int], got: list[int], plain: list[int]) -> None:
    if got == plain:
        return
    first = next(i for i, (a, b) in enumerate(zip(got, plain)) if a != b)
    plain_gaps = rescore_gaps(eng, prompt, plain)
    assert plain_gaps[first] > 0, f"outputs part at {first}, where one-token and batched numerics agree"
    got_gaps = rescore_gaps(eng, prompt, got)
    assert max(got_gaps) < NEAR_TIE, f"speculative output is not the batched greedy path: {got_gaps}"


def _greedy_identity(target: Path, drafter: Path, max_tokens: int = 40, exact: bool = True) -> None:
    from gguf_mtp.runtime.adaptive import FixedK
    from gguf_mtp.runtime.drafters import OracleDrafter
    from gguf_mtp.runtime.engine import Engine
    from gguf_mtp.runtime.loop import generate

    with Engine.load(target, drafter, TEST_SETTINGS.replace(**QUANT_SETTINGS)) as eng:
        for text in ("the quick brown fox jumps over", "once upon a time"):
            prompt = [eng.bos, *eng.tokenize(text, add_special=False)]
            plain = generate(eng, prompt, max_tokens, chooser=FixedK(0), ignore_eog=True).tokens
            assert len(plain) == max_tokens
            mtp = generate(eng, prompt, max_tokens, chooser=FixedK(3), ignore_eog=True)
            assert mtp.stats.proposed > 0
            # drafts that are mostly right: acceptance and rollback on the quantized target
            oracle = OracleDrafter(prompt + plain, eng.n_vocab, corrupt_every=3)
            got = generate(eng, prompt, max_tokens, chooser=FixedK(3), drafter=oracle, ignore_eog=True)
            assert got.stats.accepted > 0
            for tokens in (mtp.tokens, got.tokens):
                if exact:
                    assert tokens == plain
                else:
                    assert_same_greedy(eng, prompt, tokens, plain)


@pytest.mark.parametrize("qtype", PAIR_TYPES)
def test_quantized_tiny_q_pair_keeps_greedy_output(quantized_q, qtype):
    _greedy_identity(*quantized_q[qtype], exact=qtype != "Q4_K_M")


@pytest.mark.parametrize("family", ["tiny-e", "tiny-dense", "tiny-moe"])
def test_other_families_quantize_and_keep_greedy_output(tiny_ggufs, tmp_path, family):
    r = quantize_pair(tiny_ggufs[(family, "target")], tiny_ggufs[(family, "drafter")], "Q4_0", tmp_path)
    assert r.drafter.qtype == "Q8_0" and Path(r.drafter.dst).name.endswith("-Q8_0.gguf")
    _greedy_identity(r.target.dst, r.drafter.dst, max_tokens=24)


# --- sizes, provenance, options ---------------------------------------------------------------------------
def test_dry_run_predicts_the_real_size_and_writes_nothing(tiny_q, tmp_path):
    dry = quantize(tiny_q[0], tmp_path / "x.gguf", "Q4_K_M", dry_run=True)
    assert dry.dry_run and not (tmp_path / "x.gguf").exists() and no_temps(tmp_path)
    real = quantize(tiny_q[0], tmp_path / "x.gguf", "Q4_K_M")
    assert [(t.name, t.dst_type, t.dst_bytes) for t in dry.tensors] == \
           [(t.name, t.dst_type, t.dst_bytes) for t in real.tensors]
    assert dry.dst_file_bytes == real.dst_file_bytes == (tmp_path / "x.gguf").stat().st_size
    assert real.src_file_bytes == tiny_q[0].stat().st_size > real.dst_file_bytes


def test_provenance_keys_survive(tiny_q, quantized_q):
    for q, (t, d) in quantized_q.items():
        for src, out in ((tiny_q[0], t), (tiny_q[1], d)):
            ours = {k: v for k, v in read_gguf(src).metadata.items() if k.startswith("gguf_mtp.")}
            assert ours and ours == {k: v for k, v in read_gguf(out).metadata.items() if k.startswith("gguf_mtp.")}
    a, b = read_gguf(tiny_q[1]), read_gguf(quantized_q["Q8_0"][1])
    b.metadata["gguf_mtp.role"] = "target"
    with pytest.raises(GgufMtpError, match="gguf_mtp.role"):
        check_provenance(a, b)


def test_type_overrides(tiny_q, tmp_path):
    r = quantize(tiny_q[0], tmp_path / "o.gguf", "Q4_K_M", token_embedding_type="q8_0",
                 tensor_types=[r"attn_q\.weight=q8_0", ("ffn_down", "Q5_K")])
    types = types_of(tmp_path / "o.gguf")
    assert types["token_embd.weight"] == "Q8_0"
    assert {v for k, v in types.items() if k.endswith("attn_q.weight")} == {"Q8_0"}
    assert {v for k, v in types.items() if k.endswith("ffn_down.weight")} == {"Q5_K"}
    assert {v for k, v in types.items() if k.endswith("ffn_up.weight")} == {"Q4_K"}
    assert r.by_type()["Q8_0"]["tensors"] >= 5


def test_progress_and_log_callback_restored(tiny_q, tmp_path):
    import llama_cpp.llama_cpp as lib

    def current():
        cb, ud = lib.llama_log_callback(), ctypes.c_void_p()
        lib.llama_log_get(ctypes.byref(cb), ctypes.byref(ud))
        return ctypes.cast(cb, ctypes.c_void_p).value, ud.value

    before = current()
    seen = []
    r = quantize(tiny_q[1], tmp_path / "d.gguf", "Q8_0", progress=lambda d, n, name: seen.append((d, n, name)))
    assert current() == before
    n = len(r.tensors)
    assert [d for d, _, _ in seen] == list(range(1, n + 1)) and {t for _, t, _ in seen} == {n}
    assert {name for _, _, name in seen} == {t.name for t in r.tensors}


def test_drafter_centroid_head_keeps_its_type(exports, tmp_path):
    centroid_drafter = exports.get("tiny-e", "drafter", centroids=True)
    r = quantize(centroid_drafter, tmp_path / "c.gguf", "Q4_0")
    types = types_of(tmp_path / "c.gguf")
    assert r.kept == ["masked_embd_centroids.weight"]
    assert types["masked_embd_centroids.weight"] == types_of(centroid_drafter)["masked_embd_centroids.weight"]
    assert types["masked_embd_ordering"] == "I32"
    quantize(centroid_drafter, tmp_path / "c2.gguf", "Q4_0", tensor_types=["masked_embd_centroids=q8_0"],
             force=True)
    assert types_of(tmp_path / "c2.gguf")["masked_embd_centroids.weight"] == "Q8_0"  # the user's choice wins


# --- importance matrix -------------------------------------------------------------------------------------
def write_imatrix(path: Path, model: Path, scale: str = "ramp", drop: int = 0) -> Path:
    """An imatrix GGUF in llama-imatrix's layout for every 2-D weight of ``model``."""
    tensors = {}
    for t in read_gguf(model, tokens=False).tensors:
        if len(t.shape) < 2 or "norm" in t.name or t.name.startswith("token_embd"):
            continue
        ne0, n_exp = t.shape[0], (t.shape[2] if len(t.shape) > 2 else 1)
        sums = np.linspace(0.01, 50.0, ne0 * n_exp, dtype=np.float32) ** 2 if scale == "ramp" else \
            np.full(ne0 * n_exp, np.inf if scale == "inf" else 1.0, np.float32)
        tensors[t.name + ".in_sum2"] = (sums * 10)[: ne0 * n_exp - drop].reshape(n_exp, -1)
        tensors[t.name + ".counts"] = np.full((n_exp, 1), 10.0, np.float32)
    return write_gguf(path, "imatrix", {"imatrix.chunk_count": 3, "imatrix.chunk_size": 512,
                                        "imatrix.datasets": ["corpus.txt"]}, tensors)


def test_imatrix_is_read_and_used(tiny_q, tmp_path):
    im_path = write_imatrix(tmp_path / "im.gguf", tiny_q[0])
    im = load_imatrix(im_path)
    name = next(iter(im.entries))
    assert im.entries[name].dtype == np.float32 and im.datasets == ["corpus.txt"] and im.chunk_count == 3
    with_im = quantize(tiny_q[0], tmp_path / "a.gguf", "Q4_K_M", imatrix=im_path)
    quantize(tiny_q[0], tmp_path / "b.gguf", "Q4_K_M")
    assert with_im.imatrix_entries == len(im.entries)
    meta = read_gguf(tmp_path / "a.gguf").metadata
    assert meta["quantize.imatrix.entries_count"] == len(im.entries)
    assert meta["quantize.imatrix.chunks_count"] == 3 and meta["quantize.imatrix.dataset"] == "corpus.txt"
    assert (tmp_path / "a.gguf").read_bytes() != (tmp_path / "b.gguf").read_bytes()  # the data changed the result
    with pytest.raises(GgufMtpError, match="needs an importance matrix"):  # llama.cpp refuses Q2_K_S without
        quantize(tiny_q[0], tmp_path / "c.gguf", "Q2_K_S")
    r = quantize(tiny_q[0], tmp_path / "c.gguf", "Q2_K_S", imatrix=im_path)
    assert "Q2_K" in r.by_type()
    with pytest.raises(GgufMtpError, match="requires an imatrix"):  # llama.cpp's own refusal, passed on
        quantize(tiny_q[1], tmp_path / "d.gguf", "Q4_K_M", tensor_types=["attn_q=iq2_xxs"])
    assert not (tmp_path / "d.gguf").exists() and no_temps(tmp_path)


@pytest.mark.parametrize("case, match", [
    ("inf", "non-finite"),
    ("short", "imatrix size"),
    ("legacy", "legacy .dat"),
    ("not-imatrix", "not an imatrix"),
])
def test_bad_imatrix(tiny_q, tmp_path, case, match):
    p = tmp_path / "im.gguf"
    if case == "legacy":
        p.write_bytes(b"\x01\x00\x00\x00" + bytes(40))
    elif case == "not-imatrix":
        write_gguf(p, "gemma4", {"gemma4.block_count": 1})
    else:
        write_imatrix(p, tiny_q[0], scale="inf" if case == "inf" else "ramp", drop=1 if case == "short" else 0)
    with pytest.raises(GgufMtpError, match=match):
        quantize(tiny_q[0], tmp_path / "o.gguf", "Q4_K_M", imatrix=p)
    assert not (tmp_path / "o.gguf").exists() and no_temps(tmp_path)


# --- errors: clear, and nothing written ---------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"qtype": "Q4_K_X"}, "unknown quantization type 'Q4_K_X'; expected one of Q1_0"),
    ({"tensor_types": ["attn_q"]}, "expected PATTERN=TYPE"),
    ({"tensor_types": ["attn_q(=q8_0"]}, "bad pattern"),
    ({"tensor_types": ["attn_q=q9_9"]}, "unknown --tensor-type type"),
    ({"output_tensor_type": "f8"}, "unknown --output-tensor-type"),
    ({"threads": 0}, "--threads"),
])
def test_bad_arguments(tiny_q, tmp_path, kwargs, match):
    args = {"qtype": "Q8_0", **kwargs}
    with pytest.raises(GgufMtpError, match=re.escape(match)):
        quantize(tiny_q[0], tmp_path / "o.gguf", args.pop("qtype"), **args)
    assert not (tmp_path / "o.gguf").exists()


def test_existing_output_needs_force_and_same_file_is_refused(tiny_q, tmp_path):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(GgufMtpError, match="--force"):
        quantize(tiny_q[1], out, "Q8_0")
    assert out.read_bytes() == b"keep me"
    quantize(tiny_q[1], out, "Q8_0", force=True)
    assert types_of(out)["blk.0.attn_q.weight"] == "Q8_0"
    with pytest.raises(GgufMtpError, match="same file"):
        quantize(out, out, "Q4_0", force=True, allow_requantize=True)


def test_requantize_needs_permission_and_failure_leaves_nothing(quantized_q, tmp_path):
    src = quantized_q["Q8_0"][1]
    with pytest.raises(GgufMtpError, match="requantizing from type q8_0 is disabled.*--allow-requantize"):
        quantize(src, tmp_path / "o.gguf", "Q4_0")
    assert not (tmp_path / "o.gguf").exists() and no_temps(tmp_path)
    r = quantize(src, tmp_path / "o.gguf", "Q4_0", allow_requantize=True)
    assert "Q4_0" in r.by_type()


def test_bad_source_fails_before_llama_cpp(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (1 << 60).to_bytes(8, "little") * 2)
    with pytest.raises(GgufMtpError, match="corrupt GGUF header"):
        quantize(bad, tmp_path / "o.gguf", "Q8_0")
    unknown = write_gguf(tmp_path / "u.gguf", "no-such-arch", {})
    with pytest.raises(GgufMtpError, match="llama.cpp could not quantize"):
        quantize(unknown, tmp_path / "o.gguf", "Q8_0")
    assert no_temps(tmp_path)


# --- pairs ------------------------------------------------------------------------------------------------
def test_output_names():
    assert output_name("/m/gemma-4-e4b-f16.gguf", "q4_k_m") == "gemma-4-e4b-Q4_K_M.gguf"
    assert output_name("gemma-4-e4b-it-assistant.BF16.gguf", "Q8_0") == "gemma-4-e4b-it-assistant-Q8_0.gguf"
    assert output_name("model.gguf", "IQ4_XS") == "model-IQ4_XS.gguf"


def test_pair_both_or_neither(tiny_q, quantized_q, tiny_ggufs, tmp_path):
    with pytest.raises(IncompatiblePair, match="hidden_size"):
        quantize_pair(tiny_q[0], tiny_ggufs[("tiny-dense", "drafter")], "Q4_0", tmp_path)
    # the target quantizes, then the (already quantized) drafter fails: neither file may appear
    with pytest.raises(GgufMtpError, match="requantizing"):
        quantize_pair(tiny_q[0], quantized_q["Q8_0"][1], "Q4_0", tmp_path, drafter_type="Q4_0")
    assert list(tmp_path.iterdir()) == []
    r = quantize_pair(tiny_q[0], tiny_q[1], "Q4_0", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([r.target.dst.name, r.drafter.dst.name])
    with pytest.raises(GgufMtpError, match="--force"):
        quantize_pair(tiny_q[0], tiny_q[1], "Q4_0", tmp_path)


# --- CLI --------------------------------------------------------------------------------------------------
def test_cli_quantize_json_dry_run_and_errors(tiny_q, tmp_path):
    out = tmp_path / "t.gguf"
    r = CliRunner().invoke(main, ["quantize", str(tiny_q[0]), str(out), "q4_k_m", "--json", "--threads", "2"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["qtype"] == "Q4_K_M" and data["dst_file_bytes"] == out.stat().st_size and "Q6_K" in data["by_type"]
    r = CliRunner().invoke(main, ["quantize", str(tiny_q[0]), str(tmp_path / "n.gguf"), "Q6_K", "--dry-run"])
    assert r.exit_code == 0 and "dry run" in r.output and not (tmp_path / "n.gguf").exists()
    r = CliRunner().invoke(main, ["quantize", str(tiny_q[0]), str(out), "Q4_K_M"])
    assert r.exit_code == 2 and r.output.startswith("error: ") and r.output.count("\n") == 1
    r = CliRunner().invoke(main, ["quantize", str(tiny_q[0]), str(out), "Q3_K_XL", "--force"])
    assert r.exit_code == 2 and "unknown quantization type" in r.output


def test_cli_quantize_pair(tiny_q, tmp_path):
    r = CliRunner().invoke(main, ["quantize-pair", str(tiny_q[0]), str(tiny_q[1]), "Q4_K_M", "-o", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "target: wrote" in r.output and "drafter: wrote" in r.output
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and any(n.endswith("-Q4_K_M.gguf") for n in names) and \
        any(n.endswith("-Q8_0.gguf") for n in names)
    r = CliRunner().invoke(main, ["check", *(str(tmp_path / n) for n in sorted(names, key=lambda n: "Q8_0" in n))])
    assert r.exit_code == 0, r.output
