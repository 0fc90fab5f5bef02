"""Checking a checkpoint's config.json against the registry: the exporter's guard for the released variants.

The exporter calls ``check_config`` as it locates a checkpoint (export/source.py). The registry marks what no public
source pinned (``unconfirmed``); every other fact a config.json states must agree, or the conversion is refused
before a byte is written. Tiny and foreign checkpoints match no variant and are not checked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import GgufMtpError
from .registry import FULL, SLIDING, Registry, Variant, load_registry

# The exporter reads config.json; where a registry variant is certain of a fact (not in ``unconfirmed``) and the
# config states it, the two must agree. Each row: registry path, role, the value the registry implies, the value
# config.json states (MISSING when it does not say). Paths double as the ``unconfirmed`` names.

MISSING = object()


def _text_cfg(c: Mapping[str, Any]) -> Mapping[str, Any]:
    t = c.get("text_config")
    return t if isinstance(t, Mapping) else c


def _get(c: Mapping[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(c, Mapping) or key not in c:
            return MISSING
        c = c[key]
    return c


def _full_layer(c: Mapping[str, Any], flat: str, per_layer: str) -> Any:
    """A full-attention layer's value: the flat key (global_head_dim, num_global_key_value_heads), else the first
    full layer's per_layer_config entry (how transformers 5.23.0 serializes it), as the upstream converter reads."""
    t = _text_cfg(c)
    if t.get(flat) is not None:
        return t[flat]
    types, plc = t.get("layer_types") or [], t.get("per_layer_config") or {}
    for i, kind in enumerate(types):
        entry = plc.get(str(i), plc.get(i)) if isinstance(plc, Mapping) else None
        if kind == "full_attention" and isinstance(entry, Mapping) and per_layer in entry:
            return entry[per_layer]
    return MISSING


def _layer_types(c: Mapping[str, Any]) -> Any:
    types = _get(_text_cfg(c), "layer_types")
    return MISSING if types is MISSING else [{"sliding_attention": SLIDING, "full_attention": FULL}.get(x, x)
                                             for x in types]


def _text_row(path: str, key: str, want: Callable[[Variant], Any], role: str = "target") -> tuple:
    """A row whose config.json value is text_config's ``key`` (the drafter's own text config for role "drafter")."""
    return path, role, want, lambda c: _get(_text_cfg(c), key)


def _draft_row(path: str, key: str, want: Callable[[Variant], Any]) -> tuple:
    return _text_row(path, key, want, "drafter")


def _head_dim_full(c: Mapping[str, Any]) -> Any:
    return _full_layer(c, "global_head_dim", "head_dim")


def _kv_full(c: Mapping[str, Any]) -> Any:
    got = _full_layer(c, "num_global_key_value_heads", "num_key_value_heads")
    return _get(_text_cfg(c), "num_key_value_heads") if got is MISSING else got


def _embedder(part: str, field: str) -> Callable[[Variant], Any]:
    return lambda v: _tower(part, field)(v.embedders) if v.embedders else MISSING


def _tower(part: str, field: str) -> Callable[[Variant], Any]:
    return lambda v: getattr(getattr(v, part), field) if getattr(v, part) is not None else MISSING


CONFIG_CHECKS: tuple[tuple[str, str, Callable[[Variant], Any], Callable[[Mapping[str, Any]], Any]], ...] = (
    ("hf.target_architecture", "target", lambda v: v.hf.target_architecture,
     lambda c: (c.get("architectures") or [MISSING])[0]),
    _text_row("text.layers", "num_hidden_layers", lambda v: v.text.layers),
    _text_row("text.hidden", "hidden_size", lambda v: v.text.hidden),
    _text_row("text.intermediate", "intermediate_size", lambda v: v.text.intermediate),
    _text_row("text.heads", "num_attention_heads", lambda v: v.text.heads),
    _text_row("text.kv_heads.sliding", "num_key_value_heads", lambda v: v.text.kv_heads.sliding),
    ("text.kv_heads.full", "target", lambda v: v.text.kv_heads.full, _kv_full),
    _text_row("text.head_dim", "head_dim", lambda v: v.text.head_dim),
    ("text.global_head_dim", "target", lambda v: v.text.global_head_dim, _head_dim_full),
    ("text.layer_pattern", "target", lambda v: v.text.layer_types(), _layer_types),
    _text_row("text.sliding_window", "sliding_window", lambda v: v.text.sliding_window),
    _text_row("text.shared_kv_layers", "num_kv_shared_layers", lambda v: v.text.shared_kv_layers),
    _text_row("text.double_wide_mlp", "use_double_wide_mlp", lambda v: v.text.double_wide_mlp),
    _text_row("text.attention_k_eq_v", "attention_k_eq_v", lambda v: v.text.attention_k_eq_v),
    _text_row("text.vocab", "vocab_size", lambda v: v.text.vocab),
    _text_row("text.context", "max_position_embeddings", lambda v: v.text.context),
    _text_row("text.final_logit_softcap", "final_logit_softcapping", lambda v: v.text.final_logit_softcap),
    _text_row("text.moe.experts", "num_experts", lambda v: v.text.moe.experts if v.text.moe else MISSING),
    _text_row("text.moe.top_k", "top_k_experts", lambda v: v.text.moe.top_k if v.text.moe else MISSING),
    _text_row("text.moe.expert_ffn", "moe_intermediate_size",
              lambda v: v.text.moe.expert_ffn if v.text.moe else MISSING),
    ("vision.width", "target", _tower("vision", "width"), lambda c: _get(c, "vision_config", "hidden_size")),
    ("vision.layers", "target", _tower("vision", "layers"), lambda c: _get(c, "vision_config", "num_hidden_layers")),
    ("vision.heads", "target", _tower("vision", "heads"), lambda c: _get(c, "vision_config", "num_attention_heads")),
    ("vision.head_dim", "target", _tower("vision", "head_dim"), lambda c: _get(c, "vision_config", "head_dim")),
    ("vision.ffn", "target", _tower("vision", "ffn"), lambda c: _get(c, "vision_config", "intermediate_size")),
    ("audio.width", "target", _tower("audio", "width"), lambda c: _get(c, "audio_config", "hidden_size")),
    ("audio.layers", "target", _tower("audio", "layers"), lambda c: _get(c, "audio_config", "num_hidden_layers")),
    ("embedders.vision.patch_size", "target", _embedder("vision", "patch_size"),
     lambda c: _get(c, "vision_config", "patch_size")),
    ("embedders.vision.pooling_kernel", "target", _embedder("vision", "pooling_kernel"),
     lambda c: _get(c, "vision_config", "pooling_kernel_size")),
    ("embedders.vision.embed_dim", "target", _embedder("vision", "embed_dim"),
     lambda c: _get(c, "vision_config", "mm_embed_dim")),
    ("embedders.vision.position_embeddings", "target", _embedder("vision", "position_embeddings"),
     lambda c: _get(c, "vision_config", "mm_posemb_size")),
    ("embedders.audio.samples_per_token", "target", _embedder("audio", "samples_per_token"),
     lambda c: _get(c, "audio_config", "audio_embed_dim")),
    ("hf.drafter_architecture", "drafter", lambda v: v.hf.drafter_architecture,
     lambda c: (c.get("architectures") or [MISSING])[0]),
    ("text.hidden", "drafter", lambda v: v.text.hidden, lambda c: _get(c, "backbone_hidden_size")),
    _draft_row("drafter.layers", "num_hidden_layers", lambda v: v.drafter.layers),
    _draft_row("drafter.hidden", "hidden_size", lambda v: v.drafter.hidden),
    _draft_row("drafter.intermediate", "intermediate_size", lambda v: v.drafter.intermediate),
    _draft_row("drafter.heads", "num_attention_heads", lambda v: v.drafter.heads),
    ("drafter.layer_pattern", "drafter", lambda v: v.drafter.layer_types(), _layer_types),
    ("drafter.head.type", "drafter", lambda v: v.drafter.head.type,
     lambda c: MISSING if "use_ordered_embeddings" not in c else ("centroid" if c["use_ordered_embeddings"]
                                                                  else "dense")),
    ("drafter.head.clusters", "drafter", lambda v: v.drafter.head.clusters or MISSING,
     lambda c: _get(c, "num_centroids")),
    _draft_row("drafter.context", "max_position_embeddings", lambda v: v.drafter.context or MISSING),
)


@dataclass(frozen=True)
class ConfigMismatch:
    """A fact config.json states differently from a registry variant that is certain of it."""

    variant: str
    path: str
    registry: Any
    config: Any

    def __str__(self) -> str:
        return f"{self.path}: config.json says {self.config!r}, the registry's {self.variant} says {self.registry!r}"


def config_mismatches(v: Variant, role: str, config: Mapping[str, Any]) -> list[ConfigMismatch]:
    """Every confirmed fact of ``v`` for ``role`` ("target" | "drafter") that config.json states otherwise."""
    out = []
    for path, row_role, want, got in CONFIG_CHECKS:
        if row_role != role or not v.is_confirmed(path):
            continue
        w, g = want(v), got(config)
        if w is MISSING or g is MISSING or g is None and path.startswith("drafter.context"):
            continue
        if isinstance(w, float) or isinstance(g, float):
            same = isinstance(g, (int, float)) and not isinstance(g, bool) and abs(float(g) - float(w)) <= 1e-9 * abs(w)
        else:
            same = g == w
        if not same:
            out.append(ConfigMismatch(v.name, path, w, g))
    return out


def variant_for_config(config: Mapping[str, Any], role: str, source: str | None = None,
                       registry: Registry | None = None) -> Variant | None:
    """The variant a checkpoint is: by repo id (``source``, e.g. "google/gemma-4-12B-it"), else by architecture and
    shape (hidden size and layers, a drafter's backbone too). None for anything else (tiny or foreign models)."""
    reg = registry if registry is not None else load_registry()
    for v in reg:
        repo = v.hf.drafter if role == "drafter" else v.hf.target
        if source and source.lower() == repo.lower():
            return v
    arch = (config.get("architectures") or [None])[0]
    t = _text_cfg(config)
    for v in reg:
        if role == "drafter":
            shape = (v.hf.drafter_architecture, v.text.hidden, v.drafter.hidden, v.drafter.layers)
            got = (arch, config.get("backbone_hidden_size"), t.get("hidden_size"), t.get("num_hidden_layers"))
        else:
            shape = (v.hf.target_architecture, v.text.hidden, v.text.layers)
            got = (arch, t.get("hidden_size"), t.get("num_hidden_layers"))
        if shape == got:
            return v
    return None


def check_config(config: Mapping[str, Any], role: str, source: str | None = None,
                 registry: Registry | None = None) -> Variant | None:
    """The exporter's one call: the variant this config.json is (or None), after refusing a config that states a
    fact otherwise than the registry, where the registry is certain (``unconfirmed`` facts are not checked)."""
    v = variant_for_config(config, role, source, registry)
    problems = config_mismatches(v, role, config) if v is not None else []
    if problems:
        raise GgufMtpError(f"config.json does not match the registry's {v.name} {role} ({getattr(v.hf, role)}): "
                           + "; ".join(map(str, problems)))
    return v


__all__ = ["CONFIG_CHECKS", "ConfigMismatch", "check_config", "config_mismatches", "variant_for_config"]
