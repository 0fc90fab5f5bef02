"""The OpenAI-compatible HTTP routes (Starlette): models, chat completions, completions, health, metrics, and the
chat page (``GET /``: static files in static/, which use the API like any client).

Every route goes through ``_endpoint``: the API key, shutdown (503), ``ApiError`` -> OpenAI's error object, any
other exception -> 500 with the same shape (the server keeps serving), and the per-route request counter. A
generation request is checked (schema.py), rendered and tokenized on a worker thread (prompts.py), submitted to
the scheduler (engine_thread.py: a full queue is a 503 with Retry-After before any byte of a stream), then either
streamed as server-sent events, one chunk per token, or collected. A client that goes away cancels its request,
streamed or not.
"""

from __future__ import annotations

import contextlib
import hmac
import importlib.resources
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..runtime.chat import STOP_TEXTS, special_id
from ..runtime.loop import Round
from ..runtime.sampling import SamplingParams
from ..runtime.scheduler import Finished
from .engine_thread import RETRY_AFTER_S, EngineThread, Run
from .metrics import Metrics
from .prompts import Prompt, chat_prompt, check_fits, completion_prompt
from .schema import ApiError, Envelope, Generation, Usage, bad, parse_chat, parse_completion
from .text import Piece, TextStream
from .tools import CALL_OPEN, CallStream, Tools, call_grammar, check_vocabulary, parse_tools, stop_ids, text_engine

log = logging.getLogger("gguf_mtp.serve")

MAX_BODY = 32 << 20  # bytes of a request body (images and audio come base64-encoded inside it)
FINISH = {"eog": "stop", "stop": "stop", "max_tokens": "length", "context": "length"}  # scheduler -> OpenAI
CLIENT_GONE = 499  # nginx's status for a client that closed the connection first (metrics only)
PAGE_FILES = {"/": ("index.html", "text/html"), "/chat.css": ("chat.css", "text/css"),
              "/chat.js": ("chat.js", "text/javascript")}  # path -> file in static/, its media type
PAGE_HEADERS = {  # the page loads nothing from elsewhere; images and audio are the user's own data: URLs
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; media-src data:; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


@dataclass
class ServeConfig:
    model: str  # the id /v1/models lists and requests must name
    api_key: str | None = None
    think: bool = False  # thinking mode when a request does not say (chat_template_kwargs.enable_thinking)
    sampling: SamplingParams = field(default_factory=SamplingParams)  # for fields a request leaves out
    accept: str = "exact"
    draft: str | int = "adaptive"  # when a request has no "draft"
    grace: float = 10.0  # seconds running requests get to finish after SIGTERM
    max_body: int = MAX_BODY


@dataclass
class Outcome:
    """How a generation ended: the OpenAI finish reason (or an error) and its usage."""

    usage: Usage
    finish: str | None = None
    error: ApiError | None = None


class ServerState:
    """What the routes share: the engine thread, the config, the metrics, and whether shutdown has begun."""

    def __init__(self, engine_thread: EngineThread, config: ServeConfig) -> None:
        self.engine_thread, self.config = engine_thread, config
        self.metrics = Metrics()
        self.started = int(time.time())
        self.stopping: threading.Thread | None = None
        engine = engine_thread.engine
        self.chat_stops = frozenset(i for i in (special_id(engine, s) for s in STOP_TEXTS) if i is not None)

    @property
    def scheduler(self) -> Any:
        return self.engine_thread.scheduler

    def begin_shutdown(self, grace: float | None = None) -> None:
        """Refuse new requests (503) and let running ones finish for ``grace`` seconds, then cancel them."""
        if self.stopping is None:
            grace = self.config.grace if grace is None else grace
            self.stopping = threading.Thread(target=self.scheduler.stop, args=(grace,), name="gguf-mtp-stop",
                                             daemon=True)
            self.stopping.start()

    def close(self) -> None:
        self.begin_shutdown(0.0)
        self.stopping.join()

    # --- checks every route shares --------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def refuse_when_stopping(self) -> None:
        if self.stopping is not None:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down",
                           headers={"Retry-After": str(RETRY_AFTER_S)})

    def check_model(self, name: str) -> None:
        if name != self.config.model:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.config.model!r}",
                           param="model", code="model_not_found")

    async def read_json(self, request: Request) -> dict[str, Any]:
        limit = self.config.max_body
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        except RecursionError:
            raise ApiError(400, "the body is not valid JSON: nested too deeply", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"expected a JSON object, got {type(body).__name__}", code="invalid_json")
        return body

    # --- one generation -------------------------------------------------------------------------------
    @property
    def engine(self) -> Any:
        return self.engine_thread.engine

    def submit(self, prompt: Prompt, gen: Generation, stops: frozenset[int], param: str) -> Run:
        max_tokens = check_fits(prompt, self.engine.slot_ctx, gen.max_tokens, param)
        draft = {"server": self.config.draft, "fixed": gen.draft.k}.get(gen.draft.mode, gen.draft.mode)
        return self.engine_thread.submit(prompt, max_tokens=max_tokens, sampling=gen.sampling,
                                         accept=self.config.accept, draft=draft, stop_tokens=stops,
                                         grammar=gen.grammar)

    async def pieces(self, run: Run, text: TextStream, out: Outcome) -> AsyncIterator[Piece]:
        """The text pieces of a request's events; ``out`` gets the finish reason and usage at the end."""
        t0 = time.monotonic()
        async for ev in run:
            if isinstance(ev, Round):
                self.metrics.tokens(len(ev.tokens))
                if ev.first:
                    self.metrics.first_token(time.monotonic() - t0)
                was_stopped = text.stopped
                for piece in text.feed(ev.tokens, [i if i < ev.kept else None for i in range(len(ev.tokens))]):
                    yield piece
                if text.stopped and not was_stopped:  # a stop string: the rest is not wanted
                    run.cancel()
            elif isinstance(ev, Finished):
                out.usage.stats = ev.stats
                if text.stopped:
                    out.finish = "stop"
                elif ev.reason in FINISH:
                    out.finish = FINISH[ev.reason]
                else:
                    out.error = ApiError(503, "the request was cancelled: the server is shutting down",
                                         type="server_error", code="shutting_down")
            else:  # Failed
                out.error = ApiError(500, f"generation failed: {ev.message}", type="server_error")
        if out.error is None:
            for piece in text.flush():
                yield piece


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


# --- routes -----------------------------------------------------------------------------------------------
Handler = Callable[[ServerState, Request], Awaitable[Response]]


def _model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.config.model, "object": "model", "created": state.started, "owned_by": "gguf-mtp"}


async def list_models(state: ServerState, request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(state)]})


async def get_model(state: ServerState, request: Request) -> Response:
    state.check_model(request.path_params["model"])
    return JSONResponse(_model_card(state))


async def chat_completions(state: ServerState, request: Request) -> Response:
    state.refuse_when_stopping()
    body = await state.read_json(request)
    req = parse_chat(body, state.config.sampling, state.engine.slot_ctx)
    tools = parse_tools(body)
    state.check_model(req.generation.model)
    stops = state.chat_stops
    if tools is not None:
        check_vocabulary(state.engine)
        stops = stops | stop_ids(state.engine, tools)
        if tools.constrained:
            if req.generation.grammar is not None:
                raise bad("tool_choice", f"{tools.choice!r} cannot be combined with a response_format grammar",
                          code="invalid_value")
            forced = [f for f in tools.functions if tools.forced in (None, f.name)]
            req.generation.grammar = call_grammar(forced)
    think = state.config.think if req.think is None else req.think
    prompt = await anyio.to_thread.run_sync(chat_prompt, state.engine, state.engine_thread.projector, req, think,
                                            tools)
    return await _generate(state, request, "chat", prompt, req.generation, stops, tools)


async def completions(state: ServerState, request: Request) -> Response:
    state.refuse_when_stopping()
    req = parse_completion(await state.read_json(request), state.config.sampling, state.engine.slot_ctx)
    state.check_model(req.generation.model)
    prompt = await anyio.to_thread.run_sync(completion_prompt, state.engine, req)
    return await _generate(state, request, "text", prompt, req.generation, frozenset())


async def health(state: ServerState, request: Request) -> Response:
    snap = state.scheduler.snapshot()
    ok = state.stopping is None and snap.running
    body = {"status": "ok" if ok else "unavailable", "model": state.config.model, "slots": snap.slots,
            "busy": snap.busy, "queued": snap.queued}
    return JSONResponse(body, status_code=200 if ok else 503)


async def metrics(state: ServerState, request: Request) -> Response:
    text = state.metrics.render(state.scheduler.snapshot())
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


async def page(state: ServerState, request: Request) -> Response:
    """The chat page's files (no API key: the page asks for it and sends it with its API calls)."""
    name, media = PAGE_FILES[request.url.path]
    text = importlib.resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")
    if name == "index.html" and state.config.api_key is not None:  # so the page asks for the key up front
        text = text.replace('<body data-auth="none">', '<body data-auth="bearer">')
    return Response(text, media_type=f"{media}; charset=utf-8", headers=PAGE_HEADERS)


# --- generation responses ---------------------------------------------------------------------------------
async def _generate(state: ServerState, request: Request, kind: str, prompt: Prompt, gen: Generation,
                    stops: frozenset[int], tools: Tools | None = None) -> Response:
    try:
        run = state.submit(prompt, gen, stops, "messages" if kind == "chat" else "prompt")
    except BaseException:
        prompt.close()
        raise
    env = Envelope(kind, state.config.model)
    text = TextStream(state.engine if tools is None else text_engine(state.engine), gen.stop,
                      thoughts=kind == "chat")
    out = Outcome(Usage(prompt_tokens=len(prompt.tokens)))
    calls = None if tools is None else CallStream(tools.names(), CALL_OPEN if tools.constrained else "")
    if gen.stream:
        return StreamingResponse(_sse(state, run, env, text, out, gen.include_usage, calls),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    answer = []

    async def collect() -> None:
        async for piece in state.pieces(run, text, out):
            piece = piece if calls is None else calls.feed(piece)
            if piece is not None and not piece.thought:
                answer.append(piece.text)

    if not await _unless_disconnected(request, collect()):
        return Response(status_code=CLIENT_GONE)
    if out.error is not None:
        raise out.error
    rest, tool_calls = _finish_calls(calls, out)
    return JSONResponse(env.response("".join(answer) + rest, text.thoughts, out.finish, out.usage, tool_calls))


def _finish_calls(calls: CallStream | None, out: Outcome) -> tuple[str, list[dict[str, Any]]]:
    """The held text and the parsed tool calls at the end of a tool request (finish_reason "tool_calls" when
    there are calls; a malformed call stays text with the finish reason it had)."""
    if calls is None:
        return "", []
    rest, tool_calls = calls.finish(closed_by_stop=out.finish == "stop")
    if tool_calls:
        out.finish = "tool_calls"
    return rest, tool_calls


def _event(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(state: ServerState, run: Run, env: Envelope, text: TextStream, out: Outcome,
               include_usage: bool, calls: CallStream | None = None) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: a role chunk (chat), one chunk per token, the finish chunk, the
    usage chunk when asked for, ``[DONE]``; an error after the stream began is an ``error`` event."""
    if env.kind == "chat":
        yield _event(env.chunk(role=True))
    async for piece in state.pieces(run, text, out):
        piece = piece if calls is None else calls.feed(piece)
        if piece is not None:
            yield _event(env.chunk(piece.text, piece.thought, draft=piece.draft))
    if out.error is not None:
        yield _event(out.error.body())
        return
    rest, tool_calls = _finish_calls(calls, out)
    if rest:
        yield _event(env.chunk(rest))
    for i, call in enumerate(tool_calls):  # one delta per call: its id, name and whole arguments
        yield _event(env.chunk(tool_calls=[{"index": i, **call}]))
    yield _event(env.chunk(finish=out.finish))
    if include_usage:
        yield _event(env.usage_chunk(out.usage))
    yield _event("[DONE]")


async def _unless_disconnected(request: Request, work: Awaitable[None]) -> bool:
    """Run ``work`` unless the client disconnects first (then it is cancelled, which cancels its request)."""
    done = False
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        await work
        done = True
        tg.cancel_scope.cancel()
    return done


def _endpoint(state: ServerState, route: str, handler: Handler, auth: bool = True) -> Callable:
    async def endpoint(request: Request) -> Response:
        try:
            if auth:
                state.authorize(request)
            response = await handler(state, request)
        except ApiError as e:
            response = error_response(e)
        except Exception:  # a bug: the request fails, the server goes on
            log.exception("%s failed", route)
            response = error_response(ApiError(500, "internal server error (see the server's log)",
                                               type="server_error"))
        state.metrics.request(route, response.status_code)
        return response

    return endpoint


ROUTES = (  # path, methods, handler, needs the API key
    ("/v1/models", ["GET"], list_models, True),
    ("/v1/models/{model:path}", ["GET"], get_model, True),
    ("/v1/chat/completions", ["POST"], chat_completions, True),
    ("/v1/completions", ["POST"], completions, True),
    ("/health", ["GET"], health, False),
    ("/metrics", ["GET"], metrics, True),
    *((path, ["GET"], page, False) for path in PAGE_FILES),
)
HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def create_app(engine_thread: EngineThread, config: ServeConfig) -> Starlette:
    """The ASGI app over a started scheduler; its lifespan's end stops the scheduler (``ServerState.close``)."""
    state = ServerState(engine_thread, config)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code=HTTP_CODES.get(exc.status_code)))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await anyio.to_thread.run_sync(state.close)

    routes = [Route(path, _endpoint(state, path, handler, auth), methods=methods)
              for path, methods, handler, auth in ROUTES]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.state.serve = state
    return app
