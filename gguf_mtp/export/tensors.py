"""Expand the tensor table for a set of hyper-parameters, and check a checkpoint against it.

``expected_tensors`` is the expansion alone (names, shapes, types; no checkpoint): skeletons, the planner and the
registry's parameter counts are made of it (gguf_mtp/planning/layout.py). ``plan_tensors`` checks a checkpoint
against it: every tensor the config implies must be present with the shape the config implies; every checkpoint tensor
must be used, knowingly ignored (tables.IGNORED, another file's towers) or it is an error. Nothing is read
beyond the headers here: the returned TensorPlans read their data only when the writer asks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from gguf import GGMLQuantizationType as Q

from .. import keys
from ..errors import GgufMtpError
from .hparams import DrafterHparams, Layer, TextHparams
from .safetensors import SafetensorsReader
from .tables import GLOBAL, IGNORED, LAYER, OUTTYPES, ROPE_FREQS, SOURCE_TYPES, Row, tensor_type
from .writer import TensorPlan, constant, from_checkpoint


@dataclass
class PlanResult:
    tensors: list[TensorPlan]
    ignored: dict[str, int] = field(default_factory=dict)  # reason -> count of checkpoint tensors left out


def global_dims(hp: TextHparams, drafter: DrafterHparams | None) -> dict[str, int]:
    d = {"E": hp.n_embd, "V": hp.n_vocab, "Vp": hp.ple_vocab, "P": hp.ple_dim, "PL": hp.ple_dim * hp.n_layer, "1": 1}
    if drafter is not None:
        d.update(Eb=drafter.backbone, Eb2=2 * drafter.backbone, C=drafter.n_centroids)
    return d


def layer_dims(hp: TextHparams, layer: Layer) -> dict[str, int]:
    return {
        "E": hp.n_embd, "P": hp.ple_dim, "1": 1, "hd": layer.head_dim, "q": hp.n_head * layer.head_dim,
        "kv": layer.n_head_kv * layer.head_dim, "F": layer.n_ff, "X": hp.n_expert, "Fx": hp.n_ff_exp,
        "Fx2": 2 * hp.n_ff_exp,
    }


def global_conditions(hp: TextHparams, drafter: DrafterHparams | None, centroids: bool) -> set[str]:
    conds = {"ple"} if hp.ple_dim else set()
    conds.add("tied" if hp.tied else "untied")
    if drafter is not None:
        conds.add("drafter")
        conds.add("centroids" if centroids else "no_centroids")
    return conds


def layer_conditions(hp: TextHparams, layer: Layer) -> set[str]:
    conds = {"ple"} if hp.ple_dim else set()
    if layer.has_kv:
        conds.add("kv")
    else:
        conds.add("shared")
    if layer.has_v:
        conds.add("v")
    if hp.k_eq_v and not layer.swa:
        conds.add("k_eq_v")
    if hp.moe:
        conds.add("moe")
    return conds


def _hf_name(template: str, prefix: str, bid: int | None) -> str:
    name = template.format(bid=bid) if bid is not None else template
    return name[len("root:"):] if name.startswith("root:") else prefix + name


def _rows(hp: TextHparams, drafter: DrafterHparams | None, centroids: bool):
    """(row, layer index or None, dims, conditions) for every table row, globals first."""
    gd, gc = global_dims(hp, drafter), global_conditions(hp, drafter, centroids)
    for row in GLOBAL:
        yield row, None, gd, gc
    for layer in hp.layers():
        ld, lc = layer_dims(hp, layer), layer_conditions(hp, layer)
        for row in LAYER:
            yield row, layer.index, ld, lc


@dataclass(frozen=True)
class Expected:
    """One output tensor as the hyper-parameters imply it, before any checkpoint is read."""

    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order, as written (vocabulary rows cut to the tokenizer's size)
    type: Q
    row: Row | None = None  # None: generated, not read from the checkpoint (rope_freqs)
    hf: str | None = None  # the checkpoint tensor it is read from
    dims: dict[str, int] = field(default_factory=dict)  # the row's dimension names, resolved

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


def expected_tensors(hp: TextHparams, outtype: Q, *, n_tokens: int | None = None,
                     drafter: DrafterHparams | None = None, centroids: bool = False,
                     prefix: str = "") -> list[Expected]:
    """Every tensor of a target (``drafter=None``) or drafter file, in the order written: names, shapes and types
    under ``outtype``, from the hyper-parameters alone (``n_tokens``: the tokenizer's size, default the config's
    vocabulary). What a conversion writes, and what skeletons, the planner and parameter counts are made of."""
    n_tokens = hp.n_vocab if n_tokens is None else n_tokens
    out = [Expected(ROPE_FREQS, (hp.head_dim_full // 2,), Q.F32)]
    for row, bid, dims, conds in _rows(hp, drafter, centroids):
        if not set(row.when) <= conds:
            continue
        shape = tuple(dims[d] for d in row.shape)
        if row.cut_vocab:
            shape = (n_tokens, *shape[1:])
        gguf_name = row.gguf.format(bid=bid) if bid is not None else row.gguf
        out.append(Expected(gguf_name, shape, tensor_type(gguf_name, len(shape), shape[-1], outtype), row,
                            _hf_name(row.hf, prefix, bid), dims))
    return out


def plan_tensors(reader: SafetensorsReader, prefix: str, hp: TextHparams, n_tokens: int, outtype: Q,
                 *, drafter: DrafterHparams | None = None, centroids: bool = False,
                 skip_prefixes: tuple[str, ...] = ()) -> PlanResult:
    """The output tensors of a target (``drafter=None``) or drafter, checked against the checkpoint."""
    plans, used = [], set()
    for e in expected_tensors(hp, outtype, n_tokens=n_tokens, drafter=drafter, centroids=centroids, prefix=prefix):
        if e.hf is None:  # rope_freqs: the full layers' frequency factors
            plans.append(TensorPlan(e.name, e.shape, e.type, constant(np.array(hp.rope_freqs, dtype=np.float32),
                                                                       e.type)))
            continue
        plans.append(_plan_one(reader, e))
        used.add(e.hf)
    ignored = _leftovers(reader, used, prefix, hp, drafter, centroids, skip_prefixes)
    if drafter is not None and centroids:
        _check_ordering(reader, drafter, n_tokens)
    return PlanResult(plans, ignored)


def checked_entry(reader: SafetensorsReader, row: Row, name: str, dims: dict[str, int], config: str,
                  floats: bool = True):
    """The checkpoint tensor a table row stands for: present, with the shape ``config`` implies (the row's dimension
    names resolved by ``dims``), and a float tensor unless ``floats`` is off. One error naming the tensor if not."""
    if name not in reader:
        raise GgufMtpError(f"tensor {name} is missing from the checkpoint ({config} implies it)")
    entry = reader.entry(name)
    expected = tuple(dims[d] for d in row.shape)
    if entry.shape != expected:
        what = " x ".join(f"{d}={dims[d]}" for d in row.shape) or "a 0-d scalar"
        raise GgufMtpError(f"tensor {name} has shape {list(entry.shape)}, but {config} implies {list(expected)} "
                           f"({what})")
    if floats and entry.dtype not in ("F32", "F16", "BF16", "F64"):
        raise GgufMtpError(f"tensor {name} has dtype {entry.dtype}; expected a float tensor")
    return entry


def checkpoint_outtype(outtype: str, reader: SafetensorsReader, reference: str) -> Q:
    """--outtype as a ggml type; ``auto`` is the dtype of the ``reference`` tensor (the checkpoint's dtype)."""
    if outtype == "auto":
        return SOURCE_TYPES.get(reader.entry(reference).dtype, Q.F16) if reference in reader else Q.F16
    return OUTTYPES[outtype]


def _plan_one(reader: SafetensorsReader, e: Expected) -> TensorPlan:
    entry = checked_entry(reader, e.row, e.hf, e.dims, "config.json", floats=e.name != keys.ORDERING_TENSOR)
    n_rows = None
    if e.row.cut_vocab:
        if e.shape[0] > entry.shape[0]:
            raise GgufMtpError(f"the tokenizer has {e.shape[0]} tokens but {e.hf} has only {entry.shape[0]} rows")
        n_rows = e.shape[0]
    if e.name == keys.ORDERING_TENSOR:
        return TensorPlan(e.name, e.shape, e.type, lambda: iter([reader.raw(e.hf).astype("<i4")]), e.hf)
    return TensorPlan(e.name, e.shape, e.type, from_checkpoint(reader, e.hf, e.type, n_rows), e.hf)


def _leftovers(reader: SafetensorsReader, used: set[str], prefix: str, hp: TextHparams,
               drafter: DrafterHparams | None, centroids: bool, skip_prefixes: tuple[str, ...]) -> dict[str, int]:
    """Checkpoint tensors not written: known ones are counted by reason, unknown ones are an error."""
    known: dict[str, str] = {}
    gc = global_conditions(hp, drafter, centroids)
    for pattern, cond, why in IGNORED:
        if "{bid}" in pattern:
            for layer in hp.layers():
                if cond in layer_conditions(hp, layer):
                    known[_hf_name(pattern, prefix, layer.index)] = why
        elif cond in gc:
            known[_hf_name(pattern, prefix, None)] = why

    def reason(name: str) -> str | None:
        return known.get(name) or next(("the projector file's (vision/audio towers or embedders)" for p in skip_prefixes
                                        if name.startswith(p)), None)

    return count_leftovers(reader, used, reason,
                           f"a Gemma 4 {'drafter' if drafter else 'text model'} as config.json describes it")


def count_leftovers(reader: SafetensorsReader, used: set[str], reason: Callable[[str], str | None],
                    what: str) -> dict[str, int]:
    """Checkpoint tensors not written, counted by ``reason(name)``; one without a reason is an error (an unknown
    tensor would change what the model computes)."""
    ignored: dict[str, int] = {}
    for name in reader.names():
        if name in used:
            continue
        why = reason(name)
        if why is None:
            raise GgufMtpError(f"unexpected tensor {name} in the checkpoint: not part of {what}")
        ignored[why] = ignored.get(why, 0) + 1
    return ignored


def _check_ordering(reader: SafetensorsReader, d: DrafterHparams, n_tokens: int) -> None:
    """The centroid head's token ordering must be a permutation of the (cut) vocabulary."""
    if d.text.n_vocab % d.n_centroids:
        raise GgufMtpError(f"num_centroids ({d.n_centroids}) does not divide vocab_size ({d.text.n_vocab})")
    if not 0 < d.centroid_top_k <= d.n_centroids:
        raise GgufMtpError(f"centroid_intermediate_top_k ({d.centroid_top_k}) must be in 1..{d.n_centroids}")
    order = np.asarray(reader.raw("masked_embedding.token_ordering"))
    if n_tokens != d.text.n_vocab or not np.array_equal(np.sort(order), np.arange(d.text.n_vocab)):
        raise GgufMtpError("masked_embedding.token_ordering is not a permutation of the vocabulary "
                           f"({n_tokens} tokens); the centroid head cannot be exported")
