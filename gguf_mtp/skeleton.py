"""Full-size skeleton GGUFs: real Gemma 4 metadata and tensor layout, with a data region that is a sparse hole.

A skeleton lets llama.cpp (no_alloc load, quantizer dry run) and the planner see a 31B model's exact tensor
list, shapes and per-tensor quant types without downloading or storing any weights: the file's apparent size
is the real one, its disk usage is the header (a few MB, mostly the 262144-token vocabulary).

Layouts come from the registry (``registry.get_variant``). Quantized layouts come from llama.cpp's own
quantizer in dry-run mode over a BF16 skeleton (it reads no tensor data), so the per-tensor types are
llama.cpp's mix, not a table of ours.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter, LlamaFileType, TokenType

from . import __version__, keys
from .errors import GgufMtpError
from .fsutil import atomic_output, check_output_path
from .memory import pad, tensor_bytes
from .registry import FULL, Variant, get_variant

ROLES = ("target", "drafter", "mmproj")
BASE_TYPES = ("BF16", "F16", "F32")
ALIGN = 32  # general.alignment default

V = GGUFValueType


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a layout: name, ggml-order shape, ggml type name."""

    name: str
    shape: tuple[int, ...]
    type: str

    @property
    def n_bytes(self) -> int:
        return tensor_bytes(self.type, self.shape)


@dataclass(frozen=True)
class Layout:
    """What a GGUF holds, without data: arch, metadata (key -> (value, type, sub_type)) and tensors."""

    arch: str
    metadata: dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]]
    tensors: tuple[TensorSpec, ...]

    @property
    def n_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)


# --- tensor layouts ---------------------------------------------------------------------------------

def _weight(name: str, shape: tuple[int, ...], dtype: str) -> TensorSpec:
    """Upstream writes 1-D tensors, norms and routers as F32, other weights in the file's type."""
    small = len(shape) < 2 or "norm" in name or "ffn_gate_inp" in name or not name.endswith(".weight")
    return TensorSpec(name, shape, "F32" if small else dtype)


def target_tensors(v: Variant, dtype: str = "BF16") -> list[TensorSpec]:
    """The gemma4 target's tensors as llama.cpp's loader (src/models/gemma4.cpp) creates them."""
    t = v.text
    e, n_vocab, ple, n_layer = t.hidden, t.vocab, t.ple_dim, t.layers
    out = [_weight("token_embd.weight", (e, n_vocab), dtype)]
    if ple:
        out += [
            _weight("per_layer_token_embd.weight", (ple * n_layer, n_vocab), dtype),
            _weight("per_layer_model_proj.weight", (e, ple * n_layer), dtype),
            _weight("per_layer_proj_norm.weight", (ple,), dtype),
        ]
    out += [_weight("output_norm.weight", (e,), dtype), TensorSpec("rope_freqs.weight", (t.global_head_dim // 2,), "F32")]
    types = t.layer_types()
    for i in range(n_layer):
        b = f"blk.{i}."
        hd, kv, ff = t.head_dim_of(i), t.kv_heads_of(i), t.ffn_of(i)
        has_kv = i < t.first_shared_layer
        w = [("attn_norm.weight", (e,)), ("attn_q.weight", (e, hd * t.heads))]
        if has_kv:
            w.append(("attn_k.weight", (e, hd * kv)))
            if not (t.attention_k_eq_v and types[i] == FULL):
                w.append(("attn_v.weight", (e, hd * kv)))
        w += [("attn_output.weight", (hd * t.heads, e)), ("attn_q_norm.weight", (hd,))]
        if has_kv:
            w.append(("attn_k_norm.weight", (hd,)))
        w += [("post_attention_norm.weight", (e,)), ("layer_output_scale.weight", (1,)),
              ("ffn_norm.weight", (e,)), ("ffn_gate.weight", (e, ff)), ("ffn_up.weight", (e, ff)),
              ("ffn_down.weight", (ff, e)), ("post_ffw_norm.weight", (e,))]
        if t.moe:
            x, fx = t.moe.experts, t.moe.expert_ffn
            w += [("ffn_gate_inp.weight", (e, x)), ("ffn_gate_inp.scale", (e,)),
                  ("pre_ffw_norm_2.weight", (e,)), ("post_ffw_norm_1.weight", (e,)), ("post_ffw_norm_2.weight", (e,)),
                  ("ffn_gate_up_exps.weight", (e, 2 * fx, x)), ("ffn_down_exps.weight", (fx, e, x)),
                  ("ffn_down_exps.scale", (x,))]
        if ple:
            w += [("inp_gate.weight", (e, ple)), ("proj.weight", (ple, e)), ("post_norm.weight", (e,))]
        out += [_weight(b + name, shape, dtype) for name, shape in w]
    return out


def drafter_tensors(v: Variant, dtype: str = "BF16") -> list[TensorSpec]:
    """The gemma4-assistant drafter (src/models/gemma4-assistant.cpp): Q-only layers, tied head."""
    d, t = v.drafter, v.text
    e, eb = d.hidden, t.hidden
    out = [_weight("token_embd.weight", (e, t.vocab), dtype), _weight("output_norm.weight", (e,), dtype),
           TensorSpec("rope_freqs.weight", (t.global_head_dim // 2,), "F32"),
           _weight("nextn.pre_projection.weight", (2 * eb, e), dtype),
           _weight("nextn.post_projection.weight", (e, eb), dtype)]
    for i, kind in enumerate(d.layer_types()):
        hd = t.global_head_dim if kind == FULL else t.head_dim
        w = [("attn_norm.weight", (e,)), ("attn_q.weight", (e, hd * d.heads)), ("attn_output.weight", (hd * d.heads, e)),
             ("attn_q_norm.weight", (hd,)), ("post_attention_norm.weight", (e,)), ("layer_output_scale.weight", (1,)),
             ("ffn_norm.weight", (e,)), ("ffn_gate.weight", (e, d.intermediate)), ("ffn_up.weight", (e, d.intermediate)),
             ("ffn_down.weight", (d.intermediate, e)), ("post_ffw_norm.weight", (e,))]
        out += [_weight(f"blk.{i}.{name}", shape, dtype) for name, shape in w]
    return out


_CLAMPS = ("input_max", "input_min", "output_max", "output_min")


def mmproj_tensors(v: Variant, dtype: str = "F16") -> list[TensorSpec]:
    """The vision projector (clip, projector type gemma4v) as llama.cpp's converter writes it."""
    vis = v.vision
    if vis is None:
        raise GgufMtpError(f"{v.name} has no vision tower")
    w, inner, p = vis.width, vis.heads * vis.head_dim, vis.patch_size
    out = [TensorSpec("v.patch_embd.weight", (p, p, 3, w), "F16" if dtype != "F32" else "F32"),
           TensorSpec("v.position_embd.weight", (w, vis.position_embeddings, 2), "F32")]
    for i in range(vis.layers):
        b = f"v.blk.{i}."
        linears = [("attn_q", (w, inner)), ("attn_k", (w, inner)), ("attn_v", (w, inner)), ("attn_out", (inner, w)),
                   ("ffn_gate", (w, vis.ffn)), ("ffn_up", (w, vis.ffn)), ("ffn_down", (vis.ffn, w))]
        for name, shape in linears:
            out.append(_weight(f"{b}{name}.weight", shape, dtype))
            out += [TensorSpec(f"{b}{name}.{c}", (1,), "F32") for c in _CLAMPS]
        out += [_weight(f"{b}{n}.weight", (vis.head_dim,), dtype) for n in ("attn_q_norm", "attn_k_norm")]
        out += [_weight(f"{b}{n}.weight", (w,), dtype) for n in ("ln1", "ln2", "attn_post_norm", "ffn_post_norm")]
        out.append(_weight(f"{b}out_scale.weight", (1,), dtype))
    out.append(_weight("mm.input_projection.weight", (w, vis.projection_dim), dtype))
    return out


# --- metadata ---------------------------------------------------------------------------------------

def _kv(meta: dict, key: str, value: Any, vtype: GGUFValueType, sub: GGUFValueType | None = None) -> None:
    meta[key] = (value, vtype, sub)


def vocab_metadata(n_vocab: int) -> dict:
    """A synthetic gemma4 BPE vocabulary of ``n_vocab`` unique tokens with one merge: what the loader needs
    (tokens, scores, types, merges, special ids), without Google's tokenizer files."""
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    base = special + byte_tokens + ["a", "b", "ab"]
    tokens = base + [f"<unused{i}>" for i in range(n_vocab - len(base))]
    types = ([int(TokenType.CONTROL)] * len(special) + [int(TokenType.BYTE)] * 256
             + [int(TokenType.NORMAL)] * (n_vocab - len(special) - 256))
    meta: dict = {}
    _kv(meta, "tokenizer.ggml.model", "gemma4", V.STRING)
    _kv(meta, "tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING)
    _kv(meta, "tokenizer.ggml.scores", [0.0] * n_vocab, V.ARRAY, V.FLOAT32)
    _kv(meta, "tokenizer.ggml.token_type", types, V.ARRAY, V.INT32)
    _kv(meta, "tokenizer.ggml.merges", ["a b"], V.ARRAY, V.STRING)
    for name, tid in (("padding", 0), ("eos", 1), ("bos", 2), ("unknown", 3)):
        _kv(meta, f"tokenizer.ggml.{name}_token_id", tid, V.UINT32)
    _kv(meta, "tokenizer.ggml.add_bos_token", True, V.BOOL)
    _kv(meta, "tokenizer.ggml.add_space_prefix", False, V.BOOL)
    return meta


def _common(meta: dict, v: Variant, role: str, file_type: int, name: str) -> None:
    _kv(meta, "general.type", "model" if role != "mmproj" else "mmproj", V.STRING)
    _kv(meta, "general.name", name, V.STRING)
    _kv(meta, "general.file_type", file_type, V.UINT32)
    _kv(meta, "general.quantization_version", 2, V.UINT32)
    _kv(meta, keys.VERSION, __version__, V.STRING)
    _kv(meta, keys.SOURCE, f"skeleton:{getattr(v.hf, 'drafter' if role == 'drafter' else 'target')}", V.STRING)
    _kv(meta, keys.ROLE, "projector" if role == "mmproj" else role, V.STRING)


def _attention_keys(meta: dict, arch: str, v: Variant, pattern: list[str], heads: int) -> None:
    t = v.text
    a = arch
    _kv(meta, f"{a}.context_length", t.context, V.UINT32)
    _kv(meta, f"{a}.block_count", len(pattern), V.UINT32)
    _kv(meta, f"{a}.attention.head_count", heads, V.UINT32)
    kv = [t.kv_heads.full if k == FULL else t.kv_heads.sliding for k in pattern]
    _kv(meta, f"{a}.attention.head_count_kv", kv, V.ARRAY, V.UINT32)
    _kv(meta, f"{a}.attention.layer_norm_rms_epsilon", t.rms_eps, V.FLOAT32)
    _kv(meta, f"{a}.attention.key_length", t.global_head_dim, V.UINT32)
    _kv(meta, f"{a}.attention.value_length", t.global_head_dim, V.UINT32)
    _kv(meta, f"{a}.attention.key_length_swa", t.head_dim, V.UINT32)
    _kv(meta, f"{a}.attention.value_length_swa", t.head_dim, V.UINT32)
    _kv(meta, f"{a}.attention.sliding_window", t.sliding_window, V.UINT32)
    _kv(meta, f"{a}.attention.sliding_window_pattern", [k != FULL for k in pattern], V.ARRAY, V.BOOL)
    _kv(meta, f"{a}.rope.freq_base", t.rope.full_base, V.FLOAT32)
    _kv(meta, f"{a}.rope.freq_base_swa", t.rope.sliding_base, V.FLOAT32)
    _kv(meta, f"{a}.rope.dimension_count", t.global_head_dim, V.UINT32)
    _kv(meta, f"{a}.rope.dimension_count_swa", t.head_dim, V.UINT32)


def target_metadata(v: Variant, file_type: int) -> dict:
    t, a = v.text, keys.ARCH_TARGET
    meta: dict = {}
    _common(meta, v, "target", file_type, f"gemma-4-{v.name}-it skeleton")
    _attention_keys(meta, a, v, t.layer_types(), t.heads)
    _kv(meta, f"{a}.embedding_length", t.hidden, V.UINT32)
    ffn = [t.ffn_of(i) for i in range(t.layers)]
    if len(set(ffn)) == 1:
        _kv(meta, f"{a}.feed_forward_length", ffn[0], V.UINT32)
    else:
        _kv(meta, f"{a}.feed_forward_length", ffn, V.ARRAY, V.UINT32)
    _kv(meta, f"{a}.attention.shared_kv_layers", t.shared_kv_layers, V.UINT32)
    _kv(meta, f"{a}.embedding_length_per_layer_input", t.ple_dim, V.UINT32)
    if t.final_logit_softcap:
        _kv(meta, f"{a}.final_logit_softcapping", t.final_logit_softcap, V.FLOAT32)
    if t.moe:
        _kv(meta, f"{a}.expert_count", t.moe.experts, V.UINT32)
        _kv(meta, f"{a}.expert_used_count", t.moe.top_k, V.UINT32)
        _kv(meta, f"{a}.expert_feed_forward_length", t.moe.expert_ffn, V.UINT32)
    meta.update(vocab_metadata(t.vocab))
    return meta


def drafter_metadata(v: Variant, file_type: int) -> dict:
    d, t, a = v.drafter, v.text, keys.ARCH_DRAFTER
    meta: dict = {}
    _common(meta, v, "drafter", file_type, f"gemma-4-{v.name}-it-assistant skeleton")
    _attention_keys(meta, a, v, d.layer_types(), d.heads)
    _kv(meta, f"{a}.embedding_length", d.hidden, V.UINT32)
    _kv(meta, f"{a}.embedding_length_out", t.hidden, V.UINT32)
    _kv(meta, f"{a}.nextn_predict_layers", d.layers, V.UINT32)
    _kv(meta, f"{a}.feed_forward_length", d.intermediate, V.UINT32)
    _kv(meta, keys.PAIR_TARGET_HIDDEN, t.hidden, V.UINT32)
    meta.update(vocab_metadata(t.vocab))
    return meta


def mmproj_metadata(v: Variant, file_type: int) -> dict:
    vis = v.vision
    meta: dict = {}
    _common(meta, v, "mmproj", file_type, f"gemma-4-{v.name}-it mmproj skeleton")
    _kv(meta, "clip.has_vision_encoder", True, V.BOOL)
    _kv(meta, "clip.projector_type", "gemma4v", V.STRING)
    _kv(meta, "clip.vision.projector_type", "gemma4v", V.STRING)
    _kv(meta, "clip.vision.projection_dim", vis.projection_dim, V.UINT32)
    _kv(meta, "clip.vision.image_size", vis.image_size, V.UINT32)
    _kv(meta, "clip.vision.patch_size", vis.patch_size, V.UINT32)
    _kv(meta, "clip.vision.embedding_length", vis.width, V.UINT32)
    _kv(meta, "clip.vision.feed_forward_length", vis.ffn, V.UINT32)
    _kv(meta, "clip.vision.block_count", vis.layers, V.UINT32)
    _kv(meta, "clip.vision.attention.head_count", vis.heads, V.UINT32)
    _kv(meta, "clip.vision.attention.layer_norm_epsilon", 1e-6, V.FLOAT32)
    _kv(meta, "clip.vision.image_mean", [0.0, 0.0, 0.0], V.ARRAY, V.FLOAT32)
    _kv(meta, "clip.vision.image_std", [1.0, 1.0, 1.0], V.ARRAY, V.FLOAT32)
    _kv(meta, "clip.use_gelu", True, V.BOOL)
    return meta


_FILE_TYPES = {"F32": LlamaFileType.ALL_F32, "F16": LlamaFileType.MOSTLY_F16, "BF16": LlamaFileType.MOSTLY_BF16}


def base_layout(v: Variant, role: str, dtype: str | None = None) -> Layout:
    """The unquantized layout of one role (BF16 text weights, F16 projector: what the exporters write)."""
    if role not in ROLES:
        raise GgufMtpError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
    dtype = (dtype or ("F16" if role == "mmproj" else "BF16")).upper()
    if dtype not in BASE_TYPES:
        raise GgufMtpError(f"base type must be one of {', '.join(BASE_TYPES)}, got {dtype}")
    ft = int(_FILE_TYPES[dtype])
    if role == "target":
        return Layout(keys.ARCH_TARGET, target_metadata(v, ft), tuple(target_tensors(v, dtype)))
    if role == "drafter":
        return Layout(keys.ARCH_DRAFTER, drafter_metadata(v, ft), tuple(drafter_tensors(v, dtype)))
    return Layout(keys.ARCH_PROJECTOR, mmproj_metadata(v, ft), tuple(mmproj_tensors(v, dtype)))


# --- writing ----------------------------------------------------------------------------------------

def write_sparse(path: str | os.PathLike, layout: Layout) -> int:
    """Write the header and tensor infos, then extend the file to its full size without writing data.

    Returns the apparent file size. On file systems with sparse files, disk usage is the header only.
    """
    w = GGUFWriter(os.fspath(path), layout.arch)
    for key, (value, vtype, sub) in layout.metadata.items():
        if key == "general.architecture":
            continue
        w.add_key_value(key, value, vtype, sub)
    for t in layout.tensors:
        w.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np.float32), t.n_bytes,
                          raw_dtype=GGMLQuantizationType[t.type])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    fout.flush()
    data_start = pad(fout.tell(), ALIGN)
    total = data_start + sum(pad(t.n_bytes, ALIGN) for t in layout.tensors)
    fout.truncate(total)
    w.close()
    return total


# --- quantized layouts: llama.cpp's quantizer in dry-run mode ---------------------------------------

def dry_run_types(path: str | os.PathLike, quant: str) -> dict[str, str]:
    """Per-tensor types llama.cpp's quantizer chooses for ``quant`` (gguf_mtp.quantize in dry-run mode: llama.cpp
    reads the header and no tensor data, so a sparse skeleton is enough)."""
    from .quantize import quantize

    result = quantize(path, None, quant, dry_run=True)
    return {t.name: t.dst_type.upper() for t in result.tensors}


def quantized_layout(base: Layout, quant: str, workdir: str | os.PathLike | None = None) -> Layout:
    """``base`` with llama.cpp's per-tensor types for ``quant`` (writes a sparse BF16 skeleton to a temp dir)."""
    quant = quant.upper()
    if quant in BASE_TYPES:
        return base if all(t.type in ("F32", quant) for t in base.tensors) else _retype(base, quant)
    if base.arch == keys.ARCH_PROJECTOR:
        raise GgufMtpError(f"llama.cpp's quantizer does not quantize projectors (use F16, BF16 or F32), got {quant}")
    with _tempdir(workdir) as d:
        src = Path(d) / "base.gguf"
        write_sparse(src, base)
        types = dry_run_types(src, quant)
    missing = [t.name for t in base.tensors if t.name not in types]
    if missing:
        raise GgufMtpError(f"quantizer dry run did not report {len(missing)} tensor(s), e.g. {missing[0]}")
    ftype = getattr(LlamaFileType, f"MOSTLY_{quant}", None)
    meta = dict(base.metadata)
    if ftype is not None:
        _kv(meta, "general.file_type", int(ftype), V.UINT32)
    return Layout(base.arch, meta, tuple(replace(t, type=types[t.name]) for t in base.tensors))


def _retype(base: Layout, dtype: str) -> Layout:
    tensors = tuple(replace(t, type=dtype) if t.type not in ("F32",) else t for t in base.tensors)
    meta = dict(base.metadata)
    _kv(meta, "general.file_type", int(_FILE_TYPES[dtype]), V.UINT32)
    return Layout(base.arch, meta, tensors)


@contextlib.contextmanager
def _tempdir(workdir: str | os.PathLike | None) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="gguf-mtp-skel-", dir=workdir) as d:
        yield d


def layout_for(variant: str | Variant, role: str, quant: str | None = None) -> Layout:
    """The layout of a variant's file at a quant (None: the role's base type). Cached per process by name:
    a quantized layout costs a skeleton write and a quantizer dry run."""
    if isinstance(variant, str):
        return _cached_layout(get_variant(variant).name, role, quant.upper() if quant else None)
    base = base_layout(variant, role)
    return quantized_layout(base, quant) if quant else base


@functools.lru_cache(maxsize=32)
def _cached_layout(name: str, role: str, quant: str | None) -> Layout:
    return layout_for(get_variant(name), role, quant)


def make_skeleton(variant: str, out: str | os.PathLike, quant: str | None = None, role: str = "target",
                  force: bool = False) -> tuple[Path, Layout, int]:
    """Write a sparse full-size skeleton GGUF; returns (path, layout, apparent size)."""
    check_output_path(out, force)
    layout = layout_for(variant, role, quant)
    with atomic_output(out, force) as tmp:
        size = write_sparse(tmp, layout)
    return Path(out), layout, size


__all__ = [
    "Layout", "ROLES", "TensorSpec", "base_layout", "drafter_tensors", "dry_run_types", "layout_for",
    "make_skeleton", "mmproj_tensors", "quantized_layout", "target_tensors", "vocab_metadata", "write_sparse",
]
