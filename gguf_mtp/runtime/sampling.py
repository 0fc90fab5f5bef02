"""Sampling and draft acceptance, in numpy.

Two acceptance rules, both lossless (every emitted token is distributed as the target's sampler says), and their
greedy case:
- ``accept_exact`` (llama.cpp's rule): sample the target at each verify row, keep drafts while they equal the
  sample; the first mismatching sample is the bonus token. Works with any drafter, greedy drafts are best.
- ``accept_rejection`` (speculative sampling, Leviathan et al. 2023 / Chen et al. 2023): drafts are samples from
  the drafter's q; keep draft d with probability min(1, p(d)/q(d)); on rejection sample from
  norm(max(p - q, 0)); if every draft is kept the bonus comes from p at the row after the last draft. The
  acceptance rate is sum_x min(p(x), q(x)), higher than exact matching whenever q is not one-hot.
- ``accept_greedy``: both rules for a greedy target (p one-hot at the argmax), read straight off the logits.
``accept_drafts`` picks one of them for a request; ``pick`` samples a token the target produces on its own.
Both take grammar states (grammar.py) for constrained decoding: each row's token is then chosen among the tokens
its state allows (the logits masked before the transform; greedy reads the best allowed token).

The target and drafter distributions go through the same ``probabilities`` transform (top-k, temperature,
top-p, min-p, in that order), so "the target's distribution" is well defined for both rules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # <= 0: greedy (argmax)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The sampler's distribution over the whole vocabulary (float64, zeros outside the kept set)."""
    x = np.asarray(logits, dtype=np.float64)
    n = x.shape[-1]
    if params.greedy:
        p = np.zeros(n)
        p[int(np.argmax(x))] = 1.0
        return p
    keep = np.ones(n, dtype=bool)
    if 0 < params.top_k < n:
        kth = np.partition(x, n - params.top_k)[n - params.top_k]
        keep = x >= kth
    z = np.where(keep, x / params.temperature, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if params.top_p < 1.0:
        p = _top_p(p, params.top_p)
    if params.min_p > 0.0:
        p = np.where(p >= params.min_p * p.max(), p, 0.0)
        p /= p.sum()
    return p


def _top_p(p: np.ndarray, top_p: float) -> np.ndarray:
    """Smallest set of most likely tokens with mass >= top_p.

    Only tokens with p > (1 - top_p) / n can be in that set (the tokens below a kept one carry more than
    1 - top_p), so sorting those candidates is exact and avoids sorting a 262k vocabulary.
    """
    cand = np.flatnonzero(p > (1.0 - top_p) / p.size)
    order = cand[np.argsort(-p[cand], kind="stable")]
    before = np.cumsum(p[order]) - p[order]  # mass of the tokens ranked above each candidate
    kept = order[before < top_p]
    out = np.zeros_like(p)
    out[kept] = p[kept]
    return out / out.sum()


def sample(p: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF draw from a (possibly unnormalized) distribution."""
    c = np.cumsum(p)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), p.size - 1))


Rows = Callable[[int], np.ndarray]  # verify row i -> the target's distribution p_i (computed on demand)


class Constraint(Protocol):
    """A grammar state (grammar.Grammar): the best allowed token of a row, or the row with the rest at -inf."""

    def argmax(self, logits: np.ndarray) -> int: ...

    def mask(self, logits: np.ndarray) -> np.ndarray: ...


def accept_greedy(logits: np.ndarray, drafts: Sequence[int],
                  states: Sequence[Constraint] | None = None) -> tuple[int, int]:
    """(number of drafts kept, next token) for a greedy target: keep drafts while each is its verify row's
    argmax. ``logits`` holds the len(drafts) + 1 verify rows; no distribution or random draw is needed. With
    ``states`` (drafts the grammar allows) the row's token is its best allowed one: a draft that is the row's
    plain argmax is that too, any other draft is compared with ``states[i].argmax`` (the target's plain choice
    is often one the grammar forbids, while the drafts, steered, are allowed)."""
    best = np.argmax(logits[:len(drafts) + 1], axis=1)
    for i, d in enumerate(drafts):
        t = int(best[i]) if states is None or best[i] == d else states[i].argmax(logits[i])
        if t != d:
            return i, t
    n = len(drafts)
    return n, int(best[n]) if states is None else states[n].argmax(logits[n])


def pick(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
         state: Constraint | None = None) -> int:
    """The target's token from one row of logits: the argmax when greedy, else a draw from the sampler; among
    the tokens ``state`` allows when given."""
    if state is None:
        return int(np.argmax(logits)) if params.greedy else sample(probabilities(logits, params), rng)
    return state.argmax(logits) if params.greedy else sample(probabilities(state.mask(logits), params), rng)


def accept_drafts(logits: np.ndarray, drafts: Sequence[int], q: np.ndarray | None, params: SamplingParams,
                  rule: str, rng: np.random.Generator,
                  states: Sequence[Constraint] | None = None) -> tuple[int, int]:
    """(drafts kept, next token) from the len(drafts) + 1 verify rows' logits, by ``rule`` ("exact" or
    "rejection"; ``q`` as ``accept_rejection`` takes it). Distributions are computed only for rows reached.
    ``states[i]``: the grammar state at row i (constrained decoding)."""
    if params.greedy:
        return accept_greedy(logits, drafts, states)
    if states is None:
        rows = lambda i: probabilities(logits[i], params)  # noqa: E731
    else:
        rows = lambda i: probabilities(states[i].mask(logits[i]), params)  # noqa: E731
    if rule == "rejection":
        return accept_rejection(rows, drafts, q, rng)
    return accept_exact(rows, drafts, rng)


def accept_exact(target: Rows, drafts: Sequence[int], rng: np.random.Generator) -> tuple[int, int]:
    """(number of drafts kept, next token): keep drafts while the target's sample equals them."""
    for i, d in enumerate(drafts):
        t = sample(target(i), rng)
        if t != d:
            return i, t
    return len(drafts), sample(target(len(drafts)), rng)


def accept_rejection(target: Rows, drafts: Sequence[int], q: np.ndarray | None,
                     rng: np.random.Generator) -> tuple[int, int]:
    """Speculative (rejection) sampling. ``q[i]`` is the distribution draft i was sampled from; None means the
    drafts are deterministic (q one-hot), which makes this exact p(d)-acceptance."""
    for i, d in enumerate(drafts):
        p = target(i)
        q_i = q[i] if q is not None else None
        q_d = q_i[d] if q_i is not None else 1.0
        if q_d > 0 and rng.random() * q_d < p[d]:  # accept with probability min(1, p(d)/q(d))
            continue
        residual = np.maximum(p - q_i, 0.0) if q_i is not None else _without(p, d)
        if residual.sum() <= 0.0:  # p == q on the support: rejection cannot happen in exact arithmetic
            residual = p
        return i, sample(residual, rng)
    return len(drafts), sample(target(len(drafts)), rng)


def _without(p: np.ndarray, d: int) -> np.ndarray:
    r = p.copy()
    r[d] = 0.0
    return r


def acceptance_rate(p: np.ndarray, q: np.ndarray) -> float:
    """Probability that rejection sampling keeps a draft drawn from q when the target is p."""
    return float(np.minimum(p, q).sum())
