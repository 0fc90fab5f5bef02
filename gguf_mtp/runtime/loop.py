"""The speculative loop: prefill, then rounds of draft k -> verify k+1 in one target batch -> accept -> rewind.

``speculative_generate`` is the one generator every front end (generate, chat, bench) drives; ``generate`` runs it
to the end and detokenizes. State between rounds: ``y`` (the last token, sampled but not yet in the KV cache, at
position ``engine.n_past``) and ``h`` (the target's hidden state one position earlier, which the drafter reads).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import GgufMtpError
from .adaptive import AdaptiveK, FixedK
from .drafters import Draft, Drafter, DraftRequest, MTPDrafter, sampled_drafts
from .engine import Engine
from .grammar import Grammar
from .sampling import SamplingParams, accept_drafts, pick
from .stats import Stats

if TYPE_CHECKING:
    from .multimodal import MediaPrompt

ACCEPT_MODES = ("exact", "rejection")


@dataclass
class Round:
    """What one round emitted: ``tokens`` (kept drafts, then the target's own token unless a stop cut it)."""

    tokens: list[int]
    k: int  # drafts verified (0: a plain decoding step; also 0 for the first token, sampled from the prompt)
    kept: int  # drafts that matched (before any stop cut)
    first: bool = False  # the token sampled from the prompt's logits


@dataclass(frozen=True)
class StopRule:
    """Which tokens end generation (they are not emitted): ``stops``, and end-of-generation tokens unless
    ``ignore_eog``."""

    stops: frozenset[int]
    ignore_eog: bool
    is_eog: Callable[[int], bool]

    def reason(self, token: int) -> str | None:
        if token in self.stops:
            return "stop"
        if not self.ignore_eog and self.is_eog(token):
            return "eog"
        return None


def emit(new: Sequence[int], kept: int, stats: Stats, stop: StopRule, max_tokens: int) -> tuple[list[int], bool]:
    """What a round hands out: ``new`` (its ``kept`` drafts, then the target's token) cut before a stop token,
    counted into ``stats``; and whether generation ends here (a stop token, or ``max_tokens`` reached)."""
    out: list[int] = []
    for t in new:
        reason = stop.reason(t)
        if reason:
            stats.stop_reason, stats.stop_token = reason, t
            break
        out.append(t)
    n_drafts = min(len(out), kept)
    stats.accepted += n_drafts
    stats.bonus += len(out) - n_drafts
    stats.tokens += len(out)
    if not stats.stop_reason and stats.tokens >= max_tokens:
        stats.stop_reason = "max_tokens"
    return out, bool(stats.stop_reason)


@dataclass
class Generation:
    tokens: list[int]
    text: str
    stats: Stats


def make_chooser(engine: Engine, draft_max: int | None = None, adaptive: bool | None = None,
                 draft_cap: int | None = None) -> FixedK | AdaptiveK:
    """The draft-length policy the settings (or explicit arguments) ask for, capped by the engine's k_max."""
    s = engine.settings
    adaptive = s.adaptive if adaptive is None and draft_max is None else bool(adaptive)
    if adaptive:
        return AdaptiveK(min(draft_cap or s.draft_cap, engine.k_max))
    return FixedK(min(draft_max if draft_max is not None else (s.draft_max or 0), engine.k_max))


def speculative_generate(
    engine: Engine,
    prompt: Sequence[int],
    *,
    max_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    accept: str = "exact",
    chooser: FixedK | AdaptiveK | None = None,
    drafter: Drafter | None = None,
    stats: Stats | None = None,
    stop_tokens: Iterable[int] = (),
    ignore_eog: bool = False,
    media: MediaPrompt | None = None,
    grammar: str | None = None,
) -> Iterator[Round]:
    """Yield what each round emits until an end-of-generation token, ``max_tokens``, or the context's end.

    ``drafter`` replaces the MTP drafter (tests inject oracles); without one and without an MTP drafter every
    round is a plain decoding step. ``stop_tokens`` end generation like end-of-generation tokens do;
    ``ignore_eog`` generates through them (benchmarks). When the generator finishes or is closed, the KV cache
    holds the prompt and every emitted token but the last, so a chat can continue from it (``reuse_prefix``).
    ``media`` (multimodal.py) decodes a prompt holding images or audio; ``prompt`` is then ``media.tokens``.
    ``grammar`` (GBNF) constrains every token the target chooses; the MTP drafter is steered by it, and drafts
    are cut at the first token it rejects (grammar.py), MTP stays on.
    """
    if accept not in ACCEPT_MODES:
        raise GgufMtpError(f"accept: expected one of {', '.join(ACCEPT_MODES)}, got {accept!r}")
    if not prompt:
        raise GgufMtpError("empty prompt: nothing to continue from")
    if len(prompt) > engine.n_ctx:
        raise GgufMtpError(f"prompt of {len(prompt)} tokens does not fit the context of {engine.n_ctx}; raise --ctx")
    stats = stats if stats is not None else Stats()
    drafter = drafter or (MTPDrafter(engine) if engine.has_drafter else None)
    chooser = chooser or (make_chooser(engine) if drafter else FixedK(0))
    rng = np.random.default_rng(sampling.seed)
    stop = StopRule(frozenset(stop_tokens), ignore_eog, engine.is_eog)
    context = list(prompt)
    g = Grammar(engine, grammar, stop.stops) if grammar is not None else None
    sampled = sampled_drafts(accept, sampling, g is not None)

    def _prefill() -> tuple[int, np.ndarray | None]:
        t0 = time.perf_counter()
        keep = stats.reused_tokens = media.reuse_prefix(engine) if media is not None else engine.reuse_prefix(prompt)
        todo = prompt[keep:]
        rows = media.decode(engine, keep) if media is not None else engine.decode(todo, outputs="last")
        y = pick(engine.logits(1)[0], sampling, rng, g)
        h = engine.hidden(rows - 1).copy() if engine.has_drafter else None
        stats.prefill_tokens, stats.prefill_time = len(todo), time.perf_counter() - t0
        return y, h

    def _draft(y: int, h: np.ndarray | None, k: int) -> Draft:
        if k == 0 or drafter is None:
            return Draft([])
        d = drafter(DraftRequest(context, engine.n_past, h, k, sampling, sampled, rng, g))
        return Draft(list(d.tokens[:k]), d.probs[:k] if d.probs is not None else None)

    def _verify(y: int, d: Draft) -> tuple[Draft, int, int]:
        """Cut the drafts the grammar rejects, decode [y, d1..dk] in one batch; (the drafts verified, how many
        were kept, the target's next token)."""
        rows = None
        if g is not None:
            d, rows = g.check(d, stats)
        k = len(d.tokens)
        engine.decode([y, *d.tokens], outputs="all")
        try:
            return d, *accept_drafts(engine.logits(k + 1), d.tokens, d.probs, sampling, accept, rng, rows)
        finally:
            if rows is not None:
                rows.close()

    def _emit(new: list[int], kept: int) -> tuple[list[int], bool]:
        out, done = emit(new, kept, stats, stop, max_tokens)
        context.extend(out)
        if g is not None:
            g.advance(out)
        return out, done

    y, h = _prefill()
    t_start = time.perf_counter()
    safe = engine.n_past  # the cache holds exactly prompt + emitted tokens up to here
    try:
        if max_tokens <= 0:
            stats.stop_reason = "max_tokens"
            return
        out, done = _emit([y], 0)
        yield Round(out, 0, 0, first=True)
        while not done:
            pos0 = engine.n_past
            room = engine.n_ctx - pos0
            if room <= 0:
                stats.stop_reason = "context"
                break
            k = chooser.choose(min(room - 1, max_tokens - stats.tokens - 1, engine.k_max)) if drafter else 0
            t0 = time.perf_counter()
            d = _draft(y, h, k)
            t1 = time.perf_counter()
            d, kept, nxt = _verify(y, d)
            t2 = time.perf_counter()
            if engine.has_drafter:
                h = engine.hidden(kept).copy()
            engine.truncate(pos0 + kept + 1)
            chooser.observe(len(d.tokens), kept, t1 - t0, t2 - t1)
            stats.record_round(len(d.tokens), kept)
            stats.draft_time += t1 - t0
            stats.verify_time += t2 - t1
            out, done = _emit([*d.tokens[:kept], nxt], kept)
            if done and len(out) < kept:  # a stop token among the kept drafts: drop it and what follows
                engine.truncate(pos0 + 1 + len(out))
            safe = engine.n_past
            y = nxt
            yield Round(out, len(d.tokens), kept)
    finally:
        engine.truncate(safe)
        stats.generate_time = time.perf_counter() - t_start
        if g is not None:
            g.close()


def generate(engine: Engine, prompt: Sequence[int], max_tokens: int, **kwargs) -> Generation:
    """Run the loop to the end: tokens, their text, and the stats."""
    stats = kwargs.pop("stats", None) or Stats()
    tokens: list[int] = []
    for r in speculative_generate(engine, prompt, max_tokens=max_tokens, stats=stats, **kwargs):
        tokens += r.tokens
    return Generation(tokens, engine.detokenize(tokens), stats)
