"""Images through the vision projector (libmtmd), decoded into the target's KV cache with MTP kept on.

A prompt with images is rendered as text holding libmtmd's media marker where each image goes (llama-server's
way); ``mtmd_tokenize`` splits it into text chunks and image chunks (``<|image>`` + soft tokens + ``<image|>`` for
gemma4v). ``MediaPrompt.tokens`` stands for the whole prompt position by position: text ids, and for each image
position an *identity id* (negative, from the image's SHA-256), so the engine's prefix reuse (``engine.tokens``)
finds an image it already holds and never mistakes one image for another.

Decoding: text runs go through ``engine.decode``; an image chunk is encoded by the projector and its embeddings
decoded on the target context (``mtmd_helper_decode_image_chunk``: positions, and non-causal attention over the
image where the model asks for it). The target's nextn (hidden-state) output is on for every batch, and a chat
prompt always ends with text after its images, so the loop reads the drafter's input ``h`` from the last text row
exactly as for a text-only prompt: MTP drafting goes on after an image (llama-cpp-python's example server turns it
off for multimodal prompts; llama-server keeps it on).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .. import pairing
from ..errors import GgufMtpError
from ..settings import RuntimeSettings
from ..llama_ext import LLAMA_LOG, error_lines
from ..llama_ext import llama as backend_init
from .bindings import FLASH_ATTN_IDS, llama
from .engine import Engine

log = logging.getLogger("gguf_mtp.runtime")

TOKENIZE_ERRORS = {1: "the number of images does not match the media markers in the prompt",
                   2: "the image could not be preprocessed"}


def _mtmd():
    from llama_cpp import mtmd_cpp

    return mtmd_cpp


def identity_id(sha256: str) -> int:
    """The id standing for every position of one image in ``engine.tokens``: negative, so never a token."""
    return -1 - int(sha256[:15], 16)


@dataclass(eq=False)
class Image:
    """A decoded picture held by libmtmd (RGB bitmap), ready to go into any number of prompts."""

    source: str  # file name, for messages
    sha256: str
    width: int
    height: int
    _bitmap: int | None = field(default=None, repr=False)

    @property
    def identity(self) -> int:
        return identity_id(self.sha256)

    def close(self) -> None:
        if self._bitmap:
            _mtmd().mtmd_bitmap_free(self._bitmap)
        self._bitmap = None


@dataclass
class ImageSpan:
    start: int  # first position of the image's soft tokens in the prompt
    n_tokens: int
    chunk: int = field(repr=False)  # mtmd_input_chunk (owned by the prompt's chunk list)
    image: Image | None = None


class Projector:
    """libmtmd's context for the target: the vision encoder that turns images into the target's embeddings.

    Placement follows ``settings.mmproj_on_gpu`` (on a CPU-only build libmtmd runs on the CPU anyway).
    """

    def __init__(self, path: Path, engine: Engine, ctx: int) -> None:
        self.path, self.engine, self.ctx = path, engine, ctx
        mt = _mtmd()
        self.marker = (mt.mtmd_get_marker(ctx) or mt.mtmd_default_marker()).decode("utf-8")

    @classmethod
    def load(cls, path: str | Path, engine: Engine, settings: RuntimeSettings | None = None) -> Projector:
        """Check the projector against the engine's target (``projector_dim``), then load it."""
        path = Path(path)
        settings = settings or engine.settings
        pairing.require_compatible(pairing.facts_from_gguf(engine.target_path), None, pairing.facts_from_gguf(path))
        mt = _mtmd()
        backend_init()
        mt.mtmd_helper_log_set(LLAMA_LOG.callback, None)  # libmtmd's log joins llama.cpp's (quiet unless -v)
        params = mt.mtmd_context_params_default()
        params.use_gpu = settings.mmproj_on_gpu
        params.print_timings = False
        params.flash_attn_type = FLASH_ATTN_IDS[settings.flash_attn]
        if settings.threads:
            params.n_threads = settings.threads
        with LLAMA_LOG.capture() as lines:
            ctx = mt.mtmd_init_from_file(str(path).encode(), engine.model, params)
        if not ctx:
            raise GgufMtpError(f"{path}: libmtmd could not load it ({error_lines(lines) or 'no reason logged'})")
        if not mt.mtmd_support_vision(ctx):
            mt.mtmd_free(ctx)
            raise GgufMtpError(f"{path}: this projector has no vision encoder")
        return cls(path, engine, ctx)

    def close(self) -> None:
        if self.ctx:
            _mtmd().mtmd_free(self.ctx)
        self.ctx = 0

    def __enter__(self) -> Projector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- images ---------------------------------------------------------------------------------------
    def load_image(self, path: str | Path) -> Image:
        """Read and decode an image file (jpg, png, bmp, gif, ... as stb_image reads them)."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise GgufMtpError(f"image {path} does not exist") from None
        except IsADirectoryError:
            raise GgufMtpError(f"image {path} is a directory") from None
        return self.image_from_bytes(data, str(path))

    def image_from_bytes(self, data: bytes, source: str = "image") -> Image:
        mt = _mtmd()
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        with LLAMA_LOG.capture() as lines:
            wrapper = mt.mtmd_helper_bitmap_init_from_buf_wrapper(self.ctx, buf, len(data), False,
                                                                  mt.mtmd_helper_init_opt_default())
        if not wrapper.bitmap:
            raise GgufMtpError(f"{source}: not an image libmtmd can read"
                               f"{' (' + error_lines(lines) + ')' if error_lines(lines) else ''}")
        if mt.mtmd_bitmap_is_audio(wrapper.bitmap):
            mt.mtmd_bitmap_free(wrapper.bitmap)
            raise GgufMtpError(f"{source}: audio is not supported, only images")
        sha = hashlib.sha256(data).hexdigest()
        mt.mtmd_bitmap_set_id(wrapper.bitmap, sha.encode())
        return Image(source, sha, mt.mtmd_bitmap_get_nx(wrapper.bitmap), mt.mtmd_bitmap_get_ny(wrapper.bitmap),
                     wrapper.bitmap)

    # --- prompts --------------------------------------------------------------------------------------
    def tokenize(self, text: str, images: Sequence[Image]) -> MediaPrompt:
        """Split rendered text (one marker per image, in order) into text and image chunks."""
        mt = _mtmd()
        eng = self.engine
        if eng.adds_bos:
            bos = eng.piece(eng.bos, special=True).decode("utf-8", errors="replace")
            if bos and not text.startswith(bos):
                text = bos + text
        data = text.encode("utf-8")
        inp = mt.mtmd_input_text(data, len(data), False, True)
        bitmaps = (mt.mtmd_bitmap_p_ctypes * max(1, len(images)))(*[im._bitmap for im in images])
        chunks = mt.mtmd_input_chunks_init()
        with LLAMA_LOG.capture() as lines:
            rc = mt.mtmd_tokenize(self.ctx, chunks, ctypes.byref(inp), bitmaps, len(images))
        prompt = MediaPrompt([], [], chunks)
        if rc != 0:
            prompt.close()
            why = TOKENIZE_ERRORS.get(rc, f"error code {rc}")
            raise GgufMtpError(f"libmtmd could not tokenize the prompt: {why}"
                               f"{' (' + error_lines(lines) + ')' if error_lines(lines) else ''}")
        by_sha = {im.sha256: im for im in images}
        for i in range(mt.mtmd_input_chunks_size(chunks)):
            chunk = mt.mtmd_input_chunks_get(chunks, i)
            kind = mt.mtmd_input_chunk_get_type(chunk)
            if kind == mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mt.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                prompt.tokens += [int(ptr[j]) for j in range(n.value)]
                continue
            if kind != mt.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                prompt.close()
                raise GgufMtpError("only images are supported as media")
            sha = (mt.mtmd_input_chunk_get_id(chunk) or b"").decode()
            n_tok = int(mt.mtmd_input_chunk_get_n_tokens(chunk))
            prompt.spans.append(ImageSpan(len(prompt.tokens), n_tok, chunk, by_sha.get(sha)))
            prompt.tokens += [identity_id(sha)] * n_tok
        prompt.projector = self
        return prompt


@dataclass
class MediaPrompt:
    """A tokenized prompt with images: what ``speculative_generate(..., media=)`` decodes."""

    tokens: list[int]  # text ids; image positions hold the image's identity id
    spans: list[ImageSpan]
    _chunks: int | None = field(default=None, repr=False)
    projector: Projector | None = field(default=None, repr=False)
    encoded: int = 0  # image tokens encoded and decoded by the last ``decode``

    @property
    def image_tokens(self) -> int:
        return sum(s.n_tokens for s in self.spans)

    def close(self) -> None:
        if self._chunks:
            _mtmd().mtmd_input_chunks_free(self._chunks)
        self._chunks = None

    def __enter__(self) -> MediaPrompt:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def image_at(self, pos: int) -> ImageSpan | None:
        """The first image not wholly before position ``pos`` (the next one to decode from there), or None."""
        return next((s for s in self.spans if s.start + s.n_tokens > pos), None)

    def resumable(self, keep: int) -> int:
        """``keep`` (a reusable cached prefix), moved back to an image's start when it ends inside the image: an
        image is decoded whole or not at all."""
        s = self.image_at(keep)
        return s.start if s is not None and s.start < keep else keep

    def problems(self, n_ubatch: int) -> list[str]:
        """Why this prompt cannot be decoded, as "media: ..." lines (empty when it can)."""
        if self._chunks is None or self.projector is None:
            return ["media: expected an open MediaPrompt from Projector.tokenize, got a closed one"]
        out = []
        if not self.tokens or (self.spans and self.spans[-1].start + self.spans[-1].n_tokens == len(self.tokens)):
            out.append("media: a prompt cannot end with an image: nothing to continue from")
        out += [f"media: {p}" for s in self.spans if (p := self._batch_problem(s, n_ubatch))]
        return out

    def _batch_problem(self, s: ImageSpan, n_ubatch: int) -> str | None:
        if _mtmd().mtmd_decode_use_non_causal(self.projector.ctx, s.chunk) and s.n_tokens > n_ubatch:
            return (f"an image of {s.n_tokens} tokens must be decoded in one batch: raise --ubatch-size and "
                    f"--batch-size to at least {s.n_tokens} (now {n_ubatch})")
        return None

    def reuse_prefix(self, engine: Engine) -> int:
        """``engine.reuse_prefix``, moved back to an image's start when the common prefix ends inside it."""
        keep = engine.reuse_prefix(self.tokens)
        back = self.resumable(keep)
        if back != keep:
            keep = back if engine.can_rewind_to(back) else 0
            engine.truncate(keep)
        return keep

    def decode(self, engine: Engine, start: int) -> int:
        """Decode positions ``start..`` (text runs and whole images); returns the rows of the last text decode."""
        if engine.n_past != start:
            raise ValueError(f"the cache holds {engine.n_past} positions, decoding from {start}")
        problems = self.problems(int(llama.llama_n_ubatch(engine.ctx)))
        if problems:
            raise GgufMtpError("; ".join(p.removeprefix("media: ") for p in problems))
        self.encoded = 0
        pos = start
        while (s := self.image_at(pos)) is not None:
            if s.start > pos:
                engine.decode(self.tokens[pos:s.start], outputs="none")
            self._decode_image(engine, s)
            pos = s.start + s.n_tokens
        return engine.decode(self.tokens[pos:], outputs="last")

    def _decode_image(self, engine: Engine, s: ImageSpan) -> None:
        if engine.n_past + s.n_tokens > engine.n_ctx:
            raise GgufMtpError(f"context full: an image of {s.n_tokens} tokens at position {engine.n_past} does not "
                               f"fit n_ctx {engine.n_ctx}")
        try:
            self.eval_image(s, engine.ctx, engine.n_past, 0, engine.n_batch)
        except GgufMtpError:
            engine.drop_unrecorded()
            raise
        engine.record_decoded(self.tokens[s.start], s.n_tokens)

    def eval_image(self, s: ImageSpan, lctx: int, n_past: int, seq: int, n_batch: int) -> None:
        """Encode image ``s`` and decode its embeddings into sequence ``seq`` of target context ``lctx`` at
        positions n_past.. (libmtmd's helper: its own llama_decode, non-causal over the image where the projector
        asks; ``problems`` says whether it fits one ubatch). The caller owns the KV bookkeeping: on failure it
        drops the cells the decode may have left, on success it records the positions (Engine / BatchEngine)."""
        mt = _mtmd()
        ctx = self.projector.ctx
        with LLAMA_LOG.capture() as lines:
            if mt.mtmd_encode_chunk(ctx, s.chunk) != 0:
                raise GgufMtpError(f"the projector could not encode {s.image.source if s.image else 'an image'}"
                                   f" ({error_lines(lines) or 'no reason logged'})")
            new_past = llama.llama_pos(0)
            rc = mt.mtmd_helper_decode_image_chunk(ctx, lctx, s.chunk, mt.mtmd_get_output_embd(ctx), n_past, seq,
                                                   n_batch, ctypes.byref(new_past),
                                                   mt.mtmd_helper_post_decode_callback(), None)
        if rc != 0:
            raise GgufMtpError(f"target decode of an image failed (code {rc}) at position {n_past}"
                               f" ({error_lines(lines) or 'no reason logged'})")
        self.encoded += s.n_tokens
