"""Sampling math on synthetic distributions: filters, and that both acceptance rules are lossless."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gguf_mtp.runtime.sampling import (
    SamplingParams,
    accept_exact,
    accept_greedy,
    accept_rejection,
    acceptance_rate,
    probabilities,
    sample,
)

def chisquare_p(observed, expected) -> float:
    """Upper-tail p-value of Pearson's chi-square (Wilson-Hilferty normal approximation; no scipy needed)."""
    observed, expected = np.asarray(observed, float), np.asarray(expected, float)
    x = float(((observed - expected) ** 2 / expected).sum())
    k = observed.size - 1
    z = ((x / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


V = 6
P0 = np.array([0.35, 0.25, 0.2, 0.1, 0.07, 0.03])
Q0 = np.array([0.1, 0.4, 0.05, 0.3, 0.1, 0.05])
# next-token tables of a Markov "target" and "drafter": row = previous token
T = np.random.default_rng(0).dirichlet(np.full(V, 0.7), size=V)
D = np.random.default_rng(1).dirichlet(np.full(V, 0.7), size=V)


def test_greedy_is_one_hot_argmax():
    p = probabilities(np.array([0.1, 3.0, -1.0, 2.9]), SamplingParams())
    assert p.tolist() == [0.0, 1.0, 0.0, 0.0]


# verify rows' argmaxes 2, 0, 3, 1 (row i verifies draft i; the row after the last draft gives the bonus)
GREEDY_ROWS = np.eye(V)[[2, 0, 3, 1]] + 0.01 * np.arange(V)


@pytest.mark.parametrize("drafts, want", [
    ([], (0, 2)),  # no drafts: a plain step, the first row's argmax
    ([2, 0, 3], (3, 1)),  # all kept: the bonus is the last row's argmax
    ([2, 0], (2, 3)),  # all kept, fewer drafts than rows: extra rows are not read
    ([2, 5, 3], (1, 0)),  # first mismatch at draft 1: the target's token there replaces it
    ([4, 0, 3], (0, 2)),  # a later match after a mismatch does not count
])
def test_accept_greedy_keeps_drafts_while_they_are_the_argmax(drafts, want):
    assert accept_greedy(GREEDY_ROWS, drafts) == want


def test_filters_match_a_brute_force_reference():
    rng = np.random.default_rng(5)
    for _ in range(50):
        logits = rng.normal(0, 3, size=40)
        sp = SamplingParams(temperature=float(rng.uniform(0.3, 2.0)), top_k=int(rng.integers(0, 30)),
                            top_p=float(rng.uniform(0.3, 1.0)), min_p=float(rng.uniform(0, 0.2)))
        # reference: sort everything, apply each rule in turn
        order = np.argsort(-logits)
        keep = np.ones(40, bool)
        if sp.top_k:
            keep[order[sp.top_k:]] = False
        p = np.where(keep, np.exp((logits - logits.max()) / sp.temperature), 0)
        p /= p.sum()
        cum = np.cumsum(p[order])
        kept_p = np.zeros(40, bool)
        kept_p[order[: int(np.searchsorted(cum, sp.top_p) + 1)]] = True
        p = np.where(kept_p, p, 0)
        p /= p.sum()
        p = np.where(p >= sp.min_p * p.max(), p, 0)
        p /= p.sum()
        np.testing.assert_allclose(probabilities(logits, sp), p, atol=1e-12)


def test_sample_follows_the_distribution():
    rng = np.random.default_rng(0)
    draws = np.bincount([sample(P0, rng) for _ in range(20000)], minlength=V)
    assert chisquare_p(draws, P0 * draws.sum()) > 1e-3


def markov_rounds(accept: str, k: int, n_tokens: int, rng: np.random.Generator) -> list[int]:
    """Generate n_tokens of the Markov target T (first token from P0) by speculative rounds with drafter D."""
    out = [sample(P0, rng)]
    while len(out) < n_tokens:
        prev, drafts, qs = out[-1], [], []
        for _ in range(k):
            q = D[prev]
            d = sample(q, rng) if accept == "rejection" else int(np.argmax(q))
            drafts.append(d)
            qs.append(q)
            prev = d
        ctx = [out[-1], *drafts]

        def target(i: int) -> np.ndarray:
            return T[ctx[i]]

        if accept == "rejection":
            kept, nxt = accept_rejection(target, drafts, np.array(qs), rng)
        else:
            kept, nxt = accept_exact(target, drafts, rng)
        out += drafts[:kept] + [nxt]
    return out[:n_tokens]


@pytest.mark.parametrize("accept", ["exact", "rejection"])
@pytest.mark.parametrize("k", [1, 3])
def test_speculative_output_is_distributed_as_the_target(accept, k):
    """Chi-square over the first three tokens (216 cells): speculation does not change the joint distribution."""
    rng = np.random.default_rng(42 + k)
    n = 12000
    counts = np.zeros((V, V, V))
    for _ in range(n):
        a, b, c = markov_rounds(accept, k, 3, rng)
        counts[a, b, c] += 1
    expected = P0[:, None, None] * T[:, :, None] * T[None, :, :] * n
    mask = expected >= 5  # chi-square needs enough expected counts per cell
    obs, exp = counts[mask], expected[mask]
    obs = np.append(obs, counts[~mask].sum())
    exp = np.append(exp, expected[~mask].sum())
    assert chisquare_p(obs, exp) > 1e-3


def test_rejection_acceptance_rate_is_sum_of_min():
    rng = np.random.default_rng(7)
    n = 40000
    kept = 0
    for _ in range(n):
        d = sample(Q0, rng)
        k, _ = accept_rejection(lambda i: P0, [d], Q0[None, :], rng)
        kept += k
    expected = acceptance_rate(P0, Q0)
    assert expected == pytest.approx(0.60)
    assert abs(kept / n - expected) < 4 * np.sqrt(expected * (1 - expected) / n)


def test_rejection_residual_and_bonus():
    """After a rejection the token comes from norm(max(p - q, 0)); after full acceptance from p of the next row."""
    rng = np.random.default_rng(3)
    residual = np.maximum(P0 - Q0, 0)
    residual /= residual.sum()
    fixes, bonus = [], []
    for _ in range(20000):
        d = sample(Q0, rng)
        k, t = accept_rejection(lambda i: P0 if i == 0 else T[0], [d], Q0[None, :], rng)
        (bonus if k == 1 else fixes).append(t)
    f = np.bincount(fixes, minlength=V)
    assert f[residual == 0].sum() == 0
    assert chisquare_p(f[residual > 0], residual[residual > 0] * len(fixes)) > 1e-3
    b = np.bincount(bonus, minlength=V)
    assert chisquare_p(b[T[0] > 0], T[0][T[0] > 0] * len(bonus)) > 1e-3


def test_exact_acceptance_rate_of_a_deterministic_draft_is_p_of_the_draft():
    rng = np.random.default_rng(9)
    d = int(np.argmax(Q0))
    n = 20000
    kept = sum(accept_exact(lambda i: P0, [d], rng)[0] for _ in range(n))
    assert abs(kept / n - P0[d]) < 4 * np.sqrt(P0[d] * (1 - P0[d]) / n)
    # rejection sampling with a one-hot q (q=None) keeps it with the same probability
    kept = sum(accept_rejection(lambda i: P0, [d], None, rng)[0] for _ in range(n))
    assert abs(kept / n - P0[d]) < 4 * np.sqrt(P0[d] * (1 - P0[d]) / n)
