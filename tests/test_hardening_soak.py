"""Long runs: a chat of many turns on a tiny pair in a small context, the context limit reached again and again.

Checked every turn: the KV bookkeeping (``engine.tokens``) matches what llama.cpp's cache holds
(``llama_memory_seq_pos_max``), the reply is what the target alone produces greedily from the same prompt
(lossless; a near-tie is checked by rescoring, fixtures/runtime.py), and a dropped turn is announced. At the
end: the process's resident memory grew by no more than a few MB since warm-up. The CI run generates ~4000
tokens; GGUF_MTP_SOAK_TOKENS=20000 runs the long one by hand (RSS printed with -s; docs/hardening.md).
"""

from __future__ import annotations

import gc
import os
import time

import pytest
from fixtures.runtime import assert_greedy_equivalent

from gguf_mtp.runtime.adaptive import FixedK
from gguf_mtp.runtime.chat import ChatSession, Notice, Reply
from gguf_mtp.runtime.loop import generate

pytestmark = pytest.mark.slow

TOKENS = int(os.environ.get("GGUF_MTP_SOAK_TOKENS", "0") or 0) or 4000
N_CTX = 256
MAX_TOKENS = 48
WARMUP_TURNS = 8
RSS_GROWTH_LIMIT = 8 << 20  # bytes, start (after warm-up) to end
MESSAGES = ["the cat sat on the mat", "and then what did the dog do", "tell me about the weather today",
            "why is the sky blue", "count to ten", "write a short poem about rivers", "what is a token"]


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def kv_end(engine) -> int:
    """One past the last position llama.cpp's cache holds for sequence 0 (0 when empty)."""
    from gguf_mtp.runtime.bindings import llama

    return int(llama.llama_memory_seq_pos_max(engine.mem, 0)) + 1


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS is read from /proc")
def test_long_chat_keeps_memory_kv_and_output(engines):
    eng = engines.get("tiny-dense", n_ctx=N_CTX)
    ref = engines.get("tiny-dense", drafter=False, n_ctx=N_CTX)
    eng.truncate(0)
    ref.truncate(0)
    session = ChatSession(eng, system="You answer briefly.", max_tokens=MAX_TOKENS, chooser=FixedK(3))
    generated = turns = dropped = cut = near_ties = 0
    rss_start = None
    t0 = time.perf_counter()
    while generated < TOKENS:
        events = list(session.send(f"{turns}: {MESSAGES[turns % len(MESSAGES)]}"))
        reply = events[-1]
        assert isinstance(reply, Reply)
        notices = [e for e in events if isinstance(e, Notice)]
        dropped += any(n.kind == "dropped" and "dropped the" in n.message for n in notices)
        cut += any(n.kind == "context_full" for n in notices)
        # the bookkeeping is what llama.cpp holds: the prompt and the reply (its last token too when a stop token
        # ended it), nothing left over from dropped turns or rejected drafts
        assert eng.n_past == kv_end(eng), (turns, eng.n_past, kv_end(eng))
        assert eng.n_past - len(reply.prompt) in (len(reply.tokens) - 1, len(reply.tokens)), turns
        assert eng.tokens == reply.prompt + reply.tokens[:eng.n_past - len(reply.prompt)]
        assert len(reply.prompt) + session.room <= N_CTX
        # lossless: the target alone, from the same prompt, says the same (or a near-tie separates them)
        plain = generate(ref, reply.prompt, MAX_TOKENS, stop_tokens=session.stop_ids)
        assert ref.n_past == kv_end(ref)
        if plain.tokens != reply.tokens:
            near_ties += assert_greedy_equivalent(ref, reply.prompt, reply.tokens, plain.tokens)
        generated += len(reply.tokens)
        turns += 1
        if turns == WARMUP_TURNS:
            gc.collect()
            rss_start = rss()
    gc.collect()
    rss_end = rss()
    seconds = time.perf_counter() - t0
    print(f"\nsoak: {turns} turns, {generated} tokens in {seconds:.1f} s, context limit reached {dropped} times "
          f"(replies cut {cut}), near-ties {near_ties}, RSS after warm-up {rss_start / 2**20:.1f} MiB, "
          f"at the end {rss_end / 2**20:.1f} MiB")
    assert turns > WARMUP_TURNS and dropped >= 3, (turns, dropped)
    assert rss_end - rss_start <= RSS_GROWTH_LIMIT, (rss_start, rss_end)
