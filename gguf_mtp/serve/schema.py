"""The OpenAI wire format: request bodies checked into small dataclasses, and the response objects built back.

Checking is table-driven (``SAMPLING`` names each numeric field's type and range). Every problem raises
``ApiError`` with OpenAI's error object (``{"error": {"message", "type", "param", "code"}}``), naming the field;
``null`` counts as absent, unknown fields are ignored (as llama-server and vLLM do), and fields we cannot honour
(``n`` > 1, penalties, logprobs) are refused rather than silently dropped. Our extras: ``top_k``,
``min_p``, ``draft`` (``{"max": K}`` / ``"adaptive"`` / ``"off"``) and
``chat_template_kwargs: {"enable_thinking": bool}`` (llama-server's spelling). ``response_format`` ``json_object``
and ``json_schema`` become a GBNF grammar (runtime/grammar.py) that constrains decoding, MTP kept on.
``tools`` / ``tool_choice`` are read by tools.py; here, messages carry ``tool_calls`` and ``role: tool`` results.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import GgufMtpError
from ..runtime.grammar import json_object_grammar, json_schema_grammar
from ..runtime.sampling import SamplingParams
from ..runtime.stats import Stats

MAX_STOP = 4  # OpenAI's limit on stop strings
DRAFT_WORDS = ("adaptive", "off")


class ApiError(Exception):
    """A refused request: HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, f"{param}: {message}" if param else message, param=param, code=code)


def unsupported(param: str, what: str) -> ApiError:
    return bad(param, f"{what} is not supported by this server", code="unsupported_parameter")


# --- JSON values ------------------------------------------------------------------------------------------
_JSON_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
               dict: "an object"}


def _is(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, int | float) if kind is float else isinstance(value, kind)


def expect(value: Any, kind: type, param: str) -> Any:
    """``value`` when it is a JSON value of ``kind`` (a number for float, never a boolean for int), else 400."""
    if not _is(value, kind):
        got = "null" if value is None else _JSON_NAMES.get(type(value), type(value).__name__)
        raise bad(param, f"expected {_JSON_NAMES[kind]}, got {got}", code="invalid_type")
    return value


@dataclass(frozen=True)
class Number:
    """A numeric request field: its JSON type and the range it must lie in."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False

    def check(self, value: Any, param: str) -> Any:
        expect(value, self.kind, param)
        if isinstance(value, float) and not math.isfinite(value):  # JSON's NaN / Infinity / 1e999
            raise bad(param, f"expected a finite number, got {value}", code="invalid_value")
        low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        if low or (self.hi is not None and value > self.hi):
            left = "(" if self.lo_open else "["
            raise bad(param, f"expected a value in {left}{_num(self.lo)}, {_num(self.hi)}], got {value}",
                      code="invalid_value")
        return value


def _num(x: float | None) -> str:
    return "inf" if x is None else f"{x:g}"


SAMPLING = {  # request field -> its type and range (SamplingParams field of the same name, "temperature" too)
    "temperature": Number(float, 0.0, 2.0),
    "top_p": Number(float, 0.0, 1.0, lo_open=True),
    "top_k": Number(int, 0),
    "min_p": Number(float, 0.0, 1.0),
}
REFUSED_UNLESS_DEFAULT = {  # fields we cannot honour: accepted only at their default (clients often send those)
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logprobs": (False,), "top_logprobs": (0,),
    "logit_bias": ({},), "functions": ([],), "n": (1,), "best_of": (1,), "echo": (False,),
    "suffix": ("",),
}


def _present(body: dict[str, Any], name: str) -> bool:
    return body.get(name) is not None


# --- the parts every generation request shares ------------------------------------------------------------
@dataclass(frozen=True)
class Draft:
    """A request's draft control: ``mode`` "server" (the server's setting), "off", "adaptive" or "fixed" (``k``)."""

    mode: str = "server"
    k: int = 0


@dataclass
class Generation:
    """What to generate, from the fields ``/v1/chat/completions`` and ``/v1/completions`` share."""

    model: str
    sampling: SamplingParams
    max_tokens: int | None = None  # None: until the context ends
    stop: tuple[str, ...] = ()
    draft: Draft = Draft()
    stream: bool = False
    include_usage: bool = False
    grammar: str | None = None  # GBNF from response_format (None: free text)


def parse_generation(body: dict[str, Any], defaults: SamplingParams, max_tokens_limit: int) -> Generation:
    model = body.get("model")
    if model is None:
        raise bad("model", "missing required parameter", code="missing_required_parameter")
    expect(model, str, "model")
    for name, allowed in REFUSED_UNLESS_DEFAULT.items():
        if _present(body, name) and body[name] not in allowed:
            raise unsupported(name, f"{name}={body[name]!r}")
    values = {name: spec.check(body[name], name) for name, spec in SAMPLING.items() if _present(body, name)}
    seed = body.get("seed")
    if seed is not None:
        values["seed"] = expect(seed, int, "seed") % (1 << 64)  # numpy seeds are unsigned
    sampling = SamplingParams(**{**vars(defaults), **values})
    return Generation(model, sampling, _max_tokens(body, max_tokens_limit), _stop(body.get("stop")),
                      _draft(body.get("draft")), *_stream(body), _response_format(body.get("response_format")))


RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def _response_format(value: Any) -> str | None:
    """The grammar ``response_format`` asks for: None for text, any JSON object, or JSON matching a schema."""
    if value is None:
        return None
    kind = expect(expect(value, dict, "response_format").get("type"), str, "response_format.type")
    if kind not in RESPONSE_FORMATS:
        raise bad("response_format.type", f"expected one of {', '.join(RESPONSE_FORMATS)}, got {kind!r}",
                  code="invalid_value")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_grammar()
    spec = value.get("json_schema")
    if spec is None:
        raise bad("response_format.json_schema", "missing required parameter", code="missing_required_parameter")
    schema = expect(expect(spec, dict, "response_format.json_schema").get("schema"), dict,
                    "response_format.json_schema.schema")
    try:
        return json_schema_grammar(schema)
    except GgufMtpError as e:
        raise bad("response_format.json_schema.schema", str(e), code="invalid_value") from None


def _max_tokens(body: dict[str, Any], limit: int) -> int | None:
    name = "max_completion_tokens" if _present(body, "max_completion_tokens") else "max_tokens"
    if not _present(body, name):
        return None
    return Number(int, 1, limit).check(body[name], name)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else expect(value, list, "stop")
    if len(stops) > MAX_STOP:
        raise bad("stop", f"at most {MAX_STOP} stop strings, got {len(stops)}", code="invalid_value")
    for s in stops:
        if not expect(s, str, "stop"):
            raise bad("stop", "a stop string cannot be empty", code="invalid_value")
    return tuple(stops)


def _draft(value: Any) -> Draft:
    if value is None:
        return Draft()
    if isinstance(value, str):
        if value not in DRAFT_WORDS:
            raise bad("draft", f'expected "adaptive", "off" or {{"max": K}}, got {value!r}', code="invalid_value")
        return Draft(value)
    k = expect(value, dict, "draft").get("max")
    if set(value) != {"max"}:
        raise bad("draft", f'expected {{"max": K}}, got keys {sorted(value)}', code="invalid_value")
    return Draft("fixed", Number(int, 0).check(k, "draft.max"))


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = bool(_present(body, "stream") and expect(body["stream"], bool, "stream"))
    options = body.get("stream_options")
    if options is None:
        return stream, False
    expect(options, dict, "stream_options")
    if not stream:
        raise bad("stream_options", "only allowed when stream is true", code="invalid_value")
    usage = options.get("include_usage")
    return stream, bool(usage is not None and expect(usage, bool, "stream_options.include_usage"))


# --- chat messages ----------------------------------------------------------------------------------------
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


AUDIO_FORMATS = ("wav", "flac")  # input_audio.format values taken (soundfile reads the bytes; OpenAI: wav, mp3)


@dataclass
class Part:
    """One piece of a message's content: text, an image (its ``data:`` URL), or audio (base64 file bytes)."""

    text: str | None = None
    image_url: str | None = None
    audio: str | None = None  # input_audio.data: a base64 WAV or FLAC file
    param: str = ""  # where it came from, for error messages

    @property
    def is_media(self) -> bool:
        return self.image_url is not None or self.audio is not None


@dataclass(frozen=True)
class ToolCall:
    """A call an assistant message made: its id, the function and its arguments (the JSON text of an object)."""

    id: str
    name: str
    arguments: str


@dataclass
class Message:
    role: str  # system | user | assistant | tool
    parts: list[Part]
    tool_calls: list[ToolCall] = field(default_factory=list)  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call they answer
    name: str | None = None


@dataclass
class ChatRequest:
    messages: list[Message]
    generation: Generation
    think: bool | None = None  # None: the server's --think


def parse_chat(body: dict[str, Any], defaults: SamplingParams, max_tokens_limit: int) -> ChatRequest:
    gen = parse_generation(body, defaults, max_tokens_limit)
    raw = body.get("messages")
    if raw is None:
        raise bad("messages", "missing required parameter", code="missing_required_parameter")
    if not expect(raw, list, "messages"):
        raise bad("messages", "expected at least one message", code="invalid_value")
    messages = [_message(m, f"messages[{i}]") for i, m in enumerate(raw)]
    kwargs = body.get("chat_template_kwargs")
    think = None
    if kwargs is not None:
        unknown = sorted(set(expect(kwargs, dict, "chat_template_kwargs")) - {"enable_thinking"})
        if unknown:
            raise unsupported("chat_template_kwargs", f"template variable(s) {', '.join(unknown)}")
        if kwargs.get("enable_thinking") is not None:
            think = expect(kwargs["enable_thinking"], bool, "chat_template_kwargs.enable_thinking")
    return ChatRequest(messages, gen, think)


def _message(m: Any, param: str) -> Message:
    expect(m, dict, param)
    role = expect(m.get("role"), str, f"{param}.role")
    if role not in ROLES:
        raise unsupported(f"{param}.role", f"role {role!r}")
    role = ROLES[role]
    calls = _tool_calls(m.get("tool_calls"), f"{param}.tool_calls") if role == "assistant" else []
    call_id = expect(m.get("tool_call_id"), str, f"{param}.tool_call_id") if role == "tool" else None
    name = m.get("name")
    name = expect(name, str, f"{param}.name") if name is not None and role == "tool" else None
    content = m.get("content")
    if content is None and calls:
        content = ""
    if content is None:
        raise bad(f"{param}.content", "missing required parameter", code="missing_required_parameter")
    if isinstance(content, str):
        return Message(role, [Part(text=content, param=f"{param}.content")], calls, call_id, name)
    parts = [_part(p, f"{param}.content[{j}]") for j, p in enumerate(expect(content, list, f"{param}.content"))]
    media = [p for p in parts if p.is_media]
    if media and role != "user":
        raise bad(media[0].param, "images and audio are allowed in user messages only", code="invalid_value")
    return Message(role, parts, calls, call_id, name)


def _tool_calls(value: Any, param: str) -> list[ToolCall]:
    if value is None:
        return []
    calls = []
    for j, c in enumerate(expect(value, list, param)):
        at = f"{param}[{j}]"
        expect(c, dict, at)
        if c.get("type", "function") != "function":
            raise bad(f"{at}.type", f'expected "function", got {c.get("type")!r}', code="invalid_value")
        f = expect(c.get("function"), dict, f"{at}.function")
        args = expect(f.get("arguments"), str, f"{at}.function.arguments")
        try:
            parsed = json.loads(args)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise bad(f"{at}.function.arguments", "expected the JSON text of an object", code="invalid_value")
        calls.append(ToolCall(expect(c.get("id"), str, f"{at}.id"), expect(f.get("name"), str,
                                                                         f"{at}.function.name"), args))
    return calls


def _part(p: Any, param: str) -> Part:
    kind = expect(expect(p, dict, param).get("type"), str, f"{param}.type")
    if kind == "text":
        return Part(text=expect(p.get("text"), str, f"{param}.text"), param=param)
    if kind == "image_url":
        image = p.get("image_url")
        url = expect(image.get("url") if isinstance(image, dict) else image, str, f"{param}.image_url.url")
        return Part(image_url=url, param=f"{param}.image_url.url")
    if kind == "input_audio":
        audio = expect(p.get("input_audio"), dict, f"{param}.input_audio")
        fmt = expect(audio.get("format"), str, f"{param}.input_audio.format")
        if fmt not in AUDIO_FORMATS:
            raise bad(f"{param}.input_audio.format", f"expected one of {', '.join(AUDIO_FORMATS)}, got {fmt!r}",
                      code="invalid_value")
        return Part(audio=expect(audio.get("data"), str, f"{param}.input_audio.data"),
                    param=f"{param}.input_audio.data")
    raise unsupported(f"{param}.type", f"content part type {kind!r}")


# --- completions ------------------------------------------------------------------------------------------
@dataclass
class CompletionRequest:
    prompt: str | list[int]  # text, or token ids
    generation: Generation


def parse_completion(body: dict[str, Any], defaults: SamplingParams, max_tokens_limit: int) -> CompletionRequest:
    gen = parse_generation(body, defaults, max_tokens_limit)
    if body.get("tools"):
        raise unsupported("tools", "tools in /v1/completions (use /v1/chat/completions)")
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("prompt", "missing required parameter", code="missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # one prompt given as a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(_is(t, int) for t in prompt):
            raise bad("prompt", "expected a string, or one prompt of token ids (a batch of prompts is not "
                                "supported)", code="invalid_value")
        return CompletionRequest(prompt, gen)
    return CompletionRequest(expect(prompt, str, "prompt"), gen)


# --- responses --------------------------------------------------------------------------------------------
@dataclass
class Usage:
    """Token counts of one request: OpenAI's usage object plus the MTP counts (extra fields), from its Stats."""

    prompt_tokens: int = 0
    stats: Stats = field(default_factory=Stats)

    def to_dict(self) -> dict[str, Any]:
        s = self.stats
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": s.tokens,
                "total_tokens": self.prompt_tokens + s.tokens,
                "prompt_tokens_details": {"cached_tokens": s.reused_tokens},
                "mtp": {"proposed": s.proposed, "accepted": s.accepted, "acceptance_rate": round(s.acceptance_rate, 4),
                        "proposed_by_position": list(s.proposed_by_position),
                        "accepted_by_position": list(s.accepted_by_position), "grammar_cut": s.grammar_cut}}


@dataclass
class Envelope:
    """What every response and chunk of one request carries: its id, object name, creation time and model."""

    kind: str  # "chat" | "text"
    model: str
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = self.created or int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, text: str, thoughts: str, finish: str | None, usage: Usage,
                 tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text or (None if tool_calls else text)}
            if tool_calls:
                message["tool_calls"] = tool_calls
            if thoughts:
                message["reasoning_content"] = thoughts
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage.to_dict()}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage.to_dict()}

    def chunk(self, text: str = "", thought: bool = False, finish: str | None = None, role: bool = False,
              draft: list[int | None] | None = None, tool_calls: list[dict[str, Any]] | None = None
              ) -> dict[str, Any]:
        """One streamed piece; ``draft`` (an extra field) says how each of its tokens was produced: the position
        of the kept draft that gave it, or None for a token the target produced itself."""
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["reasoning_content" if thought else "content"] = text
            if tool_calls:
                delta["tool_calls"] = tool_calls  # entries with their "index"
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            out = {**self._head("text_completion"),
                   "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        if draft is not None:
            out["mtp"] = {"draft": draft}
        return out

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage.to_dict()}
