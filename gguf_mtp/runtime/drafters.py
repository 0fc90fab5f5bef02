"""Drafters: anything that, given the state of a round, proposes the next k tokens.

The loop calls ``drafter(DraftRequest) -> Draft``. ``MTPDrafter`` runs the Gemma 4 assistant on llama.cpp's MTP
context, steered by the request's grammar when it has one (``draft_token``, grammar.Steer); ``OracleDrafter``
replays a known continuation (the target's own greedy output), optionally corrupting every n-th draft — the test
and benchmark hook for exact accept/reject patterns and best-case speed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .sampling import SamplingParams, probabilities, sample

if TYPE_CHECKING:
    from .engine import Engine
    from .grammar import Grammar, Steer


@dataclass
class DraftRequest:
    tokens: Sequence[int]  # the whole context: prompt + emitted tokens; the last one is at ``pos``
    pos: int  # position of the last token (sampled, not yet in the target's KV cache)
    hidden: np.ndarray | None  # the target's hidden state at pos - 1 (None when the engine has no MTP drafter)
    k: int  # drafts wanted (a drafter may return fewer)
    sampling: SamplingParams
    sample: bool  # rejection sampling: drafts must be draws from q, and q returned
    rng: np.random.Generator
    grammar: Grammar | None = None  # the grammar state after every emitted token: steer the drafts by it


@dataclass
class Draft:
    tokens: list[int]
    probs: np.ndarray | None = None  # (len(tokens), n_vocab): the q each draft was drawn from; None: deterministic


Drafter = Callable[[DraftRequest], Draft]


class MTPDrafter:
    """The assistant model: each step reads (token, hidden) at the same position and returns the next hidden."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __call__(self, req: DraftRequest) -> Draft:
        token, h = req.tokens[-1], req.hidden
        out: list[int] = []
        qs: list[np.ndarray] = []
        steer = req.grammar.steer() if req.grammar is not None else None
        try:
            while len(out) < req.k and not (steer and steer.stopped):
                logits, h = self.engine.draft_step(token, req.pos, h)
                token, q = draft_token(logits, req.sampling, req.sample, req.rng, steer)
                if token is None:
                    break
                out.append(token)
                if q is not None:
                    qs.append(q)
        finally:
            if steer is not None:
                steer.close()
        return Draft(out, np.stack(qs) if qs else None)


def sampled_drafts(accept: str, sampling: SamplingParams, constrained: bool) -> bool:
    """Whether drafts must be draws from q (rejection sampling of a sampled target); under a grammar they are
    the drafter's argmax (grammar.py), and greedy otherwise."""
    return accept == "rejection" and not sampling.greedy and not constrained


def draft_token(logits: np.ndarray, sampling: SamplingParams, sampled: bool, rng: np.random.Generator,
                steer: Steer | None = None) -> tuple[int | None, np.ndarray | None]:
    """One MTP draft from the drafter's logits: a draw from q (returned, for rejection sampling) when
    ``sampled``, else the argmax (greedy drafts: what exact-match acceptance keeps most often). With ``steer``
    (a grammar: never sampled) the best token the grammar allows after the drafts before it, or None where the
    chain stops."""
    if steer is not None:
        return steer.choose(logits), None
    if not sampled:
        return int(np.argmax(logits)), None
    q = probabilities(logits, sampling)
    return sample(q, rng), q


class OracleDrafter:
    """Proposes ``reference[len(context):]``; with ``corrupt_every=n`` every n-th proposed draft is wrong.

    ``reference`` is prompt + the target's greedy continuation; once the context leaves it, nothing is proposed.
    """

    def __init__(self, reference: Sequence[int], n_vocab: int, corrupt_every: int = 0) -> None:
        self.reference = list(reference)
        self.n_vocab = n_vocab
        self.corrupt_every = corrupt_every
        self.proposed = 0

    def __call__(self, req: DraftRequest) -> Draft:
        n = len(req.tokens)
        if self.reference[:n] != list(req.tokens):
            return Draft([])
        out = []
        for t in self.reference[n:n + req.k]:
            self.proposed += 1
            if self.corrupt_every and self.proposed % self.corrupt_every == 0:
                t = (t + 1) % self.n_vocab
            out.append(t)
        return Draft(out)
