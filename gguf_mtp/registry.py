"""The Gemma 4 family as data: ``models.json`` loaded into frozen dataclasses, checked on load.

Every number the exporter, planner and runtime need about a variant (layer pattern, KV sharing, drafter
shape, recommended quants) lives in one JSON file, so a new variant is a data change, not a code change.
The file is validated against the field tables below (one table per section) and a short list of
consistency rules; any problem is one ``GgufMtpError`` line that names the file and the key path.
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
from typing import Any

from .errors import GgufMtpError

SCHEMA_VERSION = 1
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


# --- the dataclasses ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerPattern:
    """A compact layer pattern: ``unit`` (S = sliding, F = full) repeated ``repeat`` times."""

    unit: str
    repeat: int

    def __len__(self) -> int:
        return len(self.unit) * self.repeat

    def expand(self) -> list[str]:
        """The per-layer list of "sliding"/"full"."""
        return [PATTERN_LETTERS[c] for c in self.unit] * self.repeat


@dataclass(frozen=True)
class KVHeads:
    sliding: int
    full: int


@dataclass(frozen=True)
class RopeSpec:
    sliding_base: float
    full_base: float
    full_partial_rotary_factor: float


@dataclass(frozen=True)
class MoESpec:
    experts: int
    top_k: int
    expert_ffn: int


@dataclass(frozen=True)
class TextSpec:
    """The target's text tower, in the terms llama.cpp's gemma4 loader uses."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: KVHeads
    head_dim: int
    global_head_dim: int
    layer_pattern: LayerPattern
    sliding_window: int
    shared_kv_layers: int
    ple_dim: int
    double_wide_mlp: bool
    attention_k_eq_v: bool
    moe: MoESpec | None
    vocab: int
    context: int
    final_logit_softcap: float | None
    rope: RopeSpec
    rms_eps: float

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
    width: int
    layers: int
    heads: int
    head_dim: int
    ffn: int
    patch_size: int
    image_size: int
    pooling_kernel: int
    position_embeddings: int
    projection_dim: int


@dataclass(frozen=True)
class AudioSpec:
    width: int
    layers: int
    heads: int
    ffn: int
    output_dim: int


@dataclass(frozen=True)
class DrafterHead:
    """The drafter's LM head: tied "dense", or "centroid" (score ``top_k`` of ``clusters`` token groups)."""

    type: str
    clusters: int | None = None
    top_k: int | None = None


@dataclass(frozen=True)
class DrafterSpec:
    """The MTP assistant: Q-only layers over the target's KV cache; head dims and KV heads are the target's."""

    layers: int
    layer_pattern: LayerPattern
    hidden: int
    intermediate: int
    heads: int
    head: DrafterHead

    def layer_types(self) -> list[str]:
        return self.layer_pattern.expand()


@dataclass(frozen=True)
class HFRepos:
    target: str
    drafter: str


@dataclass(frozen=True)
class Recommended:
    draft_length: int
    target_quant: str
    drafter_quant: str


@dataclass(frozen=True)
class ParamsEstimate:
    """Approximate parameter counts of the GGUF files (tied heads counted once, K/V of shared layers absent).

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
    name: str
    hf: HFRepos
    text: TextSpec
    vision: VisionSpec | None
    audio: AudioSpec | None
    drafter: DrafterSpec
    recommended: Recommended
    aliases: tuple[str, ...] = ()
    unconfirmed: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()

    def layer_types(self) -> list[str]:
        return self.text.layer_types()

    def kv_layers(self) -> list[int]:
        return self.text.kv_layers()

    def is_confirmed(self, path: str) -> bool:
        """False when ``path`` (e.g. "drafter.hidden") or a section above it is listed as unconfirmed."""
        return not any(path == u or path.startswith(u + ".") for u in self.unconfirmed)

    def params_estimate(self) -> ParamsEstimate:
        target, ple, inactive = _text_params(self.text)
        return ParamsEstimate(
            target=target,
            target_ple=ple,
            target_active=target - ple - inactive,
            drafter=_drafter_params(self.drafter, self.text),
            vision=_vision_params(self.vision) if self.vision else 0,
            audio=_audio_params(self.audio) if self.audio else 0,
        )


@dataclass(frozen=True)
class Registry:
    schema_version: int
    path: Path | None
    variants: tuple[Variant, ...]
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False, hash=False)
    family: str = "gemma4"

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


# --- the schema: one field table per section ---------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One key of a section: its JSON type ("int", "float", "bool", "str", "str[]", "map:str",
    "map:<section>" or a section name), whether it must be present, may be null, and its minimum."""

    name: str
    type: str
    required: bool = True
    nullable: bool = False
    min: float | None = None


def _fields(*rows: tuple) -> tuple[Field, ...]:
    return tuple(Field(*row) for row in rows)


#         name                  type            required nullable min
SCHEMA: dict[str, tuple[type | None, tuple[Field, ...]]] = {
    "root": (None, _fields(
        ("schema_version",      "int",          True,  False, 1),
        ("family",              "str",          False),
        ("notes",               "str",          False),
        ("sources",             "map:str",      False),
        ("variants",            "map:variant",  True),
    )),
    "variant": (Variant, _fields(
        ("aliases",             "str[]",        False),
        ("hf",                  "hf",           True),
        ("text",                "text",         True),
        ("vision",              "vision",       True,  True),
        ("audio",               "audio",        True,  True),
        ("drafter",             "drafter",      True),
        ("recommended",         "recommended",  True),
        ("unconfirmed",         "str[]",        False),
        ("sources",             "str[]",        False),
    )),
    "hf": (HFRepos, _fields(
        ("target",              "str",          True),
        ("drafter",             "str",          True),
    )),
    "text": (TextSpec, _fields(
        ("layers",              "int",          True,  False, 1),
        ("hidden",              "int",          True,  False, 1),
        ("intermediate",        "int",          True,  False, 1),
        ("heads",               "int",          True,  False, 1),
        ("kv_heads",            "kv_heads",     True),
        ("head_dim",            "int",          True,  False, 1),
        ("global_head_dim",     "int",          True,  False, 1),
        ("layer_pattern",       "layer_pattern", True),
        ("sliding_window",      "int",          True,  False, 1),
        ("shared_kv_layers",    "int",          True,  False, 0),
        ("ple_dim",             "int",          True,  False, 0),
        ("double_wide_mlp",     "bool",         True),
        ("attention_k_eq_v",    "bool",         True),
        ("moe",                 "moe",          True,  True),
        ("vocab",               "int",          True,  False, 1),
        ("context",             "int",          True,  False, 1),
        ("final_logit_softcap", "float",        True,  True,  0),
        ("rope",                "rope",         True),
        ("rms_eps",             "float",        True,  False, 0),
    )),
    "kv_heads": (KVHeads, _fields(
        ("sliding",             "int",          True,  False, 1),
        ("full",                "int",          True,  False, 1),
    )),
    "layer_pattern": (LayerPattern, _fields(
        ("unit",                "str",          True),
        ("repeat",              "int",          True,  False, 1),
    )),
    "rope": (RopeSpec, _fields(
        ("sliding_base",        "float",        True,  False, 0),
        ("full_base",           "float",        True,  False, 0),
        ("full_partial_rotary_factor", "float", True,  False, 0),
    )),
    "moe": (MoESpec, _fields(
        ("experts",             "int",          True,  False, 1),
        ("top_k",               "int",          True,  False, 1),
        ("expert_ffn",          "int",          True,  False, 1),
    )),
    "vision": (VisionSpec, _fields(
        ("width",               "int",          True,  False, 1),
        ("layers",              "int",          True,  False, 1),
        ("heads",               "int",          True,  False, 1),
        ("head_dim",            "int",          True,  False, 1),
        ("ffn",                 "int",          True,  False, 1),
        ("patch_size",          "int",          True,  False, 1),
        ("image_size",          "int",          True,  False, 1),
        ("pooling_kernel",      "int",          True,  False, 1),
        ("position_embeddings", "int",          True,  False, 1),
        ("projection_dim",      "int",          True,  False, 1),
    )),
    "audio": (AudioSpec, _fields(
        ("width",               "int",          True,  False, 1),
        ("layers",              "int",          True,  False, 1),
        ("heads",               "int",          True,  False, 1),
        ("ffn",                 "int",          True,  False, 1),
        ("output_dim",          "int",          True,  False, 1),
    )),
    "drafter": (DrafterSpec, _fields(
        ("layers",              "int",          True,  False, 1),
        ("layer_pattern",       "layer_pattern", True),
        ("hidden",              "int",          True,  False, 1),
        ("intermediate",        "int",          True,  False, 1),
        ("heads",               "int",          True,  False, 1),
        ("head",                "drafter_head", True),
    )),
    "drafter_head": (DrafterHead, _fields(
        ("type",                "str",          True),
        ("clusters",            "int",          False, False, 1),
        ("top_k",               "int",          False, False, 1),
    )),
    "recommended": (Recommended, _fields(
        ("draft_length",        "int",          True,  False, 1),
        ("target_quant",        "str",          True),
        ("drafter_quant",       "str",          True),
    )),
}

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
        return values if cls is None else cls(**values)

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
        return tuple(self.section(item, x, _join(at, k), name=k) for k, x in v.items())


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
    section = "variant"
    for part in path.split("."):
        if section not in SCHEMA:  # descending below a scalar
            return False
        fields = {f.name: f.type for f in SCHEMA[section][1]}
        if part not in fields:
            return False
        section = fields[part]
    return True


def _check_registry(root: dict[str, Any], variants: tuple[Variant, ...], fail: Callable[..., RegistryError]) -> None:
    sources = root.get("sources", {})
    seen: dict[str, str] = {}
    for v in variants:
        for rule in VARIANT_CHECKS:
            for where, problem in rule(v):
                raise fail(f"variants.{v.name}.{where}", problem)
        for i, s in enumerate(v.sources):
            if s not in sources:
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
    root = parser.section("root", data, "")
    variants: tuple[Variant, ...] = root["variants"]
    _check_registry(root, variants, parser.fail)
    return Registry(
        schema_version=root["schema_version"],
        path=file,
        variants=variants,
        sources=root.get("sources", MappingProxyType({})),
        family=root.get("family", "gemma4"),
    )


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


# --- parameter estimates (GGUF view: what llama.cpp loads) -------------------------------------------------


def _text_params(t: TextSpec) -> tuple[int, int, int]:
    """(all text weights, of which the PLE table, of which experts not used per token)."""
    e = t.hidden
    ple_table = t.vocab * t.layers * t.ple_dim
    n = t.vocab * e + e  # tied token_embd + output_norm
    if t.ple_dim:
        n += ple_table + e * t.layers * t.ple_dim + t.ple_dim  # table, model projection, projection norm
    inactive = 0
    for i, kind in enumerate(t.layer_types()):
        hd, kv = t.head_dim_of(i), t.kv_heads_of(i)
        n += 2 * e * t.heads * hd + 2 * hd + 4 * e + 1  # q, o, q/k norms, 4 norms, layer scale
        if i < t.first_shared_layer:
            n += e * kv * hd * (1 if kind == FULL and t.attention_k_eq_v else 2)  # k (+ v)
        n += 3 * e * t.ffn_of(i)
        if t.ple_dim:
            n += 2 * e * t.ple_dim + e
        if t.moe:
            experts = t.moe.experts * 3 * e * t.moe.expert_ffn
            n += experts + e * t.moe.experts + e + t.moe.experts + 3 * e  # router, scales, extra norms
            inactive += experts * (t.moe.experts - t.moe.top_k) // t.moe.experts
    return n, ple_table, inactive


def _drafter_params(d: DrafterSpec, t: TextSpec) -> int:
    h, eb = d.hidden, t.hidden
    n = t.vocab * h + h + 3 * eb * h  # tied head, output_norm, pre (2*Eb -> h) and post (h -> Eb) projections
    if d.head.type == "centroid" and d.head.clusters:
        n += d.head.clusters * h
    for kind in d.layer_types():
        hd = t.global_head_dim if kind == FULL else t.head_dim
        n += 2 * h * d.heads * hd + hd + 3 * h * d.intermediate + 4 * h + 1
    return n


def _vision_params(v: VisionSpec) -> int:
    w, inner = v.width, v.heads * v.head_dim
    n = 3 * v.patch_size**2 * w + 2 * v.position_embeddings * w
    n += v.layers * (4 * w * inner + 2 * v.head_dim + 3 * w * v.ffn + 4 * w)
    return n + w * v.projection_dim


def _audio_params(a: AudioSpec) -> int:
    """Conformer: two macaron FFNs, attention + relative-position projection, light conv, output projection."""
    w = a.width
    per_layer = 2 * 2 * w * a.ffn + 5 * w * w + 3 * w * w + 10 * w
    return a.layers * per_layer + w * w + w * a.output_dim


__all__ = [
    "AudioSpec", "DrafterHead", "DrafterSpec", "Field", "HFRepos", "KVHeads", "LayerPattern", "MoESpec",
    "ParamsEstimate", "Recommended", "Registry", "RegistryError", "RopeSpec", "SCHEMA", "SCHEMA_VERSION",
    "TextSpec", "Variant", "VisionSpec", "default_path", "get_variant", "load_registry", "name_key",
    "parse_registry",
]
