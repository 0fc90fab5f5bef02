"""The pieces a projector file's parts share: table rows, tensor types, data transforms, and their expansion.

A projector (llama.cpp's ``clip`` GGUF, ``convert --mmproj``) holds up to two parts, each one *tower* in clip.cpp's
terms: a vision part (``v.*``, ``mm.input_projection``) and an audio part (``a.*``, ``mm.a.*``). Gemma 4 has four:
the vision encoder (gemma4v) and the conformer (gemma4a) of E2B/E4B/26B/31B in projector.py and audio.py, and the
12B's transformer-less embedders (gemma4uv, gemma4ua). Each is a :class:`Tower` (rows) plus a hyper-parameter class
(``dims()`` resolving the rows' dimension names, ``conditions()``, ``keys()``); everything below works on any of them.
Types follow convert_hf_to_gguf.py's rules for these projectors (conversion/base.py prepare_tensors,
MmprojModel / Gemma4VisionAudioModel.tensor_force_quant).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
from gguf import GGMLQuantizationType as Q

from ..errors import GgufMtpError
from .safetensors import SafetensorsReader
from .source import Source
from .tensors import Expected, checked_entry
from .writer import TensorPlan, encode, from_checkpoint
from . import metadata as md

CLAMPS = ("input_min", "input_max", "output_min", "output_max")


@dataclass(frozen=True)
class Row:
    hf: str  # under ``model.``; ``{bid}`` = layer
    gguf: str
    shape: tuple[str, ...]  # HF shape as dimension names (``()``: a 0-d scalar, written as {1})
    when: tuple[str, ...] = ()  # conditions of the part's hyper-parameters
    out: tuple[str, ...] | None = None  # the written (numpy-order) shape, where it differs from the HF shape
    transform: str | None = None  # a key of TRANSFORMS: the values change, not only the shape
    force: str | None = None  # a key of FORCED: upstream's type for this tensor, whatever --outtype says
    optional: bool = False  # written when the checkpoint has it (transformers 5.23.0 has no such module)


def clippable(hf: str, gguf: str, shape: tuple[str, ...], cond: str = "clipped") -> tuple[Row, ...]:
    """Gemma4ClippableLinear: the weight, plus four 0-d clamp bounds when use_clipped_linears."""
    return (Row(f"{hf}.linear.weight", f"{gguf}.weight", shape),
            *(Row(f"{hf}.{c}", f"{gguf}.{c}", (), (cond,)) for c in CLAMPS))


@dataclass(frozen=True)
class Tower:
    """One part of a projector file as a table."""

    part: str  # "vision" | "audio": clip.has_{part}_encoder, the result's features
    projector_type: str  # clip.{part}.projector_type (clip.cpp's PROJECTOR_TYPE_*)
    global_rows: tuple[Row, ...]
    layer_rows: tuple[Row, ...]
    prefixes: tuple[str, ...]  # the checkpoint tensors it owns (a tensor there and in no row is an error)


class PartHparams(Protocol):
    """What every part's hyper-parameters offer (VisionHparams, AudioHparams, ...)."""

    TOWER: ClassVar[Tower]
    n_layer: int

    def dims(self) -> dict[str, int]: ...

    def conditions(self) -> set[str]: ...

    def keys(self) -> md.Metadata: ...


def text_hidden(s: Source) -> int:
    """The text model's hidden size: every part projects into it (clip.{vision,audio}.projection_dim)."""
    hidden = s.text_config.get("hidden_size")
    if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden <= 0:
        raise GgufMtpError(f"{s.path / 'config.json'}: text_config.hidden_size: expected a positive integer, "
                           f"got {hidden!r}")
    return hidden


# --- tensor types (upstream's rules for these projectors) ---------------------------------------------------------
FORCED: dict[str, Callable[[Q], Q]] = {
    # Gemma4VisionAudioModel: position tables and the conformer's convolutions (HF names with ".conv" / "_conv")
    "f32": lambda outtype: Q.F32,
    # MmprojModel: the patch embedding is F16 in an f16 file, else F32 (clip.cpp's conv / im2col paths want it)
    "patch": lambda outtype: Q.F16 if outtype == Q.F16 else Q.F32,
}


def tensor_type(row: Row, gguf_name: str, shape: tuple[int, ...], outtype: Q) -> Q:
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return Q.F32
    if row.force:
        return FORCED[row.force](outtype)
    if outtype == Q.Q8_0 and shape[-1] % 32:  # gguf-py cannot quantize the row; upstream falls back to F16
        return Q.F16
    return outtype


# --- data transforms: (function of float32 rows and the part's hyper-parameters, needs the whole tensor) ----------
def _hwc_to_chw(rows: np.ndarray, hp: Any) -> np.ndarray:
    """A patch's pixels come (row, col, channel) in the checkpoint; clip.cpp's conv / im2col reads (channel, row,
    col). Applies to a patch-sized last axis (the patch weight's rows, the 12B's per-pixel norm)."""
    p = hp.pixel_patch
    return rows.reshape(-1, p, p, 3).transpose(0, 3, 1, 2).reshape(rows.shape)


def _softplus(rows: np.ndarray, hp: Any) -> np.ndarray:
    """The conformer's per-dimension query scale is used as softplus(w); llama.cpp stores it applied. Computed in
    float64 and rounded once (upstream's torch float32 softplus can differ by one ulp)."""
    return np.logaddexp(0.0, rows.astype(np.float64)).astype(np.float32)


def _axes_first(rows: np.ndarray, hp: Any) -> np.ndarray:
    """The 12B's position table is (positions, axis, width); clip.cpp views it as one table per axis."""
    width = rows.shape[-1]
    return rows.reshape(-1, 2, width).transpose(1, 0, 2).reshape(-1, width)


TRANSFORMS: dict[str, tuple[Callable[[np.ndarray, Any], np.ndarray], bool]] = {
    "hwc_to_chw": (_hwc_to_chw, False),
    "softplus": (_softplus, False),
    "axes_first": (_axes_first, True),
}


# --- expansion ------------------------------------------------------------------------------------------------------
def expected_part(hp: PartHparams, outtype: Q) -> list[Expected]:
    """Every tensor of one part, in the order written, from its hyper-parameters alone (optional rows included)."""
    dims, conds, out = hp.dims(), hp.conditions(), []
    tower = hp.TOWER
    rows = [(row, None) for row in tower.global_rows]
    rows += [(row, bid) for bid in range(hp.n_layer) for row in tower.layer_rows]
    for row, bid in rows:
        if not set(row.when) <= conds:
            continue
        shape = tuple(dims[d] for d in (row.out if row.out is not None else row.shape)) or (1,)  # 0-d: {1}
        name = row.gguf.format(bid=bid) if bid is not None else row.gguf
        hf = "model." + (row.hf.format(bid=bid) if bid is not None else row.hf)
        out.append(Expected(name, shape, tensor_type(row, name, shape, outtype), row, hf, dims))
    return out


def plan_part(reader: SafetensorsReader, hp: PartHparams, outtype: Q, config: str) -> tuple[list[TensorPlan], set[str]]:
    """One part's tensors checked against the checkpoint (``config``: the config section named in errors), and the
    checkpoint tensors it reads."""
    plans, used = [], set()
    for e in expected_part(hp, outtype):
        if e.row.optional and e.hf not in reader:
            continue
        checked_entry(reader, e.row, e.hf, e.dims, config)
        plans.append(TensorPlan(e.name, e.shape, e.type, _blocks(reader, e, hp), e.hf))
        used.add(e.hf)
    return plans, used


def _blocks(reader: SafetensorsReader, e: Expected, hp: PartHparams):
    if e.row.transform is None:
        return from_checkpoint(reader, e.hf, e.type)
    fn, whole = TRANSFORMS[e.row.transform]
    if not whole:
        return from_checkpoint(reader, e.hf, e.type, transform=lambda rows: fn(rows, hp))

    def blocks():
        data = fn(np.concatenate(list(reader.rows(e.hf))), hp)
        yield encode(data.reshape(-1, e.shape[-1]), e.type)

    return blocks
