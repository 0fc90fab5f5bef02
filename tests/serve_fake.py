"""A stand-in for ``runtime.scheduler.Scheduler``: the same interface (``submit(request, sink)``, ``cancel``,
``snapshot``, ``stop(grace)``) and the same event and refusal classes, built from N single-sequence engines (the
speculative loop), one worker thread each, and a bounded wait queue.

The server tests use it where timing must be under the test's control: ``delay`` slows every round, so a queue
can be filled, a stream interrupted mid-way, or a shutdown caught with work in flight (``ignore_eog``: requests
run to their max_tokens).
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from gguf_mtp.errors import GgufMtpError
from gguf_mtp.runtime.adaptive import AdaptiveK, FixedK
from gguf_mtp.runtime.loop import Round, speculative_generate
from gguf_mtp.runtime.scheduler import Failed, Finished, PromptTooLong, QueueFull, Request, SchedulerClosed
from gguf_mtp.runtime.stats import Stats


@dataclass(eq=False)
class Handle:
    id: int
    request: Request
    sink: Any
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: bool = False


class FakeBatchEngine:
    """N engines standing in for one BatchEngine: the first one's tokenizer; each slot holds a whole context."""

    def __init__(self, engines: list) -> None:
        self.engines, self.engine = engines, engines[0]
        self.n_seq, self.slot_ctx = len(engines), engines[0].n_ctx

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


class FakeScheduler:
    def __init__(self, engine: FakeBatchEngine, max_queue: int = 64, delay: float = 0.0,
                 ignore_eog: bool = False) -> None:
        self.engine, self.max_queue, self.delay, self.ignore_eog = engine, max_queue, delay, ignore_eog
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._media_lock = threading.Lock()  # one projector for all slots: one image prompt at a time
        self._ids = itertools.count(1)
        self.waiting = self.busy = self.requests = 0
        self.closed = False
        self._cancel_all = threading.Event()  # stop() after its grace
        self.reasons: list[str] = []  # every final reason, in order (tests read it)
        self.total = Stats()
        self._threads = [threading.Thread(target=self._worker, args=(e,), daemon=True) for e in engine.engines]
        for t in self._threads:
            t.start()

    # --- the interface ----------------------------------------------------------------------------------------
    def submit(self, request: Request, sink: Any = None) -> Handle:
        if len(request.prompt) >= self.engine.slot_ctx:
            raise PromptTooLong(len(request.prompt), self.engine.slot_ctx, self.engine.slot_ctx, 1)
        with self._lock:
            if self.closed:
                raise SchedulerClosed()
            if self.waiting >= self.max_queue:
                raise QueueFull(self.max_queue)
            self.waiting += 1
        handle = Handle(next(self._ids), request, sink)
        self._queue.put(handle)
        return handle

    def cancel(self, handle: Handle) -> None:
        handle.cancelled.set()

    def snapshot(self) -> SimpleNamespace:
        with self._lock:
            return SimpleNamespace(slots=self.engine.n_seq, busy=self.busy, queued=self.waiting,
                                   max_queue=self.max_queue, running=not self.closed, requests=self.requests,
                                   stats=self.total)

    def stop(self, grace: float = 0.0) -> None:
        with self._lock:
            if self.closed and not any(t.is_alive() for t in self._threads):
                return
            self.closed = True
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (self.busy or self.waiting):
            time.sleep(0.01)
        self._cancel_all.set()
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=30)

    # --- the slots ----------------------------------------------------------------------------------------
    def _worker(self, eng: Any) -> None:
        while (h := self._queue.get()) is not None:
            with self._lock:
                self.waiting -= 1
                self.busy += 1
            try:
                final = self._run(eng, h)
            except GgufMtpError as e:
                final = Failed(str(e))
            with self._lock:
                self.busy -= 1
                self.requests += 1
                self.reasons.append(getattr(final, "reason", "failed"))
            h.done = True
            h.sink(final)

    def _cancelled(self, h: Handle) -> bool:
        return h.cancelled.is_set() or self._cancel_all.is_set()

    def _run(self, eng: Any, h: Handle) -> Finished:
        r, stats, tokens = h.request, Stats(), []
        if self._cancelled(h):
            return Finished("cancelled", stats, tokens)
        k_max = eng.k_max if eng.has_drafter else 0
        chooser = (AdaptiveK(k_max) if r.draft == "adaptive" and k_max else
                   FixedK(0 if r.draft in ("off", "adaptive") else min(r.draft, k_max)))
        with self._media_lock if r.media is not None else contextlib.nullcontext():
            gen = speculative_generate(eng, r.prompt, max_tokens=r.max_tokens, sampling=r.sampling, accept=r.accept,
                                       chooser=chooser, stats=stats, stop_tokens=r.stop_tokens, media=r.media,
                                       ignore_eog=r.ignore_eog or self.ignore_eog)
            reason = ""
            try:
                for rnd in gen:
                    tokens += rnd.tokens
                    h.sink(Round(list(rnd.tokens), rnd.k, rnd.kept, rnd.first))
                    if self.delay:
                        time.sleep(self.delay)
                    if self._cancelled(h):
                        reason = "cancelled"
                        break
            finally:
                gen.close()
        with self._lock:
            self.total.add(stats)
        return Finished(reason or stats.stop_reason, stats, tokens)

