"""The speculative loop on the tiny families: greedy identity, exact accept/reject patterns, stops, stats."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures.runtime import RUNTIME_FAMILIES, assert_greedy_equivalent, corpus_prompts

from gguf_mtp.runtime.adaptive import AdaptiveK, FixedK
from gguf_mtp.runtime.drafters import OracleDrafter
from gguf_mtp.runtime.loop import generate, speculative_generate
from gguf_mtp.runtime.sampling import SamplingParams
from gguf_mtp.runtime.stats import Stats


def plain(engine, prompt, n, **kw):
    return generate(engine, prompt, n, chooser=FixedK(0), **kw)


def check_stats(s: Stats) -> None:
    assert s.tokens == s.accepted + s.bonus
    assert 0 <= s.accepted <= s.proposed
    assert sum(s.k_histogram.values()) == s.rounds
    assert sum(k * n for k, n in s.k_histogram.items()) == s.proposed == sum(s.proposed_by_position)
    assert sum(s.accepted_by_position) >= s.accepted  # a stop token may cut kept drafts
    assert all(a <= p for a, p in zip(s.accepted_by_position, s.proposed_by_position))


# --- greedy MTP output == target-only greedy output ------------------------------------------------------
@pytest.mark.parametrize("family", RUNTIME_FAMILIES)
def test_greedy_identity_every_k(engines, family):
    eng = engines.get(family)
    n_prompts = 3 if family == "tiny-q" else 5  # tiny-q is 8x wider: keep the suite fast
    for prompt in corpus_prompts(eng, n_prompts, seed=len(family)):
        ref = plain(eng, prompt, 40)
        for k in range(1, 9):
            g = generate(eng, prompt, 40, chooser=FixedK(k))
            if not assert_greedy_equivalent(eng, prompt, g.tokens, ref.tokens):
                assert g.stats.stop_reason == ref.stats.stop_reason
            check_stats(g.stats)
        g = generate(eng, prompt, 40, chooser=AdaptiveK(8))
        assert_greedy_equivalent(eng, prompt, g.tokens, ref.tokens)
        check_stats(g.stats)


class RandomK:
    """Any sequence of draft lengths (0 included) must give the same greedy output."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def choose(self, limit: int) -> int:
        return int(min(self.rng.integers(0, 9), limit))

    def observe(self, *args) -> None:
        pass


@pytest.mark.parametrize("family", RUNTIME_FAMILIES)
def test_greedy_identity_random_draft_lengths(engines, family):
    eng = engines.get(family)
    prompt = corpus_prompts(eng, 1, seed=100)[0]
    ref = plain(eng, prompt, 64, ignore_eog=True)
    for seed in range(3):
        g = generate(eng, prompt, 64, chooser=RandomK(seed), ignore_eog=True)
        assert_greedy_equivalent(eng, prompt, g.tokens, ref.tokens)
        check_stats(g.stats)


@pytest.mark.parametrize("family", ["tiny-e", "tiny-dense"])
def test_long_run_wraps_the_sliding_window_cache(engines, family):
    """300+ positions through a 256-cell SWA cache (window 8/16, n_ubatch 16): rollbacks stay inside the window."""
    eng = engines.get(family, n_ubatch=16)
    assert any("SWA KV cache, size = 256 cells" in ln.text for ln in eng.load_log)
    prompt = corpus_prompts(eng, 1, seed=7, length=20)[0]
    ref = plain(eng, prompt, 320, ignore_eog=True)
    assert len(ref.tokens) == 320
    for chooser in (FixedK(3), AdaptiveK(6)):
        g = generate(eng, prompt, 320, chooser=chooser, ignore_eog=True)
        assert_greedy_equivalent(eng, prompt, g.tokens, ref.tokens)
        check_stats(g.stats)


def test_prompt_longer_than_a_batch(engines):
    """Prefill in n_batch chunks: the drafter's first hidden state comes from the last row of the last chunk."""
    small = engines.get("tiny-e", n_batch=16, n_ubatch=16)
    assert small.n_batch == 16
    prompt = corpus_prompts(small, 1, seed=9, length=50)[0]
    ref = plain(engines.get("tiny-e"), prompt, 32, ignore_eog=True)
    oracle = OracleDrafter(prompt + ref.tokens, small.n_vocab)
    g = generate(small, prompt, 32, chooser=FixedK(3), drafter=oracle, ignore_eog=True)
    assert_greedy_equivalent(small, prompt, g.tokens, ref.tokens)
    small.truncate(0)
    g = generate(small, prompt, 32, chooser=FixedK(3), ignore_eog=True)
    assert g.stats.prefill_tokens == 50
    assert_greedy_equivalent(small, prompt, g.tokens, ref.tokens)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_context_limit_stops_cleanly(engines, k):
    """Drafts shrink near n_ctx; the last token sampled at position n_ctx ends generation."""
    eng = engines.get("tiny-moe", n_ctx=256)
    assert eng.n_ctx == 256
    prompt = corpus_prompts(eng, 1, seed=3, length=243)[0]
    ref = plain(eng, prompt, 100, ignore_eog=True)
    assert ref.stats.stop_reason == "context"
    assert len(ref.tokens) == eng.n_ctx - len(prompt) + 1
    g = generate(eng, prompt, 100, chooser=FixedK(k), ignore_eog=True)
    assert g.stats.stop_reason == "context"
    assert_greedy_equivalent(eng, prompt, g.tokens, ref.tokens)
    assert eng.n_past <= eng.n_ctx
    oracle = OracleDrafter(prompt + ref.tokens, eng.n_vocab)
    g = generate(eng, prompt, 100, chooser=FixedK(k), drafter=oracle, ignore_eog=True)
    assert g.stats.stop_reason == "context"
    if not assert_greedy_equivalent(eng, prompt, g.tokens, ref.tokens):
        assert g.stats.acceptance_rate == 1.0


# --- injected drafters: exact accept/reject patterns ----------------------------------------------------
def expected_rounds(k: int, corrupt_every: int, max_tokens: int) -> list[tuple[int, int]]:
    """(k, kept) per round for an oracle whose every n-th proposal is wrong (independent of the loop)."""
    rounds, proposed, emitted = [], 0, 1
    while emitted < max_tokens:
        kk = min(k, max_tokens - emitted - 1)
        ok = []
        for _ in range(kk):
            proposed += 1
            ok.append(not (corrupt_every and proposed % corrupt_every == 0))
        kept = next((i for i, good in enumerate(ok) if not good), kk)
        rounds.append((kk, kept))
        emitted += kept + 1
    return rounds


@pytest.mark.parametrize("k,corrupt_every", [(1, 0), (4, 0), (8, 0), (1, 2), (3, 2), (4, 3), (6, 5)])
def test_oracle_accept_reject_pattern(engines, k, corrupt_every):
    eng = engines.get("tiny-dense")
    prompt = corpus_prompts(eng, 1, seed=11)[0]
    n = 48
    ref = plain(eng, prompt, n + 16, ignore_eog=True).tokens
    oracle = OracleDrafter(prompt + ref, eng.n_vocab, corrupt_every)
    rounds = list(speculative_generate(eng, prompt, max_tokens=n, chooser=FixedK(k), drafter=oracle, ignore_eog=True))
    assert rounds[0].first and rounds[0].tokens == ref[:1]
    assert [(r.k, r.kept) for r in rounds[1:]] == expected_rounds(k, corrupt_every, n)
    assert [t for r in rounds for t in r.tokens] == ref[:n]


def test_oracle_makes_adaptive_choose_its_cap(engines):
    eng = engines.get("tiny-dense")
    prompt = corpus_prompts(eng, 1, seed=11)[0]
    ref = plain(eng, prompt, 120, ignore_eog=True).tokens
    chooser = AdaptiveK(6, t_draft=0.01, t_verify=lambda n: 1.0 + 0.05 * (n - 1))
    g = generate(eng, prompt, 100, chooser=chooser, drafter=OracleDrafter(prompt + ref, eng.n_vocab),
                 ignore_eog=True)
    assert g.tokens == ref[:100]
    assert g.stats.acceptance_rate == 1.0
    assert max(g.stats.k_histogram, key=g.stats.k_histogram.get) == 6


def test_useless_drafts_make_adaptive_stop_drafting(engines):
    """An always-wrong drafter: adaptive k drops to 0 and only probes with k=1 now and then."""
    eng = engines.get("tiny-dense")
    prompt = corpus_prompts(eng, 1, seed=11)[0]
    ref = plain(eng, prompt, 120, ignore_eog=True).tokens
    chooser = AdaptiveK(6, t_draft=0.2, t_verify=lambda n: 1.0 + 0.1 * (n - 1), probe_every=10)
    g = generate(eng, prompt, 100, chooser=chooser, drafter=OracleDrafter(prompt + ref, eng.n_vocab, 1),
                 ignore_eog=True)
    assert g.tokens == ref[:100] and g.stats.accepted == 0
    assert g.stats.k_histogram.get(0, 0) > 0.8 * g.stats.rounds
    assert set(g.stats.k_histogram) <= {0, 1}


# --- stops --------------------------------------------------------------------------------------------
def test_stop_token_inside_a_draft(engines):
    """A stop token among kept drafts ends output before it, and the KV cache keeps only what was emitted."""
    eng = engines.get("tiny-dense")
    prompt = corpus_prompts(eng, 1, seed=11)[0]
    ref = plain(eng, prompt, 64, ignore_eog=True).tokens
    j = next(i for i in range(10, 60) if ref[i] not in ref[:i] and not eng.is_eog(ref[i]))
    oracle = OracleDrafter(prompt + ref, eng.n_vocab)
    rounds = list(speculative_generate(eng, prompt, max_tokens=64, chooser=FixedK(8), drafter=oracle,
                                       stop_tokens=[ref[j]]))
    out = [t for r in rounds for t in r.tokens]
    assert out == ref[:j]
    last = rounds[-1]
    assert last.kept > len(last.tokens)  # the stop token was a kept draft, not the round's own token
    assert eng.tokens == (prompt + ref)[:eng.n_past] and eng.n_past <= len(prompt) + j


@pytest.mark.parametrize("family", RUNTIME_FAMILIES)
def test_end_of_generation_inside_a_draft(engines, family):
    """The target's own EOG token, proposed inside a draft, ends generation as plain decoding does."""
    eng = engines.get(family)
    for prompt in corpus_prompts(eng, 12, seed=5):
        ref = plain(eng, prompt, 200)
        if ref.stats.stop_reason == "eog" and len(ref.tokens) >= 2:
            break
    else:
        pytest.skip(f"no prompt of {family} reaches an end-of-generation token")
    eog = ref.stats.stop_token
    assert eng.is_eog(eog)
    full = prompt + ref.tokens + [eog]
    for k in (2, 5, 8):
        g = generate(eng, prompt, 200, chooser=FixedK(k), drafter=OracleDrafter(full, eng.n_vocab))
        assert g.tokens == ref.tokens and g.stats.stop_reason == "eog" and g.stats.stop_token == eog
        check_stats(g.stats)
        g = generate(eng, prompt, 200, chooser=FixedK(k))
        assert_greedy_equivalent(eng, prompt, g.tokens, ref.tokens)


def test_max_tokens(engines):
    eng = engines.get("tiny-e")
    prompt = corpus_prompts(eng, 1)[0]
    for n in (0, 1, 2, 7):
        g = generate(eng, prompt, n, chooser=FixedK(4), ignore_eog=True)
        assert len(g.tokens) == n and g.stats.stop_reason == "max_tokens"
        check_stats(g.stats)


# --- sampling -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("accept", ["exact", "rejection"])
def test_sampling_runs_and_is_reproducible(engines, accept):
    eng = engines.get("tiny-e")
    prompt = corpus_prompts(eng, 1, seed=2)[0]
    sp = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, min_p=0.02, seed=1234)
    a = generate(eng, prompt, 48, sampling=sp, accept=accept, chooser=FixedK(3), ignore_eog=True)
    b = generate(eng, prompt, 48, sampling=sp, accept=accept, chooser=FixedK(3), ignore_eog=True)
    assert a.tokens == b.tokens and len(a.tokens) == 48
    assert all(0 <= t < eng.n_vocab for t in a.tokens)
    check_stats(a.stats)
    c = generate(eng, prompt, 48, sampling=SamplingParams(0.9, 40, 0.95, 0.02, seed=99), accept=accept,
                 chooser=FixedK(3), ignore_eog=True)
    assert c.tokens != a.tokens


def uniform_drafter(n_vocab: int):
    """Drafts drawn from the uniform distribution, returned with it (a drafter that knows nothing)."""
    from gguf_mtp.runtime.drafters import Draft

    def draft(req):
        q = np.full((req.k, n_vocab), 1.0 / n_vocab)
        return Draft([int(t) for t in req.rng.integers(0, n_vocab, size=req.k)], q)

    return draft


def test_rejection_sampling_keeps_some_uninformed_drafts(engines):
    """Rejection sampling keeps a uniform draft with probability sum_x min(p(x), 1/V) > 0; exact matching
    almost never (1/V). The output stays a sample of the target either way (sampling math: test_runtime_sampling)."""
    eng = engines.get("tiny-dense")
    prompt = corpus_prompts(eng, 1, seed=11)[0]
    sp = SamplingParams(temperature=1.0, seed=3)
    got = {}
    for accept in ("rejection", "exact"):
        g = generate(eng, prompt, 60, sampling=sp, accept=accept, chooser=FixedK(2),
                     drafter=uniform_drafter(eng.n_vocab), ignore_eog=True)
        check_stats(g.stats)
        assert len(g.tokens) == 60
        got[accept] = g.stats
    assert got["rejection"].accepted > 0
    assert got["rejection"].acceptance_rate > 5 * got["exact"].acceptance_rate


# --- the KV cache across calls (what chat builds on) ---------------------------------------------------
def test_continuing_reuses_the_cache(engines):
    eng = engines.get("tiny-e")
    prompt = corpus_prompts(eng, 1, seed=4)[0]
    first = generate(eng, prompt, 20, chooser=FixedK(3), ignore_eog=True)
    follow = prompt + first.tokens + eng.tokenize(" and then", add_special=False)
    second = generate(eng, follow, 20, chooser=FixedK(3), ignore_eog=True)
    assert second.stats.reused_tokens == len(prompt) + len(first.tokens) - 1
    assert second.stats.prefill_tokens == len(follow) - second.stats.reused_tokens
    eng.truncate(0)
    fresh = generate(eng, follow, 20, chooser=FixedK(3), ignore_eog=True)
    assert fresh.stats.reused_tokens == 0
    assert_greedy_equivalent(eng, follow, second.tokens, fresh.tokens)


def test_closing_the_generator_early_leaves_a_consistent_cache(engines):
    eng = engines.get("tiny-e")
    prompt = corpus_prompts(eng, 1, seed=4)[0]
    it = speculative_generate(eng, prompt, max_tokens=50, chooser=FixedK(4), ignore_eog=True)
    emitted = [t for _, r in zip(range(3), it) for t in r.tokens]
    it.close()
    assert eng.tokens == (prompt + emitted)[:eng.n_past]
    assert eng.n_past == len(prompt) + len(emitted) - 1  # all but the last emitted token are cached


def test_centroid_head_drafter_on_the_patched_runtime(exports):
    """E-style drafters keep their centroid head when our patched llama.cpp is installed (else skipped)."""
    from fixtures.runtime import TEST_SETTINGS

    from gguf_mtp.runtime import centroid_support
    from gguf_mtp.runtime.engine import Engine

    if not centroid_support():
        pytest.skip("stock llama.cpp: no centroid-head support (gguf-mtp runtime build)")
    target = exports.get("tiny-e", "target")
    drafter = exports.get("tiny-e", "drafter", centroids=True)
    with Engine.load(target, drafter, TEST_SETTINGS) as eng:
        assert eng.has_drafter
        for prompt in corpus_prompts(eng, 2, seed=1):
            ref = plain(eng, prompt, 32)
            for k in (1, 4):
                g = generate(eng, prompt, 32, chooser=FixedK(k))
                assert_greedy_equivalent(eng, prompt, g.tokens, ref.tokens)
                check_stats(g.stats)
