"""Continuous batching of MTP requests on one ``BatchEngine``, driven by one engine thread.

Interface (what a server codes against)::

    engine = BatchEngine.load(target, drafter, settings, n_seq=4,   # settings.n_ctx: the KV pool of all slots
                              mmproj=None)             # or a projector (images, audio): engine.projector
    sched = Scheduler(engine, max_queue=64, prefill_chunk=256).start()   # starts the engine thread
    h = sched.submit(Request(prompt_tokens, max_tokens, SamplingParams(...), accept="exact",
                             draft="adaptive",         # or "off", or a fixed k
                             stop_tokens=frozenset(), ignore_eog=False,
                             media=None,               # images and audio: see below
                             grammar=None), sink=None) # GBNF text: constrained decoding (grammar.py)
    for event in h:      # blocks; Round per round, then one final Finished or Failed
        ...
    h.cancel()           # any thread, any time; the request ends with Finished("cancelled")
    sched.snapshot()     # Snapshot(slots, busy, queued, max_queue, running, requests, stats): metrics
    sched.stop(grace=5.0)   # refuse new requests, let the rest finish for up to 5 s, cancel what is left

- ``submit`` is thread-safe and refuses at once: ``PromptTooLong`` (names the slot's context), ``QueueFull``
  (more than ``max_queue`` requests already waiting for a slot), ``SchedulerClosed`` (after ``stop``),
  ``GgufMtpError`` (a malformed request). All are ``GgufMtpError``s.
- Events: ``Round(tokens, k, kept, first)`` (loop.Round: ``tokens[:kept]`` are kept drafts, draft positions
  0..kept-1; ``tokens[kept:]``, at most one, the target's own token; ``first``: the token sampled from the
  prompt), then ``Finished(reason, stats, tokens)`` (reason eog | stop | max_tokens | context | cancelled) or
  ``Failed(message)``. With ``sink`` they are passed to ``sink(event)`` on the engine thread (it must not block;
  asyncio: ``loop.call_soon_threadsafe``) instead of ``handle.events``.
- The tokenizer (``engine.tokenize`` ...) is safe from any thread; llama.cpp's contexts are touched only by the
  engine thread (or by the caller of ``step``, which runs one iteration instead of ``start``: tests).
- Images and audio: a ``Request`` with ``media`` (a ``multimodal.MediaPrompt`` from a projector loaded on this
  engine's target, ``prompt`` = ``media.tokens``) has each image or audio chunk encoded and decoded into its own
  sequence (libmtmd's decode, whole, between the text chunks), and MTP drafts after it as after text (the drafter
  reads the last prompt row). Media positions hold the image's or clip's identity id, so a slot that holds one is
  reused like text. The caller keeps the MediaPrompt (and its images and clips) open until the final event;
  ``media.encoded`` then says how many media positions were encoded (0 when the slot's cache held them). Build it
  as ``media = engine.projector.tokenize(text, media_items)``, ``prompt_tokens = media.tokens``.
- Grammars: a ``Request`` with ``grammar`` (GBNF) has every token chosen under its grammar state, as in the
  single-sequence loop (grammar.py): its drafts are steered by the grammar (each the drafter's best allowed
  token, the chain ends where the grammar is complete or allows nothing), drafts are cut at the first token the
  grammar rejects before the round's target decode (``Stats.grammar_cut``; 0 for steered drafts), each verify
  row chooses under its own state, and only emitted tokens advance it.

Each iteration (``step``): cancellations are settled; waiting requests take free slots (the slot whose cache
shares the longest prefix with the prompt: a conversation's next turn reads only its new part); prompts are
read in chunks of ``prefill_chunk`` tokens while others generate, so a long prompt delays their rounds by one
chunk at a time (an image or audio chunk, decoded whole, counts its positions against the chunk); then one round
for every generating sequence: each drafter step for all of them in one drafter decode, every sequence's
[y, d1..dk] verified in one target decode, acceptance and KV rollback per sequence, with the single-sequence
loop's pieces (sampling.accept_drafts / pick, drafters.draft_token, loop.emit). Draft lengths: per request "off",
a fixed k, or "adaptive" (adaptive.BatchAdaptiveK on the batch's measured costs).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import GgufMtpError
from .adaptive import BatchAdaptiveK, FixedK, PositionAcceptance
from .batch_engine import BatchEngine, Part
from .drafters import Draft, draft_token, sampled_drafts
from .grammar import Grammar, Rows, check_grammar
from .loop import ACCEPT_MODES, Round, StopRule, emit
from .sampling import SamplingParams, accept_drafts, pick
from .stats import Stats

if TYPE_CHECKING:
    from .multimodal import MediaPrompt, MediaSpan

log = logging.getLogger("gguf_mtp.runtime")

DRAFT_POLICIES = ("off", "adaptive")  # or a fixed k >= 0


# --- requests, events, refusals -------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    prompt: Sequence[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    accept: str = "exact"  # exact | rejection
    draft: str | int = "adaptive"  # off | adaptive | a fixed k (capped by the engine's k_max)
    stop_tokens: frozenset[int] = frozenset()
    ignore_eog: bool = False
    media: MediaPrompt | None = None  # a prompt with images/audio (engine.projector.tokenize); prompt = media.tokens
    grammar: str | None = None  # GBNF: constrained decoding (grammar.py)

    def problems(self, engine: BatchEngine) -> list[str]:
        """What is wrong with this request for ``engine``, as "field: expected X, got Y" lines."""
        out = []
        if not len(self.prompt):
            out.append("prompt: expected at least one token, got none")
        identities = set()  # the identity ids a media prompt holds at its media positions
        if self.media is not None:
            out += self._media_problems(engine)
            identities = {self.media.tokens[s.start] for s in self.media.spans}
        n_vocab = engine.n_vocab
        bad = [t for t in self.prompt
               if not (isinstance(t, int | np.integer) and (0 <= t < n_vocab or t in identities))]
        if bad:
            out.append(f"prompt: expected token ids in 0..{n_vocab - 1}, got {bad[:3]!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            out.append(f"max_tokens: expected an integer >= 0, got {self.max_tokens!r}")
        if self.accept not in ACCEPT_MODES:
            out.append(f"accept: expected one of {', '.join(ACCEPT_MODES)}, got {self.accept!r}")
        if not (self.draft in DRAFT_POLICIES or (type(self.draft) is int and self.draft >= 0)):
            out.append(f"draft: expected off, adaptive or a draft length >= 0, got {self.draft!r}")
        s = self.sampling
        for name, ok in (("temperature", math.isfinite(s.temperature)), ("top_k", s.top_k >= 0),
                         ("top_p", 0.0 < s.top_p <= 1.0), ("min_p", 0.0 <= s.min_p <= 1.0)):
            if not ok:
                out.append(f"sampling: {name} out of range, got {getattr(s, name)!r}")
        if self.grammar is not None:
            problem = check_grammar(engine, self.grammar) if isinstance(self.grammar, str) else \
                f"grammar: expected GBNF text, got {type(self.grammar).__name__}"
            if problem:
                out.append(problem)
        return out

    def _media_problems(self, engine: BatchEngine) -> list[str]:
        media = self.media
        if media.projector is not None and media.projector.engine is not engine.engine:
            return ["media: expected a prompt from this engine's projector, got one from another engine's"]
        out = media.problems(engine.n_ubatch)
        if not out and list(self.prompt) != media.tokens:
            out.append("prompt: expected media.tokens (text ids and the media's identity ids), got other tokens")
        return out


@dataclass(frozen=True)
class Finished:
    """The final event: why generation ended, its stats, every token emitted."""

    reason: str  # eog | stop | max_tokens | context | cancelled
    stats: Stats
    tokens: list[int]


@dataclass(frozen=True)
class Failed:
    """The final event of a request llama.cpp failed on; its slot is freed and the others go on."""

    message: str


Event = Round | Finished | Failed


class SchedulerClosed(GgufMtpError):
    def __init__(self) -> None:
        super().__init__("the scheduler is shutting down: no new requests")


class QueueFull(GgufMtpError):
    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        super().__init__(f"request queue full ({max_queue} waiting for a slot): try again later")


class PromptTooLong(GgufMtpError):
    def __init__(self, n_prompt: int, limit: int, n_ctx: int, n_seq: int) -> None:
        self.n_prompt, self.limit = n_prompt, limit
        super().__init__(f"prompt of {n_prompt} tokens does not fit a slot's context of {limit} positions "
                         f"(n_ctx {n_ctx} / {n_seq} slots)")


class Handle:
    """A submitted request: its events, and ``cancel``."""

    def __init__(self, id: int, request: Request, scheduler: Scheduler, sink: Callable[[Event], None] | None):
        self.id = id
        self.request = request
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.done = False
        self.cancelled = False  # asked for; the engine thread acts on it
        self._scheduler = scheduler
        self._sink = sink

    def get(self, timeout: float | None = None) -> Event:
        return self.events.get(timeout=timeout)

    def __iter__(self):
        while True:
            ev = self.get()
            yield ev
            if isinstance(ev, Finished | Failed):
                return

    def cancel(self) -> None:
        self._scheduler.cancel(self)

    def _send(self, ev: Event) -> None:
        if isinstance(ev, Finished | Failed):
            self.done = True
        try:
            (self._sink or self.events.put)(ev)
        except Exception:  # a consumer's bug must not stop the engine thread
            log.exception("request %d: event sink failed", self.id)


@dataclass(frozen=True)
class Snapshot:
    slots: int
    busy: int  # slots holding a request
    queued: int  # requests waiting for a slot
    max_queue: int
    running: bool  # the engine thread is up and accepting requests
    requests: int  # requests finished since start (any reason)
    stats: Stats  # totals since start: finished requests and the running ones so far


# --- per-slot state (engine thread only) -----------------------------------------------------------
@dataclass
class _Seq:
    handle: Handle
    stop: StopRule
    todo: list[int]  # prompt tokens not read yet
    fixed: FixedK | None  # None: adaptive
    acceptance: PositionAcceptance
    rng: np.random.Generator
    stats: Stats = field(default_factory=Stats)
    y: int = -1  # the last token: sampled, not in the cache yet
    h: np.ndarray | None = None  # the target's hidden state one position before y (the drafter's input)
    grammar: Grammar | None = None  # the request's grammar state after every emitted token
    emitted: list[int] = field(default_factory=list)
    t_admit: float = field(default_factory=time.perf_counter)
    t_first: float = 0.0

    @property
    def request(self) -> Request:
        return self.handle.request

    @property
    def sampled_drafts(self) -> bool:
        req = self.request
        return sampled_drafts(req.accept, req.sampling, req.grammar is not None)


class Scheduler:
    """Requests in, events out, over the slots (sequences) of one BatchEngine."""

    def __init__(self, engine: BatchEngine, *, max_queue: int = 64, prefill_chunk: int = 256) -> None:
        if max_queue < 0 or prefill_chunk < 1:
            raise GgufMtpError(f"scheduler: expected max_queue >= 0 and prefill_chunk >= 1, got {max_queue} and "
                               f"{prefill_chunk}")
        self.engine = engine
        self.max_queue = max_queue
        self.prefill_chunk = min(prefill_chunk, engine.n_batch)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[Handle] = deque()
        self._live: dict[int, Handle] = {}  # queued or in a slot
        self._free = engine.n_seq  # slots not claimed
        self._closed = self._stopping = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._slots: list[_Seq | None] = [None] * engine.n_seq
        self._used_at = [-1] * engine.n_seq  # when each slot last finished (least recently used goes first)
        self._clock = itertools.count()
        cap = max(1, min(engine.settings.draft_cap, engine.k_max))
        self._batch_k = BatchAdaptiveK(cap)
        self._seen = PositionAcceptance(max(1, engine.k_max))  # every round's acceptance: a new request starts here
        self._done_stats, self._requests = Stats(), 0
        self._published = Snapshot(engine.n_seq, 0, 0, max_queue, False, 0, Stats())

    # --- any thread ------------------------------------------------------------------------------
    def submit(self, request: Request, sink: Callable[[Event], None] | None = None) -> Handle:
        problems = request.problems(self.engine)
        if problems:
            raise GgufMtpError("request: " + "; ".join(problems))
        if len(request.prompt) > self.engine.slot_ctx:
            raise PromptTooLong(len(request.prompt), self.engine.slot_ctx, self.engine.n_ctx, self.engine.n_seq)
        with self._lock:
            if self._closed:
                raise SchedulerClosed()
            if len(self._queue) >= self.max_queue + self._free:
                raise QueueFull(self.max_queue)
            h = Handle(next(self._ids), request, self, sink)
            self._queue.append(h)
            self._live[h.id] = h
            self._wake.notify()
        return h

    def cancel(self, handle: Handle) -> None:
        with self._lock:
            handle.cancelled = True
            self._wake.notify()

    def snapshot(self) -> Snapshot:
        with self._lock:
            s = self._published
            running = self._thread is not None and not self._closed
            return Snapshot(s.slots, self.engine.n_seq - self._free, len(self._queue), self.max_queue, running,
                            s.requests, copy.deepcopy(s.stats))

    def start(self) -> Scheduler:
        if self._thread is not None:
            raise GgufMtpError("scheduler already started")
        self._thread = threading.Thread(target=self._run, name="gguf-mtp-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, grace: float = 0.0) -> None:
        """Refuse new requests; let queued and running ones finish for up to ``grace`` seconds; cancel the rest;
        end the engine thread."""
        with self._lock:
            self._closed = True
        deadline = time.monotonic() + grace
        while self._live and time.monotonic() < deadline:
            if self._thread is None:
                self.step()
            else:
                time.sleep(0.01)
        with self._lock:
            for h in self._live.values():
                h.cancelled = True
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        else:
            while self.step():
                pass

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._live and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self._live:
                    return
            self.step()

    # --- the engine thread -----------------------------------------------------------------------
    def step(self) -> bool:
        """One iteration (cancellations, admissions, a prefill chunk, a round); whether work is left."""
        try:
            self._settle_cancels()
            self._admit()
            self._prefill()
            self._round()
        except Exception as e:  # a bug, or llama.cpp failing outside any one request: fail them all, go on
            log.exception("scheduler step failed")
            self._fail_everything(f"internal error: {e}")
        self._publish()
        with self._lock:
            return bool(self._live)

    def _active(self, generating: bool) -> list[tuple[int, _Seq]]:
        """Slots reading their prompt (False) or generating (True), oldest request first."""
        active = [(i, s) for i, s in enumerate(self._slots) if s is not None and (not s.todo) == generating]
        return sorted(active, key=lambda a: a[1].handle.id)

    def _settle_cancels(self) -> None:
        with self._lock:
            dropped = [h for h in self._queue if h.cancelled]
            for h in dropped:
                self._queue.remove(h)
                del self._live[h.id]
                self._requests += 1
        for h in dropped:
            h._send(Finished("cancelled", Stats(stop_reason="cancelled"), []))
        for i, s in enumerate(self._slots):
            if s is not None and s.handle.cancelled:
                self._finish(i, "cancelled")

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._queue or None not in self._slots:
                    return
                h = self._queue.popleft()
                self._free -= 1
            self._start(self._pick_slot(h.request), h)

    def _pick_slot(self, req: Request) -> int:
        free = [i for i, s in enumerate(self._slots) if s is None]
        return max(free, key=lambda i: (self.engine.shared_prefix(i, req.prompt, req.media), -self._used_at[i]))

    def _start(self, seq: int, h: Handle) -> None:
        req = h.request
        keep = self.engine.reuse_prefix(seq, req.prompt, req.media)
        if req.media is not None:
            req.media.encoded = 0
        fixed = FixedK(0) if req.draft == "off" else None if req.draft == "adaptive" else FixedK(int(req.draft))
        s = _Seq(h, StopRule(frozenset(req.stop_tokens), req.ignore_eog, self.engine.is_eog),
                 [int(t) for t in req.prompt[keep:]], fixed, copy.deepcopy(self._seen),
                 np.random.default_rng(req.sampling.seed))
        s.stats.reused_tokens = keep
        if req.grammar is not None:
            s.grammar = Grammar(self.engine, req.grammar, s.stop.stops)
        self._slots[seq] = s

    def _prefill(self) -> None:
        """The next prompt chunks, oldest request first, in one target decode: ``prefill_chunk`` tokens while
        others generate (so their next round is not held up for long), a full batch when none does. An image or
        audio chunk next in a prompt is decoded first, whole and alone (libmtmd's decode), and counts against the
        same budget; a text chunk stops at the next one."""
        reading = self._active(generating=False)
        if not reading:
            return
        budget = self.prefill_chunk if self._active(generating=True) else self.engine.n_batch
        work: list[tuple[int, _Seq, Part]] = []
        for seq, s in reading:
            if budget <= 0:
                break
            span = self._next_span(seq, s)
            if span is not None and span.start == self.engine.n_past(seq):
                if not self._read_span(seq, s, span):
                    continue
                budget -= span.n_tokens
                span = self._next_span(seq, s)
            text = len(s.todo) if span is None else span.start - self.engine.n_past(seq)
            take = min(text, budget)
            if take > 0:
                work.append((seq, s, Part(seq, s.todo[:take], "last" if take == len(s.todo) else "none")))
                budget -= take
        if not work:
            return
        try:
            self.engine.decode([p for _, _, p in work])
        except GgufMtpError as e:
            for seq, _, _ in work:
                self._fail(seq, str(e))
            return
        for seq, s, p in work:
            del s.todo[:len(p.tokens)]
            s.stats.prefill_tokens += len(p.tokens)
            if not s.todo:
                self._first_token(seq, s, p.start + len(p.tokens) - 1)

    def _next_span(self, seq: int, s: _Seq) -> MediaSpan | None:
        media = s.request.media
        return media.span_at(self.engine.n_past(seq)) if media is not None else None

    def _read_span(self, seq: int, s: _Seq, span: MediaSpan) -> bool:
        """Decode the image or audio chunk that comes next in ``seq``'s prompt; False when that failed (the request
        failed)."""
        try:
            self.engine.decode_span(seq, s.request.media, span)
        except GgufMtpError as e:
            self._fail(seq, str(e))
            return False
        del s.todo[:span.n_tokens]
        s.stats.prefill_tokens += span.n_tokens
        return True

    def _first_token(self, seq: int, s: _Seq, row: int) -> None:
        req = s.request
        s.y = pick(self.engine.logits(row)[0], req.sampling, s.rng, s.grammar)
        s.h = self.engine.hidden(row).copy() if self.engine.has_drafter else None
        s.t_first = time.perf_counter()
        s.stats.prefill_time = s.t_first - s.t_admit  # admission to first token: other rounds included
        if req.max_tokens <= 0:
            self._finish(seq, "max_tokens")
            return
        out, done = emit([s.y], 0, s.stats, s.stop, req.max_tokens)
        self._emitted(s, out)
        s.handle._send(Round(out, 0, 0, first=True))
        if done:
            self._finish(seq, s.stats.stop_reason)

    def _round(self) -> None:
        gen = []
        for seq, s in self._active(generating=True):
            if self.engine.n_past(seq) >= self.engine.slot_ctx:
                self._finish(seq, "context")
            else:
                gen.append((seq, s))
        if not gen:
            return
        ks = self._draft_lengths(gen)
        t0 = time.perf_counter()
        drafts, steps = self._draft(gen, ks)
        rows = {seq: self._cut(s, drafts, seq) for seq, s in gen if s.grammar is not None}
        t1 = time.perf_counter()
        parts = [Part(seq, [s.y, *drafts[seq].tokens]) for seq, s in gen]
        pos0 = {seq: self.engine.n_past(seq) for seq, _ in gen}
        try:
            self.engine.decode(parts)
        except GgufMtpError as e:
            for seq, _ in gen:
                self._fail(seq, str(e))
            for r in rows.values():
                r.close()
            return
        t2 = time.perf_counter()
        kept_adaptive = 0
        for (seq, s), p in zip(gen, parts):
            kept = self._accept(seq, s, drafts[seq], p, pos0[seq], t1 - t0, t2 - t1, rows.pop(seq, None))
            kept_adaptive += kept if s.fixed is None else 0
        self._batch_k.observe_costs(steps, sum(len(p.tokens) for p in parts), t2 - t1)
        if any(s.fixed is None for _, s in gen):
            self._batch_k.observe_outcome(kept_adaptive)

    def _draft_lengths(self, gen: list[tuple[int, _Seq]]) -> dict[int, int]:
        """k per sequence: its limit (tokens left, room in its slot, k_max), then "off" / fixed k as asked, and
        one batch decision for the adaptive ones (BatchAdaptiveK), trimmed per sequence."""
        eng = self.engine
        if not eng.has_drafter:
            return {seq: 0 for seq, _ in gen}
        limit = {seq: min(eng.slot_ctx - eng.n_past(seq) - 1, s.request.max_tokens - s.stats.tokens - 1,
                          eng.k_max) for seq, s in gen}
        ks = {seq: s.fixed.choose(limit[seq]) for seq, s in gen if s.fixed is not None}
        adaptive = [(seq, s) for seq, s in gen if s.fixed is None]
        if adaptive:
            estimates = [s.acceptance.estimate() for _, s in adaptive]
            other = sum(k + 1 for k in ks.values())
            k = self._batch_k.choose_batch(estimates, other, max(limit[seq] for seq, _ in adaptive))
            for (seq, _), est in zip(adaptive, estimates):
                ks[seq] = min(self._batch_k.trim(est, k), limit[seq]) if k > 0 else 0
        return {seq: max(0, ks[seq]) for seq, _ in gen}

    def _draft(self, gen: list[tuple[int, _Seq]], ks: dict[int, int]) -> tuple[dict[int, Draft], list]:
        """Draft step i for every sequence drafting more than i tokens, in one drafter decode per step; a
        sequence with a grammar is steered by it (drafters.draft_token) and drafts no further once its chain
        stops."""
        tokens: dict[int, list[int]] = {seq: [] for seq, _ in gen}
        qs: dict[int, list[np.ndarray]] = {seq: [] for seq, _ in gen}
        last = {seq: s.y for seq, s in gen}
        hidden = {seq: s.h for seq, s in gen}
        steers = {seq: s.grammar.steer() for seq, s in gen if s.grammar is not None and ks[seq] > 0}
        steps = []
        try:
            for i in range(max(ks.values(), default=0)):
                rows = [(seq, s) for seq, s in gen if ks[seq] > i and not (seq in steers and steers[seq].stopped)]
                if not rows:
                    break
                t = time.perf_counter()
                logits = self.engine.draft([seq for seq, _ in rows], [last[seq] for seq, _ in rows],
                                           np.stack([hidden[seq] for seq, _ in rows]))
                for r, (seq, s) in enumerate(rows):
                    token, q = draft_token(logits[r], s.request.sampling, s.sampled_drafts, s.rng, steers.get(seq))
                    if token is None:  # the grammar stopped the chain (steers[seq].stopped)
                        continue
                    last[seq] = token
                    tokens[seq].append(token)
                    if q is not None:
                        qs[seq].append(q)
                    hidden[seq] = self.engine.draft_hidden(r).copy()
                steps.append((len(rows), time.perf_counter() - t))
        finally:
            for steer in steers.values():
                steer.close()
        return {seq: Draft(tokens[seq], np.stack(qs[seq]) if qs[seq] else None) for seq, _ in gen}, steps

    @staticmethod
    def _cut(s: _Seq, drafts: dict[int, Draft], seq: int) -> Rows:
        """Cut ``seq``'s drafts at the first token its grammar rejects; the grammar state at each verify row."""
        drafts[seq], rows = s.grammar.check(drafts[seq], s.stats)
        return rows

    def _accept(self, seq: int, s: _Seq, d: Draft, p: Part, pos0: int, t_draft: float, t_verify: float,
                rows: Rows | None = None) -> int:
        """Acceptance, KV rollback and emission for one sequence of a verified round (loop.py's round); ``rows``:
        the grammar state at each verify row."""
        req, k = s.request, len(d.tokens)
        try:
            kept, nxt = accept_drafts(self.engine.logits(p.start, k + 1), d.tokens, d.probs, req.sampling,
                                      req.accept, s.rng, rows)
        finally:
            if rows is not None:
                rows.close()
        if self.engine.has_drafter:
            s.h = self.engine.hidden(p.start + kept).copy()
        self.engine.truncate(seq, pos0 + kept + 1)
        s.stats.record_round(k, kept)
        s.stats.draft_time += t_draft
        s.stats.verify_time += t_verify
        s.acceptance.observe(k, kept)
        self._seen.observe(k, kept)
        out, done = emit([*d.tokens[:kept], nxt], kept, s.stats, s.stop, req.max_tokens)
        if done and len(out) < kept:  # a stop token among the kept drafts: drop it and what follows
            self.engine.truncate(seq, pos0 + 1 + len(out))
        s.y = nxt
        self._emitted(s, out)
        s.handle._send(Round(out, k, kept))
        if done:
            self._finish(seq, s.stats.stop_reason)
        return kept

    @staticmethod
    def _emitted(s: _Seq, out: list[int]) -> None:
        s.emitted += out
        if s.grammar is not None:
            s.grammar.advance(out)

    # --- leaving a slot --------------------------------------------------------------------------
    def _release(self, seq: int) -> _Seq:
        s = self._slots[seq]
        self._slots[seq] = None
        if s.grammar is not None:
            s.grammar.close()
        self._used_at[seq] = next(self._clock)
        if s.t_first:
            s.stats.generate_time = time.perf_counter() - s.t_first
        self._done_stats.add(s.stats)
        with self._lock:
            self._free += 1
            self._live.pop(s.handle.id, None)
            self._requests += 1
        return s

    def _finish(self, seq: int, reason: str) -> None:
        """The request in ``seq`` ends; its cache stays (prompt + emitted tokens but the last) for reuse."""
        s = self._release(seq)
        s.stats.stop_reason = reason
        s.handle._send(Finished(reason, s.stats, list(s.emitted)))

    def _fail(self, seq: int, message: str) -> None:
        s = self._release(seq)
        s.handle._send(Failed(message))

    def _fail_everything(self, message: str) -> None:
        """After an unexpected error: every request fails, every slot's cache is dropped (it may not match its
        bookkeeping any more)."""
        for seq, s in enumerate(self._slots):
            if s is not None:
                self._fail(seq, message)
            self.engine.truncate(seq, 0)
        with self._lock:
            queued, self._queue = list(self._queue), deque()
            for h in queued:
                self._live.pop(h.id, None)
        for h in queued:
            h._send(Failed(message))

    def _publish(self) -> None:
        totals = copy.deepcopy(self._done_stats)
        for s in self._slots:
            if s is not None:
                totals.add(s.stats)
        with self._lock:
            self._published = Snapshot(self.engine.n_seq, 0, 0, self.max_queue, False, self._requests, totals)
