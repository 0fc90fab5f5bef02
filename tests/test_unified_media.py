"""The 12B's image embedder (tiny-unified, gemma4uv): libmtmd loads our projector export and embeds an image, and
the embeddings equal transformers' ``get_image_features`` within a measured bound (docs/export.md).

Both sides see the same pixels: a PNG (lossless) at sizes neither resizes. llama.cpp's gemma4uv keeps any image
whose sides are multiples of 48 with 70..1120 soft tokens; Gemma4UnifiedImageProcessor keeps one that fills its
max_soft_tokens budget (tiny-unified: 70), so every size here has exactly 70 48x48 patches. The pixels are only
scaled by 1/255 on both sides (the checkpoint's processor: do_normalize false; the file: mean 0, std 1).
The audio half (gemma4ua) is compared in test_audio.py, the E2B-style image path in test_export_projector.py.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from fixtures.unified import UNIFIED

SIZES = ((480, 336), (336, 480), (672, 240))  # (width, height): 10x7, 7x10, 14x5 patches of 48: 70 soft tokens
# relative L2 distance of libmtmd's image embeddings from transformers' (bound, by the projector's outtype).
# Measured (3 sizes): f32 <= 4.4e-7 (float error), f16 <= 3.9e-4 (F16 patch and projection matrices).
TOLERANCE = {"f32": 2e-6, "f16": 1e-3}

pytestmark = pytest.mark.reference


def random_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png(image: np.ndarray) -> bytes:
    pil = pytest.importorskip("PIL.Image", reason="needs the dev extra (pillow)")
    buf = io.BytesIO()
    pil.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def reference(export_src):
    """(transformers' tiny-unified target, its directory, media_reference)."""
    media_reference = pytest.importorskip("gguf_mtp.media_reference", reason="needs the dev extra (torch)")
    from gguf_mtp.transformers_reference import load_model

    src = export_src / UNIFIED / "target"
    return load_model(src), src, media_reference


@pytest.fixture(scope="module")
def mtmd(projectors, unified_engines):
    """outtype -> a function image -> libmtmd's embeddings through our projector export of that outtype."""
    from gguf_mtp.runtime.multimodal import Projector

    loaded: dict = {}

    def embed(outtype: str, image: np.ndarray) -> np.ndarray:
        if outtype not in loaded:
            loaded[outtype] = Projector.load(projectors.get(outtype, UNIFIED), unified_engines.get(UNIFIED, False))
        proj = loaded[outtype]
        img = proj.image_from_bytes(png(image), "noise.png")
        try:
            return proj.embeddings(img)
        finally:
            img.close()

    yield embed
    for proj in loaded.values():
        proj.close()


def rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("outtype", list(TOLERANCE))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_image_embeddings_match_transformers(mtmd, reference, size, outtype):
    model, src, media_reference = reference
    image = random_image(*size)
    got = mtmd(outtype, image)
    want = media_reference.image_embeddings(model, src, image)
    assert got.shape == want.shape == (size[0] * size[1] // 48**2, model.config.text_config.hidden_size)
    rel = rel_l2(got, want)
    print(f"{size[0]}x{size[1]} {outtype}: rel L2 {rel:.2e}, max-abs {np.abs(got - want).max():.2e} "
          f"of {np.abs(want).max():.2f}")
    assert rel < TOLERANCE[outtype]


def test_the_bound_sees_a_patch_layout_error(mtmd, reference):
    """The same image mirrored (every patch's pixels and the patch order wrong) is far outside the bound."""
    model, src, media_reference = reference
    image = random_image(*SIZES[0])
    mirrored = media_reference.image_embeddings(model, src, np.ascontiguousarray(image[:, ::-1]))
    assert rel_l2(mtmd("f32", image), mirrored) > 100 * TOLERANCE["f32"]


def test_reference_refuses_a_size_the_processor_would_resize(reference):
    """144x96 (6 patches) is grown to the 70-token budget by transformers' processor (torchvision bicubic) and by
    libmtmd (its own bicubic): not the same pixels, so the reference refuses it rather than compare them."""
    model, src, media_reference = reference
    proc = media_reference.image_processor(src)
    assert proc["max_soft_tokens"] == 70 and not proc["do_normalize"]
    assert all(media_reference.processor_size(h, w, proc) == (h, w) for w, h in SIZES)
    assert media_reference.processor_size(96, 144, proc) == (288, 480)
    with pytest.raises(ValueError, match="would resize it to 288x480"):
        media_reference.image_embeddings(model, src, random_image(144, 96))
