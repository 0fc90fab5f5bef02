"""transformers' embeddings of an audio clip, the reference libmtmd's must match (``Projector.embeddings``).

Both sides get the same PCM (mono float32 at 16 kHz, as ``multimodal.read_pcm`` makes it); each runs its own
feature step from there, so the comparison covers the features as well as the encoder and the projection:

- gemma4 (E2B / E4B): ``Gemma4AudioFeatureExtractor`` (log-mel) -> the conformer ``audio_tower`` ->
  ``embed_audio``; llama.cpp: gemma4a's own mel code and graph.
- gemma4_unified (12B): ``Gemma4UnifiedAudioFeatureExtractor`` (raw 640-sample frames) -> ``embed_audio``
  (RMSNorm + projection); llama.cpp: gemma4ua.

The feature extractor is built from the checkpoint's processor_config.json when it has one (the sizes the export
reads), else with the class defaults; the model comes from ``transformers_reference.load_model``. Needs the dev
extra (torch, transformers).

Images (``image_embeddings``): both sides get the same RGB pixels at a size neither resizes. Gemma4(Unified)
ImageProcessor needs torchvision, so its steps are done here: rescale (and normalize) with the checkpoint's
values, then the patches of ``transformers_reference.image_inputs``; the unified (12B) processor's merged 3x3
groups of 16-pixel patches are exactly 48-pixel patches in (row, col, channel) order at (x, y) = merged position.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000  # what both Gemma 4 audio feature extractors and llama.cpp's gemma4a / gemma4ua take
FEATURE_EXTRACTORS = {  # config.json model_type -> transformers feature extractor class
    "gemma4": "Gemma4AudioFeatureExtractor",
    "gemma4_unified": "Gemma4UnifiedAudioFeatureExtractor",
}


def feature_extractor(model_dir: str | Path):
    """The checkpoint's audio feature extractor (processor_config.json's ``feature_extractor`` part, if any)."""
    import transformers

    model_dir = Path(model_dir)
    model_type = json.loads((model_dir / "config.json").read_text())["model_type"]
    if model_type not in FEATURE_EXTRACTORS:
        raise ValueError(f"{model_dir}: expected a model_type with audio ({', '.join(FEATURE_EXTRACTORS)}), "
                         f"got {model_type!r}")
    cls = getattr(transformers, FEATURE_EXTRACTORS[model_type])
    return cls(**_sub_processor(model_dir, "feature_extractor"))


def _sub_processor(model_dir: Path, part: str) -> dict:
    """One sub-processor's saved fields: nested under ``part`` in processor_config.json (transformers 5), or a
    flat preprocessor_config.json of that type; {} when the checkpoint has neither."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = model_dir / name
        if path.is_file():
            data = json.loads(path.read_text())
            fields = data.get(part, data if f"{part}_type" in data else {})
            return {k: v for k, v in fields.items() if k not in (f"{part}_type", "processor_class")}
    return {}


def audio_embeddings(model, model_dir: str | Path, pcm: np.ndarray) -> np.ndarray:
    """The embeddings transformers puts in place of the clip's audio soft tokens, shape (n_tokens, n_embd)."""
    import torch

    fe = feature_extractor(model_dir)
    inputs = fe([pcm.astype(np.float32)], sampling_rate=SAMPLE_RATE, return_tensors="pt")  # a batch of one
    with torch.no_grad():
        out = model.model.get_audio_features(inputs["input_features"], inputs["input_features_mask"])
    emb = out.pooler_output[0]
    valid = out.attention_mask[0] if out.attention_mask is not None else torch.ones(emb.shape[0], dtype=torch.bool)
    return emb[valid.to(torch.bool)].float().numpy()


# --- images -------------------------------------------------------------------------------------------
# Gemma4ImageProcessor's and Gemma4UnifiedImageProcessor's class defaults beyond the pixel scale (export's table)
IMAGE_PATCH_DEFAULTS = {"patch_size": 16, "pooling_kernel_size": 3, "max_soft_tokens": 280}
IMAGE_PATCHES = {  # config.json model_type -> (patch_size, pooling) -> the patches get_image_features takes
    "gemma4": lambda p, k: {"patch_size": p, "pooling_kernel_size": k},  # the tower pools k x k itself
    "gemma4_unified": lambda p, k: {"patch_size": p * k, "pooling_kernel_size": 1},  # the processor merges k x k
}


def image_processor(model_dir: str | Path) -> dict:
    """The checkpoint's image processor settings (processor_config.json's ``image_processor`` over the defaults)."""
    from gguf_mtp.export.projector import IMAGE_DEFAULTS

    return {**IMAGE_DEFAULTS, **IMAGE_PATCH_DEFAULTS, **_sub_processor(Path(model_dir), "image_processor")}


def processor_size(height: int, width: int, proc: dict) -> tuple[int, int]:
    """(height, width) the image processor resizes an image to: the aspect ratio kept, each side floored to a
    multiple of patch * pooling, the area scaled to max_soft_tokens pooled patches (small images grow).
    A side that floors to 0 is set otherwise upstream; here it only has to differ from the input's."""
    p, k = proc["patch_size"], proc["pooling_kernel_size"]
    factor = math.sqrt(proc["max_soft_tokens"] * (k * p) ** 2 / (height * width))
    return (math.floor(factor * height / (p * k)) * p * k, math.floor(factor * width / (p * k)) * p * k)


def image_embeddings(model, model_dir: str | Path, image: np.ndarray) -> np.ndarray:
    """The embeddings transformers puts in place of an image's soft tokens, shape (n_tokens, n_embd).

    ``image``: (height, width, 3) uint8 RGB at a size the processor keeps (else ValueError: a resize here would
    be torchvision's bicubic, not llama.cpp's)."""
    import torch

    from gguf_mtp import transformers_reference as reference

    model_dir = Path(model_dir)
    proc = image_processor(model_dir)
    height, width, _ = image.shape
    if processor_size(height, width, proc) != (height, width):
        raise ValueError(f"{height}x{width}: the image processor would resize it to "
                         f"{'x'.join(map(str, processor_size(height, width, proc)))}; expected a size it keeps")
    pixels = image.astype(np.float32).transpose(2, 0, 1) * np.float32(proc["rescale_factor"])
    if proc["do_normalize"]:
        mean, std = (np.asarray(proc[k], np.float32).reshape(3, 1, 1) for k in ("image_mean", "image_std"))
        pixels = (pixels - mean) / std
    p, k = proc["patch_size"], proc["pooling_kernel_size"]
    model_type = json.loads((model_dir / "config.json").read_text())["model_type"]
    vision = IMAGE_PATCHES[model_type](p, k)
    patches, positions, n_soft = reference.image_inputs(vision, height, width, image=pixels)
    with torch.no_grad():
        out = model.model.get_image_features(patches, positions)
    emb = out.pooler_output[0].float().numpy()
    if emb.shape[0] != n_soft:
        raise ValueError(f"expected {n_soft} image embeddings, got {emb.shape[0]}")
    return emb

