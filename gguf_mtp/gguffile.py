"""Reading GGUF files: metadata as plain Python values and tensor descriptions, memory-mapped.

Everything that looks into a GGUF (pairing, check, inspect, plan) goes through ``read_gguf`` so that
hardening the reader hardens them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GgufMtpError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str  # ggml type name, e.g. "F32", "Q4_K"
    shape: tuple[int, ...]  # ggml order {ne0, ne1, ...}
    n_bytes: int
    offset: int  # absolute offset of the data in the file


@dataclass
class GgufInfo:
    path: Path
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    token_bytes: list[bytes] | None  # tokenizer.ggml.tokens as raw bytes (for the vocab hash)

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def key(self, name: str, default: Any = None) -> Any:
        """An ``{arch}.name`` key of this file's architecture."""
        return self.metadata.get(f"{self.arch}.{name}", default)

    def tensor_names(self) -> set[str]:
        return {t.name for t in self.tensors}


def _field_value(field: Any) -> Any:
    from gguf import GGUFValueType

    if not field.types:
        return None
    if field.types[0] == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8", errors="replace")
    v = field.parts[-1].tolist()[0]
    return bool(v) if field.types[0] == GGUFValueType.BOOL else v


def read_gguf(path: str | Path, tokens: bool = True) -> GgufInfo:
    """Parse a GGUF's header (memory-mapped; tensor data is never read).

    ``tokens=False`` skips decoding the token list (262144 strings on real Gemma 4 files).
    """
    from gguf import GGUFReader

    p = Path(path)
    if not p.is_file():
        raise GgufMtpError(f"{p}: no such file")
    with p.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise GgufMtpError(f"{p}: not a GGUF file (bad magic)")
    try:
        reader = GGUFReader(p, "r")
    except (ValueError, IndexError, OverflowError, MemoryError, TypeError) as e:
        raise GgufMtpError(f"{p}: corrupt GGUF header ({e})") from None
    meta: dict[str, Any] = {}
    token_bytes = None
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        if name == "tokenizer.ggml.tokens":
            token_bytes = [bytes(field.parts[i]) for i in field.data]
            if tokens:
                meta[name] = [b.decode("utf-8", errors="replace") for b in token_bytes]
            continue
        meta[name] = _field_value(field)
    tensors = [
        TensorInfo(t.name, t.tensor_type.name, tuple(int(x) for x in t.shape), int(t.n_bytes), int(t.data_offset))
        for t in reader.tensors
    ]
    return GgufInfo(p, meta, tensors, token_bytes)


def tensor_array(info: GgufInfo, name: str) -> np.ndarray:
    """One tensor's data (memory-mapped view; numpy order, i.e. reversed ggml shape)."""
    from gguf import GGUFReader

    reader = GGUFReader(info.path, "r")
    for t in reader.tensors:
        if t.name == name:
            return t.data
    raise GgufMtpError(f"{info.path}: no tensor {name}")
