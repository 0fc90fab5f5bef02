"""Requests into prompt tokens: chat messages through the GGUF's own template (thinking as in ``chat``), images
from ``data:`` URLs and audio from ``input_audio`` parts (base64 WAV/FLAC) through the projector, completion
prompts as text or token ids.

Runs on a worker thread, not the engine thread: tokenizing, rendering and decoding media only read the model
(llama-server does the same in its HTTP threads). The ``Prompt`` owns what it holds (libmtmd's chunks and
bitmaps) until ``close``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import GgufMtpError
from ..runtime.chat_template import prompt_text, text_tokens
from .schema import ApiError, ChatRequest, CompletionRequest, Message, Part, bad
from .tools import CALL_OPEN, Tools, render_plain, supports_tools, template_messages

if TYPE_CHECKING:
    from ..runtime.multimodal import Media, MediaPrompt, Projector

DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*),", re.ASCII)


@dataclass
class Prompt:
    tokens: list[int]
    media: MediaPrompt | None = None
    attached: list[Media] = field(default_factory=list)  # the images and audio clips ``media`` decodes

    def close(self) -> None:
        if self.media is not None:
            self.media.close()
        for m in self.attached:
            m.close()
        self.attached.clear()


@dataclass(frozen=True)
class MediaKind:
    """How the server takes one kind of media part: what the projector must have, the part's file bytes, the
    projector's reader, and the error codes when it has not or the bytes are bad."""

    encoder: str  # Projector attribute: vision | audio
    data: Callable[[Part], bytes]  # the part's file bytes (a 400 naming the part when it holds none)
    reader: str  # Projector method: bytes -> Media
    missing: str  # the 400 when the projector lacks the encoder
    missing_code: str
    invalid_code: str


MEDIA_KINDS = {
    "image": MediaKind("vision", lambda p: image_bytes(p.image_url, p.param), "image_from_bytes",
                       "this server has no vision projector (start it with --mmproj)",
                       "images_not_supported", "invalid_image"),
    "audio": MediaKind("audio", lambda p: audio_bytes(p.audio, p.param), "audio_from_bytes",
                       "this server has no projector with an audio encoder (start it with an --mmproj that has one)",
                       "audio_not_supported", "invalid_audio"),
}


def media_kind(p: Part) -> MediaKind:
    return MEDIA_KINDS["image" if p.image_url is not None else "audio"]


def image_bytes(url: str, param: str) -> bytes:
    """The bytes of a base64 ``data:`` URL (the server fetches nothing from the network)."""
    m = DATA_URL.match(url)
    if m is None:
        raise bad(param, "expected a data: URL (data:image/png;base64,...); this server fetches no URLs",
                  code="invalid_image_url")
    if ";base64" not in m["params"]:
        raise bad(param, "expected a base64 data: URL (data:image/png;base64,...)", code="invalid_image_url")
    try:
        data = base64.b64decode(url[m.end():], validate=True)
    except (binascii.Error, ValueError):
        raise bad(param, "the data: URL is not valid base64", code="invalid_image_url") from None
    if not data:
        raise bad(param, "the data: URL holds no data", code="invalid_image_url")
    return data


def audio_bytes(data: str, param: str) -> bytes:
    """The file bytes of an ``input_audio.data`` value (plain base64, as OpenAI's API sends it)."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad(param, "expected base64 (the bytes of a WAV or FLAC file)", code="invalid_audio") from None
    if not raw:
        raise bad(param, "the audio data is empty", code="invalid_audio")
    return raw


def _content(msg: Message, marker: str | None) -> str:
    """A message's parts as one string: text as it is, an image or audio clip as the projector's marker
    (llama-server's way)."""
    out: list[str] = []
    for p in msg.parts:
        if p.text is not None:
            if marker and marker in p.text:
                raise bad(p.param, f"the text contains {marker!r}, which marks where images and audio clips go",
                          code="invalid_value")
            out.append(("\n" if out and out[-1] != marker else "") + p.text)
        else:
            out.append(marker)
    return "".join(out)


def chat_prompt(engine: Any, projector: Projector | None, req: ChatRequest, think: bool,
                tools: Tools | None = None) -> Prompt:
    """Render the conversation with the target's template (tools: tools.py); images and audio go through the
    projector."""
    parts = [p for m in req.messages for p in m.parts if p.is_media]
    for p in parts:
        kind = media_kind(p)
        if projector is None or not getattr(projector, kind.encoder):
            raise bad(p.param, kind.missing, code=kind.missing_code)
    marker = projector.marker if projector is not None else None
    contents = [_content(m, marker) for m in req.messages]
    try:
        text = _render(engine, req.messages, contents, think, tools)
        if not parts:
            return Prompt(text_tokens(engine, text))
        prompt = Prompt([])
        try:
            for p in parts:
                prompt.attached.append(_load(projector, p))
            media = projector.tokenize(text, prompt.attached)
            prompt.tokens, prompt.media = media.tokens, media
        except BaseException:
            prompt.close()
            raise
        return prompt
    except GgufMtpError as e:  # a template that refuses these messages (raise_exception) or cannot render
        raise bad("messages", str(e), code="invalid_value") from None


def _render(engine: Any, messages: list[Message], contents: list[str], think: bool, tools: Tools | None) -> str:
    """The prompt text: the template renders tools itself when it can, else tools.py writes them into plain
    messages; a forced call (tool_choice required / a function) opens the call for the model."""
    prefill = CALL_OPEN if tools is not None and tools.constrained else ""
    has_tool_parts = tools is not None or any(m.tool_calls or m.role == "tool" for m in messages)
    if has_tool_parts and supports_tools(engine):
        extra = {"tools": [f.openai() for f in tools.functions]} if tools is not None else {}
        return prompt_text(engine, template_messages(messages, contents), enable_thinking=think, **extra) + prefill
    plain, tail = render_plain(messages, contents, tools)
    return prompt_text(engine, plain, enable_thinking=think) + tail + prefill


def _load(projector: Projector, p: Part) -> Media:
    """An image or audio part read through the projector; bytes it cannot read are a 400 naming the part."""
    kind = media_kind(p)
    data = kind.data(p)
    try:
        return getattr(projector, kind.reader)(data, p.param)
    except GgufMtpError as e:
        raise bad(p.param, str(e).removeprefix(f"{p.param}: "), code=kind.invalid_code) from None


def completion_prompt(engine: Any, req: CompletionRequest) -> Prompt:
    if isinstance(req.prompt, str):
        return Prompt(engine.tokenize(req.prompt, add_special=True, parse_special=True))
    bad_ids = [t for t in req.prompt if not 0 <= t < engine.n_vocab]
    if bad_ids:
        raise bad("prompt", f"token id {bad_ids[0]} is outside the vocabulary (0..{engine.n_vocab - 1})",
                  code="invalid_value")
    return Prompt(list(req.prompt))


def check_fits(prompt: Prompt, n_ctx: int, max_tokens: int | None, param: str) -> int:
    """The tokens the reply may have: ``max_tokens``, or the rest of the context; 400 when the prompt cannot fit."""
    n = len(prompt.tokens)
    if n == 0:
        raise bad(param, "the prompt is empty: nothing to continue from", code="invalid_value")
    if n >= n_ctx:
        raise ApiError(400, f"the prompt has {n} tokens; the context holds {n_ctx} tokens per request, including "
                            f"the reply (start the server with a larger --ctx)", param=param,
                       code="context_length_exceeded")
    return max_tokens if max_tokens is not None else n_ctx - n
