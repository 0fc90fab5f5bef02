"""GGUF key/value metadata for gemma4 targets and gemma4-assistant drafters, built before anything is written.

The same dict is checked (``pairing.facts_from_metadata``) and then written, so what we validate is what
lands in the file. Values and types follow the upstream converter (conversion/gemma.py) key for key; the
differences are listed in docs/export.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from gguf import GGML_QUANT_VERSION, GGMLQuantizationType as Q, GGUFValueType as T

from .. import __version__, keys
from ..keys import Keys
from .hparams import DrafterHparams, TextHparams
from .tables import FILE_TYPES
from .tokenizer import Vocab


K = Keys.Tokenizer
SPECIAL_ID_KEYS = {"bos": K.BOS_ID, "eos": K.EOS_ID, "unk": K.UNK_ID, "sep": K.SEP_ID, "pad": K.PAD_ID,
                   "mask": K.MASK_ID}


@dataclass(frozen=True)
class KV:
    value: Any
    type: T
    sub_type: T | None = None  # arrays: None lets the writer infer it from the values (as upstream does)


class Metadata(dict):
    """Ordered ``key -> KV``; ``plain()`` gives the ``key -> value`` view that pairing reads."""

    def put(self, key: str, value: Any, vtype: T) -> None:
        self[key] = KV(value, vtype)

    def u32(self, key: str, value: int) -> None:
        self.put(key, int(value), T.UINT32)

    def f32(self, key: str, value: float) -> None:
        self.put(key, float(value), T.FLOAT32)

    def string(self, key: str, value: str) -> None:
        self.put(key, value, T.STRING)

    def bool(self, key: str, value: bool) -> None:
        self.put(key, bool(value), T.BOOL)

    def array(self, key: str, values: list) -> None:
        self.put(key, list(values), T.ARRAY)

    def i32_array(self, key: str, values: list[int]) -> None:
        self[key] = KV([int(v) for v in values], T.ARRAY, T.INT32)

    def u32_or_array(self, key: str, values: list[int], as_array: bool) -> None:
        """llama.cpp reads these keys as a scalar or as one value per layer."""
        if as_array:
            self.array(key, [int(v) for v in values])
        else:
            self.u32(key, values[0])

    def insert_after(self, anchor: str, key: str, kv: KV) -> None:
        """Place ``key`` right after ``anchor`` (keys known only late, e.g. the size label, stay grouped)."""
        items = [(k, v) for k, v in self.items() if k != key]
        self.clear()
        for k, v in items:
            self[k] = v
            if k == anchor:
                self[key] = kv
        if key not in self:
            self[key] = kv

    def finish(self, file_type: int, size_label: str) -> None:
        """The keys known once the tensors are: the file type, and the size label right after the name."""
        self.u32(Keys.General.FILE_TYPE, file_type)
        self.insert_after(Keys.General.NAME, Keys.General.SIZE_LABEL, KV(size_label, T.STRING))

    def plain(self) -> dict[str, Any]:
        return {k: kv.value for k, kv in self.items()}


def general_keys(arch: str, name: str, file_type: int) -> Metadata:
    m = Metadata()
    m.string(Keys.General.ARCHITECTURE, arch)
    m.string(Keys.General.TYPE, "model")
    m.string(Keys.General.NAME, name)
    m.u32(Keys.General.FILE_TYPE, file_type)
    m.u32(Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION)
    return m


def text_keys(arch: str, hp: TextHparams) -> Metadata:
    """The ``{arch}.*`` keys llama.cpp's gemma4 / gemma4-assistant loaders read (see gguf-layout.md)."""
    m = Metadata()
    a = functools.partial(keys.arch_key, arch=arch)
    L, A, R = Keys.LLM, Keys.Attention, Keys.Rope
    ff = [hp.n_ff_at(i) for i in range(hp.n_layer)]
    kv = [hp.layer(i).n_head_kv for i in range(hp.n_layer)]
    m.u32(a(L.BLOCK_COUNT), hp.n_layer)
    m.u32(a(L.CONTEXT_LENGTH), hp.n_ctx)
    m.u32(a(L.EMBEDDING_LENGTH), hp.n_embd)
    m.u32_or_array(a(L.FEED_FORWARD_LENGTH), ff, hp.double_wide)
    m.u32(a(A.HEAD_COUNT), hp.n_head)
    m.u32_or_array(a(A.HEAD_COUNT_KV), kv, hp.kv_override)
    m.f32(a(R.FREQ_BASE), hp.rope_base_full)
    m.f32(a(R.FREQ_BASE_SWA), hp.rope_base_swa)
    m.f32(a(A.LAYERNORM_RMS_EPS), hp.eps)
    if hp.moe:
        m.u32(a(L.EXPERT_COUNT), hp.n_expert)
        m.u32(a(L.EXPERT_USED_COUNT), hp.n_expert_used)
    m.u32(a(A.KEY_LENGTH), hp.head_dim_full)
    m.u32(a(A.VALUE_LENGTH), hp.head_dim_full)
    if hp.softcap:
        m.f32(a(L.FINAL_LOGIT_SOFTCAPPING), hp.softcap)
    m.u32(a(A.SLIDING_WINDOW), hp.sliding_window)
    m.u32(a(A.SHARED_KV_LAYERS), hp.n_shared_kv)
    m.u32(a(L.EMBD_LENGTH_PER_LAYER_INP), hp.ple_dim)
    m.array(a(A.SLIDING_WINDOW_PATTERN), list(hp.swa_layers))
    m.u32(a(A.KEY_LENGTH_SWA), hp.head_dim_swa)
    m.u32(a(A.VALUE_LENGTH_SWA), hp.head_dim_swa)
    if hp.moe:
        m.u32(a(L.EXPERT_FEED_FORWARD_LENGTH), hp.n_ff_exp)
    # partial rotation of full layers goes through rope_freqs, so the full head dim is "rotated"
    m.u32(a(R.DIMENSION_COUNT), hp.head_dim_full)
    m.u32(a(R.DIMENSION_COUNT_SWA), int(hp.head_dim_swa * hp.rot_swa))
    return m


def drafter_keys(d: DrafterHparams, centroids: bool) -> Metadata:
    arch = keys.ARCH_DRAFTER
    m = text_keys(arch, d.text)
    m.u32(keys.arch_key(Keys.LLM.EMBEDDING_LENGTH_OUT, arch), d.backbone)
    m.u32(keys.arch_key(Keys.LLM.NEXTN_PREDICT_LAYERS, arch), d.text.n_layer)
    if centroids:
        m.u32(keys.arch_key(keys.CENTROID_COUNT, arch), d.n_centroids)
        m.u32(keys.arch_key(keys.CENTROID_TOP_K, arch), d.centroid_top_k)
    return m


def vocab_keys(v: Vocab) -> Metadata:
    m = Metadata()
    m.string(K.MODEL, "gemma4")
    m.array(K.LIST, v.tokens)
    m.array(K.SCORES, [float(s) for s in v.scores])
    m.array(K.TOKEN_TYPE, [int(t) for t in v.types])
    m.array(K.MERGES, v.merges)
    for typ, tid in v.special_ids.items():
        m.u32(SPECIAL_ID_KEYS[typ], tid)
    m.bool(K.ADD_BOS, True)  # Gemma 4 always starts with <bos> (llama.cpp forces it too)
    if v.add_eos is not None:
        m.bool(K.ADD_EOS, v.add_eos)
    if v.chat_template:
        m.string(K.CHAT_TEMPLATE, v.chat_template)
    m.bool(K.ADD_PREFIX, False)
    return m


def model_keys(arch: str, name: str, text: TextHparams, drafter: DrafterHparams | None, vocab: Vocab, source: str,
               revision: str | None, role: str, centroids: bool = False,
               suppress_tokens: list[int] | None = None) -> Metadata:
    """Every key of a target (``drafter=None``) or drafter file but the two ``finish`` adds once the tensors are
    known, in the order written: general, the architecture's, tokenizer, provenance, pairing.
    ``suppress_tokens``: generation_config.json's, which llama.cpp's samplers mask (the 12B's)."""
    m = general_keys(arch, name, FILE_TYPES[Q.F32])
    m.update(drafter_keys(drafter, centroids) if drafter else text_keys(arch, text))
    m.update(vocab_keys(vocab))
    if suppress_tokens:
        m.i32_array(keys.TOKENIZER_SUPPRESS_TOKENS, suppress_tokens)
    m.update(provenance_keys(source, revision, role))
    if drafter:
        m.update(pair_keys(drafter.backbone, vocab))
    return m


def provenance_keys(source: str, revision: str | None, role: str) -> Metadata:
    """Never a machine's path: a repo id or the directory's name, so exports are byte-identical everywhere."""
    m = Metadata()
    m.string(keys.VERSION, __version__)
    m.string(keys.SOURCE, source)
    if revision:
        m.string(keys.SOURCE_REVISION, revision)
    m.string(keys.ROLE, role)
    return m


def pair_keys(target_hidden: int, vocab: Vocab) -> Metadata:
    m = Metadata()
    m.u32(keys.PAIR_TARGET_HIDDEN, target_hidden)
    m.string(keys.PAIR_VOCAB_SHA256, vocab.sha256())
    return m
