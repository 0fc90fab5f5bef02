"""``gguf-mtp serve`` tool calling (gguf_mtp/serve/tools.py): the official ``openai`` client round-trips a call on
tiny-e (batched scheduler, MTP on), streamed and not; rendering in Gemma 4's format; parsing; bad input.

tiny-e's template has no tool support, so the server writes Gemma 4's declarations, calls and results itself. The
tiny model is steered to a call by ``tool_choice: "required"`` / a named function: a grammar (runtime/grammar.py)
constrains its reply to ``call:NAME{arguments}``. A malformed call is made with ``response_format`` (a schema whose
only value is call-like text) under ``tool_choice: "auto"``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace

import httpx2
import pytest
from fixtures.runtime import TEST_SETTINGS
from test_serve import KEY, MODEL, SLOT_CTX, Served, serving

from gguf_mtp.runtime.chat_template import prompt_text
from gguf_mtp.serve.prompts import _render
from gguf_mtp.serve.schema import Message, Part, ToolCall
from gguf_mtp.serve.tools import CallStream, Function, Malformed, Tools, parse_calls
from gguf_mtp.serve.text import Piece

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["paris", "rome"]},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "what is the weather in paris"}]


@pytest.fixture(scope="module")
def served(runtime_ggufs) -> Iterator[Served]:
    from gguf_mtp.runtime.batch_engine import BatchEngine
    from gguf_mtp.runtime.scheduler import Scheduler

    target, drafter = runtime_ggufs["tiny-e"]
    with BatchEngine.load(target, drafter, TEST_SETTINGS.replace(n_ctx=2 * SLOT_CTX), n_seq=2) as engine:
        with serving(Scheduler(engine).start(), api_key=KEY) as s:
            yield s


def ask(client, stream: bool, **kw):
    """A chat completion, streamed chunks accumulated as the openai client's own stream state does."""
    kw = {"model": MODEL, "temperature": 0, "max_tokens": 64, "tools": TOOLS, "extra_body": {"draft": {"max": 3}},
          **kw}
    if not stream:
        return client.chat.completions.create(**kw)
    from openai.lib.streaming.chat import ChatCompletionStreamState

    state = ChatCompletionStreamState()
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        state.handle_chunk(chunk)
    snapshot = state.current_completion_snapshot  # get_final_completion refuses finish_reason "length"
    return snapshot if snapshot.choices[0].finish_reason == "length" else state.get_final_completion()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_openai_client_round_trips_a_tool_call(served, stream):
    client = served.client()
    r = ask(client, stream, messages=ASK, tool_choice="required")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in ("get_weather", "get_time")
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert args["city"] in ("paris", "rome") and args["unit"] in ("c", "f")
    mtp = r.usage.model_extra["mtp"]  # drafting stays on: tiny-e's random drafts mostly fail the call grammar
    assert mtp["proposed"] + mtp["grammar_cut"] > 0 and r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0

    history = [*ASK, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp": 21})}]
    final = ask(client, stream, messages=history, max_tokens=16)
    assert final.choices[0].finish_reason in ("stop", "length") and not final.choices[0].message.tool_calls
    assert isinstance(final.choices[0].message.content, str)
    assert final.usage.prompt_tokens > r.usage.prompt_tokens and final.usage.model_extra["mtp"]["proposed"] > 0


def test_named_function_is_called(served):
    r = served.client().chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, max_tokens=64, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city", "unit"}


CALL_LIKE = "<|tool_call>call:get_weather{oops"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_malformed_call_comes_back_as_text(served, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"const": CALL_LIKE}}}
    r = ask(served.client(), stream, messages=ASK, tool_choice="auto", response_format=fmt)
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content == json.dumps(CALL_LIKE)


def test_none_is_plain_chat(served):
    r = served.client().chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none",
                                                max_tokens=8, temperature=0)
    plain = served.client().chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == plain.choices[0].message.content
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens


BAD = [  # id, body changes, param
    ("tools-not-a-list", {"tools": {"a": 1}}, "tools"),
    ("tool-type", {"tools": [{"type": "code", "function": {"name": "f"}}]}, "tools[0].type"),
    ("no-function", {"tools": [{"type": "function"}]}, "tools[0].function"),
    ("bad-name", {"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ("parameters-not-object", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "string"}}}]}, "tools[0].function.parameters"),
    ("parameters-bad-schema", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}]}, "tools[0].function.parameters"),
    ("duplicate-names", {"tools": [TIME, TIME]}, "tools"),
    ("unknown-choice", {"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ("unknown-function", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "tool_choice.function.name"),
    ("choice-without-tools", {"tool_choice": "required"}, "tool_choice"),
    ("required-and-response-format", {"tools": TOOLS, "tool_choice": "required",
                                      "response_format": {"type": "json_object"}}, "tool_choice"),
    ("arguments-not-json", {"messages": [*ASK, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{x"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ("tool-without-call-id", {"messages": [*ASK, {"role": "tool", "content": "1"}]}, "messages[1].tool_call_id"),
    ("tools-in-completions", {"prompt": "x", "tools": TOOLS}, "tools"),
]


@pytest.mark.parametrize("change, param", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_tool_input_is_a_400_naming_the_param(served, change, param):
    path = "/v1/completions" if "prompt" in change else "/v1/chat/completions"
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, **change}
    if "prompt" in change:
        body.pop("messages")
    with httpx2.Client(base_url=served.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        r = http.post(path, json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
        assert http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 2}
                         ).status_code == 200


# --- rendering and parsing ---------------------------------------------------------------------------------
def conversation() -> list[Message]:
    call = ToolCall("c1", "get_weather", '{"city": "paris", "unit": "c"}')
    return [Message("system", [Part("Be brief.")]), Message("user", [Part("weather?")]),
            Message("assistant", [Part("")], [call]), Message("tool", [Part('{"temp": 21}')], tool_call_id="c1")]


def contents(messages: list[Message]) -> list[str]:
    return [m.parts[0].text for m in messages]


TOOLSPEC = Tools((Function("get_weather", "The weather", WEATHER["function"]["parameters"]),), "required")


def test_gemma4_format_without_template_support(engines):
    engine = engines.get("tiny-e", drafter=False)
    msgs = conversation()
    text = _render(engine, msgs, contents(msgs), False, TOOLSPEC)
    assert text.startswith("<bos><|turn>system\nBe brief.<|tool>declaration:get_weather{description:<|\"|>The "
                           "weather<|\"|>,parameters:{type:<|\"|>OBJECT<|\"|>,")
    assert text.endswith("<|turn>user\nweather?<turn|>\n<|turn>model\n"
                         '<|tool_call>call:get_weather{city:<|"|>paris<|"|>,unit:<|"|>c<|"|>}<tool_call|>'
                         "<|tool_response>response:get_weather{temp:21}<tool_response|><|tool_call>")
    answered = [*msgs, Message("assistant", [Part("21 degrees")])]
    text = _render(engine, answered, contents(answered), False, None)
    assert text.endswith("<tool_response|>21 degrees<turn|>\n<|turn>model\n")  # one model turn, then the next


TOOL_TEMPLATE = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}{{ m.role }}:"
                 "{{ m.content }}{% for c in m.tool_calls or [] %}<{{ c.function.name }} {{ c.function.arguments.city }}>"
                 "{% endfor %}{% if m.role == 'tool' %}({{ m.name }}){% endif %};{% endfor %}")


def test_a_template_with_tool_support_renders_them():
    engine = SimpleNamespace(chat_template=TOOL_TEMPLATE, bos=0, eos=-1, piece=lambda t, special=False: b"")
    msgs = conversation()
    text = _render(engine, msgs, contents(msgs), False, TOOLSPEC)
    assert text == "[get_weather]system:Be brief.;user:weather?;assistant:<get_weather paris>;tool:{\"temp\": 21}" \
                   "(get_weather);<|tool_call>"
    assert prompt_text(engine, [{"role": "user", "content": "x"}]) == "user:x;"


def test_call_stream_holds_calls_and_lets_text_through():
    cs = CallStream({"f"})
    sent = [p.text for p in (cs.feed(Piece(t)) for t in ["hello <", "|tool", "_call>call:f{a:", "1}<tool_call|>"]) if p]
    assert sent == ["hello "] and cs.finish(False)[1][0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    cs = CallStream({"f"})
    assert cs.feed(Piece("a <|")).text == "a " and cs.finish(False) == ("<|", [])
    with pytest.raises(Malformed):
        parse_calls("<|tool_call>call:f[1]<tool_call|>", {"f"})
