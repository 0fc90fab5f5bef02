"""The one GGUF write loop: metadata and tensor infos first, then tensor data streamed block by block.

Any exporter (text model, drafter, projector) hands ``write_gguf`` a Metadata and a list of TensorPlan whose
``blocks()`` yield the tensor's encoded bytes in order, a few MB at a time. GGUFWriter (gguf-py) writes the
header, key/values and tensor infos; we write the data ourselves so that no tensor is ever held whole.
The output appears atomically (fsutil.atomic_output): an error or Ctrl-C leaves nothing at the path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFWriter, quants, size_label as _size_label

from ..errors import GgufMtpError
from ..fsutil import atomic_output, check_free_space, check_output_path
from ..keys import Keys
from .metadata import Metadata
from .safetensors import SafetensorsReader, to_f32


@dataclass
class TensorPlan:
    """One output tensor: name, numpy-order shape (GGUF stores it reversed), type, and its data blocks."""

    name: str
    shape: tuple[int, ...]
    type: Q
    blocks: Callable[[], Iterable[np.ndarray]]
    source: str | None = None  # the checkpoint tensor it comes from (None: generated)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.type]
        return self.n_elements // block * size


@dataclass(frozen=True)
class Progress:
    """Reported after every block written; ``done`` counts finished tensors."""

    tensor: str
    done: int
    total: int
    bytes_done: int
    bytes_total: int


ProgressFn = Callable[[Progress], None]


def encode(block: np.ndarray, qtype: Q) -> np.ndarray:
    """float32 rows (or BF16 bits as uint16, or integers) -> the bytes of ``qtype``."""
    if qtype == Q.BF16 and block.dtype == np.uint16:
        return block  # bf16 source, bf16 out: the bits as they are
    if qtype == Q.I32:
        return block.astype("<i4")
    if block.dtype == np.uint16:
        block = to_f32(block, "BF16")
    if qtype == Q.F32:
        return block.astype("<f4", copy=False)
    if qtype == Q.F16:
        return block.astype("<f2")
    return quants.quantize(np.ascontiguousarray(block, dtype=np.float32), qtype)


def from_checkpoint(reader: SafetensorsReader, name: str, qtype: Q, n_rows: int | None = None,
                    transform: Callable[[np.ndarray], np.ndarray] | None = None) -> Callable[[], Iterator[np.ndarray]]:
    """Blocks of a checkpoint tensor, encoded as ``qtype`` (BF16 -> BF16 copies the bits)."""

    def blocks() -> Iterator[np.ndarray]:
        if reader.entry(name).dtype == "BF16" and qtype == Q.BF16 and transform is None:
            for bits in reader.raw_rows(name, n_rows, row_bytes=2):
                yield np.ascontiguousarray(bits)
            return
        for rows in reader.rows(name, n_rows):
            yield encode(transform(rows) if transform else rows, qtype)

    return blocks


def constant(values: np.ndarray, qtype: Q) -> Callable[[], Iterator[np.ndarray]]:
    """Blocks of a generated tensor."""
    return lambda: iter([encode(values, qtype)])


def size_label(tensors: list[TensorPlan]) -> str:
    """general.size_label ("372K", "8x3.2M") counted the way gguf-py counts: experts once per expert."""
    total = shared = expert = expert_sum = n_expert_tensors = 0
    for t in tensors:
        n = t.n_elements
        total += n
        if "_exps." in t.name and len(t.shape) >= 3:
            count = t.shape[-3]
            expert += n // count
            expert_sum += count
            n_expert_tensors += 1
        else:
            shared += n
    return _size_label(total, shared, expert, expert_sum // n_expert_tensors if n_expert_tensors else 0)


def _pad(f, align: int) -> None:
    n = (-f.tell()) % align
    if n:
        f.write(b"\0" * n)


def write_gguf(path: str | Path, metadata: Metadata, tensors: list[TensorPlan], *, force: bool = False,
               progress: ProgressFn | None = None) -> int:
    """Write a GGUF atomically; returns its size in bytes. ``metadata`` must start with general.architecture."""
    arch = metadata[Keys.General.ARCHITECTURE].value
    bytes_total = sum(t.nbytes for t in tensors)
    check_free_space(check_output_path(path, force), bytes_total)  # a full disk is found now, not after an hour
    with atomic_output(path, force) as tmp:
        w = GGUFWriter(None, arch)  # adds general.architecture itself
        try:
            for key, kv in metadata.items():
                if key != Keys.General.ARCHITECTURE:
                    w.add_key_value(key, kv.value, kv.type, kv.sub_type)
            for t in tensors:
                w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.type)
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            f = w.fout[0]
            done_bytes = 0
            for i, t in enumerate(tensors):
                _pad(f, w.data_alignment)
                written = 0
                for block in t.blocks():
                    data = np.ascontiguousarray(block)
                    f.write(data.data)  # the array's own buffer: no bytes copy of the block
                    written += data.nbytes
                    done_bytes += data.nbytes
                    if progress:
                        progress(Progress(t.name, i, len(tensors), done_bytes, bytes_total))
                if written != t.nbytes:
                    raise GgufMtpError(f"internal error: tensor {t.name} produced {written} bytes, expected {t.nbytes}")
                if progress:
                    progress(Progress(t.name, i + 1, len(tensors), done_bytes, bytes_total))
            _pad(f, w.data_alignment)
            f.flush()
        finally:
            w.close()
        size = tmp.stat().st_size
    return size
