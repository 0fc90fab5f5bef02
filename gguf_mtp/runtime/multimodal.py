"""Images and audio through the projector (libmtmd), decoded into the target's KV cache with MTP kept on.

A prompt with media is rendered as text holding libmtmd's media marker where each image or audio clip goes
(llama-server's way); ``mtmd_tokenize`` splits it into text chunks and media chunks (``<|image>`` + soft tokens +
``<image|>`` for gemma4v; ``<|audio>`` + soft tokens + ``<audio|>`` for gemma4a / gemma4ua, one chunk per 30 s of
audio). ``MediaPrompt.tokens`` stands for the whole prompt position by position: text ids, and for each media
position an *identity id* (negative, from the file's SHA-256), so the engine's prefix reuse (``engine.tokens``)
finds an image or a clip it already holds and never mistakes one for another.

Audio: libmtmd takes mono float PCM at the projector's sample rate (``mtmd_get_audio_sample_rate``: 16 kHz for
Gemma 4) and does the rest itself (gemma4a: log-mel frames; gemma4ua: raw 640-sample frames). Files are read by
soundfile (libsndfile: WAV, FLAC, OGG, ...), channels averaged, and resampled with soxr when their rate differs.

Decoding: text runs go through ``engine.decode``; a media chunk is encoded by the projector and its embeddings
decoded on the target context (``mtmd_helper_decode_image_chunk``, for audio chunks too: positions, and
non-causal attention over the chunk where the model asks for it). Those embedding batches write the target's KV
cells, which the MTP drafter reads (it shares them), and a chat prompt always ends with text after its media, so
the loop reads the drafter's input ``h`` from the last text row exactly as for a text-only prompt: MTP drafting
goes on after an image or an audio clip (llama-cpp-python's example server turns it off for multimodal prompts;
llama-server keeps it on).
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import pairing
from ..errors import GgufMtpError
from ..settings import RuntimeSettings
from ..llama_ext import LLAMA_LOG, error_lines
from ..llama_ext import llama as backend_init
from .bindings import FLASH_ATTN_IDS, llama
from .engine import Engine

log = logging.getLogger("gguf_mtp.runtime")

TOKENIZE_ERRORS = {1: "the number of images and audio clips does not match the media markers in the prompt",
                   2: "an image or audio clip could not be preprocessed"}


def _mtmd():
    from llama_cpp import mtmd_cpp

    return mtmd_cpp


def identity_id(sha256: str) -> int:
    """The id standing for every position of one image or clip in ``engine.tokens``: negative, so never a token."""
    return -1 - int(sha256[:15], 16)


@dataclass(eq=False)
class Media:
    """An image or audio clip held by libmtmd (a bitmap), ready to go into any number of prompts."""

    source: str  # file name, for messages
    sha256: str
    _bitmap: int | None = field(repr=False)

    what = "media"  # how messages name it

    @property
    def identity(self) -> int:
        return identity_id(self.sha256)

    def close(self) -> None:
        if self._bitmap:
            _mtmd().mtmd_bitmap_free(self._bitmap)
        self._bitmap = None


@dataclass(eq=False)
class Image(Media):
    """A decoded picture (RGB bitmap)."""

    width: int = 0
    height: int = 0

    what = "an image"

    def describe(self) -> str:
        return f"image {self.source}, {self.width}x{self.height}"


@dataclass(eq=False)
class Audio(Media):
    """A clip as mono float PCM at the projector's rate; ``source_rate``: the file's."""

    samples: int = 0
    rate: int = 0
    source_rate: int = 0

    what = "an audio clip"

    @property
    def seconds(self) -> float:
        return self.samples / self.rate if self.rate else 0.0

    def describe(self) -> str:
        resampled = f", resampled from {self.source_rate} Hz" if self.source_rate != self.rate else ""
        return f"audio {self.source}, {self.seconds:.2f} s at {self.rate} Hz{resampled}"


def read_media_file(path: str | Path, what: str) -> bytes:
    """A media file's bytes, or one error naming it."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise GgufMtpError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise GgufMtpError(f"{what} {path} is a directory") from None
    except PermissionError:
        raise GgufMtpError(f"{what} {path} cannot be read (permission denied)") from None


def read_pcm(data: bytes, rate: int, source: str = "audio") -> tuple[np.ndarray, int]:
    """The mono float32 samples of an audio file at ``rate`` Hz (channels averaged, resampled by soxr when the
    file's rate differs), and the file's own rate."""
    import soundfile
    import soxr

    try:
        frames, file_rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except soundfile.LibsndfileError as e:
        raise GgufMtpError(f"{source}: not an audio file soundfile can read (WAV, FLAC, ...): "
                           f"{e.error_string.rstrip('.')}") from None
    except (RuntimeError, ValueError, TypeError) as e:
        raise GgufMtpError(f"{source}: not an audio file soundfile can read (WAV, FLAC, ...): {e}") from None
    if not frames.size:
        raise GgufMtpError(f"{source}: the audio holds no samples")
    mono = frames.mean(axis=1, dtype=np.float32)
    if file_rate != rate:
        mono = soxr.resample(mono, file_rate, rate)
    return np.ascontiguousarray(mono, dtype=np.float32), int(file_rate)


@dataclass
class MediaSpan:
    start: int  # first position of the chunk's soft tokens in the prompt
    n_tokens: int
    chunk: int = field(repr=False)  # mtmd_input_chunk (owned by the prompt's chunk list)
    what: str  # how messages name it (Image.what / Audio.what)
    media: Media | None = None


class Projector:
    """libmtmd's context for the target: the vision and/or audio encoders that turn media into the target's
    embeddings (``vision``, ``audio``: which this projector has; ``sample_rate``: the PCM rate audio must have).

    Placement follows ``settings.mmproj_on_gpu`` (on a CPU-only build libmtmd runs on the CPU anyway).
    """

    def __init__(self, path: Path, engine: Engine, ctx: int) -> None:
        self.path, self.engine, self.ctx = path, engine, ctx
        mt = _mtmd()
        self.marker = (mt.mtmd_get_marker(ctx) or mt.mtmd_default_marker()).decode("utf-8")
        self.vision = bool(mt.mtmd_support_vision(ctx))
        self.audio = bool(mt.mtmd_support_audio(ctx))
        self.sample_rate = int(mt.mtmd_get_audio_sample_rate(ctx)) if self.audio else 0

    @property
    def kinds(self) -> str:
        """What it takes, for messages: "vision", "audio" or "vision, audio"."""
        return ", ".join(k for k, on in (("vision", self.vision), ("audio", self.audio)) if on)

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
        if not (mt.mtmd_support_vision(ctx) or mt.mtmd_support_audio(ctx)):
            mt.mtmd_free(ctx)
            raise GgufMtpError(f"{path}: this projector has neither a vision nor an audio encoder")
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
        return self.image_from_bytes(read_media_file(path, "image"), str(path))

    def image_from_bytes(self, data: bytes, source: str = "image") -> Image:
        if not self.vision:
            raise GgufMtpError(f"{source}: {self.path.name} has no vision encoder (it takes {self.kinds})")
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
            raise GgufMtpError(f"{source}: this is audio, not an image (send it as audio)")
        sha = hashlib.sha256(data).hexdigest()
        mt.mtmd_bitmap_set_id(wrapper.bitmap, sha.encode())
        return Image(source, sha, wrapper.bitmap, mt.mtmd_bitmap_get_nx(wrapper.bitmap),
                     mt.mtmd_bitmap_get_ny(wrapper.bitmap))

    # --- audio ----------------------------------------------------------------------------------------
    def load_audio(self, path: str | Path) -> Audio:
        """Read an audio file (WAV, FLAC, ... as libsndfile reads them) into a clip at the projector's rate."""
        return self.audio_from_bytes(read_media_file(path, "audio"), str(path))

    def audio_from_bytes(self, data: bytes, source: str = "audio") -> Audio:
        if not self.audio:
            raise GgufMtpError(f"{source}: {self.path.name} has no audio encoder (it takes {self.kinds})")
        pcm, file_rate = read_pcm(data, self.sample_rate, source)
        mt = _mtmd()
        bitmap = mt.mtmd_bitmap_init_from_audio(len(pcm), pcm.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        if not bitmap:
            raise GgufMtpError(f"{source}: libmtmd could not hold {len(pcm)} audio samples")
        sha = hashlib.sha256(data).hexdigest()
        mt.mtmd_bitmap_set_id(bitmap, sha.encode())
        return Audio(source, sha, bitmap, len(pcm), self.sample_rate, file_rate)

    def embeddings(self, m: Media) -> np.ndarray:
        """What the projector makes of ``m``: its soft-token embeddings in the target's input space, every chunk's
        in order, shape (n_tokens, n_embd) (evidence against transformers; decoding does not go through here)."""
        n_embd = int(llama.llama_model_n_embd_inp(self.engine.model))
        rows = []
        with self.tokenize(self.marker, [m]) as prompt:
            for s in prompt.spans:
                out = np.ctypeslib.as_array(self.encode(s), shape=(s.n_tokens * n_embd,))
                rows.append(out.reshape(s.n_tokens, n_embd).copy())
        return np.concatenate(rows)

    def encode(self, s: MediaSpan):
        """Run the encoder over media chunk ``s``: its embeddings, as libmtmd's float pointer (libmtmd owns them
        until the next encode)."""
        mt = _mtmd()
        with LLAMA_LOG.capture() as lines:
            if mt.mtmd_encode_chunk(self.ctx, s.chunk) != 0:
                raise GgufMtpError(f"the projector could not encode {s.media.source if s.media else s.what}"
                                   f" ({error_lines(lines) or 'no reason logged'})")
        return mt.mtmd_get_output_embd(self.ctx)

    # --- prompts --------------------------------------------------------------------------------------
    def tokenize(self, text: str, media: Sequence[Media]) -> MediaPrompt:
        """Split rendered text (one marker per image or clip, in order) into text and media chunks."""
        mt = _mtmd()
        eng = self.engine
        if eng.adds_bos:
            bos = eng.piece(eng.bos, special=True).decode("utf-8", errors="replace")
            if bos and not text.startswith(bos):
                text = bos + text
        data = text.encode("utf-8")
        inp = mt.mtmd_input_text(data, len(data), False, True)
        bitmaps = (mt.mtmd_bitmap_p_ctypes * max(1, len(media)))(*[m._bitmap for m in media])
        chunks = mt.mtmd_input_chunks_init()
        with LLAMA_LOG.capture() as lines:
            rc = mt.mtmd_tokenize(self.ctx, chunks, ctypes.byref(inp), bitmaps, len(media))
        prompt = MediaPrompt([], [], chunks)
        if rc != 0:
            prompt.close()
            why = TOKENIZE_ERRORS.get(rc, f"error code {rc}")
            raise GgufMtpError(f"libmtmd could not tokenize the prompt: {why}"
                               f"{' (' + error_lines(lines) + ')' if error_lines(lines) else ''}")
        by_sha = {m.sha256: m for m in media}
        what = {mt.MTMD_INPUT_CHUNK_TYPE_IMAGE: Image.what, mt.MTMD_INPUT_CHUNK_TYPE_AUDIO: Audio.what}
        for i in range(mt.mtmd_input_chunks_size(chunks)):
            chunk = mt.mtmd_input_chunks_get(chunks, i)
            kind = mt.mtmd_input_chunk_get_type(chunk)
            if kind == mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mt.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                prompt.tokens += [int(ptr[j]) for j in range(n.value)]
                continue
            if kind not in what:
                prompt.close()
                raise GgufMtpError(f"libmtmd made a media chunk of unknown type {kind}")
            sha = (mt.mtmd_input_chunk_get_id(chunk) or b"").decode()
            n_tok = int(mt.mtmd_input_chunk_get_n_tokens(chunk))
            prompt.spans.append(MediaSpan(len(prompt.tokens), n_tok, chunk, what[kind], by_sha.get(sha)))
            prompt.tokens += [identity_id(sha)] * n_tok
        prompt.projector = self
        return prompt


@dataclass
class MediaPrompt:
    """A tokenized prompt with images and/or audio: what ``speculative_generate(..., media=)`` decodes."""

    tokens: list[int]  # text ids; media positions hold the image's or clip's identity id
    spans: list[MediaSpan]
    _chunks: int | None = field(default=None, repr=False)
    projector: Projector | None = field(default=None, repr=False)
    encoded: int = 0  # media tokens encoded and decoded by the last ``decode``

    @property
    def media_tokens(self) -> int:
        return sum(s.n_tokens for s in self.spans)

    def close(self) -> None:
        if self._chunks:
            _mtmd().mtmd_input_chunks_free(self._chunks)
        self._chunks = None

    def __enter__(self) -> MediaPrompt:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def span_at(self, pos: int) -> MediaSpan | None:
        """The first media chunk not wholly before position ``pos`` (the next one to decode from there), or None."""
        return next((s for s in self.spans if s.start + s.n_tokens > pos), None)

    def resumable(self, keep: int) -> int:
        """``keep`` (a reusable cached prefix), moved back to a media chunk's start when it ends inside the chunk:
        a chunk is decoded whole or not at all."""
        s = self.span_at(keep)
        return s.start if s is not None and s.start < keep else keep

    def problems(self, n_ubatch: int) -> list[str]:
        """Why this prompt cannot be decoded, as "media: ..." lines (empty when it can)."""
        if self._chunks is None or self.projector is None:
            return ["media: expected an open MediaPrompt from Projector.tokenize, got a closed one"]
        out = []
        if not self.tokens or (self.spans and self.spans[-1].start + self.spans[-1].n_tokens == len(self.tokens)):
            out.append(f"media: a prompt cannot end with {self.spans[-1].what if self.spans else 'media'}: "
                       f"nothing to continue from")
        out += [f"media: {p}" for s in self.spans if (p := self._batch_problem(s, n_ubatch))]
        return out

    def _batch_problem(self, s: MediaSpan, n_ubatch: int) -> str | None:
        if _mtmd().mtmd_decode_use_non_causal(self.projector.ctx, s.chunk) and s.n_tokens > n_ubatch:
            return (f"{s.what} of {s.n_tokens} tokens must be decoded in one batch: raise --ubatch-size and "
                    f"--batch-size to at least {s.n_tokens} (now {n_ubatch})")
        return None

    def reuse_prefix(self, engine: Engine) -> int:
        """``engine.reuse_prefix``, moved back to a media chunk's start when the common prefix ends inside it."""
        keep = engine.reuse_prefix(self.tokens)
        back = self.resumable(keep)
        if back != keep:
            keep = back if engine.can_rewind_to(back) else 0
            engine.truncate(keep)
        return keep

    def decode(self, engine: Engine, start: int) -> int:
        """Decode positions ``start..`` (text runs and whole media chunks); returns the rows of the last text
        decode."""
        if engine.n_past != start:
            raise ValueError(f"the cache holds {engine.n_past} positions, decoding from {start}")
        problems = self.problems(int(llama.llama_n_ubatch(engine.ctx)))
        if problems:
            raise GgufMtpError("; ".join(p.removeprefix("media: ") for p in problems))
        self.encoded = 0
        pos = start
        while (s := self.span_at(pos)) is not None:
            if s.start > pos:
                engine.decode(self.tokens[pos:s.start], outputs="none")
            self._decode_span(engine, s)
            pos = s.start + s.n_tokens
        return engine.decode(self.tokens[pos:], outputs="last")

    def _decode_span(self, engine: Engine, s: MediaSpan) -> None:
        if engine.n_past + s.n_tokens > engine.n_ctx:
            raise GgufMtpError(f"context full: {s.what} of {s.n_tokens} tokens at position {engine.n_past} does not "
                               f"fit n_ctx {engine.n_ctx}")
        try:
            self.eval_span(s, engine.ctx, engine.n_past, 0, engine.n_batch)
        except GgufMtpError:
            engine.drop_unrecorded()
            raise
        engine.record_decoded(self.tokens[s.start], s.n_tokens)

    def eval_span(self, s: MediaSpan, lctx: int, n_past: int, seq: int, n_batch: int) -> None:
        """Encode media chunk ``s`` and decode its embeddings into sequence ``seq`` of target context ``lctx`` at
        positions n_past.. (libmtmd's helper: its own llama_decode, non-causal over the chunk where the projector
        asks; ``problems`` says whether it fits one ubatch). The caller owns the KV bookkeeping: on failure it
        drops the cells the decode may have left, on success it records the positions (Engine / BatchEngine)."""
        mt = _mtmd()
        embd = self.projector.encode(s)
        with LLAMA_LOG.capture() as lines:
            new_past = llama.llama_pos(0)
            rc = mt.mtmd_helper_decode_image_chunk(self.projector.ctx, lctx, s.chunk, embd, n_past, seq, n_batch,
                                                   ctypes.byref(new_past), mt.mtmd_helper_post_decode_callback(),
                                                   None)
        if rc != 0:
            raise GgufMtpError(f"target decode of {s.what} failed (code {rc}) at position {n_past}"
                               f" ({error_lines(lines) or 'no reason logged'})")
        self.encoded += s.n_tokens
