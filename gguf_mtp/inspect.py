"""What is in a GGUF file: role, key metadata, parameters, bytes by quant type and per layer, our provenance.

Header only (``read_gguf``: bounded, memory-mapped), so a 20 GB file takes as long as a 2 MB one with the same
vocabulary. Returns plain data; the CLI renders it as tables or JSON.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import keys, quanttypes
from .gguffile import TensorInfo, read_gguf
from .keys import Keys

ROLE_BY_ARCH = {keys.ARCH_TARGET: "target", keys.ARCH_DRAFTER: "drafter", keys.ARCH_PROJECTOR: "projector"}

# keys worth showing, in this order; "{arch}" expands to the file's architecture. Absent keys are skipped.
KEY_METADATA = (
    Keys.General.NAME, Keys.General.FILE_TYPE, Keys.General.QUANTIZATION_VERSION,
    Keys.LLM.CONTEXT_LENGTH, Keys.LLM.EMBEDDING_LENGTH, Keys.LLM.EMBEDDING_LENGTH_OUT, Keys.LLM.BLOCK_COUNT,
    Keys.LLM.FEED_FORWARD_LENGTH, Keys.Attention.HEAD_COUNT, Keys.Attention.HEAD_COUNT_KV,
    Keys.Attention.KEY_LENGTH, Keys.Attention.KEY_LENGTH_SWA, Keys.Attention.SLIDING_WINDOW,
    Keys.Attention.SHARED_KV_LAYERS, Keys.LLM.EMBD_LENGTH_PER_LAYER_INP, Keys.LLM.EXPERT_COUNT,
    Keys.LLM.EXPERT_USED_COUNT, Keys.LLM.NEXTN_PREDICT_LAYERS, keys.CENTROID_COUNT, keys.CENTROID_TOP_K,
    Keys.LLM.FINAL_LOGIT_SOFTCAPPING,
    Keys.ClipVision.PROJECTOR_TYPE, Keys.ClipVision.PROJECTION_DIM, Keys.ClipVision.IMAGE_SIZE,
    Keys.ClipVision.BLOCK_COUNT, Keys.Clip.HAS_AUDIO_ENCODER, Keys.ClipAudio.PROJECTOR_TYPE, Keys.ClipAudio.BLOCK_COUNT,
    Keys.ClipAudio.NUM_MEL_BINS,
    keys.IMATRIX_KEYS["file"], keys.IMATRIX_KEYS["dataset"], keys.IMATRIX_KEYS["entries"],
)
_LAYER = re.compile(r"^((?:[a-z]+\.)?blk)\.(\d+)\.")


@dataclass
class TypeStats:
    type: str
    tensors: int = 0
    params: int = 0
    bytes: int = 0


@dataclass
class LayerStats:
    layer: str  # "blk.3", "v.blk.0", or "other" for tensors outside any block
    tensors: int = 0
    params: int = 0
    bytes: int = 0


@dataclass
class Inspection:
    path: str
    file_bytes: int
    gguf_version: int
    arch: str
    role: str  # target / drafter / projector / unknown
    file_type: str | None
    n_vocab: int | None
    n_tensors: int
    n_params: int
    tensor_bytes: int
    metadata: dict[str, Any]  # the KEY_METADATA subset
    provenance: dict[str, Any]  # every gguf_mtp.* key
    by_type: list[TypeStats]
    layers: list[LayerStats]
    n_kv: int = 0
    tensors: list[dict[str, Any]] | None = field(default=None)  # only with tensors=True

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.tensor_bytes / max(1, self.n_params)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bits_per_weight"] = round(self.bits_per_weight, 4)
        if self.tensors is None:
            del d["tensors"]
        return d


def role_of(metadata: dict[str, Any]) -> str:
    """Our ``gguf_mtp.role`` key when present, else what the architecture implies."""
    role = metadata.get(keys.ROLE)
    if role in keys.ROLES:
        return str(role)
    return ROLE_BY_ARCH.get(str(metadata.get(Keys.General.ARCHITECTURE, "")), "unknown")


def _layer_of(name: str) -> tuple[str, int]:
    m = _LAYER.match(name)
    return (f"{m[1]}.{m[2]}", int(m[2])) if m else ("other", -1)


def _group(tensors: list[TensorInfo]) -> tuple[list[TypeStats], list[LayerStats]]:
    types: dict[str, TypeStats] = {}
    layers: dict[str, LayerStats] = {}
    order: dict[str, tuple] = {}
    for t in tensors:
        ts = types.setdefault(t.type, TypeStats(t.type))
        name, idx = _layer_of(t.name)
        ls = layers.setdefault(name, LayerStats(name))
        order[name] = (name == "other", name.rsplit(".", 1)[0] if idx >= 0 else "", idx)
        for s in (ts, ls):
            s.tensors += 1
            s.params += t.n_elements
            s.bytes += t.n_bytes
    by_type = sorted(types.values(), key=lambda s: -s.bytes)
    by_layer = sorted(layers.values(), key=lambda s: order[s.layer])
    return by_type, by_layer


def inspect_gguf(path: str | Path, tensors: bool = False) -> Inspection:
    """Inspect one file; ``tensors=True`` also lists every tensor (name, type, shape, bytes, offset)."""
    info = read_gguf(path, tokens=False)
    meta = info.metadata
    arch = info.arch
    shown = {}
    for template in KEY_METADATA:
        k = keys.arch_key(template, arch)
        if k in meta:
            shown[k] = meta[k]
    by_type, layers = _group(info.tensors)
    return Inspection(
        path=str(info.path),
        file_bytes=info.file_size,
        gguf_version=info.version,
        arch=arch,
        role=role_of(meta),
        file_type=quanttypes.ftype_name(meta.get(Keys.General.FILE_TYPE)),
        n_vocab=len(info.token_bytes) if info.token_bytes is not None else None,
        n_tensors=len(info.tensors),
        n_params=sum(t.n_elements for t in info.tensors),
        tensor_bytes=sum(t.n_bytes for t in info.tensors),
        metadata=shown,
        provenance={k: v for k, v in meta.items() if k.startswith("gguf_mtp.")},
        by_type=by_type,
        layers=layers,
        n_kv=len(meta) + (1 if info.token_bytes is not None and Keys.Tokenizer.LIST not in meta else 0),
        tensors=[{"name": t.name, "type": t.type, "shape": list(t.shape), "bytes": t.n_bytes, "offset": t.offset}
                 for t in info.tensors] if tensors else None,
    )
