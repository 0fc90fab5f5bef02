"""Batched multi-sequence MTP (runtime/batch_engine.py, runtime/scheduler.py) against the single-sequence loop.

The trained pair (real drafts kept ~60% of the time) for output identity, acceptance and the scheduler's
behaviour; the tiny families (random drafters: every draft rejected, sliding windows of 8-16 crossed quickly)
for rollback under batching; BatchAdaptiveK on injected costs.
"""

from __future__ import annotations

import threading

import pytest
from fixtures.runtime import TEST_SETTINGS, assert_greedy_equivalent, drain, finished

from gguf_mtp.bench import heldout_prompts
from gguf_mtp.errors import GgufMtpError
from gguf_mtp.runtime.adaptive import BatchAdaptiveK, FixedK
from gguf_mtp.runtime.loop import generate
from gguf_mtp.runtime.sampling import SamplingParams
from gguf_mtp.runtime.scheduler import (Failed, Finished, PromptTooLong, QueueFull, Request, Round, Scheduler,
                                        SchedulerClosed)

N_SEQ = 8
SETTINGS = TEST_SETTINGS.replace(n_ctx=N_SEQ * 256)  # 256 positions per slot
LENGTHS = (16, 40, 24, 64, 8, 48, 32, 56)  # max_tokens of the 8 concurrent requests


@pytest.fixture(scope="module")
def single(trained_ggufs):
    from gguf_mtp.runtime.engine import Engine

    with Engine.load(*trained_ggufs, SETTINGS) as eng:
        yield eng


@pytest.fixture(scope="module")
def batch(trained_ggufs):
    from gguf_mtp.runtime.batch_engine import BatchEngine

    with BatchEngine.load(*trained_ggufs, SETTINGS, n_seq=N_SEQ) as eng:
        yield eng


@pytest.fixture(scope="module")
def prompts(single) -> list[list[int]]:
    """8 held-out prompts; the 4th grown past the sliding window (128) so its rounds cross it."""
    out = [[single.bos, *single.tokenize(t, add_special=False)] for t in heldout_prompts(N_SEQ)]
    out[3] = (out[3] + [t for p in out for t in p[1:]])[:120]
    return out


@pytest.fixture(scope="module")
def reference(single, prompts) -> list[list[int]]:
    """Each prompt's single-sequence target-alone greedy output."""
    return [generate(single, p, n, chooser=FixedK(0), ignore_eog=True).tokens for p, n in zip(prompts, LENGTHS)]


# --- greedy output == single-sequence target alone --------------------------------------------------------
def test_concurrent_greedy_requests_equal_target_alone(batch, single, prompts, reference):
    """8 requests, different prompts and lengths, admitted at different times (one submission per iteration,
    so early ones are mid-generation when later ones are prefilled), adaptive and fixed k alternating."""
    sched = Scheduler(batch)
    handles = []
    for i, (p, n) in enumerate(zip(prompts, LENGTHS)):
        handles.append(sched.submit(Request(p, n, draft="adaptive" if i % 2 else 3, ignore_eog=True)))
        sched.step()
    drain(sched)
    for h, p, ref in zip(handles, prompts, reference):
        fin = finished(h)
        assert fin.reason == "max_tokens" and len(fin.tokens) == h.request.max_tokens
        assert fin.stats.proposed > 0
        assert_greedy_equivalent(single, p, fin.tokens, ref)
    snap = sched.snapshot()
    assert (snap.busy, snap.queued, snap.requests) == (0, 0, N_SEQ)
    assert snap.stats.tokens == sum(LENGTHS)


def test_threaded_submissions_and_sinks(batch, single, prompts, reference):
    """The engine thread with requests submitted from 8 threads at once; half deliver through a sink."""
    got: dict[int, list] = {i: [] for i in range(N_SEQ)}
    with Scheduler(batch) as sched:
        def client(i: int) -> None:
            req = Request(prompts[i], LENGTHS[i], draft=3, ignore_eog=True)
            h = sched.submit(req, sink=got[i].append if i % 2 else None)
            if not i % 2:
                got[i].extend(h)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(N_SEQ)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sched.stop(grace=30)
        with pytest.raises(SchedulerClosed):
            sched.submit(Request(prompts[0], 4))
    for i in range(N_SEQ):
        fin = got[i][-1]
        assert isinstance(fin, Finished), fin
        assert [t for r in got[i][:-1] for t in r.tokens] == fin.tokens
        assert_greedy_equivalent(single, prompts[i], fin.tokens, reference[i])


@pytest.mark.parametrize("family", ["tiny-e", "tiny-dense", "tiny-moe"])
def test_rollback_every_round_on_tiny_families(runtime_ggufs, engines, family):
    """Random drafters: every round rolls each sequence back; 4 sequences past their sliding windows."""
    from fixtures.runtime import corpus_prompts

    from gguf_mtp.runtime.batch_engine import BatchEngine

    eng = engines.get(family)
    ps = corpus_prompts(eng, 4, seed=7)
    refs = [generate(eng, p, 40, chooser=FixedK(0)).tokens for p in ps]
    with BatchEngine.load(*runtime_ggufs[family], TEST_SETTINGS, n_seq=4) as b:
        sched = Scheduler(b)
        hs = [sched.submit(Request(p, 40, draft=k)) for p, k in zip(ps, (1, 3, 6, "adaptive"))]
        drain(sched)
    for h, p, ref in zip(hs, ps, refs):
        fin = finished(h)
        assert_greedy_equivalent(eng, p, fin.tokens, ref)


# --- acceptance under batching ---------------------------------------------------------------------------
@pytest.mark.parametrize("n_streams", [4, 8])
def test_acceptance_under_batching_matches_single_sequence(batch, single, prompts, n_streams):
    """Same prompts, k = 3: each request keeps as many drafts as it does alone (the drafter reads the right
    sequence's cache), and adaptive requests in the same batch keep drafting."""
    sched = Scheduler(batch)
    hs = [sched.submit(Request(p, 48, draft=3 if i % 2 == 0 else "adaptive", ignore_eog=True))
          for i, p in enumerate(prompts[:n_streams])]
    drain(sched)
    for i, (h, p) in enumerate(zip(hs, prompts)):
        fin = finished(h)
        assert fin.stats.proposed > 0
        if i % 2 == 0:
            alone = generate(single, p, 48, chooser=FixedK(3), ignore_eog=True).stats
            print(f"request {i}: acceptance {fin.stats.acceptance_rate:.3f} batched, {alone.acceptance_rate:.3f} alone")
            assert abs(fin.stats.acceptance_rate - alone.acceptance_rate) <= 0.1


def test_adaptive_switches_drafting_off_for_a_batch_whose_drafts_fail(runtime_ggufs):
    """tiny-e's random drafter keeps nothing: adaptive requests stop drafting (probes aside)."""
    from fixtures.runtime import corpus_prompts

    from gguf_mtp.runtime.batch_engine import BatchEngine

    with BatchEngine.load(*runtime_ggufs["tiny-e"], TEST_SETTINGS, n_seq=4) as b:
        sched = Scheduler(b)
        hs = [sched.submit(Request(p, 96, ignore_eog=True)) for p in corpus_prompts(b.engine, 4, seed=3)]
        drain(sched)
    for h in hs:
        s = finished(h).stats
        assert s.k_histogram.get(0, 0) >= 0.7 * s.rounds, s.k_histogram


# --- slots: cancel, reuse, chunked prefill, refusals -----------------------------------------------------
def test_cancel_frees_the_slot(batch, single, prompts, reference):
    sched = Scheduler(batch, max_queue=4)
    running = [sched.submit(Request(p, 200, ignore_eog=True)) for p in prompts]
    waiting = sched.submit(Request(prompts[0], LENGTHS[0], ignore_eog=True))
    doomed = sched.submit(Request(prompts[1], 8, ignore_eog=True))
    for _ in range(3):
        sched.step()
    assert (sched.snapshot().busy, sched.snapshot().queued) == (N_SEQ, 2)
    doomed.cancel()  # still waiting: leaves the queue with nothing emitted
    running[5].cancel()  # generating: leaves with what it has emitted, its slot goes to ``waiting``
    sched.step()
    assert (sched.snapshot().busy, sched.snapshot().queued) == (N_SEQ, 0)
    fin = finished(doomed)
    assert (fin.reason, fin.tokens) == ("cancelled", [])
    fin = finished(running[5])
    assert fin.reason == "cancelled" and 0 < len(fin.tokens) < 200
    for h in running:
        h.cancel()
    drain(sched)
    assert_greedy_equivalent(single, prompts[0], finished(waiting).tokens, reference[0])
    running[5].cancel()  # after the end: nothing happens
    assert sched.step() is False and running[5].events.empty()


def test_next_turn_reuses_its_slot(batch, single, prompts):
    """A conversation's next turn goes to the slot holding the last one (among 8) and reads only what is new."""
    sched = Scheduler(batch)
    first = [sched.submit(Request(p, 24, draft=3, ignore_eog=True)) for p in prompts]
    drain(sched)
    replies = [finished(h).tokens for h in first]
    turn = prompts[5] + replies[5] + single.tokenize("\n    return", add_special=False)
    h = sched.submit(Request(turn, 24, draft=3, ignore_eog=True))
    drain(sched)
    fin = finished(h)
    assert fin.stats.reused_tokens >= len(prompts[5]) + len(replies[5]) - 1
    assert fin.stats.prefill_tokens + fin.stats.reused_tokens == len(turn)
    ref = generate(single, turn, 24, chooser=FixedK(0), ignore_eog=True).tokens
    assert_greedy_equivalent(single, turn, fin.tokens, ref)


def test_a_long_prompt_is_read_in_chunks_between_rounds(batch, single, prompts, reference):
    sched = Scheduler(batch, prefill_chunk=16)
    short = sched.submit(Request(prompts[1], LENGTHS[1], draft=3, ignore_eog=True))
    sched.step()
    long_prompt = [single.bos, *reversed([t for p in prompts for t in p[1:]])][:200]  # in no slot's cache
    long = sched.submit(Request(long_prompt, 8, draft=3, ignore_eog=True))
    rounds_while_reading = 0
    while sched.step():
        if long.events.empty() and not short.done:
            rounds_while_reading += 1
    assert_greedy_equivalent(single, prompts[1], finished(short).tokens, reference[1])
    fin = finished(long)
    assert fin.stats.prefill_tokens >= len(long_prompt) - 1
    assert rounds_while_reading >= (fin.stats.prefill_tokens - 1) // 16  # the short one went on: a round per chunk
    ref = generate(single, long_prompt, 8, chooser=FixedK(0), ignore_eog=True).tokens
    assert_greedy_equivalent(single, long_prompt, fin.tokens, ref)


def test_stop_without_grace_cancels_running_work(batch, prompts):
    sched = Scheduler(batch).start()
    h = sched.submit(Request(prompts[0], 200, ignore_eog=True))
    assert isinstance(h.get(timeout=30), Round)
    sched.stop()
    fin = list(h)[-1]
    assert fin.reason == "cancelled" and len(fin.tokens) < 200


def test_cancel_while_reading_the_prompt_keeps_what_was_read(batch, single, prompts):
    tokens = [(7 * t + 11) % single.n_vocab for p in prompts for t in p[1:]]  # in no slot's cache
    long_prompt = [single.bos, *tokens[:150]]
    sched = Scheduler(batch, prefill_chunk=16)
    other = sched.submit(Request(prompts[1], 64, ignore_eog=True))  # generating: prompts are read in chunks
    sched.step()
    h = sched.submit(Request(long_prompt, 8, ignore_eog=True))
    sched.step()
    sched.step()
    h.cancel()
    sched.step()
    fin = finished(h)
    assert (fin.reason, fin.tokens) == ("cancelled", []) and sched.snapshot().busy == 1
    other.cancel()
    again = sched.submit(Request(long_prompt, 8, ignore_eog=True))
    drain(sched)
    fin = finished(again)
    assert fin.stats.reused_tokens >= 32  # the two chunks read before the cancel
    ref = generate(single, long_prompt, 8, chooser=FixedK(0), ignore_eog=True).tokens
    assert_greedy_equivalent(single, long_prompt, fin.tokens, ref)


def test_refusals(batch, prompts):
    sched = Scheduler(batch, max_queue=1)
    with pytest.raises(PromptTooLong, match=f"of {batch.slot_ctx + 1} tokens .* context of {batch.slot_ctx} "
                                            rf"positions \(n_ctx {batch.n_ctx} / {N_SEQ} slots\)"):
        sched.submit(Request([batch.bos] * (batch.slot_ctx + 1), 4))
    for bad, what in ((Request([], 4), "prompt"), (Request([batch.n_vocab], 4), "token ids"),
                      (Request(prompts[0], -1), "max_tokens"), (Request(prompts[0], 4, accept="maybe"), "accept"),
                      (Request(prompts[0], 4, draft="some"), "draft"),
                      (Request(prompts[0], 4, SamplingParams(temperature=1.0, top_p=0.0)), "top_p")):
        with pytest.raises(GgufMtpError, match=what):
            sched.submit(bad)
    hs = [sched.submit(Request(p, 4)) for p in prompts] + [sched.submit(Request(prompts[0], 4))]
    with pytest.raises(QueueFull, match="1 waiting"):
        sched.submit(Request(prompts[0], 4))
    sched.stop(grace=30)
    with pytest.raises(SchedulerClosed):
        sched.submit(Request(prompts[0], 4))
    assert all(isinstance(list(h)[-1], Finished) for h in hs)


def test_max_tokens_zero_and_stop_tokens(batch, single, prompts, reference):
    sched = Scheduler(batch)
    none = sched.submit(Request(prompts[0], 0))
    stop_at = reference[2][5]  # a stop token the 6th token of the reply: never emitted, the reply ends before it
    cut = sched.submit(Request(prompts[2], LENGTHS[2], draft=3, stop_tokens=frozenset({stop_at}), ignore_eog=True))
    drain(sched)
    fin = list(none)[-1]
    assert (fin.reason, fin.tokens, fin.stats.prefill_tokens + fin.stats.reused_tokens) == (
        "max_tokens", [], len(prompts[0]))
    fin = finished(cut)
    assert (fin.reason, fin.stats.stop_token) == ("stop", stop_at)
    assert fin.tokens == reference[2][:reference[2].index(stop_at)]


# --- sampling ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("accept", ["exact", "rejection"])
def test_sampled_requests_match_the_single_sequence_loop(batch, single, prompts, accept):
    """Temperature 0.8, a seed per request, k = 3: each request draws from its own generator in the loop's
    order, so it reproduces the single-sequence loop's output with the same seed. Batched and one-sequence
    logits differ by ~1e-3 (batch shape), which can move a draw across a boundary once in a few hundred
    draws: most requests, not all, must match. Shared or misrouted generators would match none."""
    sched = Scheduler(batch)
    params = [SamplingParams(temperature=0.8, top_k=40, seed=i) for i in range(N_SEQ)]
    hs = [sched.submit(Request(p, 32, sp, accept=accept, draft=3, ignore_eog=True)) for p, sp in zip(prompts, params)]
    drain(sched)
    same = 0
    for h, p, sp in zip(hs, prompts, params):
        fin = finished(h)
        alone = generate(single, p, 32, sampling=sp, accept=accept, chooser=FixedK(3), ignore_eog=True)
        same += fin.tokens == alone.tokens
        assert fin.stats.proposed > 0 and len(fin.tokens) == 32
    assert same >= N_SEQ - 2, f"{same} of {N_SEQ} sampled outputs equal the single-sequence loop's"


def test_a_failing_decode_fails_its_requests_and_the_rest_go_on(batch, single, prompts, reference, monkeypatch):
    sched = Scheduler(batch)
    h = sched.submit(Request(prompts[0], 8, ignore_eog=True))
    real = type(batch).decode
    calls = {"n": 0}

    def flaky(self, parts):
        calls["n"] += 1
        if calls["n"] == 3:
            raise GgufMtpError("target decode failed (code -3) for sequences 0")
        return real(self, parts)

    monkeypatch.setattr(type(batch), "decode", flaky)
    drain(sched)
    assert isinstance(list(h)[-1], Failed)
    monkeypatch.undo()
    h = sched.submit(Request(prompts[0], LENGTHS[0], ignore_eog=True))
    drain(sched)
    assert_greedy_equivalent(single, prompts[0], finished(h).tokens, reference[0])


# --- the batch's draft length on injected costs ----------------------------------------------------------
def run_batch_k(acceptances, decode, step, rounds: int = 40) -> tuple[BatchAdaptiveK, int]:
    """Feed a BatchAdaptiveK decode / drafter-step costs (seconds of n rows) for the rows its choices make."""
    bk = BatchAdaptiveK(8)
    k = 0
    for _ in range(rounds):
        k = bk.choose_batch(acceptances, 0, 8)
        ks = [bk.trim(a, k) if k else 0 for a in acceptances]
        rows = sum(x + 1 for x in ks)
        steps = [(sum(1 for x in ks if x > i), step(sum(1 for x in ks if x > i))) for i in range(max(ks))]
        bk.observe_costs(steps, rows, decode(rows))
        bk.observe_costs([], len(acceptances), decode(len(acceptances)))  # a plain round's cost too
        bk.observe_outcome(int(sum(a[0] * x for a, x in zip(acceptances, ks))))
    return bk, k


def test_batch_k_switches_drafting_off_when_verify_rows_are_expensive():
    # compute-bound (a big batch on a CPU): every verify row costs nearly a step
    bk, k = run_batch_k([[0.3] * 8] * 8, decode=lambda n: 1.0 + 0.8 * n, step=lambda n: 0.2 + 0.05 * n)
    assert k == 0


def test_batch_k_drafts_long_when_verify_rows_are_cheap_and_trims_per_sequence():
    # memory-bound (a GPU): rows are nearly free, drafts that agree pay up to the cap
    good, poor = [0.9] * 8, [0.1] * 8
    bk, k = run_batch_k([good] * 4 + [poor] * 4, decode=lambda n: 1.0 + 0.02 * n, step=lambda n: 0.05 + 0.001 * n)
    assert k >= 4
    assert bk.trim(good, k) == k
    assert 1 <= bk.trim(poor, k) < k
