"""Fuzz targets for the readers that take files from strangers, and the harness that judges one input.

Each target is (seed files, hypothesis strategy of inputs, ``run(input, workdir)``). ``judge`` runs one input
under ``tracemalloc`` and a clock and allows exactly three outcomes: the reader returns, it raises
``GgufMtpError``, or the harness fails the test (any other exception is a crash; more than ``MAX_SECONDS`` is a
hang; a traced-memory peak over the target's budget means something allocated from a claimed count rather than
from bytes actually present). ``STATS`` counts what happened per target (tools/fuzz.py prints it).

Inputs are built two ways per target: mutations of valid seed files (byte edits biased towards the integers
that break parsers: 0, 1, 2^31, 2^32-1, 2^63, 2^64-1, sizes near the file's), and structured files generated
field by field, so that lies about counts, lengths, types and offsets reach the code past the first check.
"""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st

from gguf_mtp.errors import GgufMtpError

MAX_SECONDS = 1.0
HANG_SECONDS = 5.0  # an input still running after this is stopped (SIGALRM) and reported as a hang
SLACK = 1 << 20  # fixed-size work independent of the input: type tables, exceptions, the plan's structures
# traced-memory budget per input byte. Binary readers keep what they decode; a Python object per decoded
# element costs more than its encoding (a 1-byte i8 array element becomes an 8-byte list slot), hence > 2.
# JSON inputs go through json.loads, whose objects take ~10-25x the text (a dict per entry, a str per key).
BUDGET = {"gguf": 2, "safetensors": 2, "config": 32}
EXAMPLES = int(os.environ.get("GGUF_MTP_FUZZ_EXAMPLES", "0") or 0)  # 0: the short CI run


@dataclass
class TargetStats:
    inputs: int = 0
    accepted: int = 0  # read without error
    refused: Counter = field(default_factory=Counter)  # GgufMtpError, by the message's first words
    max_seconds: float = 0.0
    max_ratio: float = 0.0  # peak traced memory / input bytes (inputs >= 4 KiB)
    max_peak: int = 0
    max_input: int = 0
    crashes: int = 0
    slow: int = 0
    over_budget: int = 0


STATS: dict[str, TargetStats] = {}
# tools/fuzz.py sets this to collect findings (site -> (message, input)) instead of failing at the first
FINDINGS: dict[str, tuple[str, Any]] | None = None


def examples(default: int) -> int:
    return EXAMPLES or default


def _site(e: BaseException) -> str:
    """Where an exception came from: its type and the innermost frame in gguf_mtp."""
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__) if "gguf_mtp" in f.filename]
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    return f"{type(e).__name__} at {where}"


def _finding(site: str, message: str, data: Any) -> None:
    if FINDINGS is None:
        raise AssertionError(f"{site}: {message}")
    FINDINGS.setdefault(site, (message, data))


def judge(target: str, data: Any, size: int, fn: Callable[[], Any]) -> Any:
    """Run one input; a crash, a hang or an allocation beyond the budget fails (or is collected)."""
    stats = STATS.setdefault(target, TargetStats())
    stats.inputs += 1
    stats.max_input = max(stats.max_input, size)
    tracemalloc.start()
    t0 = time.perf_counter()
    result, refused, crash = None, None, None
    try:
        with _hang_guard():
            result = fn()
    except GgufMtpError as e:
        refused = e
    except Exception as e:  # noqa: BLE001 -- judged below
        crash = e
    finally:
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    stats.max_seconds = max(stats.max_seconds, seconds)
    stats.max_peak = max(stats.max_peak, peak)
    if size >= 4096:
        stats.max_ratio = max(stats.max_ratio, peak / size)
    if crash is not None:
        stats.crashes += 1
        if FINDINGS is None:
            raise crash
        _finding(f"{target}: {_site(crash)}", f"{type(crash).__name__}: {crash}"[:300], data)
    elif refused is None:
        stats.accepted += 1
    else:
        msg = str(refused)
        stats.refused[" ".join(msg.split(": ", 1)[-1].split()[:4])] += 1
        if "\n" in msg:
            _finding(f"{target}: multi-line refusal", msg[:300], data)
    if seconds >= MAX_SECONDS:
        stats.slow += 1
        _finding(f"{target}: slow ({_site_of_slow(fn)})", f"{seconds:.2f} s on a {size}-byte input", data)
    limit = BUDGET[target] * size + SLACK
    if peak > limit:
        stats.over_budget += 1
        _finding(f"{target}: memory", f"traced memory peaked at {peak} bytes for a {size}-byte input "
                 f"(limit {limit})", data)
    return result


def _site_of_slow(fn: Callable[[], Any]) -> str:
    return getattr(fn, "__qualname__", "?")


class Hang(Exception):
    """An input ran past HANG_SECONDS (raised inside it by SIGALRM, so the campaign goes on)."""


class _hang_guard:
    def __enter__(self) -> None:
        self.armed = threading.current_thread() is threading.main_thread()
        if self.armed:
            self.old = signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)

    def __exit__(self, *exc: Any) -> None:
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old)

    @staticmethod
    def _fire(signum: int, frame: Any) -> None:
        raise Hang(f"still running after {HANG_SECONDS:g} s")


# --- byte mutations --------------------------------------------------------------------------------------------
INTERESTING = (0, 1, 2, 3, 7, 8, 31, 32, 33, 255, 256, 4096, 65535, 2**24, 10**9, 2**31 - 1, 2**31, 2**32 - 1,
               2**32, 10**12, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1)


@st.composite
def mutated(draw: Any, seeds: list[bytes], max_mutations: int = 6) -> bytes:
    """A seed file with a few edits: overwrite, insert, delete, cut, or an interesting little-endian integer."""
    data = bytearray(draw(st.sampled_from(seeds)))
    rng = draw(st.randoms(use_true_random=False))  # positions spread over the file (drawn integers favour 0)
    for _ in range(draw(st.integers(1, max_mutations))):
        kind = draw(st.sampled_from(["int", "int", "int", "bytes", "insert", "delete", "cut", "flip"]))
        pos = rng.randrange(max(1, len(data)))
        if kind == "int":
            width = draw(st.sampled_from([1, 2, 4, 8]))
            value = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2**64 - 1),
                                   st.integers(-16, 16).map(lambda d, n=len(data): max(0, n + d))))
            data[pos:pos + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
        elif kind == "bytes":
            payload = draw(st.binary(min_size=1, max_size=16))
            data[pos:pos + len(payload)] = payload
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif kind == "cut":
            del data[pos:]
        elif data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


# --- GGUF ------------------------------------------------------------------------------------------------------
def gguf_seeds(workdir: Path) -> list[bytes]:
    """Small valid files: a target, a drafter and a projector with every value type and a few tensor types."""
    import gguf

    def one(name: str, arch: str, kv: dict[str, Any], tensors: dict[str, np.ndarray], tokens: bool) -> bytes:
        path = workdir / name
        w = gguf.GGUFWriter(str(path), arch)
        for key, (value, vtype, sub) in kv.items():
            w.add_key_value(key, value, vtype, sub_type=sub)
        if tokens:
            w.add_token_list(["<pad>", "<eos>", "<bos>", "a", "b", "ab", "\u00e9"])
            w.add_token_scores([0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0])
            w.add_token_types([3, 3, 3, 1, 1, 1, 1])
            w.add_token_merges(["a b"])
            w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
        for tname, arr in tensors.items():
            w.add_tensor(tname, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes()

    T = gguf.GGUFValueType
    layout = [True, False, True, False]
    common = {
        "attention.key_length": (32, T.UINT32, None), "attention.key_length_swa": (16, T.UINT32, None),
        "attention.sliding_window": (8, T.UINT32, None), "rope.freq_base": (1e6, T.FLOAT32, None),
        "rope.freq_base_swa": (1e4, T.FLOAT32, None), "context_length": (4096, T.UINT32, None),
        "attention.head_count": (4, T.UINT32, None), "feed_forward_length": ([64] * 4, T.ARRAY, T.UINT32),
    }
    target = {f"gemma4.{k}": v for k, v in {
        **common, "block_count": (4, T.UINT32, None), "embedding_length": (64, T.UINT32, None),
        "attention.head_count_kv": ([2, 1, 2, 1], T.ARRAY, T.INT32),
        "attention.sliding_window_pattern": (layout, T.ARRAY, T.BOOL),
        "attention.shared_kv_layers": (0, T.UINT32, None)}.items()}
    target.update({"general.file_type": (1, T.UINT32, None), "general.alignment": (32, T.UINT32, None),
                   "test.i8": (-3, T.INT8, None), "test.u16": (7, T.UINT16, None), "test.i64": (-9, T.INT64, None),
                   "test.f64": (0.5, T.FLOAT64, None), "test.bool": (True, T.BOOL, None),
                   "test.strings": (["x", "yz"], T.ARRAY, T.STRING), "gguf_mtp.role": ("target", T.STRING, None)})
    drafter = {f"gemma4-assistant.{k}": v for k, v in {
        **common, "block_count": (2, T.UINT32, None), "embedding_length": (32, T.UINT32, None),
        "embedding_length_out": (64, T.UINT32, None), "attention.head_count_kv": (2, T.UINT32, None),
        "attention.sliding_window_pattern": ([True, False], T.ARRAY, T.BOOL),
        "nextn_predict_layers": (2, T.UINT32, None), "centroid_count": (2, T.UINT32, None)}.items()}
    f32 = lambda *shape: np.arange(math.prod(shape), dtype=np.float32).reshape(shape)  # noqa: E731
    t_tensors = {"token_embd.weight": f32(7, 64), "blk.0.attn_q.weight": f32(64, 64).astype(np.float16),
                 "blk.0.attn_norm.weight": f32(64), "blk.3.ffn_up.weight": f32(2, 64), "output_norm.weight": f32(64)}
    d_tensors = {"masked_embd_centroids.weight": f32(2, 32), "masked_embd_ordering": np.arange(7, dtype=np.int32),
                 "blk.0.attn_q.weight": f32(4, 32)}
    return [
        one("target.gguf", "gemma4", target, t_tensors, True),
        one("drafter.gguf", "gemma4-assistant", drafter, d_tensors, True),
        one("mmproj.gguf", "clip", {"clip.vision.projection_dim": (64, T.UINT32, None),
                                    "clip.has_vision_encoder": (True, T.BOOL, None)},
            {"v.patch_embd.weight": f32(4, 8)}, False),
    ]


# structured GGUFs: value type codes as the format defines them (8 string, 9 array), plus invalid ones
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
_KEYS = ("general.architecture", "general.alignment", "general.file_type", "tokenizer.ggml.tokens",
         "tokenizer.ggml.scores", "{a}.block_count", "{a}.embedding_length", "{a}.embedding_length_out",
         "{a}.attention.head_count_kv", "{a}.attention.head_count", "{a}.attention.sliding_window_pattern",
         "{a}.attention.key_length", "{a}.attention.key_length_swa", "{a}.attention.sliding_window",
         "{a}.attention.shared_kv_layers", "{a}.context_length", "{a}.feed_forward_length", "{a}.expert_count",
         "{a}.expert_used_count", "{a}.rope.freq_base", "{a}.centroid_count", "clip.vision.projection_dim",
         "gguf_mtp.role", "gguf_mtp.pair.vocab_sha256", "x")
_ARCHS = ("gemma4", "gemma4-assistant", "clip", "llama", "")
_TENSOR_NAMES = ("token_embd.weight", "output.weight", "blk.0.attn_q.weight", "blk.1.ffn_down_exps.weight",
                 "blk.300.attn_k.weight", "masked_embd_centroids.weight", "v.blk.0.attn_q.weight", "rope_freqs.weight")


def _u64(v: int) -> bytes:
    return struct.pack("<Q", v % 2**64)


def _string(s: bytes, lie: int | None = None) -> bytes:
    return _u64(len(s) if lie is None else lie) + s


@st.composite
def _value(draw: Any, depth: int = 0) -> tuple[int, bytes]:
    """(type code, encoding) of one value, sometimes with a lying length or count."""
    code = draw(st.sampled_from([0, 1, 4, 5, 6, 7, 10, 11, 12, 8, 8, 9, 9, 13, 2**32 - 1]))
    if code in _SCALAR_FMT:
        fmt = _SCALAR_FMT[code]
        if fmt[1] in "fd":
            v = draw(st.floats(allow_nan=True, allow_infinity=True, width=32 if fmt[1] == "f" else 64))
            return code, struct.pack(fmt, v)
        bits = struct.calcsize(fmt) * 8
        v = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2**bits - 1))) % 2**bits
        return code, v.to_bytes(bits // 8, "little")
    if code == 8:
        s = draw(st.binary(max_size=24))
        lie = draw(st.one_of(st.none(), st.none(), st.sampled_from(INTERESTING)))
        return code, _string(s, lie)
    if code == 9 and depth < 5:
        n = draw(st.integers(0, 12))
        items = [draw(_value(depth + 1)) for _ in range(n)]
        etype = items[0][0] if items and draw(st.booleans()) else draw(st.sampled_from([0, 4, 6, 7, 8, 9, 12, 99]))
        count = n if draw(st.booleans()) else draw(st.sampled_from(INTERESTING))
        same = [enc for t, enc in items if t == etype]
        body = b"".join(same if draw(st.booleans()) else [enc for _, enc in items])
        return code, struct.pack("<I", etype) + _u64(count) + body
    return code, draw(st.binary(max_size=8))


@st.composite
def structured_gguf(draw: Any) -> bytes:
    """A GGUF written field by field from drawn keys, values, tensor infos and (sometimes lying) counts."""
    arch = draw(st.sampled_from(_ARCHS))
    kvs = []
    kv_arch = b"general.architecture"
    kvs.append(_string(kv_arch) + struct.pack("<I", 8) + _string(arch.encode()))
    for _ in range(draw(st.integers(0, 10))):
        key = draw(st.sampled_from(_KEYS)).format(a=arch).encode()
        code, enc = draw(_value())
        kvs.append(_string(key) + struct.pack("<I", code) + enc)
    infos = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(_TENSOR_NAMES)).encode()
        n_dims = draw(st.sampled_from([1, 2, 3, 4, 0, 5, 2**32 - 1]))
        dims = [draw(st.one_of(st.integers(0, 64), st.sampled_from(INTERESTING))) for _ in range(min(n_dims, 6))]
        ttype = draw(st.sampled_from([0, 1, 8, 12, 30, 2, 4, 40, 2**31]))
        offset = draw(st.one_of(st.sampled_from([0, 32, 64, 256]), st.sampled_from(INTERESTING)))
        infos.append(_string(name) + struct.pack("<I", n_dims % 2**32) + b"".join(_u64(d) for d in dims)
                     + struct.pack("<I", ttype) + _u64(offset))
    n_kv = len(kvs) if draw(st.booleans()) else draw(st.sampled_from(INTERESTING))
    n_t = len(infos) if draw(st.booleans()) else draw(st.sampled_from(INTERESTING))
    version = draw(st.sampled_from([3, 3, 3, 2, 1, 0x03000000]))
    head = b"GGUF" + struct.pack("<I", version) + _u64(n_t) + _u64(n_kv) + b"".join(kvs) + b"".join(infos)
    head += b"\0" * (-len(head) % 32)
    return head + b"\0" * draw(st.sampled_from([0, 32, 256, 2048]))


@st.composite
def _honest_value(draw: Any, depth: int = 0) -> tuple[int, bytes]:
    """(type code, encoding) of a well-formed value of any type: the file parses, the value is hostile."""
    kind = draw(st.sampled_from(["scalar", "scalar", "string", "array", "array"] if depth < 2 else ["scalar"]))
    if kind == "scalar":
        code = draw(st.sampled_from(sorted(_SCALAR_FMT)))
        fmt = _SCALAR_FMT[code]
        if fmt[1] in "fd":
            return code, struct.pack(fmt, draw(st.floats(width=32 if fmt[1] == "f" else 64)))
        bits = struct.calcsize(fmt) * 8
        v = draw(st.one_of(st.integers(0, 70), st.sampled_from(INTERESTING))) % 2**bits
        return code, v.to_bytes(bits // 8, "little")
    if kind == "string":
        return 8, _string(draw(st.binary(max_size=24)))
    etype = draw(st.sampled_from([0, 4, 5, 6, 7, 10, 8, 9]))
    n = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 8, 600]))
    rng = draw(st.randoms(use_true_random=False))  # element values in bulk (one draw each would be slow)
    pool = [0, 1, 2, 4, 8, *INTERESTING]
    items = []
    for _ in range(n if etype != 9 else min(n, 3)):
        if etype == 8:
            items.append(_string(rng.randbytes(rng.randrange(7))))
        elif etype == 9:  # an array of arrays of u32
            k = rng.randrange(4)
            items.append(struct.pack("<I", 4) + _u64(k) + b"".join(struct.pack("<I", i) for i in range(k)))
        else:
            width = struct.calcsize(_SCALAR_FMT[etype])
            items.append((rng.choice(pool) % 2 ** (8 * width)).to_bytes(width, "little"))
    return 9, struct.pack("<I", etype) + _u64(len(items)) + b"".join(items)


_GGML = {"F32": (0, 1, 4), "F16": (1, 1, 2), "Q8_0": (8, 32, 34), "I32": (26, 1, 4), "BF16": (30, 1, 2)}


@st.composite
def honest_gguf(draw: Any) -> bytes:
    """A GGUF that reads cleanly (true counts, lengths and offsets) holding hostile metadata values and shapes:
    for the code past the reader (inspect, pairing, the planner)."""
    arch = draw(st.sampled_from(_ARCHS[:3]))
    kvs = [_string(b"general.architecture") + struct.pack("<I", 8) + _string(arch.encode())]
    if draw(st.booleans()):
        n_layer = draw(st.sampled_from([0, 1, 2, 4, 6, 600, 2**32 - 1]))
        kvs.append(_string(f"{arch}.block_count".encode()) + struct.pack("<I", 4) + struct.pack("<I", n_layer))
    for key in draw(st.lists(st.sampled_from(_KEYS[2:]), max_size=10, unique=True)):
        code, enc = draw(_honest_value())
        kvs.append(_string(key.format(a=arch).encode()) + struct.pack("<I", code) + enc)
    infos, data = [], b""
    for name in draw(st.lists(st.sampled_from(_TENSOR_NAMES), max_size=4, unique=True)):
        tname = draw(st.sampled_from(sorted(_GGML)))
        code, block, size = _GGML[tname]
        dims = [block * draw(st.integers(0, 3))] + [draw(st.integers(0, 5)) for _ in range(draw(st.integers(0, 3)))]
        n_bytes = math.prod(dims) // block * size
        infos.append(_string(name.encode()) + struct.pack("<I", len(dims)) + b"".join(_u64(d) for d in dims)
                     + struct.pack("<I", code) + _u64(len(data)))
        data += b"\x01" * n_bytes + b"\0" * (-n_bytes % 32)
    head = b"GGUF" + struct.pack("<I", 3) + _u64(len(infos)) + _u64(len(kvs)) + b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % 32) + data


def run_gguf(data: bytes, workdir: Path) -> None:
    """What inspect, check and plan do with a file: header, inspection, pairing facts, the planner's model."""
    from gguf_mtp import pairing
    from gguf_mtp.planning import placement, search
    from gguf_mtp.gguffile import read_gguf
    from gguf_mtp.inspect import inspect_gguf

    p = workdir / "fuzz.gguf"
    p.write_bytes(data)

    def chain() -> None:
        info = read_gguf(p)
        assert all(0 <= t.offset and t.offset + t.n_bytes <= len(data) for t in info.tensors)
        inspect_gguf(p, tensors=True).to_dict()
        facts = pairing.facts_from_gguf(p)
        pairing.check_set(facts, facts, facts)
        files = placement.files_from_paths(p)
        files.target.graph()
        search.plan(search.Request(files, n_ctx=None))

    judge("gguf", data, len(data), chain)


# --- safetensors ---------------------------------------------------------------------------------------------
def safetensors_bytes(header: dict[str, Any] | bytes, data: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", (len(raw) if length is None else length) % 2**64) + raw + data


def safetensors_seeds() -> list[bytes]:
    tensors = {"a": ("F32", [2, 3]), "b": ("BF16", [4]), "c": ("I64", [3]), "d": ("F16", []), "e": ("U8", [0, 5]),
               "f": ("BOOL", [2])}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, (dtype, shape) in tensors.items():
        n = math.prod(shape) * {"F32": 4, "BF16": 2, "I64": 8, "F16": 2, "U8": 1, "BOOL": 1}[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    data = bytes(range(256)) * (off // 256 + 1)
    return [safetensors_bytes(header, data[:off]), safetensors_bytes({"x": {"dtype": "F32", "shape": [1],
                                                                             "data_offsets": [0, 4]}}, b"\0" * 4)]


# drawn integers favour small values; absurd sizes are what break readers, so they get a strategy of their own
_JSON_INTS = st.one_of(st.integers(-3, 70), st.sampled_from(INTERESTING), st.sampled_from(INTERESTING),
                       st.integers(-(2**70), 2**70), st.sampled_from([-1, -(2**31), 10**30, 2**70]))


@st.composite
def structured_safetensors(draw: Any) -> bytes:
    """Headers with drawn dtypes, shapes and offsets (JSON of any type where a list of ints belongs)."""
    junk = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=4), _JSON_INTS,
                     st.lists(_JSON_INTS, max_size=3), st.dictionaries(st.text(max_size=3), _JSON_INTS, max_size=2))
    header: dict[str, Any] = {}
    for i in range(draw(st.integers(0, 5))):
        entry: dict[str, Any] = {
            "dtype": draw(st.one_of(st.sampled_from(["F32", "BF16", "F16", "I8", "U8", "I64", "F64", "BOOL"]), junk)),
            "shape": draw(st.one_of(st.lists(st.one_of(st.integers(0, 9), _JSON_INTS), max_size=6), junk)),
            "data_offsets": draw(st.one_of(st.lists(st.one_of(st.integers(0, 300), _JSON_INTS), min_size=2,
                                                    max_size=2), junk)),
        }
        for key in draw(st.lists(st.sampled_from(list(entry)), max_size=1)):
            del entry[key]
        name = draw(st.sampled_from(["w", "__metadata__", "model.embed_tokens.weight"])) + ("" if i == 0 else str(i))
        header[name] = entry if draw(st.integers(0, 9)) else draw(junk)
    raw = json.dumps(header).encode()
    if draw(st.integers(0, 7)) == 0:
        raw = draw(st.sampled_from([b"[]", b"1", b"{", b"\xff\xfe", b'{"a": 1e999}', b"[" * 5000, b"9" * 5000]))
    length = None if draw(st.integers(0, 5)) else draw(st.sampled_from(INTERESTING))
    return safetensors_bytes(raw, draw(st.binary(max_size=512)), length)


_ST_WIDTH = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@st.composite
def honest_safetensors(draw: Any) -> bytes:
    """Headers that pass every check (true offsets, sizes that match), with odd shapes: empty, scalar, a zero
    beside a huge dimension, long rows; for the reading code past the header."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}} if draw(st.booleans()) else {}
    off = 0
    for i in range(draw(st.integers(1, 5))):
        dtype = draw(st.sampled_from(sorted(_ST_WIDTH)))
        shape = draw(st.one_of(st.lists(st.integers(0, 9), max_size=4), st.just([]),
                               st.tuples(st.just(0), st.sampled_from(INTERESTING[:-4])).map(list),
                               st.tuples(st.integers(1, 3), st.integers(1, 700)).map(list)))
        n = math.prod(shape) * _ST_WIDTH[dtype]
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    return safetensors_bytes(header, draw(st.randoms(use_true_random=False)).randbytes(off))


def run_safetensors(data: bytes, workdir: Path) -> None:
    """What the exporter does with a weights file: headers, then every tensor read (raw and as f32)."""
    from gguf_mtp.export.safetensors import FLOAT_DTYPES, SafetensorsReader

    p = workdir / "model.safetensors"
    p.write_bytes(data)

    @np.errstate(over="ignore", invalid="ignore")  # random f64 bits cast to f32 overflow: values, not errors
    def chain() -> None:
        reader = SafetensorsReader.from_directory(workdir)
        try:
            for name in reader.names():
                e = reader.entry(name)
                assert e.offset + e.nbytes <= len(data)
                for _ in reader.raw_rows(name):
                    pass
                if e.dtype in FLOAT_DTYPES:
                    for _ in reader.rows(name):
                        pass
                reader.raw(name)
        finally:
            reader.close()

    judge("safetensors", data, len(data), chain)


# --- config.json / tokenizer files -------------------------------------------------------------------------
CONFIG_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja")


def config_seeds(tiny_root: Path) -> list[dict[str, bytes]]:
    """The tiny families' config and tokenizer files (no weights: ``describe`` reads none)."""
    seeds = []
    for family in sorted(p for p in tiny_root.iterdir() if p.is_dir()):
        for role in ("target", "drafter"):
            d = family / role
            seeds.append({f: (d / f).read_bytes() for f in CONFIG_FILES if (d / f).is_file()})
    return seeds


_JSON_LEAF = st.one_of(st.none(), st.booleans(), _JSON_INTS, st.floats(), st.text(max_size=8),
                       st.sampled_from(["sliding_attention", "full_attention", "BPE", "gelu_pytorch_tanh", "default",
                                        "proportional", "<bos>", "<eos>", "Gemma4ForCausalLM", "gemma4_assistant"]))
# values a config or tokenizer field meets in the wild or from an attacker, picked uniformly (hypothesis' own
# draws favour the first and the smallest choices)
JSON_VALUES = [None, True, False, 0, 1, -1, 7, 2**31, 2**32, 10**9, 10**12, 2**63, 10**30, -(2**31), 0.5, -0.0,
               float("nan"), float("inf"), 1e300, 1e-300, "", "x", "sliding_attention", "full_attention", "BPE", [],
               [1], [0, 1], ["a", "b"], [[1]], {}, {"a": 1}, {"content": "x", "id": 10**12}, "9" * 50]
def _json_containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3))


_JSON_ANY = st.recursive(_JSON_LEAF, _json_containers, max_leaves=6)


def _paths(obj: Any, prefix: tuple = (), out: list | None = None, limit: int = 4000) -> list[tuple]:
    """Every container path in a JSON document (breadth-limited)."""
    out = [] if out is None else out
    if len(out) >= limit:
        return out
    out.append(prefix)
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        if isinstance(v, dict | list):
            _paths(v, (*prefix, k), out, limit)
        elif len(out) < limit:
            out.append((*prefix, k))
    return out


@st.composite
def mutated_json(draw: Any, raw: bytes) -> bytes:
    """A JSON document with a few values replaced, keys deleted, or containers swapped for other types."""
    doc = json.loads(raw)
    paths = _paths(doc)
    rng = draw(st.randoms(use_true_random=False))  # a path anywhere in the document (sampled_from favours the first)
    for _ in range(draw(st.integers(1, 4))):
        path = paths[rng.randrange(len(paths))]
        if not path:
            if draw(st.integers(0, 9)) == 0:
                doc = draw(_JSON_ANY)
            continue
        parent = doc
        try:
            for k in path[:-1]:
                parent = parent[k]
            if rng.random() < 0.2 and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = rng.choice(JSON_VALUES) if rng.random() < 0.7 else draw(_JSON_ANY)
        except (KeyError, IndexError, TypeError):
            pass
    return json.dumps(doc).encode()


@st.composite
def config_input(draw: Any, seeds: list[dict[str, bytes]]) -> dict[str, bytes]:
    files = dict(draw(st.sampled_from(seeds)))
    rng = draw(st.randoms(use_true_random=False))
    if rng.random() < 0.4:  # hyper-parameters: one to three fields of config.json (text_config) set to odd values
        cfg = json.loads(files["config.json"])
        fields = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg
        keys = sorted(fields) + ["rope_parameters.sliding_attention", "rope_parameters.full_attention"]
        for key in rng.sample(keys, rng.randint(1, 3)):
            if "." in key:
                outer, inner = key.split(".")
                rope = fields.get(outer)
                if isinstance(rope, dict) and isinstance(rope.get(inner), dict):  # not already replaced
                    rope[inner]["rope_theta" if rng.random() < 0.5 else "partial_rotary_factor"] = \
                        rng.choice(JSON_VALUES)
            else:
                fields[key] = rng.choice(JSON_VALUES)
        files["config.json"] = json.dumps(cfg).encode()
        return files
    for _ in range(draw(st.integers(1, 3))):
        name = rng.choice(sorted(files))
        how = rng.choice(["json", "json", "json", "bytes", "drop"] if name.endswith(".json") else ["bytes", "drop"])
        if how == "json":
            try:
                files[name] = draw(mutated_json(files[name]))
            except ValueError:
                pass
        elif how == "bytes":
            files[name] = draw(mutated([files[name]], max_mutations=3))
        elif name != "config.json":
            del files[name]
    return files


def run_config(files: dict[str, bytes], workdir: Path) -> None:
    """What ``convert`` does before any weights: locate (config.json), hyper-parameters, vocabulary, metadata,
    the pair facts, and writing that metadata (a GGUF with no tensors)."""
    from gguf_mtp.export import describe
    from gguf_mtp.export.writer import write_gguf

    for name in CONFIG_FILES:
        (workdir / name).unlink(missing_ok=True)
    for name, data in files.items():
        (workdir / name).write_bytes(data)
    out = workdir / "out" / "metadata.gguf"
    out.parent.mkdir(exist_ok=True)

    def chain() -> None:
        d = describe(workdir)
        d.facts()
        write_gguf(out, d.metadata, [], force=True)

    judge("config", files, sum(len(d) for d in files.values()), chain)
