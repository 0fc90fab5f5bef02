"""Reading GGUF files: metadata as plain Python values and tensor descriptions, memory-mapped.

Everything that looks into a GGUF (pairing, check, inspect, plan, quantize) goes through ``read_gguf`` so that
hardening the reader hardens them all.

The header is parsed here by a bounded scanner rather than gguf-py's ``GGUFReader``: that reader trusts every
count and length it meets (a corrupt file can make it allocate or loop without limit) and it builds numpy views
per string, which takes ~10 s for Gemma 4's 262144-token vocabulary. The scanner checks each count, length and
offset against what the file size allows *before* acting on it, so a bad file costs bounded time and memory
and ends in one ``GgufMtpError`` naming the offset. Tensor data is never read.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GgufMtpError
from .keys import Keys

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts and is long gone
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_STRING = 64 << 20  # one metadata string; chat templates are ~10-100 KB
MAX_ARRAY = 1 << 24  # elements of one metadata array; Gemma 4's vocabulary has 262144
MAX_NESTING = 4  # arrays of arrays

# GGUF value types: code -> (struct format, size); 8 = string, 9 = array
_SCALARS = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
          10: "<u8", 11: "<i8", 12: "<f8"}
T_STRING, T_ARRAY, T_BOOL = 8, 9, 7
_MIN_VALUE_SIZE = {**{k: v[1] for k, v in _SCALARS.items()}, T_STRING: 8, T_ARRAY: 12}
MIN_KV_SIZE = 8 + 4 + 1  # empty key, type, one-byte value
MIN_TENSOR_INFO_SIZE = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset

# tensor data types numpy can view directly (others are returned as raw bytes per row)
_TENSOR_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                  "I32": np.int32, "I64": np.int64}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str  # ggml type name, e.g. "F32", "Q4_K"
    shape: tuple[int, ...]  # ggml order {ne0, ne1, ...}
    n_bytes: int
    offset: int  # absolute offset of the data in the file

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GgufInfo:
    path: Path
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    token_bytes: list[bytes] | None  # tokenizer.ggml.tokens as raw bytes (for the vocab hash)
    version: int = 3
    alignment: int = DEFAULT_ALIGNMENT
    data_offset: int = 0  # where the tensor data section starts
    file_size: int = 0

    @property
    def arch(self) -> str:
        return str(self.metadata.get(Keys.General.ARCHITECTURE, ""))

    def key(self, name: str, default: Any = None) -> Any:
        """An ``{arch}.name`` key of this file's architecture."""
        return self.metadata.get(f"{self.arch}.{name}", default)

    def tensor_names(self) -> set[str]:
        return {t.name for t in self.tensors}


def ggml_type_sizes() -> dict[str, tuple[int, int]]:
    """ggml type name -> (elements per block, bytes per block), from gguf-py's table."""
    from gguf import GGML_QUANT_SIZES

    return {t.name: v for t, v in GGML_QUANT_SIZES.items()}


def _ggml_type_names() -> dict[int, str]:
    from gguf import GGMLQuantizationType

    return {int(t): t.name for t in GGMLQuantizationType}


class _Scanner:
    """A cursor over the mapped header that refuses to read or allocate past the end of the file."""

    def __init__(self, buf: Any, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, what: str, at: int | None = None) -> GgufMtpError:
        return GgufMtpError(f"{self.path}: corrupt GGUF header: {what} (offset {self.pos if at is None else at})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.size - self.pos:
            raise self.fail(f"{what} needs {n} bytes, only {self.size - self.pos} left in the file")

    def scalar(self, code: int) -> Any:
        fmt, n = _SCALARS[code]
        self.need(n, "a value")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self) -> int:
        return self.scalar(4)

    def u64(self) -> int:
        return self.scalar(10)

    def raw_string(self, what: str = "string") -> bytes:
        at = self.pos
        n = self.u64()
        if n > MAX_STRING:
            raise self.fail(f"{what} length {n} exceeds the {MAX_STRING}-byte limit", at)
        self.need(n, f"{what} of length {n}")
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s

    def count(self, n: int, min_size: int, what: str, limit: int | None = None) -> int:
        """Refuse a count whose smallest possible encoding would not fit in the rest of the file."""
        if limit is not None and n > limit:
            raise self.fail(f"{what} {n} exceeds the limit of {limit}")
        if n * min_size > self.size - self.pos:
            raise self.fail(f"{what} {n} cannot fit in the {self.size - self.pos} bytes left in the file")
        return n

    def value(self, vtype: int, depth: int = 0, raw_strings: bool = False) -> Any:
        if vtype in _SCALARS:
            return self.scalar(vtype)
        if vtype == T_STRING:
            s = self.raw_string()
            return s if raw_strings else s.decode("utf-8", errors="replace")
        if vtype != T_ARRAY:
            raise self.fail(f"unknown value type {vtype}", self.pos - 4)
        if depth >= MAX_NESTING:
            raise self.fail(f"arrays nested deeper than {MAX_NESTING}")
        etype = self.u32()
        if etype not in _MIN_VALUE_SIZE:
            raise self.fail(f"unknown array element type {etype}", self.pos - 4)
        n = self.count(self.u64(), _MIN_VALUE_SIZE[etype], "array length", MAX_ARRAY)
        if etype in _NUMPY:
            size = n * _SCALARS[etype][1]
            data = bytes(self.buf[self.pos:self.pos + size])
            self.pos += size
            values = np.frombuffer(data, dtype=_NUMPY[etype]).tolist()
            return [bool(v) for v in values] if etype == T_BOOL else values
        return [self.value(etype, depth + 1, raw_strings) for _ in range(n)]


def _scan(buf: Any, size: int, path: Path, decode_tokens: bool) -> GgufInfo:
    sc = _Scanner(buf, size, path)
    sc.need(24, "the fixed header (magic, version, counts)")
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise GgufMtpError(f"{path}: not a GGUF file (bad magic)")
    sc.pos = 4
    version = sc.u32()
    if version not in SUPPORTED_VERSIONS:
        hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise GgufMtpError(f"{path}: unsupported GGUF version {version}{hint}; expected 2 or 3")
    n_tensors = sc.u64()
    n_kv = sc.u64()
    sc.count(n_kv, MIN_KV_SIZE, "metadata count")
    sc.count(n_tensors, MIN_TENSOR_INFO_SIZE, "tensor count")

    meta: dict[str, Any] = {}
    token_bytes = None
    for _ in range(n_kv):
        key_at = sc.pos
        key = sc.raw_string("key").decode("utf-8", errors="replace")
        if key in meta or (key == Keys.Tokenizer.LIST and token_bytes is not None):
            raise sc.fail(f"duplicate key {key!r}", key_at)
        vtype = sc.u32()
        if key == Keys.Tokenizer.LIST:
            value = sc.value(vtype, raw_strings=True)
            if not isinstance(value, list) or not all(isinstance(t, bytes) for t in value):
                raise sc.fail("tokenizer.ggml.tokens is not an array of strings", key_at)
            token_bytes = value
            if decode_tokens:
                meta[key] = [t.decode("utf-8", errors="replace") for t in value]
            continue
        meta[key] = sc.value(vtype)

    alignment = meta.get(Keys.General.ALIGNMENT, DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise GgufMtpError(f"{path}: corrupt GGUF header: general.alignment must be a power of two, got {alignment!r}")

    type_names, type_sizes = _ggml_type_names(), ggml_type_sizes()
    raw = []
    names: set[str] = set()
    for _ in range(n_tensors):
        at = sc.pos
        name = sc.raw_string("tensor name").decode("utf-8", errors="replace")
        if name in names:
            raise sc.fail(f"duplicate tensor {name!r}", at)
        names.add(name)
        n_dims = sc.u32()
        if not 1 <= n_dims <= MAX_DIMS:
            raise sc.fail(f"tensor {name!r} has {n_dims} dimensions; expected 1 to {MAX_DIMS}", at)
        shape = tuple(sc.u64() for _ in range(n_dims))
        code = sc.u32()
        tname = type_names.get(code)
        if tname is None or tname not in type_sizes:
            raise sc.fail(f"tensor {name!r} has unknown ggml type {code}", at)
        offset = sc.u64()
        raw.append((name, tname, shape, offset, at))

    data_offset = -(-sc.pos // alignment) * alignment
    tensors = []
    for name, tname, shape, offset, at in raw:
        block, block_bytes = type_sizes[tname]
        n = 1
        for d in shape:
            n *= d
        if shape[0] % block:
            raise sc.fail(f"tensor {name!r}: first dimension {shape[0]} is not a multiple of {tname}'s block size "
                          f"{block}", at)
        n_bytes = n // block * block_bytes
        if offset % alignment:
            raise sc.fail(f"tensor {name!r}: data offset {offset} is not a multiple of the alignment {alignment}", at)
        if data_offset + offset + n_bytes > size:
            raise sc.fail(f"tensor {name!r}: data ({n_bytes} bytes at {data_offset + offset}) runs past the end of "
                          f"the file ({size} bytes); truncated?", at)
        tensors.append(TensorInfo(name, tname, shape, n_bytes, data_offset + offset))
    _check_overlaps(tensors, path)
    return GgufInfo(path, meta, tensors, token_bytes, version, alignment, data_offset, size)


def _check_overlaps(tensors: list[TensorInfo], path: Path) -> None:
    end, prev = 0, None
    for t in sorted(tensors, key=lambda t: t.offset):
        if t.offset < end:
            raise GgufMtpError(f"{path}: corrupt GGUF header: tensors {prev!r} and {t.name!r} overlap")
        end, prev = t.offset + t.n_bytes, t.name


def read_gguf(path: str | Path, tokens: bool = True) -> GgufInfo:
    """Parse a GGUF's header (memory-mapped; tensor data is never read).

    ``tokens=False`` skips decoding the token list into ``metadata`` (``token_bytes`` is always filled).
    """
    p = Path(path)
    if not p.is_file():
        raise GgufMtpError(f"{p}: no such file")
    with p.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 4:
            raise GgufMtpError(f"{p}: not a GGUF file ({size} bytes)")
        if f.read(4) != GGUF_MAGIC:
            raise GgufMtpError(f"{p}: not a GGUF file (bad magic)")
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError) as e:  # emptied since the size was read
            raise GgufMtpError(f"{p}: cannot map the file ({e})") from None
        with mm:
            return _scan(mm, len(mm), p, tokens)  # the mapping's size: bounds checks never pass its end


def tensor_array(info: GgufInfo, name: str) -> np.ndarray:
    """One tensor's data as a read-only memory-mapped array (numpy order, i.e. reversed ggml shape).

    Types numpy knows come typed; block-quantized types come as raw bytes, one row per ggml row.
    """
    t = next((t for t in info.tensors if t.name == name), None)
    if t is None:
        raise GgufMtpError(f"{info.path}: no tensor {name}")
    dtype = _TENSOR_DTYPES.get(t.type)
    if dtype is not None:
        shape = tuple(reversed(t.shape))
    else:
        dtype = np.uint8
        rows = tuple(reversed(t.shape[1:]))
        shape = (*rows, t.n_bytes // max(1, int(np.prod(rows, dtype=np.int64))))
    if t.n_bytes == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(info.path, dtype=dtype, mode="r", offset=t.offset, shape=shape)
