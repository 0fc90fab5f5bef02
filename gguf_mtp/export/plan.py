"""Expand the tensor table for one checkpoint and check it against the safetensors headers.

Every tensor the config implies must be present with the shape the config implies; every checkpoint tensor
must be used, knowingly ignored (tables.IGNORED, another file's towers) or it is an error. Nothing is read
beyond the headers here: the returned TensorPlans read their data only when the writer asks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from gguf import GGMLQuantizationType as Q

from .. import keys
from ..errors import GgufMtpError
from .hparams import DrafterHparams, Layer, TextHparams
from .safetensors import SafetensorsReader
from .tables import GLOBAL, IGNORED, LAYER, ROPE_FREQS, Row, tensor_type
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


def plan_tensors(reader: SafetensorsReader, prefix: str, hp: TextHparams, n_tokens: int, outtype: Q,
                 *, drafter: DrafterHparams | None = None, centroids: bool = False,
                 skip_prefixes: tuple[str, ...] = ()) -> PlanResult:
    """The output tensors of a target (``drafter=None``) or drafter, checked against the checkpoint."""
    plans = [TensorPlan(ROPE_FREQS, (hp.head_dim_full // 2,), Q.F32,
                        constant(np.array(hp.rope_freqs, dtype=np.float32), Q.F32))]
    used: set[str] = set()
    for row, bid, dims, conds in _rows(hp, drafter, centroids):
        if not set(row.when) <= conds:
            continue
        name = _hf_name(row.hf, prefix, bid)
        gguf_name = row.gguf.format(bid=bid) if bid is not None else row.gguf
        plans.append(_plan_one(reader, row, name, gguf_name, dims, n_tokens, outtype))
        used.add(name)
    ignored = _leftovers(reader, used, prefix, hp, drafter, centroids, skip_prefixes)
    if drafter is not None and centroids:
        _check_ordering(reader, drafter, n_tokens)
    return PlanResult(plans, ignored)


def _plan_one(reader: SafetensorsReader, row: Row, name: str, gguf_name: str, dims: dict[str, int],
              n_tokens: int, outtype: Q) -> TensorPlan:
    if name not in reader:
        raise GgufMtpError(f"tensor {name} is missing from the checkpoint (config.json implies it)")
    entry = reader.entry(name)
    expected = tuple(dims[d] for d in row.shape)
    if entry.shape != expected:
        what = " x ".join(f"{d}={dims[d]}" for d in row.shape)
        raise GgufMtpError(f"tensor {name} has shape {list(entry.shape)}, but config.json implies {list(expected)} "
                           f"({what})")
    shape = entry.shape
    n_rows = None
    if row.cut_vocab:
        if n_tokens > shape[0]:
            raise GgufMtpError(f"the tokenizer has {n_tokens} tokens but {name} has only {shape[0]} rows")
        n_rows = n_tokens
        shape = (n_tokens, *shape[1:])
    if gguf_name == keys.ORDERING_TENSOR:
        qtype = Q.I32
        return TensorPlan(gguf_name, shape, qtype, lambda: iter([reader.raw(name).astype("<i4")]), name)
    if entry.dtype not in ("F32", "F16", "BF16", "F64"):
        raise GgufMtpError(f"tensor {name} has dtype {entry.dtype}; expected a float tensor")
    qtype = tensor_type(gguf_name, len(shape), shape[-1], outtype)
    return TensorPlan(gguf_name, shape, qtype, from_checkpoint(reader, name, qtype, n_rows), name)


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
    ignored: dict[str, int] = {}
    for name in reader.names():
        if name in used:
            continue
        why = known.get(name) or next(("another file's tower (vision/audio)" for p in skip_prefixes
                                       if name.startswith(p)), None)
        if why is None:
            raise GgufMtpError(f"unexpected tensor {name} in the checkpoint: not part of a Gemma 4 "
                               f"{'drafter' if drafter else 'text model'} as config.json describes it")
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
