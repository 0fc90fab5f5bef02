"""The server's side of the engine thread: requests handed to the batched scheduler, its events read back in
asyncio.

``runtime/scheduler.py`` owns the one thread that touches llama.cpp; ``submit`` is thread-safe and returns at
once, and each request's events (``Round``, then a final ``Finished`` or ``Failed``) arrive through a ``sink``
called on the engine thread, which here only hands them to the request's asyncio queue. Refusals at submit are
the scheduler's exceptions, mapped to HTTP statuses (``REFUSALS``). Leaving ``events`` early (a client
that disconnected, a stop string, shutdown) cancels the request in the scheduler, which frees its slot.

A prompt with images or audio owns libmtmd objects the engine thread reads while it prefills: they are freed when both
the request is final and the server is done with it, whichever comes last.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from ..errors import GgufMtpError
from ..runtime.scheduler import Failed, Finished, PromptTooLong, QueueFull, Request, SchedulerClosed
from .prompts import Prompt
from .schema import ApiError

REFUSALS = {  # scheduler exception -> (HTTP status, OpenAI error type, code); any other GgufMtpError is a 400
    QueueFull: (503, "server_error", "server_busy"),
    SchedulerClosed: (503, "server_error", "shutting_down"),
    PromptTooLong: (400, "invalid_request_error", "context_length_exceeded"),
}
RETRY_AFTER_S = 1  # what a 503 tells the client to wait


class Handle(Protocol):
    done: bool


class Scheduler(Protocol):
    """``runtime.scheduler.Scheduler`` as far as the server uses it."""

    engine: Any  # BatchEngine: tokenizer (any thread), slot_ctx, n_seq, k_max, has_drafter

    def submit(self, request: Any, sink: Callable[[Any], None] | None = None) -> Handle: ...

    def cancel(self, handle: Handle) -> None: ...

    def snapshot(self) -> Any: ...

    def stop(self, grace: float = 0.0) -> None: ...


def is_final(event: Any) -> bool:
    return isinstance(event, Finished | Failed)


def refusal(e: GgufMtpError) -> ApiError:
    status, kind, code = REFUSALS.get(type(e), (400, "invalid_request_error", "invalid_value"))
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return ApiError(status, str(e), type=kind, code=code, headers=headers)


class _Release:
    """Frees a prompt's resources once both the engine thread and the server are done with it."""

    def __init__(self, prompt: Prompt) -> None:
        self.prompt, self.lock, self.left = prompt, threading.Lock(), 2

    def __call__(self) -> None:
        with self.lock:
            self.left -= 1
            last = self.left == 0
        if last:
            self.prompt.close()


class EngineThread:
    """Submits requests (with images and audio, through ``projector``) and streams their events."""

    def __init__(self, scheduler: Scheduler, projector: Any = None) -> None:
        self.scheduler, self.projector = scheduler, projector

    @property
    def engine(self) -> Any:
        return self.scheduler.engine

    def submit(self, prompt: Prompt, **request: Any) -> Run:
        """Hand ``prompt`` with the Request fields ``request`` to the scheduler (refusals raise ``ApiError`` here,
        before a response starts); the Run yields its events. Must be called on the event loop's thread."""
        run = Run(self.scheduler, prompt)
        try:
            run.handle = self.scheduler.submit(Request(prompt=prompt.tokens, media=prompt.media, **request),
                                               sink=run.sink)
        except GgufMtpError as e:
            prompt.close()
            raise refusal(e) from None
        return run


class Run:
    """One submitted request: ``async for event in run`` up to the final event; ``cancel()`` at any time (the
    final ``Finished("cancelled")`` still comes). Leaving the loop early cancels too."""

    def __init__(self, scheduler: Scheduler, prompt: Prompt) -> None:
        self.scheduler, self.handle = scheduler, None
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.release = _Release(prompt) if prompt.media is not None or prompt.attached else None

    def sink(self, event: Any) -> None:
        """Called on the engine thread: must not block or raise."""
        if self.release is not None and is_final(event):
            self.release()
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (the server stopped)
            pass

    def cancel(self) -> None:
        self.scheduler.cancel(self.handle)

    async def __aiter__(self) -> AsyncIterator[Any]:
        try:
            while True:
                event = await self.queue.get()
                yield event
                if is_final(event):
                    return
        finally:
            if not self.handle.done:
                self.cancel()
            if self.release is not None:
                self.release()
