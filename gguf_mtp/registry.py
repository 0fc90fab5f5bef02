"""The Gemma 4 family as data: ``models.json`` loaded into frozen dataclasses, checked on load.

Every number the exporter, planner and runtime need about a variant (layer pattern, KV sharing, drafter
shape, recommended quants) lives in one JSON file, so a new variant is a data change, not a code change.
The file is validated against the dataclasses themselves (each field's type and default say its JSON type
and whether it may be left out or null; ``at_least`` adds a minimum) and a short list of consistency rules;
any problem is one ``GgufMtpError`` line that names the file and the key path.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, get_args, get_origin, get_type_hints

from .errors import GgufMtpError

SCHEMA_VERSION = 1
FAMILY = "gemma4"
ENV_MODELS = "GGUF_MTP_MODELS"
MODELS_FILE = "models.json"

SLIDING, FULL = "sliding", "full"
PATTERN_LETTERS = {"S": SLIDING, "F": FULL}
HEAD_TYPES = ("centroid", "dense")

# llama.cpp file types a recommendation may name (spelled as llama-quantize spells them).
KNOWN_QUANTS = frozenset(
    "F32 F16 BF16 Q8_0 Q6_K Q5_K_M Q5_K_S Q5_0 Q5_1 Q4_K_M Q4_K_S Q4_0 Q4_1 Q3_K_L Q3_K_M Q3_K_S Q2_K "
    "IQ4_XS IQ4_NL IQ3_M IQ3_S IQ3_XS IQ3_XXS IQ2_M IQ2_S IQ2_XS IQ2_XXS IQ1_M IQ1_S TQ1_0 TQ2_0 MXFP4_MOE".split()
)


class RegistryError(GgufMtpError):
    """A models.json that cannot be used; ``where`` is the dotted key path (empty for the whole file)."""

    def __init__(self, file: str | os.PathLike | None, where: str, problem: str) -> None:
        self.file = str(file) if file is not None else None
        self.where = where
        self.problem = problem
        parts = [p for p in (self.file, where) if p]
        super().__init__(": ".join([*parts, problem]))


# --- what a field's type cannot say ----------------------------------------------------------------


def at_least(low: float, **field_options: Any) -> Any:
    """A dataclass field whose value in models.json must be ``low`` or more."""
    return dataclasses.field(metadata={"min": low}, **field_options)


def map_key() -> Any:
    """A dataclass field models.json does not spell as a key: the key its section is listed under."""
    return dataclasses.field(metadata={"map_key": True})


# --- the dataclasses ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerPattern:
    """A compact layer pattern: ``unit`` (S = sliding, F = full) repeated ``repeat`` times."""

    unit: str
    repeat: int = at_least(1)

    def __len__(self) -> int:
        return len(self.unit) * self.repeat

    def expand(self) -> list[str]:
        """The per-layer list of "sliding"/"full"."""
        return [PATTERN_LETTERS[c] for c in self.unit] * self.repeat


@dataclass(frozen=True)
class KVHeads:
    sliding: int = at_least(1)
    full: int = at_least(1)


@dataclass(frozen=True)
class RopeSpec:
    sliding_base: float = at_least(0)
    full_base: float = at_least(0)
    full_partial_rotary_factor: float = at_least(0)


@dataclass(frozen=True)
class MoESpec:
    experts: int = at_least(1)
    top_k: int = at_least(1)
    expert_ffn: int = at_least(1)


@dataclass(frozen=True)
class TextSpec:
    """The target's text tower, in the terms llama.cpp's gemma4 loader uses."""

    layers: int = at_least(1)
    hidden: int = at_least(1)
    intermediate: int = at_least(1)
    heads: int = at_least(1)
    kv_heads: KVHeads
    head_dim: int = at_least(1)
    global_head_dim: int = at_least(1)
    layer_pattern: LayerPattern
    sliding_window: int = at_least(1)
    shared_kv_layers: int = at_least(0)
    ple_dim: int = at_least(0)
    double_wide_mlp: bool
    attention_k_eq_v: bool
    moe: MoESpec | None
    vocab: int = at_least(1)
    context: int = at_least(1)
    final_logit_softcap: float | None = at_least(0)
    rope: RopeSpec
    rms_eps: float = at_least(0)

    def layer_types(self) -> list[str]:
        return self.layer_pattern.expand()

    @property
    def first_shared_layer(self) -> int:
        """Layers from here on read K/V computed by an earlier layer of the same type."""
        return self.layers - self.shared_kv_layers

    def kv_layers(self) -> list[int]:
        """Indices of the layers that own a KV cache (everything before the KV-shared tail)."""
        return list(range(self.first_shared_layer))

    def kv_source(self, layer: int) -> int:
        """The layer whose K/V ``layer`` attends: itself, or the last owning layer of its type."""
        if layer < self.first_shared_layer:
            return layer
        types = self.layer_types()
        return max(i for i in range(self.first_shared_layer) if types[i] == types[layer])

    def head_dim_of(self, layer: int) -> int:
        return self.global_head_dim if self.layer_types()[layer] == FULL else self.head_dim

    def kv_heads_of(self, layer: int) -> int:
        return self.kv_heads.full if self.layer_types()[layer] == FULL else self.kv_heads.sliding

    def ffn_of(self, layer: int) -> int:
        """Dense MLP width: KV-shared layers are twice as wide when ``double_wide_mlp``."""
        wide = self.double_wide_mlp and layer >= self.first_shared_layer
        return self.intermediate * (2 if wide else 1)


@dataclass(frozen=True)
class VisionSpec:
    width: int = at_least(1)
    layers: int = at_least(1)
    heads: int = at_least(1)
    head_dim: int = at_least(1)
    ffn: int = at_least(1)
    patch_size: int = at_least(1)
    image_size: int = at_least(1)
    pooling_kernel: int = at_least(1)
    position_embeddings: int = at_least(1)
    projection_dim: int = at_least(1)


@dataclass(frozen=True)
class AudioSpec:
    width: int = at_least(1)
    layers: int = at_least(1)
    heads: int = at_least(1)
    ffn: int = at_least(1)
    output_dim: int = at_least(1)


@dataclass(frozen=True)
class VisionEmbedderSpec:
    """The 12B's transformer-less image embedder: each soft token is a square of ``patch_size x pooling_kernel``
    pixels, layer-normed, projected to ``embed_dim`` (a Dense), plus a factorized 2-D position table of
    ``position_embeddings`` rows per axis, then RMS-normed and projected into the text model."""

    patch_size: int = at_least(1)
    pooling_kernel: int = at_least(1)
    embed_dim: int = at_least(1)
    position_embeddings: int = at_least(1)


@dataclass(frozen=True)
class AudioEmbedderSpec:
    """The 12B's transformer-less audio embedder: each soft token is a frame of ``samples_per_token`` raw samples
    at ``sample_rate`` Hz, RMS-normed and projected into the text model."""

    samples_per_token: int = at_least(1)
    sample_rate: int = at_least(1)


@dataclass(frozen=True)
class Embedders:
    """Media embedders without an encoder (Gemma4Unified); a variant has these or vision/audio towers."""

    vision: VisionEmbedderSpec | None
    audio: AudioEmbedderSpec | None


@dataclass(frozen=True)
class DrafterHead:
    """The drafter's LM head: tied "dense", or "centroid" (score ``top_k`` of ``clusters`` token groups)."""

    type: str
    clusters: int | None = at_least(1, default=None)
    top_k: int | None = at_least(1, default=None)


@dataclass(frozen=True)
class DrafterSpec:
    """The MTP assistant: Q-only layers over the target's KV cache; head dims and KV heads are the target's."""

    layers: int = at_least(1)
    layer_pattern: LayerPattern
    hidden: int = at_least(1)
    intermediate: int = at_least(1)
    heads: int = at_least(1)
    head: DrafterHead
    context: int | None = at_least(1, default=None)  # its own context_length, where not the target's

    def layer_types(self) -> list[str]:
        return self.layer_pattern.expand()


@dataclass(frozen=True)
class HFRepos:
    target: str
    drafter: str
    # config.json "architectures" (what the converters register); the four first variants share these
    target_architecture: str = "Gemma4ForConditionalGeneration"
    drafter_architecture: str = "Gemma4AssistantForCausalLM"


@dataclass(frozen=True)
class Recommended:
    draft_length: int = at_least(1)
    target_quant: str
    drafter_quant: str


@dataclass(frozen=True)
class ParamsEstimate:
    """Parameter counts of the GGUF files as the exporter writes them (tied heads counted once, K/V of shared
    layers absent, a drafter's centroid head included); ``vision``/``audio``: the projector file's parts.

    ``target`` includes the per-layer-embedding table (``target_ple``), which llama.cpp can keep on the
    CPU; ``target_active`` is what one token touches on the GPU side: no PLE table, only top-k experts.
    """

    target: int
    target_ple: int
    target_active: int
    drafter: int
    vision: int
    audio: int

    @property
    def total(self) -> int:
        return self.target + self.drafter + self.vision + self.audio


@dataclass(frozen=True)
class Variant:
    name: str = map_key()
    # keyword-only, so it can stand first, where models.json has it (problems are reported in field order)
    aliases: tuple[str, ...] = dataclasses.field(default=(), kw_only=True)
    hf: HFRepos
    text: TextSpec
    vision: VisionSpec | None
    audio: AudioSpec | None
    drafter: DrafterSpec
    recommended: Recommended
    embedders: Embedders | None = None
    unconfirmed: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()

    @property
    def has_vision(self) -> bool:
        """Images go in through a vision tower or an embedder (either way the projector file's vision part)."""
        return self.vision is not None or bool(self.embedders and self.embedders.vision)

    @property
    def has_audio(self) -> bool:
        return self.audio is not None or bool(self.embedders and self.embedders.audio)

    def layer_types(self) -> list[str]:
        return self.text.layer_types()

    def kv_layers(self) -> list[int]:
        return self.text.kv_layers()

    def is_confirmed(self, path: str) -> bool:
        """False when ``path`` (e.g. "drafter.hidden") or a section above it is listed as unconfirmed."""
        return not any(path == u or path.startswith(u + ".") for u in self.unconfirmed)

    def params_estimate(self) -> ParamsEstimate:
        from .planning.layout import param_counts  # sums over the exporter's tensor tables (which sit above us)

        n = param_counts(self)
        return ParamsEstimate(
            target=n["target"],
            target_ple=n["target_ple"],
            target_active=n["target"] - n["target_ple"] - n["target_inactive"],
            drafter=n["drafter"],
            vision=n["vision"],
            audio=n["audio"],
        )


@dataclass(frozen=True, kw_only=True)
class ModelsFile:
    """models.json's top level as written (keyword-only so the fields keep the file's order, which is the
    order problems are looked for in)."""

    schema_version: int = at_least(1)
    family: str = FAMILY
    notes: str = ""
    sources: Mapping[str, str] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    variants: tuple[Variant, ...]


@dataclass(frozen=True)
class Registry:
    schema_version: int
    path: Path | None
    variants: tuple[Variant, ...]
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False, hash=False)
    family: str = FAMILY

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.variants]

    def __iter__(self) -> Iterator[Variant]:
        return iter(self.variants)

    def __len__(self) -> int:
        return len(self.variants)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._find(name) is not None

    def get(self, name: str) -> Variant:
        """Look a variant up by name, alias or HF repo id, case-insensitively ("e2b", "gemma-4-31B-it")."""
        found = self._find(name)
        if found is None:
            raise GgufMtpError(f"unknown model variant {name!r} (valid: {', '.join(self.names)})")
        return found

    get_variant = get

    def _find(self, name: str) -> Variant | None:
        key = name_key(name)
        for v in self.variants:
            if key in {name_key(v.name), *(name_key(a) for a in v.aliases)}:
                return v
        return None


# --- name lookup -----------------------------------------------------------------------------------

_ORG = "google/"
_PREFIXES = ("gemma-4-", "gemma4-", "gemma-4", "gemma4")
_SUFFIXES = ("-assistant", "-it")


def name_key(name: str) -> str:
    """Normalise a user's spelling: "google/gemma-4-E2B-it" -> "e2b", "26B_A4B" -> "26b-a4b"."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-").removeprefix(_ORG)
    for p in _PREFIXES:
        if key.startswith(p) and len(key) > len(p):
            key = key[len(p) :]
            break
    for s in _SUFFIXES:
        if key.endswith(s) and len(key) > len(s):
            key = key[: -len(s)]
    return key


# --- the schema, read off the dataclasses -------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One key of a section: its JSON type ("int", "float", "bool", "str", "str[]", "map:str",
    "map:<section>" or a section name, the dataclass's), whether it must be present, may be null, and its
    minimum."""

    name: str
    type: str
    required: bool = True
    nullable: bool = False
    min: float | None = None


# Python types of scalar fields -> their JSON type; a dataclass is a section, a tuple of them "map:<section>".
_JSON_TYPES: dict[Any, str] = {int: "int", float: "float", bool: "bool", str: "str", tuple[str, ...]: "str[]",
                               Mapping[str, str]: "map:str"}


def _map_key(cls: type) -> str | None:
    """The field holding the key a section is listed under (``map_key()``), if it has one."""
    return next((f.name for f in dataclasses.fields(cls) if f.metadata.get("map_key")), None)


def _section_of(hint: Any) -> type | None:
    """The dataclass a field's type holds (``X``, ``X | None`` or ``tuple[X, ...]``), if any."""
    candidates = [hint, *get_args(hint)]
    return next((c for c in candidates if isinstance(c, type) and dataclasses.is_dataclass(c)), None)


def _field_row(f: dataclasses.Field, hint: Any) -> Field:
    """``X | None`` without a default may be null; with one (``None``) it may only be left out."""
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    args = get_args(hint)
    optional = type(None) in args
    if optional:
        (hint,) = [a for a in args if a is not type(None)]
    section = _section_of(hint)
    if section is None:
        kind = _JSON_TYPES.get(hint)
    elif hint is section:
        kind = section.__name__
    else:
        kind = f"map:{section.__name__}" if get_origin(hint) is tuple and _map_key(section) else None
    if kind is None:
        raise TypeError(f"registry: field {f.name!r} has a type models.json cannot hold: {hint!r}")
    return Field(f.name, kind, required, optional and required, f.metadata.get("min"))


def _schema(root: type) -> dict[str, tuple[type, tuple[Field, ...]]]:
    """Section name (the class name) -> (dataclass, its fields), for ``root`` and every section below it."""
    table: dict[str, tuple[type, tuple[Field, ...]]] = {}
    todo = [root]
    while todo:
        cls = todo.pop(0)
        if cls.__name__ in table:
            continue
        hints = get_type_hints(cls)
        fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("map_key")]
        table[cls.__name__] = (cls, tuple(_field_row(f, hints[f.name]) for f in fields))
        todo += [c for c in (_section_of(hints[f.name]) for f in fields) if c is not None]
    return table


SCHEMA = _schema(ModelsFile)

_SCALARS: dict[str, Callable[[Any], bool]] = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "str[]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "str[]": "a list of strings"}


def _json_kind(v: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null",
            int: "integer", float: "number"}.get(type(v), type(v).__name__)


class _Parser:
    """Walks the JSON with SCHEMA, building dataclasses; the first problem raises a RegistryError."""

    def __init__(self, file: Path | None) -> None:
        self.file = file

    def fail(self, where: str, problem: str) -> RegistryError:
        return RegistryError(self.file, where, problem)

    def section(self, kind: str, obj: Any, where: str, **extra: Any) -> Any:
        cls, fields = SCHEMA[kind]
        if not isinstance(obj, dict):
            raise self.fail(where, f"expected an object, got {_json_kind(obj)}")
        known = {f.name for f in fields}
        for key in obj:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(known))})"
                raise self.fail(_join(where, key), f"unknown key{hint}")
        values: dict[str, Any] = dict(extra)
        for f in fields:
            at = _join(where, f.name)
            if f.name not in obj:
                if f.required:
                    raise self.fail(at, "missing field")
                continue
            values[f.name] = self.value(f, obj[f.name], at)
        return cls(**values)

    def value(self, f: Field, v: Any, at: str) -> Any:
        if v is None:
            if f.nullable:
                return None
            raise self.fail(at, f"expected {_TYPE_WORDS.get(f.type, 'an object')}, got null")
        if f.type.startswith("map:"):
            return self.mapping(f.type[4:], v, at)
        if f.type in SCHEMA:
            return self.section(f.type, v, at)
        if not _SCALARS[f.type](v):
            raise self.fail(at, f"expected {_TYPE_WORDS[f.type]}, got {_json_kind(v)} {json.dumps(v)[:40]}")
        if f.min is not None and v < f.min:
            raise self.fail(at, f"must be at least {f.min:g}, got {v}")
        if f.type == "float":
            return float(v)
        if f.type == "str[]":
            return tuple(v)
        return v

    def mapping(self, item: str, v: Any, at: str) -> Any:
        if not isinstance(v, dict):
            raise self.fail(at, f"expected an object, got {_json_kind(v)}")
        if item == "str":
            for k, x in v.items():
                if not isinstance(x, str):
                    raise self.fail(_join(at, k), f"expected a string, got {_json_kind(x)}")
            return MappingProxyType(dict(v))
        if not v:
            raise self.fail(at, "is empty")
        key = _map_key(SCHEMA[item][0])
        return tuple(self.section(item, x, _join(at, k), **{key: k}) for k, x in v.items())


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


# --- consistency rules (per variant; each yields (relative path, problem)) -----------------------------

Problems = Iterable[tuple[str, str]]


def _check_pattern(where: str, p: LayerPattern, layers: int, layers_field: str) -> Problems:
    bad = sorted(set(p.unit) - set(PATTERN_LETTERS))
    if not p.unit or bad:
        yield f"{where}.unit", f"must be a non-empty string of S (sliding) and F (full), got {p.unit!r}"
        return
    if len(p) != layers:
        yield where, f"covers {len(p)} layers ({p.unit!r} x {p.repeat}) but {layers_field} is {layers}"
    elif p.unit[-1] != "F":
        yield where, "the last layer must be a full-attention layer"


def _check_text(v: Variant) -> Problems:
    t = v.text
    yield from _check_pattern("text.layer_pattern", t.layer_pattern, t.layers, "text.layers")
    for kind in (SLIDING, FULL):
        kv = getattr(t.kv_heads, kind)
        if t.heads % kv:
            yield f"text.kv_heads.{kind}", f"text.heads ({t.heads}) is not divisible by {kind} kv heads ({kv})"
    if t.shared_kv_layers >= t.layers:
        yield "text.shared_kv_layers", f"must be below text.layers ({t.layers}), got {t.shared_kv_layers}"
    elif t.shared_kv_layers and len(t.layer_pattern) == t.layers:
        owners = set(t.layer_types()[: t.first_shared_layer])
        missing = sorted(set(t.layer_types()[t.first_shared_layer :]) - owners)
        if missing:
            yield "text.shared_kv_layers", f"no earlier {missing[0]} layer owns the KV that shared layers reuse"
    if not 0 < t.rope.full_partial_rotary_factor <= 1:
        yield "text.rope.full_partial_rotary_factor", "must be in (0, 1]"
    if t.moe is not None and t.moe.top_k > t.moe.experts:
        yield "text.moe.top_k", f"top_k ({t.moe.top_k}) exceeds experts ({t.moe.experts})"
    if t.sliding_window > t.context:
        yield "text.sliding_window", f"exceeds text.context ({t.context})"


def _check_drafter(v: Variant) -> Problems:
    d, t = v.drafter, v.text
    yield from _check_pattern("drafter.layer_pattern", d.layer_pattern, d.layers, "drafter.layers")
    if "S" not in d.layer_pattern.unit:
        yield "drafter.layer_pattern", "needs at least one sliding layer (llama.cpp refuses an all-full drafter)"
    for kind in (SLIDING, FULL):
        kv = getattr(t.kv_heads, kind)
        if d.heads % kv:
            yield "drafter.heads", f"drafter.heads ({d.heads}) is not divisible by the target's {kind} kv heads ({kv})"
    h = d.head
    if h.type not in HEAD_TYPES:
        yield "drafter.head.type", f"must be one of {', '.join(HEAD_TYPES)}, got {h.type!r}"
    elif h.type == "dense":
        extra = [k for k in ("clusters", "top_k") if getattr(h, k) is not None]
        if extra:
            yield f"drafter.head.{extra[0]}", "only a centroid head has clusters/top_k"
    elif h.clusters is None or h.top_k is None:
        yield f"drafter.head.{'clusters' if h.clusters is None else 'top_k'}", "missing field (centroid head)"
    elif h.top_k > h.clusters:
        yield "drafter.head.top_k", f"top_k ({h.top_k}) exceeds clusters ({h.clusters})"
    elif t.vocab % h.clusters:
        yield "drafter.head.clusters", f"text.vocab ({t.vocab}) is not divisible by clusters ({h.clusters})"


def _check_towers(v: Variant) -> Problems:
    e = v.embedders
    for part in ("vision", "audio"):
        if e is not None and getattr(e, part) is not None and getattr(v, part) is not None:
            yield f"embedders.{part}", f"a variant has a {part} tower or a {part} embedder, not both"
    if v.vision is not None and v.vision.projection_dim != v.text.hidden:
        yield "vision.projection_dim", f"must equal text.hidden ({v.text.hidden}), got {v.vision.projection_dim}"
    for name, tower in (("vision", v.vision), ("audio", v.audio)):
        if tower is not None and tower.width % tower.heads:
            yield f"{name}.heads", f"{name}.width ({tower.width}) is not divisible by {name}.heads ({tower.heads})"


def _check_meta(v: Variant) -> Problems:
    for role in ("target", "drafter"):
        repo = getattr(v.hf, role)
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
            yield f"hf.{role}", f"expected an 'owner/name' repo id, got {repo!r}"
    for role in ("target_quant", "drafter_quant"):
        q = getattr(v.recommended, role)
        if q not in KNOWN_QUANTS:
            close = difflib.get_close_matches(q, sorted(KNOWN_QUANTS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            yield f"recommended.{role}", f"unknown quant type {q!r}{hint}"
    for i, path in enumerate(v.unconfirmed):
        if not _schema_has(path):
            yield f"unconfirmed[{i}]", f"{path!r} names no field of a variant"


VARIANT_CHECKS: tuple[Callable[[Variant], Problems], ...] = (_check_text, _check_drafter, _check_towers, _check_meta)


def _schema_has(path: str) -> bool:
    """Whether a dotted path ("drafter.head.top_k") names a field of a variant in SCHEMA."""
    section = Variant.__name__
    for part in path.split("."):
        if section not in SCHEMA:  # descending below a scalar
            return False
        fields = {f.name: f.type for f in SCHEMA[section][1]}
        if part not in fields:
            return False
        section = fields[part]
    return True


def _check_registry(root: ModelsFile, fail: Callable[..., RegistryError]) -> None:
    seen: dict[str, str] = {}
    for v in root.variants:
        for rule in VARIANT_CHECKS:
            for where, problem in rule(v):
                raise fail(f"variants.{v.name}.{where}", problem)
        for i, s in enumerate(v.sources):
            if s not in root.sources:
                raise fail(f"variants.{v.name}.sources[{i}]", f"unknown source {s!r} (not in top-level sources)")
        for spelling in (v.name, *v.aliases):
            key = name_key(spelling)
            if seen.get(key, v.name) != v.name:
                raise fail(f"variants.{v.name}", f"name or alias {spelling!r} also names {seen[key]}")
            seen[key] = v.name


# --- loading ---------------------------------------------------------------------------------------------


def default_path() -> Path:
    """$GGUF_MTP_MODELS, else models.json at the repository root (beside the package), else package data."""
    env = os.environ.get(ENV_MODELS)
    if env:
        return Path(env).expanduser()
    here = Path(__file__).resolve().parent
    repo_root = here.parent / MODELS_FILE
    packaged = here / "data" / MODELS_FILE
    return repo_root if repo_root.is_file() or not packaged.is_file() else packaged


def parse_registry(data: Any, path: str | os.PathLike | None = None) -> Registry:
    """Validate an already-decoded models.json and build the Registry."""
    file = Path(path) if path is not None else None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if _SCALARS["int"](version) and version != SCHEMA_VERSION:  # before the keys, which may have changed
        raise RegistryError(file, "schema_version", f"is {version}, this gguf-mtp reads version {SCHEMA_VERSION}")
    parser = _Parser(file)
    root: ModelsFile = parser.section(ModelsFile.__name__, data, "")
    _check_registry(root, parser.fail)
    return Registry(schema_version=root.schema_version, path=file, variants=root.variants, sources=root.sources,
                    family=root.family)


def load_registry(path: str | os.PathLike | None = None) -> Registry:
    """Read and validate models.json (``path``, else $GGUF_MTP_MODELS, else the repo's models.json)."""
    file = Path(path) if path is not None else default_path()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        hint = f" (set by ${ENV_MODELS})" if path is None and os.environ.get(ENV_MODELS) else ""
        raise RegistryError(file, "", f"model registry not found{hint}") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise RegistryError(file, "", f"cannot read model registry: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RegistryError(file, "", f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    return parse_registry(data, file)


def get_variant(name: str, registry: Registry | None = None) -> Variant:
    """A variant by name or alias from ``registry`` (default: the registry ``load_registry()`` finds)."""
    return (registry if registry is not None else load_registry()).get(name)


__all__ = [
    "AudioEmbedderSpec", "AudioSpec", "DrafterHead", "DrafterSpec", "Embedders", "Field", "HFRepos", "KVHeads",
    "LayerPattern", "MoESpec", "ParamsEstimate", "Recommended", "Registry", "RegistryError", "RopeSpec", "SCHEMA",
    "SCHEMA_VERSION", "TextSpec", "Variant", "VisionEmbedderSpec", "VisionSpec", "default_path", "get_variant",
    "load_registry", "name_key", "parse_registry",
]
