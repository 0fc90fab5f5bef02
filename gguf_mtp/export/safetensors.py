"""Our own memory-mapped safetensors reader: headers checked up front, tensor data read in row chunks.

Why not the ``safetensors`` package: it hands out whole tensors (a 262144 x 5376 embedding is 2.8 GB of bf16,
5.6 GB as f32), needs torch for bf16, and its errors on a truncated download are not ones a user can act on.
Here every header is checked before any work starts (header length, JSON, dtype, shape vs byte size, offsets
inside the file), and data is read with ``pread`` a few rows at a time (never through a memory map, which would
crash the process with SIGBUS if the file were truncated under it). A file that changes while we read it (a
download still running, an edit) is refused: each file's identity, size and mtime are taken when its header is
read and compared again after every tensor.

Format: 8-byte little-endian header length N, N bytes of JSON ``{name: {dtype, shape, data_offsets: [b, e]}}``
(plus an optional ``__metadata__``), then the data; offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import GgufMtpError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit
MAX_DIMS = 8  # real tensors have <= 5; a longer shape is a corrupt header (and its product is costly)
CHUNK_BYTES = 16 << 20  # rows are read and converted this many (f32) bytes at a time: peak memory is a few blocks

# safetensors dtype -> (bytes per element, numpy dtype of the stored bits); BF16 is stored as uint16 bits
DTYPES: dict[str, tuple[int, np.dtype]] = {
    "F64": (8, np.dtype("<f8")),
    "F32": (4, np.dtype("<f4")),
    "F16": (2, np.dtype("<f2")),
    "BF16": (2, np.dtype("<u2")),
    "I64": (8, np.dtype("<i8")),
    "I32": (4, np.dtype("<i4")),
    "I16": (2, np.dtype("<i2")),
    "I8": (1, np.dtype("i1")),
    "U8": (1, np.dtype("u1")),
    "BOOL": (1, np.dtype("?")),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's place on disk (numpy/PyTorch shape order)."""

    name: str
    dtype: str  # safetensors spelling: "BF16", "F32", ...
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute offset of the first byte in ``file``
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and check one safetensors file's header; no tensor data is read."""
    return _read_header(path)[0]


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _read_header(path: Path) -> tuple[dict[str, TensorEntry], tuple[int, int, int, int]]:
    """The header's entries and the file's identity (device, inode, size, mtime) when it was read."""
    try:
        with path.open("rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            head = f.read(8)
            if len(head) < 8:
                raise GgufMtpError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER or 8 + n > size:
                raise GgufMtpError(f"{path}: bad safetensors header length {n} (file is {size} bytes); "
                                   "the file is truncated or not a safetensors file")
            raw = f.read(n)
    except OSError as e:
        raise GgufMtpError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: also ints of > 4300 digits
        raise GgufMtpError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise GgufMtpError(f"{path}: corrupt safetensors header (expected a JSON object)")
    data_start = 8 + n
    data_size = size - data_start
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, info, data_start, data_size)
    return entries, _identity(st)


def _entry(path: Path, name: str, info: object, data_start: int, data_size: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise GgufMtpError(f"{where}: corrupt header entry")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise GgufMtpError(f"{where}: unsupported dtype {str(dtype)[:40]!r} (expected one of {', '.join(DTYPES)})")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in shape)):
        raise GgufMtpError(f"{where}: bad shape {str(shape)[:80]} (at most {MAX_DIMS} dimensions, each 0..2^63-1)")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise GgufMtpError(f"{where}: bad data_offsets {str(offsets)[:80]}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise GgufMtpError(f"{where}: bad data_offsets {str(offsets)[:80]}")
    if end > data_size:
        raise GgufMtpError(f"{where}: data offsets [{begin}, {end}] point past the end of the file "
                           f"({data_size} data bytes); the file is truncated")
    expected = math.prod(shape) * DTYPES[dtype][0]
    if end - begin != expected:
        raise GgufMtpError(f"{where}: {end - begin} bytes on disk, but dtype {dtype} and shape {shape} "
                           f"need {expected}")
    return TensorEntry(name, dtype, tuple(shape), path, data_start + begin, end - begin)


def find_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (index first, then the single file, then any)."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise GgufMtpError(f"{index}: corrupt index (expected JSON with a weight_map)") from None
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise GgufMtpError(f"{index} names {missing[0]}, which is missing from {directory}")
        return [directory / f for f in files]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    found = sorted(directory.glob("*.safetensors"))
    if not found:
        raise GgufMtpError(f"{directory}: no safetensors weights ({SINGLE_FILE} or {INDEX_FILE})")
    return found


class SafetensorsReader:
    """All tensors of a (possibly sharded) checkpoint, by name; data memory-mapped on demand."""

    def __init__(self, files: list[Path]):
        self.entries: dict[str, TensorEntry] = {}
        self._identity: dict[Path, tuple[int, int, int, int]] = {}
        for path in files:
            entries, self._identity[path] = _read_header(path)
            for name, entry in entries.items():
                if name in self.entries:
                    raise GgufMtpError(f"tensor {name!r} appears in both {self.entries[name].file.name} "
                                       f"and {path.name}")
                self.entries[name] = entry
        self._fds: dict[Path, int] = {}

    @classmethod
    def from_directory(cls, directory: str | Path) -> SafetensorsReader:
        return cls(find_files(Path(directory)))

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise GgufMtpError(f"tensor {name!r} is missing from the checkpoint") from None

    def raw(self, name: str) -> np.ndarray:
        """The stored bits, whole, in the tensor's shape (BF16 as uint16); for small tensors (token orderings)."""
        e = self.entry(name)
        data = self._pread(name, e.file, e.offset, e.nbytes)
        self._check_unchanged(e.file)
        return np.frombuffer(data, DTYPES[e.dtype][1]).reshape(e.shape)

    def raw_rows(self, name: str, n_rows: int | None = None, row_bytes: int = 4) -> Iterator[np.ndarray]:
        """The stored bits as 2-D blocks of whole rows (last dim = row), ~CHUNK_BYTES at ``row_bytes`` per value.

        ``n_rows`` keeps only the first rows (embedding rows cut to the tokenizer's size). Blocks are read with
        pread into fresh buffers, not through the memory map: pages of a mapped file stay in the process's
        resident set until unmapped, so a whole checkpoint streamed through one map would count as our memory.
        """
        e = self.entry(name)
        row = e.shape[-1] if len(e.shape) > 1 else max(1, e.n_elements)
        total = e.n_elements // row if row else 0
        if n_rows is not None:
            total = min(total, n_rows)
        width, dtype = DTYPES[e.dtype]
        step = max(1, CHUNK_BYTES // max(1, row * row_bytes))
        for start in range(0, total, step):
            count = min(step, total - start)
            buf = self._pread(name, e.file, e.offset + start * row * width, count * row * width)
            yield np.frombuffer(buf, dtype=dtype).reshape(count, row)
        self._check_unchanged(e.file)

    def _pread(self, name: str, path: Path, offset: int, want: int) -> bytearray:
        fd = self._fd(path)
        buf = bytearray(want)
        view, got = memoryview(buf), 0
        while got < want:
            n = os.preadv(fd, [view[got:]], offset + got)
            if n <= 0:
                raise GgufMtpError(f"{path}: truncated while reading tensor {name!r}")
            got += n
        return buf

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise GgufMtpError(f"{path}: cannot read ({e.strerror})") from None
            self._check_unchanged(path)  # the same file whose header we read (not one swapped in since)
        return fd

    def _check_unchanged(self, path: Path) -> None:
        if _identity(os.fstat(self._fd(path))) != self._identity[path]:
            raise GgufMtpError(f"{path}: the file changed while it was being read (size, mtime or inode differ "
                               "from when its header was read); finish the download or edit, then run again")

    def rows(self, name: str, n_rows: int | None = None) -> Iterator[np.ndarray]:
        """The tensor as float32 2-D blocks of whole rows (see raw_rows)."""
        e = self.entry(name)
        if e.dtype not in FLOAT_DTYPES:
            raise GgufMtpError(f"tensor {name!r} has dtype {e.dtype}; a float tensor was expected")
        for block in self.raw_rows(name, n_rows):
            yield to_f32(block, e.dtype)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def to_f32(block: np.ndarray, dtype: str) -> np.ndarray:
    """Stored bits -> float32 (BF16 is the top half of an f32; no torch needed)."""
    if dtype == "BF16":
        bits = block.astype(np.uint32)
        bits <<= 16  # in place: one f32-sized buffer per block, not two
        return bits.view(np.float32)
    return block.astype(np.float32)
