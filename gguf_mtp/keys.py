"""GGUF names that gguf-mtp owns or relies on: one place, so writer, checker, inspector and planner agree.

See docs/contracts.md. llama.cpp's key names are gguf-py's ``Keys`` table (``gguf.constants``), re-exported here as
``Keys``: ``Keys.LLM.BLOCK_COUNT`` is the template ``"{arch}.block_count"``, expanded with :func:`arch_key`. Keys it
lacks (the centroid head's, our own provenance and pairing keys) are defined below. No other module spells a key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from gguf import Keys

__all__ = ["Keys", "arch_key", "vocab_sha256"]

# --- architectures -------------------------------------------------------------------------------
ARCH_TARGET = "gemma4"
ARCH_DRAFTER = "gemma4-assistant"
ARCH_PROJECTOR = "clip"

# --- provenance and pairing keys of our own ------------------------------------------------------
VERSION = "gguf_mtp.version"
SOURCE = "gguf_mtp.source"
SOURCE_REVISION = "gguf_mtp.source_revision"
ROLE = "gguf_mtp.role"
PAIR_TARGET_HIDDEN = "gguf_mtp.pair.target_hidden"
PAIR_VOCAB_SHA256 = "gguf_mtp.pair.vocab_sha256"

ROLES = ("target", "drafter", "projector")

# --- centroid-clustered drafter head (E2B/E4B drafters) -----------------------------------------
CENTROIDS_TENSOR = "masked_embd_centroids.weight"  # F32/F16, ggml shape {drafter hidden, clusters}
ORDERING_TENSOR = "masked_embd_ordering"  # I32, ggml shape {vocab}
CENTROID_COUNT = "{arch}.centroid_count"  # u32
CENTROID_TOP_K = "{arch}.centroid_top_k"  # u32


# --- llama.cpp keys gguf-py 0.19.0's table lacks (the vendored gguf-py spells it Keys.Tokenizer.SUPPRESS_TOKENS) --
TOKENIZER_SUPPRESS_TOKENS = getattr(Keys.Tokenizer, "SUPPRESS_TOKENS", "tokenizer.ggml.suppress_tokens")  # INT32[]

# --- clip.cpp keys gguf-py's table lacks (tools/mtmd/clip-impl.h) ----------------------------------------
CLIP_VISION_HEAD_COUNT_KV = "clip.vision.attention.head_count_kv"
CLIP_VISION_HEAD_DIM = "clip.vision.attention.head_dim"

# --- what llama.cpp's quantizer records about an importance matrix (tools/quantize/quantize.cpp) ----------
IMATRIX_KEYS = {
    "file": "quantize.imatrix.file",
    "dataset": "quantize.imatrix.dataset",
    "entries": "quantize.imatrix.entries_count",
    "chunks": "quantize.imatrix.chunks_count",
}

# --- synthetic, never written: the planner keeps a vocabulary's size instead of its token list ----------
N_TOKENS = "tokenizer.ggml.n_tokens"


def arch_key(template: str, arch: str) -> str:
    """Expand an ``{arch}.name`` template (llama.cpp's convention); keys without ``{arch}`` come back as they are."""
    return template.format(arch=arch)


def vocab_sha256(tokens: Iterable[str | bytes]) -> str:
    """SHA-256 over every token's UTF-8 bytes followed by one NUL byte, in id order.

    The same hash is computed from any GGUF's token list, so upstream files without our keys can be
    paired as well as ours.
    """
    h = hashlib.sha256()
    for tok in tokens:
        h.update(tok if isinstance(tok, bytes) else tok.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()
