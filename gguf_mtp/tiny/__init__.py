"""Tiny, deterministic Gemma 4 checkpoints (target + MTP drafter) in the Hugging Face layout.

Every test in the project runs on these. ``make_tiny_models(outdir)`` writes, per family,
``outdir/<family>/target`` and ``outdir/<family>/drafter`` (config.json, model.safetensors,
generation_config.json, tokenizer files, chat_template.jinja; a target with a vision part also
processor_config.json, every sub-processor nested as transformers 5 saves it). Building needs numpy, tokenizers
and sentencepiece only (no torch) and takes well under a second per family.

Families (see ``configs.FAMILIES`` for every number):

- ``tiny-e``: E2B-style. Per-layer embeddings, KV-shared layers, double-wide MLP on shared layers,
  sliding/full layers with different head dims; Gemma4ForConditionalGeneration with a tiny vision tower and
  a tiny audio tower (the E2B conformer, mel feature extractor); drafter with the centroid (masked-embedding) head.
- ``tiny-dense``: 31B-style. attention_k_eq_v full layers, fewer global KV heads than sliding KV heads,
  no PLE, no shared KV; text-only Gemma4ForCausalLM; dense-head drafter.
- ``tiny-moe``: 26B-A4B-style. MoE block beside the dense MLP; Gemma4ForConditionalGeneration layout
  without a vision tower; ships a sentencepiece ``tokenizer.model`` INSTEAD of tokenizer.json; config.json
  in the form transformers' save_pretrained writes (``per_layer_config`` instead of ``global_head_dim``).
- ``tiny-q``: every matrix row a multiple of 256 so llama.cpp k-quants (Q4_K, Q6_K) apply; text-only;
  weights stored as **bf16** (all other families are f32).
- ``tiny-unified``: 12B-style (google/gemma-4-12B-it). Gemma4UnifiedForConditionalGeneration + its
  Gemma4UnifiedAssistantForCausalLM drafter; (5 sliding + 1 full) x 2 layers, config.json in save_pretrained
  form (per_layer_config); transformer-less vision embedder (raw 48x48 patches) and audio embedder (raw 640-sample
  frames); image tokens attend bidirectionally (use_bidirectional_attention "vision", driven by
  mm_token_type_ids); the target's generation_config.json carries ``suppress_tokens``.

transformers 5.23.0 quirks these files work around (tests/test_tiny_models.py checks each):

- The unified vision weights are written under the released checkpoint's names (``model.vision_embedder.*``,
  ``model.embed_vision.embedding_projection``): llama.cpp's converter maps only those, and transformers renames
  them on load (conversion_mapping.py). Its own module names (``embed_vision.patch_ln1`` ...) would not convert.
- The unified text config keeps a null ``moe_intermediate_size``: the upstream converter requires the key.
- Gemma4Processor / Gemma4UnifiedProcessor need an image processor, a feature extractor and a video processor
  even for one modality; Gemma4UnifiedImageProcessor and both video processors need torchvision.
- Gemma4AudioConfig: ``subsampling_conv_channels[0]`` must equal the 128 mel bins (input_proj_linear is sized
  from it); Gemma4AudioFeatureExtractor needs a list of clips, not a bare 1-D array.
- The assistants' all-shared text configs (and 0-shared targets) need patches/transformers' kv_sharing_modes fix,
  for Gemma4UnifiedTextConfig too.

Same seed, same bytes: tensors draw from per-name generators, tokenizer training is deterministic, JSON is
written with fixed key order.

``speed_pair`` builds one more pair on these pieces: a ~130M-parameter target and a drafter
constructed to agree with it, where MTP's speed-up shows on a CPU (``gguf-mtp demo``, bench/bench_speed_pair.py).
"""

from __future__ import annotations

import json
import operator
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GgufMtpError
from ..fsutil import TMP_PREFIX
from . import configs, tokenizer, weights
from .configs import FAMILIES, FamilySpec

__all__ = ["FAMILIES", "FamilySpec", "make_tiny_models", "build_family"]

# role -> (config.json builder, tensor list builder)
ROLES = {
    "target": (configs.target_config, weights.target_specs),
    "drafter": (configs.drafter_config, weights.drafter_specs),
}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


# (role, tensors by name) -> the tensors to write: lets a caller shape the random weights (speed_pair.py)
Adjust = Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]


def _write_role(spec: FamilySpec, role: str, directory: Path, seed: int, adjust: Adjust | None = None) -> None:
    directory.mkdir(parents=True)
    make_config, make_specs = ROLES[role]
    _write_json(directory / "config.json", make_config(spec))
    _write_json(directory / "generation_config.json", configs.generation_config(spec, role))
    if role == "target" and spec.vision is not None:  # processor_config.json holds every media sub-processor
        _write_json(directory / "processor_config.json", configs.processor_config(spec))
    tensors = weights.materialize(make_specs(spec), seed, f"{spec.name}/{role}")
    if adjust is not None:
        tensors = adjust(role, tensors)
    weights.write_safetensors(directory / "model.safetensors", tensors, spec.dtype)
    tokenizer.write_tokenizer(directory, spec.tokenizer)


def build_family(spec: FamilySpec, directory: Path, seed: int = 0, adjust: Adjust | None = None) -> Path:
    """Write ``directory/target`` and ``directory/drafter`` for one family (``directory`` must not exist).

    ``adjust`` sees each role's tensors (target first) before they are written and returns what to write.
    """
    configs.check_layout(spec.target_text, "target")
    configs.check_layout(spec.drafter_text, "drafter")
    configs.check_pair(spec.target_text, spec.drafter_text)
    for role in ROLES:
        _write_role(spec, role, directory / role, seed, adjust)
    return directory


def make_tiny_models(outdir: str | os.PathLike, seed: int = 0, families: list[str] | None = None,
                     force: bool = False) -> dict[str, Path]:
    """Build the tiny checkpoints under ``outdir`` (created if missing); returns family -> its directory.

    Each family directory appears whole or not at all (built in a temp directory, then renamed). An
    existing family directory is an error unless ``force``, which replaces it.
    """
    if isinstance(families, str):
        families = [families]
    names = list(FAMILIES) if families is None else list(dict.fromkeys(families))
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise GgufMtpError(f"unknown family {unknown[0]!r} (expected one of: {', '.join(FAMILIES)})")
    try:
        ok = operator.index(seed) >= 0
    except TypeError:
        ok = False
    if not ok:
        raise GgufMtpError(f"seed must be a non-negative integer, got {seed!r}")
    seed = operator.index(seed)
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise GgufMtpError(f"output path {out} is not a directory")
    if not force:
        for name in names:
            if (out / name).exists():
                raise GgufMtpError(f"{out / name} exists (use --force to overwrite)")
    out.mkdir(parents=True, exist_ok=True)

    built = {}
    for name in names:
        final = out / name
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out))
        try:
            build_family(FAMILIES[name], tmp / "family", seed)
            if final.exists():  # force: move the old one aside first, drop it after the swap
                old = tmp / "old"
                os.replace(final, old)
            os.replace(tmp / "family", final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        built[name] = final
    return built
