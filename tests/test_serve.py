"""``gguf-mtp serve``: the OpenAI-compatible server, talked to with the official ``openai`` client (and raw HTTP
where the client cannot send what is tested), on 127.0.0.1 with ephemeral ports, in-process.

Servers (module-scoped): ``served`` runs the batched scheduler (runtime/scheduler.py: 4 slots, an API key) and
answers the protocol, bad-input and load tests; ``vision`` the batched scheduler with the tiny-e projector
(images); ``slow`` the stand-in scheduler of tests/serve_fake.py where timing must be the test's (1 slot, 1 queue
place, 50 ms a round, through end-of-generation: a queue fills, a stream is cut, a shutdown starts with work in
flight). The command itself runs in a subprocess for SIGTERM.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import openai
import pytest
from click.testing import CliRunner
from fixtures.runtime import TEST_SETTINGS
from serve_fake import FakeBatchEngine, FakeScheduler

from gguf_mtp.cli import main
from gguf_mtp.runtime.chat import STOP_TEXTS, ThoughtSplitter, special_id
from gguf_mtp.runtime.chat_template import prompt_tokens
from gguf_mtp.runtime.loop import generate
from gguf_mtp.serve import EngineThread, ServeConfig, create_app
from gguf_mtp.runtime.devices import is_loopback
from gguf_mtp.serve.server import bind, make_server

MODEL, KEY = "tiny-e", "test-key"
FAMILY = "tiny-e"
MAX_BODY = 1 << 20
SLOT_CTX = 512
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
QUESTIONS = ["the cat sat on the mat", "and then what did the dog do", "tell me about the weather today",
             "one two three four", "where is the red ball", "a small bird sang", "open the door please",
             "the sun is hot"]


@dataclass
class Served:
    url: str
    state: Any
    scheduler: Any

    def client(self, key: str = KEY, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def http(self) -> httpx2.Client:
        return httpx2.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


@contextlib.contextmanager
def serving(scheduler: Any, projector: Any = None, **config: Any) -> Iterator[Served]:
    """An in-process server on 127.0.0.1 and an ephemeral port, stopped (and its scheduler with it) at the end."""
    app = create_app(EngineThread(scheduler, projector), ServeConfig(model=MODEL, **config))
    state = app.state.serve
    server = make_server(app, state)
    sock = bind("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield Served(f"http://127.0.0.1:{sock.getsockname()[1]}", state, scheduler)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "the server did not stop"


def load_engines(runtime_ggufs, n: int) -> list:
    from gguf_mtp.runtime.engine import Engine

    target, drafter = runtime_ggufs[FAMILY]
    return [Engine.load(target, drafter, TEST_SETTINGS) for _ in range(n)]


@pytest.fixture(scope="module")
def served(runtime_ggufs) -> Iterator[Served]:
    """The batched scheduler: 4 slots of 512 positions (one KV pool of 2048), an API key, a 1 MiB body limit."""
    from gguf_mtp.runtime.batch_engine import BatchEngine
    from gguf_mtp.runtime.scheduler import Scheduler

    target, drafter = runtime_ggufs[FAMILY]
    with BatchEngine.load(target, drafter, TEST_SETTINGS.replace(n_ctx=4 * SLOT_CTX), n_seq=4) as engine:
        with serving(Scheduler(engine).start(), api_key=KEY, max_body=MAX_BODY) as s:
            yield s


@pytest.fixture(scope="module")
def fake_engines(runtime_ggufs):
    engines = load_engines(runtime_ggufs, 1)  # for `slow`
    yield engines
    for e in engines:
        e.close()


@pytest.fixture(scope="module")
def vision(runtime_ggufs, projectors) -> Iterator[Served]:
    """Images: the batched scheduler, 2 slots, with the tiny-e projector."""
    from gguf_mtp.runtime.batch_engine import BatchEngine
    from gguf_mtp.runtime.scheduler import Scheduler

    target, drafter = runtime_ggufs[FAMILY]
    with BatchEngine.load(target, drafter, TEST_SETTINGS.replace(n_ctx=2 * SLOT_CTX), n_seq=2,
                          mmproj=projectors.get()) as engine:
        with serving(Scheduler(engine).start(), engine.projector, api_key=KEY) as s:
            yield s


@pytest.fixture(scope="module")
def slow(fake_engines) -> Iterator[Served]:
    with serving(FakeScheduler(FakeBatchEngine(fake_engines), max_queue=1, delay=0.05, ignore_eog=True),
                 api_key=KEY) as s:
        yield s


@pytest.fixture(scope="module")
def plain(engines):
    return engines.get(FAMILY, drafter=False)


def reference(plain, messages: list[dict], max_tokens: int, think: bool = False) -> tuple[list[int], list[int], str]:
    """Target-alone greedy: (prompt, tokens, answer text) as the server's chat template and stops make them."""
    prompt = prompt_tokens(plain, messages, enable_thinking=think)
    stops = [i for i in (special_id(plain, s) for s in STOP_TEXTS) if i is not None]
    plain.truncate(0)
    tokens = generate(plain, prompt, max_tokens, stop_tokens=stops).tokens
    split = ThoughtSplitter(plain)
    split.feed(tokens), split.flush()
    return prompt, tokens, split.answer


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# --- the protocol through the openai client ----------------------------------------------------------------------
def test_models_and_health(served):
    client = served.client()
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "gguf-mtp"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    health = httpx2.get(f"{served.url}/health").json()  # no key needed
    assert health == {"status": "ok", "model": MODEL, "slots": 4, "busy": 0, "queued": 0}


def test_chat_equals_target_alone_greedy_with_usage(served, plain):
    messages = [{"role": "system", "content": "You answer briefly."}, *user(QUESTIONS[0])]
    prompt, tokens, answer = reference(plain, messages, 24)
    r = served.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.content == answer
    assert r.choices[0].finish_reason == ("length" if len(tokens) == 24 else "stop")
    u = r.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (len(prompt), len(tokens), len(prompt) + len(tokens))
    assert u.prompt_tokens_details.cached_tokens >= 0
    mtp = u.model_extra["mtp"]
    assert mtp["proposed"] > 0 and 0 <= mtp["accepted"] <= mtp["proposed"]
    assert sum(mtp["proposed_by_position"]) == mtp["proposed"] and sum(mtp["accepted_by_position"]) == mtp["accepted"]


def test_streamed_chat_matches_and_says_how_tokens_were_made(served):
    client, messages = served.client(), user(QUESTIONS[1])
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == whole.usage.completion_tokens
    draft = [d for c in chunks if c.model_extra.get("mtp") for d in c.model_extra["mtp"]["draft"]]
    assert len(draft) == usage.completion_tokens  # one entry per token, in order
    kept = [d for d in draft if d is not None]
    assert len(kept) == usage.model_extra["mtp"]["accepted"]
    for a, b in zip(draft, draft[1:]):  # a kept draft at position i > 0 follows the one at i - 1
        assert b is None or b == 0 or a == b - 1


def test_completions_text_and_token_ids(served, plain):
    client = served.client()
    text = "the cat sat on the"
    ids = plain.tokenize(text, add_special=True, parse_special=True)
    plain.truncate(0)
    want = plain.detokenize(generate(plain, ids, 12).tokens)
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == want and r.usage.prompt_tokens == len(ids)
    assert client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0).choices[0].text == want
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=text, max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == want


def test_stop_strings_draft_control_and_thinking(served, plain):
    client, messages = served.client(), user(QUESTIONS[2])
    _, _, answer = reference(plain, messages, 24)
    cut = answer.strip()[3:6]
    assert cut, answer
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0, stop=[cut])
    assert r.choices[0].message.content == answer[:answer.index(cut)] and r.choices[0].finish_reason == "stop"
    off = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                         extra_body={"draft": "off"})
    two = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                         extra_body={"draft": {"max": 2}})
    assert off.choices[0].message.content == two.choices[0].message.content == answer
    assert off.usage.model_extra["mtp"]["proposed"] == 0
    assert 0 < len(two.usage.model_extra["mtp"]["proposed_by_position"]) <= 2
    think_prompt, _, _ = reference(plain, messages, 1, think=True)
    thinking = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                              extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert thinking.usage.prompt_tokens == len(think_prompt) > off.usage.prompt_tokens  # a system turn: <|think|>
    sampled = [client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=1.0,
                                              top_p=0.9, seed=7, extra_body={"top_k": 40, "min_p": 0.05})
               for _ in range(2)]
    assert sampled[0].choices[0].message.content == sampled[1].choices[0].message.content  # one seed, one reply


@pytest.fixture(scope="module")
def png_url() -> str:
    pil = pytest.importorskip("PIL.Image", reason="needs the dev extra (pillow)")
    buf = io.BytesIO()
    pil.fromarray(np.random.default_rng(0).integers(0, 256, (100, 130, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(url: str, text: str | None = "what is in this picture") -> list[dict]:
    parts = [{"type": "text", "text": text}] if text else []
    return [{"role": "user", "content": [*parts, {"type": "image_url", "image_url": {"url": url}}]}]


def test_image_message(vision, png_url):
    messages = image_message(png_url)
    client = vision.client()
    replies = [client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
               for _ in range(2)]
    text_only = client.chat.completions.create(model=MODEL, messages=user("what is in this picture"), max_tokens=1)
    u = replies[0].usage
    assert u.prompt_tokens >= text_only.usage.prompt_tokens + 80  # gemma4v: 80 soft tokens for 130x100
    assert u.completion_tokens > 0 and u.model_extra["mtp"]["proposed"] > 0  # drafting goes on after an image
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content


@pytest.mark.parametrize("stops, answer", [((), "the cat sat on the mat"), (("sat on",), "the cat "),
                                           (("mat", "cat"), "the "), (("t s",), "the ca"), (("dog",), None)])
def test_text_stream_holds_back_what_may_begin_a_stop_string(plain, stops, answer):
    from gguf_mtp.serve.text import TextStream

    text = "the cat sat on the mat"
    tokens = [t for c in text for t in plain.tokenize(c, add_special=False)]  # one token per character
    stream = TextStream(plain, stops)
    pieces = []
    for i, t in enumerate(tokens):
        pieces += stream.feed([t], [i % 3 or None])
        sent = "".join(p.text for p in pieces)
        assert not any(s[:1] and s in sent for s in stops)
    pieces += stream.flush()
    assert "".join(p.text for p in pieces) == stream.answer == (answer or text)
    assert stream.stopped == (answer is not None and bool(stops))
    if not stream.stopped:  # every token's draft position went out with some piece, in order
        assert [d for p in pieces for d in p.draft] == [i % 3 or None for i in range(len(tokens))]


# --- bad input ---------------------------------------------------------------------------------------------------
MSG = user("hi")


def chat_body(**kw: Any) -> dict:
    return {"model": MODEL, "messages": MSG, "max_tokens": 4, **kw}


BAD_INPUT = [  # id, method, path, body (JSON or raw bytes), status, code, param
    ("malformed-json", "POST", CHAT, b'{"model": ', 400, "invalid_json", None),
    ("not-an-object", "POST", CHAT, b"[1, 2]", 400, "invalid_json", None),
    ("nested-too-deeply", "POST", CHAT, b"[" * 100_000, 400, "invalid_json", None),
    ("no-model", "POST", CHAT, {"messages": MSG}, 400, "missing_required_parameter", "model"),
    ("unknown-model", "POST", CHAT, chat_body(model="gpt-4o"), 404, "model_not_found", "model"),
    ("messages-not-a-list", "POST", CHAT, chat_body(messages="hi"), 400, "invalid_type", "messages"),
    ("no-messages", "POST", CHAT, chat_body(messages=[]), 400, "invalid_value", "messages"),
    ("content-a-number", "POST", CHAT, chat_body(messages=[{"role": "user", "content": 5}]), 400, "invalid_type",
     "messages[0].content"),
    ("tool-role-without-call-id", "POST", CHAT, chat_body(messages=[{"role": "tool", "content": "x"}]), 400,
     "invalid_type", "messages[0].tool_call_id"),
    ("function-role", "POST", CHAT, chat_body(messages=[{"role": "function", "content": "x"}]), 400,
     "unsupported_parameter", "messages[0].role"),
    ("temperature-a-string", "POST", CHAT, chat_body(temperature="hot"), 400, "invalid_type", "temperature"),
    ("temperature-too-high", "POST", CHAT, chat_body(temperature=5), 400, "invalid_value", "temperature"),
    ("temperature-nan", "POST", CHAT, b'{"model": "tiny-e", "messages": [], "temperature": NaN}', 400,
     "invalid_value", "temperature"),
    ("max-tokens-negative", "POST", CHAT, chat_body(max_tokens=-1), 400, "invalid_value", "max_tokens"),
    ("max-tokens-huge", "POST", CHAT, chat_body(max_tokens=10**9), 400, "invalid_value", "max_tokens"),
    ("max-tokens-a-boolean", "POST", CHAT, chat_body(max_tokens=True), 400, "invalid_type", "max_tokens"),
    ("stream-a-string", "POST", CHAT, chat_body(stream="yes"), 400, "invalid_type", "stream"),
    ("n-2", "POST", CHAT, chat_body(n=2), 400, "unsupported_parameter", "n"),
    ("tool-name", "POST", CHAT, chat_body(tools=[{"type": "function", "function": {"name": "a b"}}]), 400,
     "invalid_value", "tools[0].function.name"),
    ("five-stops", "POST", CHAT, chat_body(stop=list("abcde")), 400, "invalid_value", "stop"),
    ("draft-word", "POST", CHAT, chat_body(draft="sometimes"), 400, "invalid_value", "draft"),
    ("draft-negative", "POST", CHAT, chat_body(draft={"max": -1}), 400, "invalid_value", "draft.max"),
    ("image-without-a-projector", "POST", CHAT, chat_body(messages=image_message("data:image/png;base64,AAAA")),
     400, "images_not_supported", "messages[0].content[1].image_url.url"),
    ("image-from-assistant", "POST", CHAT, chat_body(messages=[{"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]), 400, "invalid_value",
     "messages[0].content[0].image_url.url"),
    ("prompt-too-long", "POST", CHAT, chat_body(messages=user("the cat " * 400)), 400, "context_length_exceeded",
     "messages"),
    ("body-too-large", "POST", CHAT, b"x" * (MAX_BODY + 1), 413, "request_too_large", None),
    ("completion-batch", "POST", COMPLETIONS, {"model": MODEL, "prompt": ["a", "b"]}, 400, "invalid_value", "prompt"),
    ("completion-bad-token", "POST", COMPLETIONS, {"model": MODEL, "prompt": [10**9]}, 400, "invalid_value",
     "prompt"),
    ("unknown-route", "GET", "/v1/engines", None, 404, "not_found", None),
    ("wrong-method", "GET", CHAT, None, 405, "method_not_allowed", None),
]


IMAGE_URL = "messages[0].content[1].image_url.url"
BAD_IMAGES = [  # id, data URL, code (on the `vision` server)
    ("http-url", "http://example.com/cat.png", "invalid_image_url"),
    ("not-base64", "data:image/png,rawbytes", "invalid_image_url"),
    ("broken-base64", "data:image/png;base64,@@@", "invalid_image_url"),
    ("empty", "data:image/png;base64,", "invalid_image_url"),
    ("not-an-image", "data:image/png;base64," + base64.b64encode(b"not an image").decode(), "invalid_image"),
]
BAD = [("served", *c[1:]) for c in BAD_INPUT] + [
    ("vision", "POST", CHAT, chat_body(messages=image_message(url)), 400, code, IMAGE_URL) for _, url, code in BAD_IMAGES]


@pytest.mark.parametrize("server, method, path, body, status, code, param", BAD,
                         ids=[c[0] for c in BAD_INPUT] + [f"image-{c[0]}" for c in BAD_IMAGES])
def test_bad_input_gets_an_openai_error_and_the_server_goes_on(request, server, method, path, body, status, code,
                                                               param):
    served = request.getfixturevalue(server)
    with served.http() as http:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
        r = http.request(method, path, **kw)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert (error["code"], error["param"]) == (code, param), error
        assert http.post(CHAT, json=chat_body(max_tokens=2)).status_code == 200  # still serving


def test_limits_are_named_in_the_message(served):
    with served.http() as http:
        huge = http.post(CHAT, json=chat_body(max_tokens=10**9)).json()["error"]["message"]
        long = http.post(CHAT, json=chat_body(messages=user("the cat " * 400))).json()["error"]["message"]
    assert "512" in huge and "the context holds 512 tokens" in long


def test_client_raises_its_own_exception_types(served):
    client = served.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=-1)
    assert e.value.status_code == 400 and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    with pytest.raises(openai.AuthenticationError):
        served.client(key="wrong").chat.completions.create(model=MODEL, messages=MSG)


def test_api_key(served):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("GET", "/v1/models"), ("POST", CHAT), ("GET", "/metrics")):
            r = httpx2.request(method, served.url + path, headers=headers, json=chat_body())
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx2.get(f"{served.url}/health").status_code == 200  # for load balancers


def test_metrics(served):
    served.client().chat.completions.create(model=MODEL, messages=MSG, max_tokens=4)
    with served.http() as http:
        r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    lines = dict(line.rsplit(" ", 1) for line in r.text.splitlines() if not line.startswith("#"))
    for name in ("tokens_per_second", "slots", "slots_busy", "queue_depth", "draft_proposed_total"):
        assert f"gguf_mtp_{name}" in lines
    assert lines["gguf_mtp_slots"] == "4" and float(lines["gguf_mtp_generated_tokens_total"]) > 0
    assert 'gguf_mtp_draft_acceptance_by_position{position="0"}' in lines
    assert float(lines['gguf_mtp_http_requests_total{route="/v1/chat/completions",status="200"}']) >= 1


# --- a busy server: full queue, disconnects, shutdown -------------------------------------------------------------
def open_stream(http: httpx2.Client, max_tokens: int = 400) -> httpx2.Response:
    req = http.build_request("POST", CHAT, json=chat_body(max_tokens=max_tokens, stream=True))
    r = http.send(req, stream=True)
    assert r.status_code == 200
    return r


def test_full_queue_is_503_with_retry_after(slow):
    with slow.http() as a, slow.http() as b, slow.http() as c:
        running, waiting = open_stream(a), None
        try:
            wait_for(lambda: slow.scheduler.snapshot().busy == 1)
            waiting = open_stream(b)
            wait_for(lambda: slow.scheduler.snapshot().queued == 1)
            r = c.post(CHAT, json=chat_body())
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "server_busy"
            with pytest.raises(openai.InternalServerError) as e:
                slow.client().chat.completions.create(model=MODEL, messages=MSG)
            assert e.value.status_code == 503
        finally:
            running.close()
            if waiting is not None:
                waiting.close()
    wait_for(lambda: slow.scheduler.snapshot().busy == slow.scheduler.snapshot().queued == 0)


def test_disconnect_mid_stream_frees_the_slot(slow):
    finished = len(slow.scheduler.reasons)
    with slow.http() as http:
        r = open_stream(http)
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(6)) if line.startswith("data:")]
        assert len(got) >= 3
        r.close()
    wait_for(lambda: len(slow.scheduler.reasons) > finished)
    assert slow.scheduler.reasons[finished:] == ["cancelled"]
    assert slow.scheduler.snapshot().busy == 0
    with slow.http() as http:  # a non-streamed request whose client gives up is cancelled too
        with pytest.raises(httpx2.ReadTimeout):
            http.post(CHAT, json=chat_body(max_tokens=400), timeout=0.5)
    wait_for(lambda: len(slow.scheduler.reasons) > finished + 1)
    assert slow.scheduler.reasons[finished + 1:] == ["cancelled"]


def test_disconnect_cancels_in_the_batched_scheduler(served):
    before = served.scheduler.snapshot()
    limit = SLOT_CTX - 20
    with served.http() as http:
        r = open_stream(http, max_tokens=limit)
        assert len([line for line, _ in zip(r.iter_lines(), range(8)) if line.startswith("data:")]) >= 4
        r.close()
    wait_for(lambda: served.scheduler.snapshot().requests > before.requests)
    after = served.scheduler.snapshot()
    assert after.busy == 0 and after.stats.tokens - before.stats.tokens < limit  # cut short, slot free


def test_shutdown_refuses_new_work_and_ends_running_streams(runtime_ggufs):
    engines = load_engines(runtime_ggufs, 1)
    try:
        with serving(FakeScheduler(FakeBatchEngine(engines), delay=0.05, ignore_eog=True)) as s:
            with httpx2.Client(base_url=s.url, timeout=30) as http:
                r = open_stream(http)
                wait_for(lambda: s.scheduler.snapshot().busy == 1)
                t0 = time.monotonic()
                s.state.begin_shutdown(grace=0.2)
                after = http.post(CHAT, json=chat_body())
                assert after.status_code == 503 and after.json()["error"]["code"] == "shutting_down"
                assert http.get("/health").status_code == 503
                events = [line for line in r.iter_lines() if line.startswith("data:")]
                assert time.monotonic() - t0 < 10
                assert '"code": "shutting_down"' in events[-1]  # the cut stream says why
    finally:
        for e in engines:
            e.close()


# --- load ---------------------------------------------------------------------------------------------------------
def rss_mb() -> float:
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs /proc")
    return int(next(ln for ln in status.read_text().splitlines() if ln.startswith("VmRSS")).split()[1]) / 1024


def test_load_200_requests_16_concurrent(served, plain):
    """No 5xx but deliberate 503s, no lost or duplicated responses, each one its own prompt's greedy reply, and
    memory flat after warm-up."""
    lengths = (4, 8, 12)
    jobs = [(QUESTIONS[i % len(QUESTIONS)], lengths[i % len(lengths)], i % 2 == 0) for i in range(216)]
    want = {(q, n): reference(plain, user(q), n)[2] for q, n, _ in jobs}
    client = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0, timeout=120)

    async def one(q: str, n: int, stream: bool, gate: asyncio.Semaphore) -> tuple[str, str | int]:
        async with gate:
            try:
                if not stream:
                    r = await client.chat.completions.create(model=MODEL, messages=user(q), max_tokens=n,
                                                             temperature=0)
                    return r.id, r.choices[0].message.content
                text, rid = "", None
                async for c in await client.chat.completions.create(model=MODEL, messages=user(q), max_tokens=n,
                                                                    temperature=0, stream=True):
                    rid = c.id
                    text += (c.choices[0].delta.content or "") if c.choices else ""
                return rid, text
            except openai.APIStatusError as e:
                return "", e.status_code

    async def run(batch: list) -> list:
        gate = asyncio.Semaphore(16)
        return await asyncio.gather(*(one(*job, gate) for job in batch))

    async def all_batches() -> tuple[list, float, list, float]:
        warm = await run(jobs[:40])
        rss_warm = rss_mb()
        rest = await run(jobs[40:])
        await client.close()
        return warm, rss_warm, rest, rss_mb()

    warm, rss_warm, rest, rss_end = asyncio.run(all_batches())
    results = warm + rest
    assert len(results) == len(jobs)
    statuses = [r for _, r in results if isinstance(r, int)]
    assert set(statuses) <= {503}, statuses
    ids = [rid for rid, r in results if isinstance(r, str)]
    assert len(ids) + len(statuses) == len(jobs) and len(set(ids)) == len(ids)
    wrong = [(q, n, r) for (q, n, _), (_, r) in zip(jobs, results) if isinstance(r, str) and r != want[(q, n)]]
    assert not wrong, wrong[:3]
    assert rss_end - rss_warm < 64, (rss_warm, rss_end)
    assert served.scheduler.snapshot().busy == served.scheduler.snapshot().queued == 0


# --- the command --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("127.5.0.1", True), ("0.0.0.0", False), ("192.0.2.1", False),
                                            ("example.com", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) == loopback


def test_cli_bad_input(runtime_ggufs, tmp_path):
    target, drafter = runtime_ggufs[FAMILY]
    run = lambda *a: CliRunner().invoke(main, ["serve", *map(str, a)])  # noqa: E731
    r = run("--target", tmp_path / "missing.gguf")
    assert r.exit_code == 2 and "error: target" in r.stderr and "does not exist" in r.stderr
    with contextlib.closing(bind("127.0.0.1", 0)) as taken:
        r = run("--target", target, "--drafter", drafter, "--port", taken.getsockname()[1])
    assert r.exit_code == 2 and "error: cannot listen on 127.0.0.1:" in r.stderr
    r = run("--target", target, "--host", "192.0.2.1", "--port", 0)  # not this machine's: warns, then fails
    assert "warning: --host 192.0.2.1 is reachable from other machines; without --api-key" in r.stderr
    assert r.exit_code == 2 and "error: cannot listen on 192.0.2.1:0" in r.stderr
    r = run("--target", target, "--draft-max", 2, "--adaptive")
    assert r.exit_code == 2 and "--draft-max fixes the draft length" in r.stderr


def test_sigterm_ends_running_work_and_exits(runtime_ggufs):
    """The command in a subprocess: it says where it listens, serves, and on SIGTERM cuts a running stream (no
    --grace) with an error event saying why, and exits 0 without hanging."""
    target, drafter = runtime_ggufs[FAMILY]
    cmd = [sys.executable, "-m", "gguf_mtp", "serve", "--target", str(target), "--drafter", str(drafter),
           "--port", "0", "--parallel", "2", "--grace", "0", "--model-name", MODEL, "--threads", "1",
           "--flash-attn", "off", "--ctx", "1024"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 60
        while "serving " not in line:
            assert time.monotonic() < deadline and proc.poll() is None, line
            line = proc.stderr.readline()
        url = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)[1]
        assert "tiny-e (MTP drafter, 2 slots of 512 positions)" in line
        with httpx2.Client(base_url=url, timeout=30) as http:
            assert http.post(CHAT, json=chat_body()).status_code == 200
            events: list[str] = []
            stream = http.send(http.build_request("POST", CHAT, json=chat_body(max_tokens=500, stream=True)),
                               stream=True)
            reader = threading.Thread(target=lambda: events.extend(stream.iter_lines()), daemon=True)
            reader.start()
            wait_for(lambda: len(events) >= 4)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            reader.join(timeout=10)
            assert not reader.is_alive()
            assert '"code": "shutting_down"' in [e for e in events if e][-1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
