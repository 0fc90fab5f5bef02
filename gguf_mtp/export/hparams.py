"""Gemma 4 hyper-parameters from a raw config.json, with transformers 5.23.0's defaults, checked up front.

We read config.json ourselves (no transformers at run time), so the defaults Gemma4TextConfig fills in are a
table here. Everything llama.cpp cannot run is refused before a byte is written, naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import GgufMtpError

SLIDING, FULL = "sliding_attention", "full_attention"

# Gemma4TextConfig's defaults (transformers 5.23.0); ``global_head_dim`` and ``num_global_key_value_heads`` are
# constructor-only arguments there (folded into per_layer_config), read the same way here.
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_144,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 30,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "global_head_dim": 512,
    "num_global_key_value_heads": None,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "rope_parameters": None,
    "attention_bias": False,
    "sliding_window": 512,
    "layer_types": None,
    "final_logit_softcapping": None,
    "use_bidirectional_attention": None,
    "vocab_size_per_layer_input": 262_144,
    "hidden_size_per_layer_input": 256,
    "attention_k_eq_v": False,
    "num_kv_shared_layers": 0,
    "enable_moe_block": False,
    "use_double_wide_mlp": False,
    "num_experts": None,
    "top_k_experts": None,
    "moe_intermediate_size": None,
    "per_layer_config": None,
}
DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
ASSISTANT_DEFAULTS: dict[str, Any] = {
    "backbone_hidden_size": 1536,
    "use_ordered_embeddings": False,
    "num_centroids": 2048,
    "centroid_intermediate_top_k": 32,
}


@dataclass(frozen=True)
class TextModel:
    """One transformers text-model class: its config defaults, the assistant's, and Gemma4TextConfig fields it
    lacks (its layers never build them, so a config that sets one describes a model we would export wrongly)."""

    defaults: dict[str, Any]
    assistant_defaults: dict[str, Any]
    lacks: dict[str, str]  # field -> what it would add


# Gemma4UnifiedTextConfig (the 12B) and Gemma4UnifiedAssistantConfig, transformers 5.23.0: no PLE and no MoE
# fields (its decoder layer is Gemma 2's plus layer_scalar), other defaults for context, window, bidirectional
# attention and the backbone.
UNIFIED_TEXT_DEFAULTS: dict[str, Any] = {
    **TEXT_DEFAULTS,
    "max_position_embeddings": 262_144,
    "sliding_window": 1024,
    "use_bidirectional_attention": "vision",
    "hidden_size_per_layer_input": 0,
    "vocab_size_per_layer_input": 0,
    "enable_moe_block": False,
}
TEXT_MODELS = {
    "gemma4_text": TextModel(TEXT_DEFAULTS, ASSISTANT_DEFAULTS, {}),
    "gemma4_unified_text": TextModel(
        UNIFIED_TEXT_DEFAULTS, {**ASSISTANT_DEFAULTS, "backbone_hidden_size": 3840},
        {"hidden_size_per_layer_input": "per-layer embeddings", "enable_moe_block": "MoE block"},
    ),
}
# per_layer_config overrides that change a layer's shape (anything else there is refused)
PER_LAYER_KEYS = ("head_dim", "num_key_value_heads")
ACTIVATIONS = ("gelu_pytorch_tanh",)  # what llama.cpp's gemma4 graph computes
ROPE_TYPES = ("default", "proportional")
# upper bounds, checked before anything is sized from them: GGUF stores these as u32 (llama.cpp reads most as
# int32); llama.cpp allows at most LLAMA_MAX_LAYERS = 512 layers; head dims size per-layer tables (rope_freqs)
INT_MAX = 2**31 - 1
MAXIMA = {"num_hidden_layers": 512, "head_dim": 1 << 16, "global_head_dim": 1 << 16}
F32_MAX = 3.4028234663852886e38  # floats are written as f32


@dataclass(frozen=True)
class Layer:
    """One decoder layer's shape, as the tensor table needs it."""

    index: int
    swa: bool
    head_dim: int
    n_head_kv: int
    n_ff: int
    has_kv: bool  # owns K/V projections (not a KV-shared layer)
    has_v: bool  # owns a V projection (k_eq_v full layers reuse K)


@dataclass(frozen=True)
class TextHparams:
    """A Gemma 4 text model (target, or a drafter's own layers)."""

    n_vocab: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv_swa: int
    n_head_kv_full: int
    head_dim_swa: int
    head_dim_full: int
    kv_override: bool  # the config gives full layers their own KV head count (written as a per-layer array)
    swa_layers: tuple[bool, ...]
    n_ctx: int
    eps: float
    sliding_window: int
    rope_base_swa: float
    rope_base_full: float
    rot_swa: float  # partial_rotary_factor of sliding layers
    rot_full: float  # of full layers ("proportional": only the first pairs rotate)
    softcap: float | None
    ple_dim: int
    ple_vocab: int
    k_eq_v: bool
    n_shared_kv: int
    double_wide: bool
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    tied: bool

    @property
    def layout(self) -> str:
        return "".join("S" if s else "F" for s in self.swa_layers)

    @property
    def moe(self) -> bool:
        return self.n_expert > 0

    @property
    def first_shared(self) -> int:
        return self.n_layer - self.n_shared_kv

    def n_ff_at(self, i: int) -> int:
        return self.n_ff * 2 if self.double_wide and i >= self.first_shared else self.n_ff

    def layer(self, i: int) -> Layer:
        swa = self.swa_layers[i]
        has_kv = i < self.first_shared
        return Layer(
            index=i,
            swa=swa,
            head_dim=self.head_dim_swa if swa else self.head_dim_full,
            n_head_kv=self.n_head_kv_swa if swa else self.n_head_kv_full,
            n_ff=self.n_ff_at(i),
            has_kv=has_kv,
            has_v=has_kv and not (self.k_eq_v and not swa),
        )

    def layers(self) -> list[Layer]:
        return [self.layer(i) for i in range(self.n_layer)]

    @property
    def rope_freqs(self) -> list[float]:
        """Full layers' frequency factors: rotate the first n_rot pairs, freeze the rest (1e30 -> angle 0)."""
        half = self.head_dim_full // 2
        n_rot = int(self.head_dim_full * self.rot_full / 2)
        return [1.0] * n_rot + [1e30] * (half - n_rot)


@dataclass(frozen=True)
class DrafterHparams:
    text: TextHparams
    backbone: int  # the target's hidden size
    ordered_embeddings: bool  # ships the centroid head
    n_centroids: int
    centroid_top_k: int


class _Cfg:
    """A config dict with defaults and typed getters that fail with the field's name."""

    def __init__(self, raw: dict[str, Any], defaults: dict[str, Any], where: str):
        self.raw, self.defaults, self.where = raw, defaults, where

    def get(self, key: str) -> Any:
        v = self.raw.get(key, self.defaults.get(key))
        return self.defaults.get(key) if v is None and key in self.defaults else v

    def fail(self, msg: str) -> GgufMtpError:
        return GgufMtpError(f"{self.where}: {msg}")

    def int(self, key: str, minimum: int = 0) -> int:
        v = self.get(key)
        maximum = MAXIMA.get(key, INT_MAX)
        if not isinstance(v, int) or isinstance(v, bool) or not minimum <= v <= maximum:
            raise self.fail(f"{key}: expected an integer from {minimum} to {maximum}, got {_short(v)}")
        return v

    def float(self, key: str) -> float:
        return _number(self.get(key), key, self.where)

    def bool(self, key: str) -> bool:
        v = self.get(key)
        if not isinstance(v, bool):
            raise self.fail(f"{key}: expected true or false, got {v!r}")
        return v


def _short(v: Any) -> str:
    """A value for an error line: hostile configs hold huge ones."""
    text = repr(v) if not isinstance(v, int) or abs(v) < 10**30 else f"an integer of {v.bit_length()} bits"
    return text if len(text) <= 80 else text[:77] + "..."


def _number(v: Any, key: str, where: str) -> float:
    if not isinstance(v, int | float) or isinstance(v, bool) or not abs(v) <= F32_MAX:  # NaN fails too
        raise GgufMtpError(f"{where}: {key}: expected a finite number, got {_short(v)}")
    return float(v)


def _layer_types(c: _Cfg, n_layer: int) -> list[str]:
    types = c.get("layer_types")
    if types is None:  # transformers' default: 5 sliding, 1 full
        types = [SLIDING if (i + 1) % 6 else FULL for i in range(n_layer)]
    if not isinstance(types, list) or len(types) != n_layer or any(t not in (SLIDING, FULL) for t in types):
        raise c.fail(f"layer_types: expected {n_layer} entries of {SLIDING!r} / {FULL!r}, got {_short(types)}")
    types = list(types)
    types[-1] = FULL  # transformers forces the last layer to full attention (with a warning)
    return types


def _per_layer(c: _Cfg, types: list[str]) -> dict[str, dict[str, int]]:
    """Per layer-type overrides from per_layer_config / global_head_dim / num_global_key_value_heads."""
    plc = c.get("per_layer_config")
    out: dict[str, dict[str, int]] = {SLIDING: {}, FULL: {}}
    if plc is None:
        out[FULL]["head_dim"] = c.int("global_head_dim", 1)
        if c.get("num_global_key_value_heads") is not None and c.get("attention_k_eq_v"):
            out[FULL]["num_key_value_heads"] = c.int("num_global_key_value_heads", 1)
        return out
    if not isinstance(plc, dict):
        raise c.fail(f"per_layer_config: expected an object, got {type(plc).__name__}")
    seen: dict[str, dict] = {}
    for i, t in enumerate(types):
        ov = next((v for k, v in plc.items() if str(k).isdecimal() and int(k) == i), {})
        if not isinstance(ov, dict):
            raise c.fail(f"per_layer_config[{i}]: expected an object, got {_short(ov)}")
        bad = sorted(set(ov) - set(PER_LAYER_KEYS))
        if bad:
            raise c.fail(f"per_layer_config[{i}]: cannot export a per-layer {', '.join(bad)} "
                         f"(llama.cpp's gemma4 reads only {', '.join(PER_LAYER_KEYS)} per layer type)")
        if t in seen and seen[t] != ov:
            raise c.fail(f"per_layer_config: layer {i} differs from the other {t} layers ({ov} vs {seen[t]}); "
                         "llama.cpp takes one shape per layer type")
        seen[t] = ov
    for t, ov in seen.items():
        for key, value in ov.items():
            maximum = MAXIMA.get(key, INT_MAX)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= maximum:
                raise c.fail(f"per_layer_config: {key} of {t} layers: expected an integer from 1 to {maximum}, "
                             f"got {_short(value)}")
        out[t] = dict(ov)
    return out


def _rope(c: _Cfg) -> dict[str, dict[str, float]]:
    """theta and partial_rotary_factor per layer type, with transformers' defaults."""
    rope = c.get("rope_parameters") or DEFAULT_ROPE
    if not isinstance(rope, dict) or not all(isinstance(rope.get(t), dict) for t in (SLIDING, FULL)):
        raise c.fail(f"rope_parameters: expected objects for {SLIDING} and {FULL}, got {_short(rope)}")
    out = {}
    for t in (SLIDING, FULL):
        kind = rope[t].get("rope_type", "default")
        allowed = ROPE_TYPES if t == FULL else ("default",)  # rope_freqs (partial rotation) serves full layers only
        if kind not in allowed:
            raise c.fail(f"rope_parameters.{t}.rope_type: llama.cpp's gemma4 runs {' / '.join(allowed)} here, "
                         f"got {kind!r}")
        key, theta = f"rope_parameters.{t}.", rope[t].get("rope_theta", DEFAULT_ROPE[t]["rope_theta"])
        out[t] = {"theta": _number(theta, key + "rope_theta", c.where),
                  "rot": _number(rope[t].get("partial_rotary_factor", 1.0), key + "partial_rotary_factor", c.where)}
    return out


def text_hparams(raw: dict[str, Any], where: str, *, tied: bool | None = None, all_shared: bool = False,
                 text_model: str = "gemma4_text") -> TextHparams:
    """Normalize and check a Gemma 4 text config (the target's, or the drafter's text_config).

    ``tied``: the checkpoint-level tie_word_embeddings when it sits outside this dict (multimodal, drafter).
    ``all_shared``: a drafter, whose layers all read the target's KV.
    ``text_model``: the transformers text model (TEXT_MODELS), for its defaults and the fields it lacks.
    """
    model = TEXT_MODELS[text_model]
    c = _Cfg(raw, model.defaults, where)
    for key, what in model.lacks.items():
        if c.get(key):
            raise c.fail(f"{key}: {text_model} has no {what} (transformers ignores the field, so the checkpoint "
                         f"has none to export), got {_short(c.get(key))}")
    n_layer = c.int("num_hidden_layers", 1)
    types = _layer_types(c, n_layer)
    over = _per_layer(c, types)
    n_head = c.int("num_attention_heads", 1)
    n_kv = c.int("num_key_value_heads", 1)
    head_dim = c.int("head_dim", 1)
    kv_swa = over[SLIDING].get("num_key_value_heads", n_kv)
    kv_full = over[FULL].get("num_key_value_heads", n_kv)
    for t, kv in ((SLIDING, kv_swa), (FULL, kv_full)):
        if n_head % kv:
            raise c.fail(f"num_attention_heads ({n_head}) is not a multiple of the {t} layers' KV heads ({kv})")
    rope = _rope(c)
    hd_full = over[FULL].get("head_dim", head_dim)
    rot_full = rope[FULL]["rot"]
    if not 0 < rope[SLIDING]["rot"] <= 1:
        raise c.fail(f"rope_parameters.{SLIDING}.partial_rotary_factor: expected a number in (0, 1], "
                     f"got {rope[SLIDING]['rot']}")
    if not 0 < rot_full <= 1 or (hd_full * rot_full / 2) != int(hd_full * rot_full / 2):
        raise c.fail(f"rope_parameters.{FULL}.partial_rotary_factor {rot_full} must rotate a whole number of "
                     f"pairs of the {hd_full}-wide head")
    n_shared = c.int("num_kv_shared_layers")
    if all_shared:
        if n_shared not in (0, n_layer):
            raise c.fail(f"num_kv_shared_layers: a drafter's layers all read the target's KV, so expected "
                         f"{n_layer} (or 0), got {n_shared}")
        n_shared = n_layer
    elif n_shared >= n_layer:
        raise c.fail(f"num_kv_shared_layers ({n_shared}) must be smaller than num_hidden_layers ({n_layer})")
    if c.get("hidden_activation") not in ACTIVATIONS:
        raise c.fail(f"hidden_activation: llama.cpp's gemma4 computes {ACTIVATIONS[0]}, "
                     f"got {c.get('hidden_activation')!r}")
    if c.get("attention_bias"):
        raise c.fail("attention_bias: llama.cpp's gemma4 has no attention biases")
    if c.get("use_bidirectional_attention") == "all":
        raise c.fail("use_bidirectional_attention 'all' (an encoder) is not a model llama.cpp's gemma4 runs")
    moe = c.bool("enable_moe_block")
    softcap = c.get("final_logit_softcapping")
    if tied is None:
        tied = c.bool("tie_word_embeddings")
    return TextHparams(
        n_vocab=c.int("vocab_size", 1),
        n_embd=c.int("hidden_size", 1),
        n_ff=c.int("intermediate_size", 1),
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv_swa=kv_swa,
        n_head_kv_full=kv_full,
        head_dim_swa=over[SLIDING].get("head_dim", head_dim),
        head_dim_full=hd_full,
        kv_override="num_key_value_heads" in over[FULL],
        swa_layers=tuple(t == SLIDING for t in types),
        n_ctx=c.int("max_position_embeddings", 1),
        eps=c.float("rms_norm_eps"),
        sliding_window=c.int("sliding_window", 1),
        rope_base_swa=rope[SLIDING]["theta"],
        rope_base_full=rope[FULL]["theta"],
        rot_swa=rope[SLIDING]["rot"],
        rot_full=rot_full,
        softcap=_number(softcap, "final_logit_softcapping", where) if softcap else None,
        ple_dim=c.int("hidden_size_per_layer_input"),
        ple_vocab=c.int("vocab_size_per_layer_input"),
        k_eq_v=c.bool("attention_k_eq_v"),
        n_shared_kv=n_shared,
        double_wide=c.bool("use_double_wide_mlp"),
        n_expert=c.int("num_experts", 1) if moe else 0,
        n_expert_used=c.int("top_k_experts", 1) if moe else 0,
        n_ff_exp=c.int("moe_intermediate_size", 1) if moe else 0,
        tied=bool(tied),
    )


def drafter_hparams(config: dict[str, Any], where: str, text_model: str = "gemma4_text") -> DrafterHparams:
    """A gemma4_assistant / gemma4_unified_assistant config: its own text layers plus the target-facing sizes and
    the centroid head."""
    text_raw = config.get("text_config")
    if not isinstance(text_raw, dict):
        raise GgufMtpError(f"{where}: a drafter config needs a text_config object")
    tied = config.get("tie_word_embeddings", True)
    if tied is not True:
        raise GgufMtpError(f"{where}: tie_word_embeddings must be true for a drafter (its head is its embedding)")
    text = text_hparams(text_raw, f"{where} text_config", tied=True, all_shared=True, text_model=text_model)
    c = _Cfg(config, TEXT_MODELS[text_model].assistant_defaults, where)
    d = DrafterHparams(
        text=text,
        backbone=c.int("backbone_hidden_size", 1),
        ordered_embeddings=c.bool("use_ordered_embeddings"),
        n_centroids=c.int("num_centroids", 1),
        centroid_top_k=c.int("centroid_intermediate_top_k", 1),
    )
    problems = []
    if text.ple_dim:
        problems.append(f"hidden_size_per_layer_input must be 0 for a drafter, got {text.ple_dim}")
    if text.moe:
        problems.append("a drafter has no MoE block (enable_moe_block must be false)")
    if text.double_wide:
        problems.append("use_double_wide_mlp must be false for a drafter")
    if d.backbone == text.n_embd:
        problems.append(f"backbone_hidden_size ({d.backbone}) equals the drafter's hidden_size; llama.cpp tells the "
                        "two apart by size and refuses such a drafter")
    if all(not s for s in text.swa_layers):
        problems.append("a drafter needs at least one sliding layer (it reads the target's last sliding layer)")
    if problems:
        raise GgufMtpError(f"{where}: " + "; ".join(problems))
    return d

