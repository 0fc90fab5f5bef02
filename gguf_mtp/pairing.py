"""The one pair validator: is this target + drafter (+ projector) a working set?

``check``, ``generate``, ``chat``, ``plan``, ``modelfile`` and the exporter all call ``check_set`` so that a
refusal names the same field everywhere. Facts come from GGUF metadata (``facts_from_metadata``); the exporter
builds the metadata it is about to write and checks it the same way before writing anything.

Field names are stable (scripts read them from ``check --json``): hidden_size, vocab, head_dim_swa,
head_dim_full, kv_heads_swa, kv_heads_full, sliding_window, rope_base_swa, rope_base_full, layer_layout,
projector_dim, centroid_support (and arch for the wrong kind of file).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import keys
from .keys import Keys
from .errors import GgufMtpError, IncompatiblePair

FIELDS = (
    "arch", "hidden_size", "vocab", "head_dim_swa", "head_dim_full", "kv_heads_swa", "kv_heads_full",
    "sliding_window", "rope_base_swa", "rope_base_full", "layer_layout", "projector_dim", "centroid_support",
)


@dataclass(frozen=True)
class ModelFacts:
    """What pairing needs to know of one file, read from its GGUF metadata."""

    arch: str
    hidden_size: int | None = None  # {arch}.embedding_length (projector: clip.vision.projection_dim)
    hidden_out: int | None = None  # drafter: embedding_length_out = the target hidden it expects
    n_vocab: int | None = None
    vocab_sha256: str | None = None
    head_dim_swa: int | None = None
    head_dim_full: int | None = None
    kv_heads_swa: int | None = None  # of the last sliding layer (the one the drafter reads)
    kv_heads_full: int | None = None  # of the last full layer
    sliding_window: int | None = None
    rope_base_swa: float | None = None
    rope_base_full: float | None = None
    layer_layout: str = ""  # one letter per layer: S sliding, F full
    n_shared_kv: int = 0
    centroids: bool = False  # drafter carries the centroid-clustered head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Problem:
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def _per_layer(value: Any, n: int) -> list:
    if isinstance(value, list | tuple):
        return list(value)
    return [value] * n


def _last(layout: str, kind: str, values: list) -> Any:
    idx = layout.rfind(kind)
    return values[idx] if idx >= 0 and idx < len(values) else None


def facts_from_metadata(meta: Mapping[str, Any], token_bytes: Sequence[bytes] | None = None) -> ModelFacts:
    """Facts of a gemma4 / gemma4-assistant / clip file from its metadata (any writer's, not only ours)."""
    arch = str(meta.get(Keys.General.ARCHITECTURE, ""))
    if arch == keys.ARCH_PROJECTOR:
        return ModelFacts(arch=arch, hidden_size=meta.get(Keys.ClipVision.PROJECTION_DIM))

    def k(template: str, default: Any = None) -> Any:
        return meta.get(keys.arch_key(template, arch), default)

    pattern = k(Keys.Attention.SLIDING_WINDOW_PATTERN) or []
    n_layer = int(k(Keys.LLM.BLOCK_COUNT, len(pattern) if isinstance(pattern, list) else 0) or 0)
    layout = "".join("S" if s else "F" for s in _per_layer(pattern, n_layer)) if pattern else ""
    kv = _per_layer(k(Keys.Attention.HEAD_COUNT_KV), n_layer)
    if token_bytes is None and meta.get(Keys.Tokenizer.LIST) is not None:
        token_bytes = [t.encode("utf-8") for t in meta[Keys.Tokenizer.LIST]]
    vocab_hash = keys.vocab_sha256(token_bytes) if token_bytes is not None else meta.get(keys.PAIR_VOCAB_SHA256)
    return ModelFacts(
        arch=arch,
        hidden_size=k(Keys.LLM.EMBEDDING_LENGTH),
        hidden_out=k(Keys.LLM.EMBEDDING_LENGTH_OUT),
        n_vocab=len(token_bytes) if token_bytes is not None else None,
        vocab_sha256=vocab_hash,
        head_dim_swa=k(Keys.Attention.KEY_LENGTH_SWA),
        head_dim_full=k(Keys.Attention.KEY_LENGTH),
        kv_heads_swa=_last(layout, "S", kv),
        kv_heads_full=_last(layout, "F", kv),
        sliding_window=k(Keys.Attention.SLIDING_WINDOW),
        rope_base_swa=k(Keys.Rope.FREQ_BASE_SWA),
        rope_base_full=k(Keys.Rope.FREQ_BASE),
        layer_layout=layout,
        n_shared_kv=int(k(Keys.Attention.SHARED_KV_LAYERS, 0) or 0),
        centroids=k(keys.CENTROID_COUNT) is not None,
    )


# Integer hyper-parameters that readers of a model file size things from (pairing's per-layer lists, the
# planner's tables). A file from elsewhere is checked once (``check_metadata``) before anyone uses them, so a
# hostile value is one clear error instead of a crash or a 4-billion-entry list.
MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS
INT_KEYS = (
    Keys.LLM.BLOCK_COUNT, Keys.LLM.CONTEXT_LENGTH, Keys.LLM.EMBEDDING_LENGTH, Keys.LLM.EMBEDDING_LENGTH_OUT,
    Keys.Attention.KEY_LENGTH, Keys.Attention.KEY_LENGTH_SWA, Keys.Attention.SLIDING_WINDOW,
    Keys.Attention.SHARED_KV_LAYERS, Keys.LLM.EXPERT_COUNT, Keys.LLM.EXPERT_USED_COUNT,
    Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, Keys.LLM.EMBD_LENGTH_PER_LAYER_INP, keys.CENTROID_COUNT,
    Keys.General.FILE_TYPE, Keys.ClipVision.PROJECTION_DIM, Keys.ClipVision.EMBEDDING_LENGTH,
    Keys.ClipVision.FEED_FORWARD_LENGTH, Keys.ClipVision.Attention.HEAD_COUNT, Keys.ClipVision.PATCH_SIZE,
    Keys.ClipVision.Projector.SCALE_FACTOR, Keys.ClipVision.IMAGE_SIZE, Keys.ClipVision.BLOCK_COUNT,
)
PER_LAYER_KEYS = (Keys.Attention.SLIDING_WINDOW_PATTERN, Keys.Attention.HEAD_COUNT, Keys.Attention.HEAD_COUNT_KV,
                  Keys.LLM.FEED_FORWARD_LENGTH)  # a scalar, or one value per layer


def _is_uint(v: Any) -> bool:
    return isinstance(v, int) and 0 <= v < 2**32  # bools are ints here: a flag stored as a count is harmless


def check_metadata(meta: Mapping[str, Any], where: str | Path) -> None:
    """Refuse a file whose integer hyper-parameters are not integers, or whose per-layer lists do not match
    its layer count (GgufMtpError naming the key)."""
    arch = str(meta.get(Keys.General.ARCHITECTURE, ""))
    for template in INT_KEYS:
        key = keys.arch_key(template, arch)
        v = meta.get(key)
        if v is not None and not _is_uint(v):
            raise GgufMtpError(f"{where}: {key}: expected an integer from 0 to 2^32-1, got {_short(v)}")
    block_count = keys.arch_key(Keys.LLM.BLOCK_COUNT, arch)
    n = meta.get(block_count)
    if n is not None and n > MAX_LAYERS:
        raise GgufMtpError(f"{where}: {block_count}: {n} layers, llama.cpp allows at most {MAX_LAYERS}")
    for template in PER_LAYER_KEYS:
        key = keys.arch_key(template, arch)
        v = meta.get(key)
        if isinstance(v, list):
            if n is None:
                raise GgufMtpError(f"{where}: {block_count} is missing ({key} has {len(v)} values)")
            if len(v) != n:
                raise GgufMtpError(f"{where}: {key}: {len(v)} values for {n} layers")
            if len(v) > MAX_LAYERS or not all(_is_uint(x) for x in v):
                raise GgufMtpError(f"{where}: {key}: expected up to {MAX_LAYERS} integers, got {_short(v)}")
        elif v is not None and not _is_uint(v):
            raise GgufMtpError(f"{where}: {key}: expected an integer or one per layer, got {_short(v)}")


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def facts_from_gguf(path: str | Path) -> ModelFacts:
    from .gguffile import read_gguf

    info = read_gguf(path, tokens=False)
    check_metadata(info.metadata, info.path)
    facts = facts_from_metadata(info.metadata, info.token_bytes)
    if info.arch == keys.ARCH_DRAFTER and not facts.centroids:
        # upstream files have no centroid keys; the tensors alone still mark a centroid head
        if keys.CENTROIDS_TENSOR in info.tensor_names():
            facts = ModelFacts(**{**facts.to_dict(), "centroids": True})
    return facts


def layout_problems(layout: str, n_shared_kv: int) -> list[Problem]:
    """llama.cpp's hard-coded Gemma 4 KV reuse, checked before it can abort the process.

    Shared sliding layers reuse layer (first_shared - 2) and shared full layers (first_shared - 1); the drafter
    reads the target's layers n_layer-2 (sliding) and n_layer-1 (full). So the layout needs ``S F`` right
    before the first shared layer and at the very end.
    """
    problems = []
    n = len(layout)
    if n < 2 or layout[-2:] != "SF":
        problems.append(Problem("layer_layout", f"must end with a sliding then a full layer (got ...{layout[-2:]!r}); "
                                "llama.cpp's drafter reads the target's last sliding and last full layer"))
    if n_shared_kv:
        first = n - n_shared_kv
        if first < 2 or layout[first - 2:first] != "SF":
            problems.append(Problem("layer_layout", f"the two layers before the first KV-shared layer ({first}) must be "
                                    f"sliding, full (got {layout[max(first - 2, 0):first]!r}); llama.cpp hard-codes this reuse"))
    return problems


def _mismatch(field: str, what: str, target: Any, drafter: Any) -> Problem | None:
    if target is None or drafter is None or target == drafter:
        return None
    return Problem(field, f"{what}: target has {target}, drafter has {drafter}")


def check_set(
    target: ModelFacts,
    drafter: ModelFacts | None = None,
    projector: ModelFacts | None = None,
    runtime_centroids: bool = False,
) -> list[Problem]:
    """Every reason this set cannot run together (empty: compatible).

    ``runtime_centroids``: the runtime that will load the drafter carries our centroid-head patch.
    """
    problems: list[Problem] = []
    if target.arch != keys.ARCH_TARGET:
        problems.append(Problem("arch", f"target must be {keys.ARCH_TARGET}, got {target.arch or 'no architecture'}"))
    if drafter is not None:
        if drafter.arch != keys.ARCH_DRAFTER:
            problems.append(Problem("arch", f"drafter must be {keys.ARCH_DRAFTER}, got {drafter.arch or 'no architecture'}"))
        if target.hidden_size is not None and drafter.hidden_out != target.hidden_size:
            problems.append(Problem("hidden_size", f"drafter expects a target hidden size of {drafter.hidden_out} "
                                    f"(embedding_length_out), target has {target.hidden_size}"))
        if target.vocab_sha256 and drafter.vocab_sha256 and target.vocab_sha256 != drafter.vocab_sha256:
            sizes = f" ({target.n_vocab} vs {drafter.n_vocab} tokens)" if target.n_vocab != drafter.n_vocab else ""
            problems.append(Problem("vocab", f"target and drafter token lists differ{sizes}"))
        for field, what in (
            ("head_dim_swa", "sliding-layer head dim"),
            ("head_dim_full", "full-layer head dim"),
            ("kv_heads_swa", "KV heads of the last sliding layer"),
            ("kv_heads_full", "KV heads of the last full layer"),
            ("sliding_window", "sliding window"),
            ("rope_base_swa", "sliding-layer RoPE base"),
            ("rope_base_full", "full-layer RoPE base"),
        ):
            p = _mismatch(field, what, getattr(target, field), getattr(drafter, field))
            if p:
                problems.append(p)
        if drafter.layer_layout and "S" not in drafter.layer_layout:
            problems.append(Problem("layer_layout", "drafter needs at least one sliding layer"))
        if drafter.centroids and not runtime_centroids:
            problems.append(Problem("centroid_support", "drafter has the centroid-clustered head, which stock llama.cpp "
                                    "(llama-server, Ollama) refuses; re-export without --centroids or use the patched "
                                    "runtime (gguf-mtp runtime build)"))
    if target.layer_layout:
        problems += layout_problems(target.layer_layout, target.n_shared_kv)
    if projector is not None:
        if projector.arch != keys.ARCH_PROJECTOR:
            problems.append(Problem("arch", f"projector must be {keys.ARCH_PROJECTOR}, got {projector.arch or 'no architecture'}"))
        elif target.hidden_size is not None and projector.hidden_size != target.hidden_size:
            problems.append(Problem("projector_dim", f"projector outputs {projector.hidden_size}, target hidden size is "
                                    f"{target.hidden_size}"))
    return problems


def require_compatible(target: ModelFacts, drafter: ModelFacts | None = None, projector: ModelFacts | None = None,
                       runtime_centroids: bool = False) -> None:
    """Raise IncompatiblePair naming every failing field (one per line) if the set cannot run."""
    problems = check_set(target, drafter, projector, runtime_centroids)
    if problems:
        raise IncompatiblePair("incompatible set: " + "; ".join(str(p) for p in problems))
