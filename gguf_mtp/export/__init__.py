"""Export Gemma 4 targets and MTP drafters from Hugging Face checkpoints to GGUF files llama.cpp loads.

``convert(src, out)`` is the whole job: locate SRC (directory or cached repo id), read config.json and the
tokenizer, check everything llama.cpp would refuse or abort on (layer layout, shapes, pairing with
``target``), then stream the tensors into ``out`` atomically. ``describe(src)`` builds the metadata a
conversion would write without touching weights (used to pair a drafter with an HF target).
Pieces meant for reuse by other exporters: safetensors.SafetensorsReader, source.locate, writer.write_gguf.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import keys, pairing
from ..errors import GgufMtpError, IncompatiblePair
from ..fsutil import check_output_path
from . import metadata as md
from .hparams import DrafterHparams, TextHparams, drafter_hparams, text_hparams
from .tensors import checkpoint_outtype, plan_tensors
from .safetensors import SafetensorsReader
from .source import Source, locate
from .tables import FILE_TYPES, OUTTYPES
from .tokenizer import Vocab, load_vocab
from .writer import Progress, ProgressFn, size_label, write_gguf

__all__ = ["ConvertResult", "Described", "OUTTYPE_CHOICES", "Progress", "convert", "describe", "target_facts"]

OUTTYPE_CHOICES = ("auto", *OUTTYPES)


@dataclass
class Described:
    """What a conversion of ``source`` would write, short of the tensors."""

    source: Source
    arch: str
    text: TextHparams
    drafter: DrafterHparams | None
    vocab: Vocab
    metadata: md.Metadata

    def facts(self) -> pairing.ModelFacts:
        return pairing.facts_from_metadata(self.metadata.plain(), self.vocab.token_bytes())


@dataclass
class ConvertResult:
    output: str
    arch: str
    role: str
    kind: str
    source: str
    revision: str | None
    outtype: str
    n_tensors: int
    n_bytes: int
    features: list[str]
    ignored: dict[str, int] = field(default_factory=dict)
    paired_with: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def features(hp: TextHparams, drafter: DrafterHparams | None = None, centroids: bool = False) -> list[str]:
    """The family traits the tensor table was expanded for (for reports)."""
    if drafter is not None:
        return ["centroid_head"] if centroids else []
    flags = {"ple": hp.ple_dim > 0, "shared_kv": hp.n_shared_kv > 0, "double_wide_mlp": hp.double_wide,
             "moe": hp.moe, "k_eq_v": hp.k_eq_v, "untied_head": not hp.tied}
    return [k for k, v in flags.items() if v]


def describe(src: str | os.PathLike | Source, *, centroids: bool = False) -> Described:
    """Parse and check SRC's config and tokenizer; build the metadata its GGUF would carry (file type F32 until
    ``convert`` knows the tensors)."""
    s = src if isinstance(src, Source) else locate(src)
    where = str(s.path / "config.json")
    if s.role == "drafter":
        d = drafter_hparams(s.config, where, s.text_model)
        if centroids and not d.ordered_embeddings:
            raise GgufMtpError(f"{where}: --centroids: this drafter has no centroid head "
                               "(use_ordered_embeddings is false)")
        text, arch = d.text, keys.ARCH_DRAFTER
    else:
        d = None
        tied = s.config.get("tie_word_embeddings") if s.kind.text_config else None
        text = text_hparams(s.text_config, where, tied=tied if isinstance(tied, bool) else None,
                            text_model=s.text_model)
        arch = keys.ARCH_TARGET
        problems = pairing.layout_problems(text.layout, text.n_shared_kv)
        if problems:  # llama.cpp would abort the whole process at context creation
            raise GgufMtpError(f"{where}: layer layout {text.layout} with {text.n_shared_kv} KV-shared layers cannot "
                               "run in llama.cpp: " + "; ".join(p.message for p in problems))
    vocab = load_vocab(s.path, s.config)
    meta = md.model_keys(arch, s.source.rsplit("/", 1)[-1], text, d, vocab, s.source, s.revision, s.role, centroids,
                         s.suppress_tokens())
    return Described(s, arch, text, d, vocab, meta)


def target_facts(target: str | os.PathLike) -> pairing.ModelFacts:
    """Pairing facts of a target given as a GGUF file or as an HF checkpoint (metadata only, nothing written)."""
    p = Path(target).expanduser()
    if p.is_file():
        return pairing.facts_from_gguf(p)
    described = describe(target)
    if described.source.role != "target":
        raise GgufMtpError(f"--target {target}: expected a Gemma 4 target, got a {described.source.kind.name}")
    return described.facts()


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    outtype: str = "auto",
    target: str | os.PathLike | None = None,
    centroids: bool = False,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> ConvertResult:
    """Convert one checkpoint (target or drafter) to ``out``; nothing is written unless every check passes.

    ``outtype``: auto (the checkpoint's dtype), f32, f16, bf16 or q8_0. ``target`` (drafters only): a GGUF or
    HF target to validate the pair against. ``centroids``: keep a drafter's centroid head (needs our patched
    llama.cpp to load). ``progress`` is called after every block of tensor data written.
    """
    check_output_path(out, force)
    if outtype not in OUTTYPE_CHOICES:
        raise GgufMtpError(f"--outtype: expected one of {', '.join(OUTTYPE_CHOICES)}, got {outtype!r}")
    s = locate(src)
    if target is not None and s.role != "drafter":
        raise GgufMtpError(f"--target pairs a drafter with its target, but {src} is a {s.kind.name}")
    described = describe(s, centroids=centroids)
    if target is not None:
        problems = pairing.check_set(target_facts(target), described.facts(), runtime_centroids=centroids)
        if problems:
            raise IncompatiblePair(f"{src} does not pair with {target}: " + "; ".join(str(p) for p in problems))
    reader = SafetensorsReader.from_directory(s.path)
    try:
        prefix = next((p for p in s.kind.prefixes if p + "embed_tokens.weight" in reader), s.kind.prefixes[0])
        qtype = checkpoint_outtype(outtype, reader, prefix + "embed_tokens.weight")  # auto: the embedding's dtype
        plan = plan_tensors(reader, prefix, described.text, len(described.vocab), qtype,
                            drafter=described.drafter, centroids=centroids, skip_prefixes=s.kind.skip_prefixes)
        meta = described.metadata
        meta.finish(FILE_TYPES[qtype], size_label(plan.tensors))
        n_bytes = write_gguf(out, meta, plan.tensors, force=force, progress=progress)
    finally:
        reader.close()
    return ConvertResult(
        output=str(out), arch=described.arch, role=s.role, kind=s.kind.name, source=s.source,
        revision=s.revision, outtype=qtype.name, n_tensors=len(plan.tensors), n_bytes=n_bytes,
        features=features(described.text, described.drafter, centroids), ignored=plan.ignored,
        paired_with=os.fspath(target) if target is not None else None,
    )
