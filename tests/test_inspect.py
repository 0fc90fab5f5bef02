"""The bounded GGUF header reader (gguffile) and ``inspect``: right values, and bad files end in one clear error.

Bad files are built byte by byte so each one breaks exactly one rule; every read is timed and traced for memory.
"""

from __future__ import annotations

import json
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures.quant import TOKENS, write_gguf, write_role
from gguf_mtp.cli import main
from gguf_mtp.errors import GgufMtpError
from gguf_mtp.gguffile import read_gguf, tensor_array
from gguf_mtp.inspect import inspect_gguf

MAX_PEAK = 1 << 20  # bytes any bad-file read may allocate (tracemalloc peak)
MAX_SECONDS = 1.0


# --- a byte-level GGUF encoder for bad files ----------------------------------------------------------------
def s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def kv_u32(key: str, v: int) -> bytes:
    return s(key) + struct.pack("<II", 4, v)


def kv_str(key: str, v: str) -> bytes:
    return s(key) + struct.pack("<I", 8) + s(v)


def tensor_info(name: str, dims: tuple[int, ...], ggml_type: int = 0, offset: int = 0) -> bytes:
    dims_bytes = struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
    return s(name) + dims_bytes + struct.pack("<IQ", ggml_type, offset)


def gguf_bytes(kvs: list[bytes] = (), tensors: list[bytes] = (), data: bytes = b"", version: int = 3,
               n_kv: int | None = None, n_tensors: int | None = None, magic: bytes = b"GGUF") -> bytes:
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    pad = -len(body) % 32
    return body + b"\0" * pad + data


def good_bytes() -> bytes:
    return gguf_bytes([kv_str("general.architecture", "gemma4"), kv_u32("gemma4.block_count", 2)],
                      [tensor_info("a.weight", (4, 2), 0, 0), tensor_info("b", (8,), 0, 32)], bytes(64))


def read_bounded(path: Path):
    """read_gguf under tracemalloc and a clock; returns (result or exception, peak bytes, seconds)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        out = read_gguf(path)
    except GgufMtpError as e:
        out = e
    finally:
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return out, peak, seconds


BIG = 1 << 62
BAD_FILES = {
    # name: (bytes, expected message fragment)
    "empty": (b"", "not a GGUF"),
    "wrong magic": (b"GGML" + good_bytes()[4:], "bad magic"),
    "version 1": (gguf_bytes(version=1), "unsupported GGUF version 1"),
    "version 4": (gguf_bytes(version=4), "unsupported GGUF version 4"),
    "big-endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    "header cut": (good_bytes()[:20], "fixed header"),
    "absurd kv count": (gguf_bytes([kv_u32("a", 1)], n_kv=BIG), "metadata count"),
    "absurd tensor count": (gguf_bytes([kv_u32("a", 1)], n_tensors=BIG), "tensor count"),
    "key length past end": (gguf_bytes([struct.pack("<Q", BIG) + b"abc"]), "key length"),
    "string value past end": (gguf_bytes([s("k") + struct.pack("<IQ", 8, 10**12) + b"xy"]), "string"),
    "array length past end": (gguf_bytes([s("k") + struct.pack("<IIQ", 9, 4, 10**15)]), "array length"),
    "string in array past end": (gguf_bytes([s("k") + struct.pack("<IIQQ", 9, 8, 1, 1000) + b"ab"]), "string"),
    "unknown value type": (gguf_bytes([s("k") + struct.pack("<II", 77, 0)]), "unknown value type 77"),
    "nested arrays": (gguf_bytes([s("k") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 6 + bytes(64)]),
                      "nested"),
    "duplicate key": (gguf_bytes([kv_u32("a", 1), kv_u32("a", 2)]), "duplicate key"),
    "too many dims": (gguf_bytes([], [tensor_info("t", (1,) * 9)]), "dimensions"),
    "zero dims": (gguf_bytes([], [s("t") + struct.pack("<IIQ", 0, 0, 0)]), "dimensions"),
    "unknown tensor type": (gguf_bytes([], [tensor_info("t", (4,), 99)], bytes(32)), "unknown ggml type 99"),
    "tensor past end": (gguf_bytes([], [tensor_info("t", (1 << 40,), 0)], bytes(32)), "runs past the end"),
    "tensor offset past end": (gguf_bytes([], [tensor_info("t", (4,), 0, 1 << 50)], bytes(32)), "runs past"),
    "misaligned offset": (gguf_bytes([], [tensor_info("t", (4,), 0, 4)], bytes(64)), "alignment"),
    "bad alignment": (gguf_bytes([kv_u32("general.alignment", 3)]), "power of two"),
    "block size": (gguf_bytes([], [tensor_info("t", (7,), 8)], bytes(64)), "block size"),
    "overlapping tensors": (gguf_bytes([], [tensor_info("a", (8,)), tensor_info("b", (8,))], bytes(32)), "overlap"),
    "duplicate tensor": (gguf_bytes([], [tensor_info("a", (8,)), tensor_info("a", (8,), 0, 32)], bytes(64)),
                         "duplicate tensor"),
    "truncated data": (good_bytes()[:-8], "truncated"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_files_give_one_clear_error_in_bounded_time_and_memory(tmp_path, name):
    data, fragment = BAD_FILES[name]
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    out, peak, seconds = read_bounded(p)
    assert isinstance(out, GgufMtpError), f"{name}: read succeeded"
    assert fragment in str(out), str(out)
    assert str(p) in str(out) and "\n" not in str(out)
    assert peak < MAX_PEAK, f"{name}: {peak} bytes allocated"
    assert seconds < MAX_SECONDS


def test_good_handmade_file_reads(tmp_path):
    p = tmp_path / "ok.gguf"
    p.write_bytes(good_bytes())
    info = read_gguf(p)
    assert info.metadata == {"general.architecture": "gemma4", "gemma4.block_count": 2}
    assert [(t.name, t.shape, t.n_bytes) for t in info.tensors] == [("a.weight", (4, 2), 32), ("b", (8,), 32)]
    assert info.tensors[1].offset == info.data_offset + 32 and info.version == 3


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9, 0.999])
def test_truncated_real_file(tmp_path, cut):
    full = write_role(tmp_path / "t.gguf", "target").read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(full[: int(len(full) * cut)])
    out, peak, seconds = read_bounded(p)
    assert isinstance(out, GgufMtpError) and peak < MAX_PEAK and seconds < MAX_SECONDS


def test_reader_agrees_with_gguf_py(tmp_path):
    """Every value type, read by our scanner and by gguf-py's reader."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    p = tmp_path / "types.gguf"
    w = GGUFWriter(str(p), arch="gemma4")
    w.add_uint8("x.u8", 200), w.add_int8("x.i8", -5), w.add_uint16("x.u16", 60000), w.add_int16("x.i16", -300)
    w.add_uint32("x.u32", 4_000_000_000), w.add_int32("x.i32", -7), w.add_float32("x.f32", 1.5)
    w.add_uint64("x.u64", 1 << 40), w.add_int64("x.i64", -(1 << 40)), w.add_float64("x.f64", 0.1)
    w.add_bool("x.bool", True), w.add_string("x.str", "héllo")
    w.add_key_value("x.arr_bool", [True, False, True], GGUFValueType.ARRAY, sub_type=GGUFValueType.BOOL)
    w.add_array("x.arr_int", [1, -2, 3]), w.add_array("x.arr_f", [0.5, 2.0]), w.add_array("x.arr_s", ["a", "", "ü"])
    w.add_token_list(TOKENS)
    w.add_tensor("m.weight", np.arange(48, dtype=np.float32).reshape(6, 8))
    w.add_tensor("h.weight", np.ones(32, dtype=np.float16))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()

    ours = read_gguf(p)
    theirs = GGUFReader(str(p))
    for name, f in theirs.fields.items():
        if name.startswith("GGUF."):
            continue
        expect = f.contents()
        got = ours.metadata[name]
        if isinstance(expect, float):
            assert got == pytest.approx(expect)
        elif isinstance(expect, list) and expect and isinstance(expect[0], float):
            assert got == pytest.approx(expect)
        else:
            assert got == expect, name
    assert ours.token_bytes == [t.encode() for t in TOKENS]
    for t in theirs.tensors:
        mine = next(x for x in ours.tensors if x.name == t.name)
        assert (mine.type, mine.shape, mine.n_bytes, mine.offset) == (
            t.tensor_type.name, tuple(int(x) for x in t.shape), int(t.n_bytes), int(t.data_offset))
        np.testing.assert_array_equal(tensor_array(ours, t.name), t.data)


# --- fuzz: any mutation of a valid file reads or fails cleanly ---------------------------------------------
@pytest.fixture(scope="module")
def seed_bytes(tmp_path_factory) -> bytes:
    d = tmp_path_factory.mktemp("fuzz")
    return write_role(d / "seed.gguf", "drafter", kv={"gguf_mtp.role": "drafter"}).read_bytes()


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("cut"), st.integers(0, 10_000), st.just(b"")),
    st.tuples(st.just("huge"), st.integers(0, 10_000), st.sampled_from(
        [struct.pack("<Q", v) for v in (1 << 63, 1 << 40, 0xFFFFFFFF, 2**64 - 1, 7)])),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(mutation, min_size=1, max_size=4))
def test_fuzzed_headers_read_or_fail_cleanly(tmp_path, seed_bytes, mutations):
    data = bytearray(seed_bytes)
    for kind, pos, payload in mutations:
        pos %= max(1, len(data))
        if kind == "cut":
            del data[pos:]
        else:
            data[pos:pos + len(payload)] = payload
    p = tmp_path / "fuzz.gguf"
    p.write_bytes(bytes(data))
    t0 = time.perf_counter()
    try:
        info = read_gguf(p)
    except GgufMtpError:
        pass
    else:
        assert all(t.offset + t.n_bytes <= len(data) for t in info.tensors)
    assert time.perf_counter() - t0 < MAX_SECONDS


# --- inspect -------------------------------------------------------------------------------------------------
def test_inspect_reports_role_types_layers_and_provenance(tmp_path):
    tensors = {
        "token_embd.weight": np.zeros((16, 32), np.float32),
        "blk.0.attn_q.weight": np.zeros((32, 32), np.float16),
        "blk.0.attn_norm.weight": np.zeros(32, np.float32),
        "blk.1.attn_q.weight": np.zeros((32, 32), np.float16),
        "v.blk.0.attn_q.weight": np.zeros((8, 32), np.float32),
    }
    p = write_gguf(tmp_path / "m.gguf", "gemma4", {"gemma4.block_count": 2, "gemma4.embedding_length": 32,
                                                   "general.file_type": 15, "gguf_mtp.role": "drafter",
                                                   "gguf_mtp.source": "google/x"}, tensors, TOKENS)
    ins = inspect_gguf(p, tensors=True)
    assert ins.role == "drafter"  # our key wins over the architecture
    assert ins.file_type == "Q4_K_M" and ins.n_vocab == len(TOKENS) and ins.n_tensors == 5
    assert ins.n_params == 16 * 32 + 2 * 32 * 32 + 32 + 8 * 32
    assert {s.type: (s.tensors, s.bytes) for s in ins.by_type} == {"F32": (3, (512 + 32 + 256) * 4),
                                                                    "F16": (2, 2 * 1024 * 2)}
    assert [(s.layer, s.tensors) for s in ins.layers] == [("blk.0", 2), ("blk.1", 1), ("v.blk.0", 1), ("other", 1)]
    assert ins.provenance == {"gguf_mtp.role": "drafter", "gguf_mtp.source": "google/x"}
    assert ins.metadata["gemma4.block_count"] == 2
    assert len(ins.tensors) == 5 and ins.tensors[0]["name"] == "token_embd.weight"
    json.dumps(ins.to_dict())


@pytest.mark.parametrize("role", ["target", "drafter", "projector"])
def test_inspect_role_from_architecture(tmp_path, role):
    assert inspect_gguf(write_role(tmp_path / f"{role}.gguf", role)).role == role


def test_inspect_is_fast_on_a_gemma4_sized_vocabulary(tmp_path):
    """262144 tokens (Gemma 4's vocabulary) and a 'large' data section: the header read stays well under 2 s."""
    toks = [f"tok{i}" for i in range(262144)]
    p = write_gguf(tmp_path / "big.gguf", "gemma4", {"gemma4.block_count": 1}, tokens=toks)
    with p.open("r+b") as f:  # a sparse 20 GB tail: offsets and sizes are checked, data never read
        f.truncate(20 << 30)
    t0 = time.perf_counter()
    ins = inspect_gguf(p)
    assert time.perf_counter() - t0 < 2.0
    assert ins.n_vocab == 262144 and ins.file_bytes == 20 << 30


def test_inspect_cli_json_and_tables(tmp_path):
    a = write_role(tmp_path / "t.gguf", "target", kv={"gguf_mtp.role": "target", "gguf_mtp.version": "0.1.0"})
    b = write_role(tmp_path / "d.gguf", "drafter")
    r = CliRunner().invoke(main, ["inspect", str(a), str(b), "--json", "--tensors"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert [d["role"] for d in data] == ["target", "drafter"]
    assert data[0]["provenance"] == {"gguf_mtp.role": "target", "gguf_mtp.version": "0.1.0"}
    assert data[0]["tensors"][0]["name"] == "token_embd.weight"
    r = CliRunner().invoke(main, ["inspect", str(a), "--tensors"])
    assert r.exit_code == 0 and "bytes by type" in r.output and "token_embd.weight" in r.output


def test_inspect_cli_bad_file_is_one_error_line(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(gguf_bytes([kv_u32("a", 1)], n_kv=BIG))
    r = CliRunner().invoke(main, ["inspect", str(p)])
    assert r.exit_code == 2
    assert r.output.count("\n") == 1 and r.output.startswith("error: ") and "metadata count" in r.output


def test_inspect_a_full_size_31b_skeleton(skeletons):
    """A 17 GiB Gemma 4 31B Q4_K_M layout (sparse file): read in well under a second or two, llama.cpp's mix shown."""
    path = skeletons.get("31B", "target", "Q4_K_M")
    t0 = time.perf_counter()
    ins = inspect_gguf(path)
    assert time.perf_counter() - t0 < 2.0
    assert ins.file_bytes > 16 << 30 and ins.n_vocab == 262144 and ins.role == "target"
    assert ins.file_type == "Q4_K_M" and {"Q4_K", "Q6_K"} <= {s.type for s in ins.by_type}
    assert ins.n_params > 30e9 and 4.5 < ins.bits_per_weight < 5.5
