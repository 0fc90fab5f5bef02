"""Where a checkpoint is and what it is: a directory, or a repo id in the local Hugging Face cache (offline).

``config.json`` alone decides the kind (``architectures`` first, then ``model_type``): a Gemma 4 target
(multimodal or text-only, with the prefix its text weights live under) or an MTP drafter. Provenance
(``source``, ``revision``) never contains a machine's paths, so exports are byte-identical everywhere.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..registry_config import check_config
from ..errors import GgufMtpError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Kind:
    """One checkpoint layout we export: the role it plays and where its text weights live."""

    name: str  # "target-multimodal", "target-text", "target-unified", "drafter", "drafter-unified"
    role: str  # keys.ROLES
    text_config: bool  # the text hyper-parameters sit under config["text_config"]
    prefixes: tuple[str, ...]  # candidate prefixes of the text model's weights, first match wins
    skip_prefixes: tuple[str, ...] = ()  # towers / embedders another file carries (the projector)
    text_model: str = "gemma4_text"  # the transformers text model (hparams.TEXT_MODELS: defaults, fields it lacks)
    suppress_tokens: bool = False  # generation_config.json's suppress_tokens go into the GGUF (upstream: 12B only)


# --- the checkpoints we know, by HF architecture and by model_type ------------------------------------
KINDS = {
    "Gemma4ForConditionalGeneration": Kind(
        "target-multimodal", "target", True, ("model.language_model.", "model."),
        ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio."),
    ),
    "Gemma4ForCausalLM": Kind("target-text", "target", False, ("model.", "model.language_model.")),
    "Gemma4AssistantForCausalLM": Kind("drafter", "drafter", True, ("model.",)),
    # Gemma 4 12B: no PLE, no MoE, transformer-less vision/audio embedders (the projector file's; saved as
    # model.vision_embedder.* + model.embed_vision.embedding_projection, transformers renames them on load)
    "Gemma4UnifiedForConditionalGeneration": Kind(
        "target-unified", "target", True, ("model.language_model.",),
        ("model.vision_embedder.", "model.embed_vision.", "model.embed_audio."),
        text_model="gemma4_unified_text", suppress_tokens=True,
    ),
    "Gemma4UnifiedAssistantForCausalLM": Kind("drafter-unified", "drafter", True, ("model.",),
                                              text_model="gemma4_unified_text"),
}
MODEL_TYPES = {
    "gemma4": "Gemma4ForConditionalGeneration",
    "gemma4_text": "Gemma4ForCausalLM",
    "gemma4_assistant": "Gemma4AssistantForCausalLM",
    "gemma4_unified": "Gemma4UnifiedForConditionalGeneration",
    "gemma4_unified_assistant": "Gemma4UnifiedAssistantForCausalLM",
}


@dataclass
class Source:
    """A located checkpoint: its directory, config and kind, and provenance for the GGUF."""

    path: Path
    config: dict[str, Any]
    architecture: str
    kind: Kind
    source: str  # repo id, or the directory's name
    revision: str | None  # commit hash when known

    @property
    def role(self) -> str:
        return self.kind.role

    @property
    def text_config(self) -> dict[str, Any]:
        """The text model's hyper-parameters (root keys overlaid by text_config, as transformers reads them)."""
        if not self.kind.text_config:
            return dict(self.config)
        text = self.config.get("text_config")
        if not isinstance(text, dict):
            raise GgufMtpError(f"{self.path / 'config.json'}: {self.architecture} needs a text_config object")
        return dict(text)

    @property
    def text_model(self) -> str:
        """The kind's transformers text model, checked against text_config.model_type (which transformers follows
        for assistants): a mismatch would export one model's weights under the other's rules."""
        text = self.config.get("text_config") if self.kind.text_config else None
        model_type = text.get("model_type", self.kind.text_model) if isinstance(text, dict) else self.kind.text_model
        if model_type != self.kind.text_model:
            raise GgufMtpError(f"{self.path / 'config.json'}: text_config.model_type: {self.architecture} has a "
                               f"{self.kind.text_model} text model, got {str(model_type)[:40]!r}")
        return self.kind.text_model

    def suppress_tokens(self) -> list[int] | None:
        """generation_config.json's ``suppress_tokens`` for kinds whose GGUF carries them (None: none to write).

        llama.cpp reads them as an INT32 array and masks them in its samplers; it drops ids outside the
        vocabulary itself. An empty list writes no key (as upstream)."""
        if not self.kind.suppress_tokens:
            return None
        path = self.path / "generation_config.json"
        if not path.is_file():
            return None
        try:
            ids = json.loads(path.read_text(encoding="utf-8")).get("suppress_tokens")
        except (UnicodeDecodeError, ValueError, RecursionError, AttributeError) as e:
            raise GgufMtpError(f"{path}: not a JSON object ({e})") from None
        if ids is None or ids == []:
            return None
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31
                                                for i in ids):
            raise GgufMtpError(f"{path}: suppress_tokens: expected a list of token ids (0 to 2^31-1), "
                               f"got {str(ids)[:60]}")
        return list(ids)


def hub_cache() -> Path:
    """HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub (huggingface_hub's own order)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _from_cache(spec: str) -> tuple[Path, str, str]:
    """repo id (optionally @revision) -> (snapshot dir, repo id, commit) from the local cache, offline."""
    repo_id, _, rev = spec.partition("@")
    rev = rev or "main"
    cache = hub_cache()
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    if not repo_dir.is_dir():
        raise GgufMtpError(f"{spec!r} is neither a directory nor a model in the local Hugging Face cache ({cache}); "
                           f"gguf-mtp works offline: download it first (hf download {repo_id})")
    commit = rev
    ref = repo_dir / "refs" / rev
    if ref.is_file():
        commit = ref.read_text().strip()
    snapshot = repo_dir / "snapshots" / commit
    if not snapshot.is_dir():
        raise GgufMtpError(f"{repo_id}: revision {rev!r} is not in the local Hugging Face cache ({repo_dir})")
    return snapshot, repo_id, commit


def _provenance(path: Path) -> tuple[str, str | None]:
    """(source, revision) of a plain directory: a cache snapshot path or an ``hf download --local-dir`` copy."""
    parts = path.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--") and COMMIT.match(parts[-1]):
        return parts[-3][len("models--"):].replace("--", "/"), parts[-1]
    meta = path / ".cache" / "huggingface" / "download" / "config.json.metadata"
    if meta.is_file():
        first = meta.read_text(errors="replace").splitlines()[:1]
        if first and COMMIT.match(first[0].strip()):
            return path.resolve().name, first[0].strip()
    return path.resolve().name, None


def read_config(path: Path) -> dict[str, Any]:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise GgufMtpError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: also ints of > 4300 digits
        raise GgufMtpError(f"{cfg}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise GgufMtpError(f"{cfg}: expected a JSON object")
    return data


def detect(config: dict[str, Any], where: Path) -> tuple[str, Kind]:
    """The HF architecture name and our Kind for a config (architectures first, then model_type)."""
    archs = config.get("architectures") or []
    archs = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    arch = next((a for a in archs if a in KINDS), None)
    model_type = config.get("model_type")
    if arch is None and isinstance(model_type, str) and model_type in MODEL_TYPES:
        arch = MODEL_TYPES[model_type]
    if arch is None:
        got = ", ".join(archs) if archs else f"model_type {str(model_type)[:40]!r}"
        raise GgufMtpError(f"{where / 'config.json'}: unknown architecture {got} "
                           f"(expected one of {', '.join(KINDS)})")
    return arch, KINDS[arch]


def locate(src: str | os.PathLike) -> Source:
    """Find SRC (a checkpoint directory or a cached repo id) and classify it from its config.json."""
    spec = os.fspath(src)
    p = Path(spec).expanduser()
    if p.is_dir():
        path = p
        source, revision = _provenance(p)
    elif p.exists():
        raise GgufMtpError(f"{spec}: expected a checkpoint directory, got a file")
    elif REPO_ID.match(spec):
        path, source, revision = _from_cache(spec)
    else:
        raise GgufMtpError(f"{spec}: no such directory")
    config = read_config(path)
    arch, kind = detect(config, path)
    # a released variant's config.json must agree with what the registry is certain of (tiny/foreign: unchecked)
    check_config(config, kind.role, source=source)
    return Source(path, config, arch, kind, source, revision)
