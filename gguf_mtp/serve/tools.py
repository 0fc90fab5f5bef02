"""OpenAI tool calling in Gemma 4's format: ``tools`` / ``tool_choice`` checked, declarations and past calls
rendered, the model's calls parsed back into ``tool_calls``.

Gemma 4 (tokens 46-52 of its vocabulary) declares a tool as ``<|tool>declaration:NAME{...}<tool|>`` in the system
turn, calls one as ``<|tool_call>call:NAME{key:<|"|>text<|"|>,n:5}<tool_call|>`` (keys unquoted, strings between
``<|"|>``), then emits ``<|tool_response>`` (an end-of-generation token); the result comes back in the same model
turn as ``<|tool_response>response:NAME{...}<tool_response|>`` and the model goes on.

- Rendering: a chat template that reads ``tools`` (Hugging Face's convention) gets ``tools``, ``tool_calls``
  (arguments as objects) and ``role: tool`` messages as they are. A template without tool support (the tiny and
  trained pairs') gets plain messages that ``render_plain`` writes in the format above, when the vocabulary has
  Gemma 4's tool tokens; otherwise tools are refused (400).
- ``tool_choice: "required"`` or a named function: the prompt ends with ``<|tool_call>`` and a GBNF grammar
  (runtime/grammar.py, MTP kept on) makes the reply ``call:NAME{JSON arguments matching the parameters}``, ended
  by ``<tool_call|>``. The grammar sampler never allows control tokens, so the arguments are plain JSON (which
  the parser reads too) rather than ``<|"|>``-quoted.
- Parsing: text before the first ``<|tool_call>`` is content; what follows must be well-formed calls of declared
  functions, or the whole reply is returned as text (finish_reason ``stop``).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..runtime.chat import special_id
from ..runtime.chat_template import template_variables
from .schema import Message, bad, expect
from .text import Piece, partial_marker

CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
DECL_OPEN, DECL_CLOSE = "<|tool>", "<tool|>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<|tool_response>", "<tool_response|>"
QUOTE = '<|"|>'
TOOL_TOKENS = (DECL_OPEN, DECL_CLOSE, CALL_OPEN, CALL_CLOSE, RESPONSE_OPEN, RESPONSE_CLOSE, QUOTE)
CHOICES = ("auto", "none", "required")
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
NO_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Function:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: dict(NO_PARAMETERS))

    def openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class Tools:
    """A request's tools and choice: "auto", "none", "required" or one function's name (``forced``)."""

    functions: tuple[Function, ...]
    choice: str = "auto"
    forced: str | None = None

    @property
    def constrained(self) -> bool:
        return self.choice == "required" or self.forced is not None

    def names(self) -> set[str]:
        return {f.name for f in self.functions}


# --- the request ------------------------------------------------------------------------------------------
def parse_tools(body: dict[str, Any]) -> Tools | None:
    """``tools`` and ``tool_choice``, checked (400 naming the field); None when there are no tools to use."""
    raw, choice = body.get("tools"), body.get("tool_choice")
    if raw is None or raw == []:
        if choice is not None and choice != "none":
            raise bad("tool_choice", "needs tools", code="invalid_value")
        return None
    functions = tuple(_function(t, f"tools[{i}]") for i, t in enumerate(expect(raw, list, "tools")))
    names = [f.name for f in functions]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise bad("tools", f"function names must be unique, got {dupes[0]!r} twice", code="invalid_value")
    if choice is None:
        return Tools(functions)
    if isinstance(choice, str):
        if choice not in CHOICES:
            raise bad("tool_choice", f"expected one of {', '.join(CHOICES)} or a function, got {choice!r}",
                      code="invalid_value")
        return None if choice == "none" else Tools(functions, choice)
    expect(choice, dict, "tool_choice")
    if choice.get("type") != "function":
        raise bad("tool_choice.type", f'expected "function", got {choice.get("type")!r}', code="invalid_value")
    name = expect(expect(choice.get("function"), dict, "tool_choice.function").get("name"), str,
                  "tool_choice.function.name")
    if name not in names:
        raise bad("tool_choice.function.name", f"no tool is named {name!r}", code="invalid_value")
    return Tools(functions, "function", name)


def _function(t: Any, param: str) -> Function:
    kind = expect(t, dict, param).get("type", "function")
    if kind != "function":
        raise bad(f"{param}.type", f'expected "function", got {kind!r}', code="invalid_value")
    f = expect(t.get("function"), dict, f"{param}.function")
    name = expect(f.get("name"), str, f"{param}.function.name")
    if not NAME.fullmatch(name):
        raise bad(f"{param}.function.name", f"expected 1-64 of a-z, A-Z, 0-9, _ and -, got {name!r}",
                  code="invalid_value")
    description = f.get("description")
    description = "" if description is None else expect(description, str, f"{param}.function.description")
    parameters = f.get("parameters")
    parameters = dict(NO_PARAMETERS) if parameters is None else expect(parameters, dict,
                                                                       f"{param}.function.parameters")
    if parameters.get("type", "object") != "object":
        raise bad(f"{param}.function.parameters", f'expected a schema of "type": "object", got '
                  f'{parameters.get("type")!r}', code="invalid_value")
    try:
        call_grammar([Function(name, description, parameters)])  # a schema the grammar cannot take: 400 now
    except Exception as e:
        raise bad(f"{param}.function.parameters", f"cannot be turned into a grammar: {type(e).__name__}: {e}",
                  code="invalid_value") from None
    return Function(name, description, parameters)


def call_grammar(functions: list[Function] | tuple[Function, ...]) -> str:
    """GBNF for what follows ``<|tool_call>``: ``call:NAME`` and a JSON object matching NAME's parameters."""
    from llama_cpp.llama_grammar import SchemaConverter

    conv = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    alts = [f'"{f.name}" {conv.visit(conv.resolve_refs(f.parameters, f.name), f"tool-{i}")}'
            for i, f in enumerate(functions)]
    return f'root ::= "call:" ({" | ".join(alts)})\n{conv.format_grammar()}'


# --- rendering --------------------------------------------------------------------------------------------
def supports_tools(engine: Any) -> bool:
    """Whether the GGUF's chat template renders ``tools`` itself."""
    return engine.chat_template is not None and "tools" in template_variables(engine.chat_template)


def check_vocabulary(engine: Any) -> None:
    """400 unless the model can use tools: a template with tool support, or Gemma 4's tool tokens."""
    if supports_tools(engine):
        return
    missing = [t for t in (CALL_OPEN, CALL_CLOSE, RESPONSE_OPEN) if special_id(engine, t) is None]
    if missing:
        raise bad("tools", f"this model's chat template has no tool support and its vocabulary lacks {missing[0]}",
                  code="tools_not_supported")


def template_messages(messages: list[Message], contents: list[str]) -> list[dict[str, Any]]:
    """Messages for a template that reads ``tools``: Hugging Face's shape (call arguments as objects)."""
    out: list[dict[str, Any]] = []
    for m, text in zip(messages, contents):
        d: dict[str, Any] = {"role": m.role, "content": text}
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.name, "arguments": json.loads(c.arguments)}} for c in m.tool_calls]
        if m.role == "tool":
            d["tool_call_id"], d["name"] = m.tool_call_id, m.name or _called(messages, m.tool_call_id)
        out.append(d)
    return out


def render_plain(messages: list[Message], contents: list[str], tools: Tools | None
                 ) -> tuple[list[dict[str, str]], str]:
    """Messages a template without tool support can render, and text to append after its generation prompt:
    declarations join the system turn; a model turn's calls, their results and its answer become one model
    message; a conversation ending in results leaves that turn open (the tail text), as Gemma 4 continues it."""
    out: list[dict[str, str]] = []
    if tools is not None:
        decls = "".join(f"{DECL_OPEN}declaration:{f.name}{gemma_value(_declaration(f))}{DECL_CLOSE}"
                        for f in tools.functions)
        if messages and messages[0].role == "system":
            contents = [contents[0] + decls, *contents[1:]]
        else:
            out.append({"role": "system", "content": decls})
    open_turn: str | None = None  # a model turn with calls, waiting for its results and answer
    for m, text in zip(messages, contents):
        if m.role == "tool":
            name = m.name or _called(messages, m.tool_call_id)
            response = f"{RESPONSE_OPEN}response:{name}{gemma_value(_result(text))}{RESPONSE_CLOSE}"
            open_turn = (open_turn or "") + response
        elif m.role == "assistant" and m.tool_calls:
            open_turn = (open_turn or "") + text + "".join(
                f"{CALL_OPEN}call:{c.name}{gemma_value(json.loads(c.arguments))}{CALL_CLOSE}" for c in m.tool_calls)
        elif m.role == "assistant" and open_turn is not None:
            out.append({"role": "assistant", "content": open_turn + text})
            open_turn = None
        else:
            if open_turn is not None:
                out.append({"role": "assistant", "content": open_turn})
                open_turn = None
            out.append({"role": m.role, "content": text})
    return out, open_turn or ""


def _called(messages: list[Message], call_id: str | None) -> str:
    """The function a ``role: tool`` message answers (by its ``tool_call_id``)."""
    for m in messages:
        for c in m.tool_calls:
            if c.id == call_id:
                return c.name
    return "unknown"


def _declaration(f: Function) -> dict[str, Any]:
    return {"description": f.description, "parameters": _upper_types(f.parameters)}


def _upper_types(schema: Any) -> Any:
    """Gemma 4 writes schema types in capitals (STRING, OBJECT)."""
    if isinstance(schema, dict):
        return {k: v.upper() if k == "type" and isinstance(v, str) else _upper_types(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_upper_types(v) for v in schema]
    return schema


def _result(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {"value": text}
    return value if isinstance(value, dict) else {"value": value}


def gemma_value(v: Any) -> str:
    """A JSON value in Gemma 4's notation: unquoted keys, strings between ``<|"|>``."""
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{gemma_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(gemma_value(x) for x in v) + "]"
    if isinstance(v, str):
        return f"{QUOTE}{v}{QUOTE}"
    return json.dumps(v)


# --- reading the reply back -------------------------------------------------------------------------------
class Malformed(ValueError):
    pass


class _Reader:
    """Gemma 4's argument notation (and plain JSON): objects with bare or quoted keys, ``<|"|>`` or JSON strings."""

    def __init__(self, text: str) -> None:
        self.s, self.i = text, 0

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t\r\n":
            self.i += 1

    def take(self, lit: str) -> bool:
        self.ws()
        if self.s.startswith(lit, self.i):
            self.i += len(lit)
            return True
        return False

    def value(self, depth: int = 0) -> Any:
        if depth > 64:
            raise Malformed("nested too deeply")
        self.ws()
        if self.take("{"):
            out: dict[str, Any] = {}
            while not self.take("}"):
                if out and not self.take(","):
                    raise Malformed(f"expected , or }} at {self.i}")
                key = self.key()
                if not self.take(":"):
                    raise Malformed(f"expected : at {self.i}")
                out[key] = self.value(depth + 1)
            return out
        if self.take("["):
            items: list[Any] = []
            while not self.take("]"):
                if items and not self.take(","):
                    raise Malformed(f"expected , or ] at {self.i}")
                items.append(self.value(depth + 1))
            return items
        if self.s.startswith(QUOTE, self.i):
            end = self.s.find(QUOTE, self.i + len(QUOTE))
            if end < 0:
                raise Malformed("an unclosed string")
            text, self.i = self.s[self.i + len(QUOTE):end], end + len(QUOTE)
            return text
        try:
            value, end = json.JSONDecoder().raw_decode(self.s, self.i)
        except ValueError:
            raise Malformed(f"expected a value at {self.i}") from None
        self.i = end
        return value

    def key(self) -> str:
        self.ws()
        if self.s.startswith((QUOTE, '"'), self.i):
            key = self.value()
            if isinstance(key, str):
                return key
        m = re.compile(r"[A-Za-z_][\w.-]*").match(self.s, self.i)
        if m is None:
            raise Malformed(f"expected a key at {self.i}")
        self.i = m.end()
        return m[0]


CALL_HEAD = re.compile(r"\s*<\|tool_call>call:([A-Za-z0-9_-]+)")


def parse_calls(text: str, names: set[str], closed_by_stop: bool = False) -> tuple[str, list[dict[str, Any]]]:
    """(content, OpenAI ``tool_calls``) of a reply; ``Malformed`` when the text after the first ``<|tool_call>``
    is not a run of calls to declared functions. ``closed_by_stop``: the last ``<tool_call|>`` ended generation
    (a stop token: not in the text)."""
    start = text.find(CALL_OPEN)
    if start < 0:
        return text, []
    calls, i = [], start
    while i < len(text) and text[i:].strip():
        m = CALL_HEAD.match(text, i)
        if m is None:
            raise Malformed(f"expected {CALL_OPEN}call:NAME at {i}")
        if m[1] not in names:
            raise Malformed(f"a call to {m[1]!r}, which is not a declared tool")
        r = _Reader(text)
        r.i = m.end()
        if not text.startswith("{", m.end()):
            raise Malformed("expected the arguments object")
        args = r.value()
        if not r.take(CALL_CLOSE):
            r.ws()
            if not (closed_by_stop and r.i == len(text)):
                raise Malformed(f"expected {CALL_CLOSE}")
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": m[1], "arguments": json.dumps(args, ensure_ascii=False)}})
        i = r.i
    return text[:start], calls


class CallStream:
    """Streamed answer text with calls held back: text before ``<|tool_call>`` goes out as it comes (a possible
    start of the marker waits), the rest waits for ``finish``."""

    def __init__(self, names: set[str], prefill: str = "") -> None:
        self.names, self.held, self.in_call = names, prefill, bool(prefill)

    def feed(self, piece: Piece) -> Piece | None:
        if piece.thought:
            return piece
        text = self.held + piece.text
        if self.in_call:
            self.held = text
            return None
        at = text.find(CALL_OPEN)
        if at >= 0:
            self.in_call, self.held, out = True, text[at:], text[:at]
        else:
            keep = partial_marker(text, (CALL_OPEN,))
            self.held, out = text[len(text) - keep:], text[:len(text) - keep]
        return Piece(out, False, piece.draft) if out else None

    def finish(self, closed_by_stop: bool) -> tuple[str, list[dict[str, Any]]]:
        """(text still to send, tool_calls): calls when the held text is well-formed, else the held text."""
        try:
            _, calls = parse_calls(self.held, self.names, closed_by_stop) if self.in_call else ("", [])
        except Malformed:
            return self.held, []
        return ("", calls) if calls else (self.held, [])


def text_engine(engine: Any) -> Any:
    """``engine`` whose ``piece`` spells Gemma 4's tool tokens (control tokens otherwise decode to nothing)."""
    spelled = {i: t.encode() for t in TOOL_TOKENS if (i := special_id(engine, t)) is not None}

    class Spelled:
        def __getattr__(self, name: str) -> Any:
            return getattr(engine, name)

        def piece(self, token: int, special: bool = False) -> bytes:
            return spelled[token] if token in spelled else engine.piece(token, special)

    return Spelled()


def stop_ids(engine: Any, tools: Tools) -> frozenset[int]:
    """Extra stop tokens of a tool request: ``<|tool_response>`` (after calls), ``<tool_call|>`` when forced."""
    texts = (RESPONSE_OPEN, CALL_CLOSE) if tools.constrained else (RESPONSE_OPEN,)
    return frozenset(i for i in (special_id(engine, t) for t in texts) if i is not None)
