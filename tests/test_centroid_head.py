"""The centroid-clustered drafter head in our patched llama.cpp (patches/llama.cpp/0001-centroid-head.patch).

On the tiny E-style pair (32 clusters of 16 tokens, top 8 per step) exported with ``convert --centroids``:
llama.cpp selects the clusters transformers' Gemma4AssistantMaskedEmbedder selects, its logits over them match,
every other token holds min(selected) - 1, its greedy drafts are transformers' drafts, and greedy MTP stays
identical to plain greedy. Skipped unless the loaded runtime carries the patch (``gguf-mtp runtime info``).

Also here, because it needs no patch: llama.cpp's drafter attends the last W-1 target positions on sliding layers
(transformers' the last W+1); pinned so a change upstream or in our patches shows (docs/runtime-build.md).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fixtures.runtime import NEAR_TIE, TEST_SETTINGS, assert_greedy_equivalent, corpus_prompts

from gguf_mtp.runtime_build import supports_centroid_head

CENTROID_RUNTIME = supports_centroid_head()
needs_patch = pytest.mark.skipif(not CENTROID_RUNTIME, reason="the loaded llama.cpp lacks our centroid-head patch "
                                 "(gguf-mtp runtime build)")
N_CLUSTERS, TOP_K, PER_CLUSTER = 32, 8, 16  # tiny-e's drafter head (gguf_mtp/tiny/configs.py)
WINDOW = 16  # tiny-e's sliding window
CLUSTER_TIE = 0.02  # centroid score gap (kept vs dropped) below which llama.cpp and transformers may disagree


@pytest.fixture(scope="module")
def tiny_e(exports, export_src) -> SimpleNamespace:
    """tiny-e checkpoints and GGUFs: target, drafter with the centroid head, the same drafter with the dense head."""
    return SimpleNamespace(
        hf=Path(export_src) / "tiny-e",
        target=exports.get("tiny-e", "target"),
        dense=exports.get("tiny-e", "drafter"),
        centroid=exports.get("tiny-e", "drafter", centroids=True) if CENTROID_RUNTIME else None,
    )


@pytest.fixture(scope="module")
def tiny_e_engines(tiny_e):
    """Engines of tiny-e: "centroid" (patched runtime only), "dense" and "plain" (no drafter)."""
    from gguf_mtp.runtime.engine import Engine

    made = {"dense": Engine.load(tiny_e.target, tiny_e.dense, TEST_SETTINGS),
            "plain": Engine.load(tiny_e.target, None, TEST_SETTINGS),
            # CPU flash attention triples the numeric distance to transformers (docs: mtp-loop notes)
            "dense-no-fa": Engine.load(tiny_e.target, tiny_e.dense, TEST_SETTINGS.replace(flash_attn="off"))}
    if CENTROID_RUNTIME:
        made["centroid"] = Engine.load(tiny_e.target, tiny_e.centroid, TEST_SETTINGS)
    yield made
    for eng in made.values():
        eng.close()


@pytest.fixture(scope="module")
def hf_pair(tiny_e):
    reference = pytest.importorskip("gguf_mtp.transformers_reference",
                                    reason="needs the dev extra (torch, transformers)")
    target, drafter = reference.load_pair(tiny_e.hf)
    pair = SimpleNamespace(ref=reference, target=target, drafter=drafter, head_input=None)
    if drafter.masked_embedding is not None:  # keep what the centroid head saw, to find near-ties of clusters
        drafter.masked_embedding.register_forward_pre_hook(lambda m, args: setattr(pair, "head_input", args[0]))
    return pair


def hf_step(pair, token: int, hidden: np.ndarray, tp, position: int):
    """transformers' draft step, and the gap between its last kept and first dropped cluster score."""
    step = pair.ref.drafter_step(pair.drafter, pair.target, token, hidden, tp.shared_kv, position)
    scores = np.sort(pair.drafter.masked_embedding.centroids(pair.head_input)[0, -1].detach().float().numpy())[::-1]
    return step, float(scores[TOP_K - 1] - scores[TOP_K])


def near_tie(logits: np.ndarray, cluster_gap: float) -> bool:
    """Numerics (~1% here) may pick another cluster or token: the selection is a hard top-k, the draft an argmax."""
    top2 = np.sort(logits)[-2:]
    return cluster_gap < CLUSTER_TIE or float(top2[1] - top2[0]) < NEAR_TIE


def first_step(eng, prompt: list[int]) -> tuple[int, np.ndarray, np.ndarray]:
    """Target reads ``prompt``; its greedy token t; the drafter's first step: (t, logits, next hidden), copied."""
    eng.truncate(0)
    n = eng.decode(prompt, outputs="last")
    t = int(eng.logits(1)[0].argmax())
    logits, h = eng.draft_step(t, len(prompt), eng.hidden(n - 1).copy())
    return t, logits.copy(), h.copy()


def drafts(eng, prompt: list[int], k: int) -> list[int]:
    """[t, d1..dk]: greedy drafts of one round, all at the position after the prompt (like the MTP loop)."""
    eng.truncate(0)
    n = eng.decode(prompt, outputs="last")
    token, h, out = int(eng.logits(1)[0].argmax()), eng.hidden(n - 1).copy(), []
    out.append(token)
    for _ in range(k):
        logits, h = eng.draft_step(token, len(prompt), h.copy())
        token = int(logits.argmax())
        out.append(token)
    return out


def drafter_meta(eng, key: str) -> str | None:
    import ctypes

    from gguf_mtp.runtime.bindings import llama

    buf = ctypes.create_string_buffer(256)
    n = llama.llama_model_meta_val_str(eng.draft_model, key.encode(), buf, len(buf))
    return buf.value.decode() if n >= 0 else None


def selected(logits: np.ndarray) -> np.ndarray:
    """Token ids that got a real logit (everything else holds the fill value, the row's minimum)."""
    return np.flatnonzero(logits > logits.min())


def prompts(eng, n: int, length: int) -> list[list[int]]:
    return corpus_prompts(eng, n, seed=7, length=length)


# --- the head itself ---------------------------------------------------------------------------------


@needs_patch
def test_head_scores_top_k_clusters_and_fills_the_rest(tiny_e_engines):
    eng = tiny_e_engines["centroid"]
    assert drafter_meta(eng, "gemma4-assistant.centroid_count") == str(N_CLUSTERS)
    assert drafter_meta(eng, "gemma4-assistant.centroid_top_k") == str(TOP_K)
    for prompt in prompts(eng, 4, 12):
        _, logits, _ = first_step(eng, prompt)
        sel = selected(logits)
        assert len(sel) == TOP_K * PER_CLUSTER
        fill = logits.min()
        assert fill == np.float32(logits[sel].min()) - np.float32(1.0)
        assert np.all(np.isfinite(logits))


@needs_patch
def test_selected_logits_equal_the_dense_head(tiny_e_engines):
    """Same trunk, same weights: the centroid head's logits are the dense head's on the tokens it selects."""
    for prompt in prompts(tiny_e_engines["dense"], 4, 12):
        tc, lc, hc = first_step(tiny_e_engines["centroid"], prompt)
        td, ld, hd = first_step(tiny_e_engines["dense"], prompt)
        assert tc == td
        np.testing.assert_array_equal(hc, hd)  # post_projection: untouched by the head
        sel = selected(lc)
        np.testing.assert_allclose(lc[sel], ld[sel], rtol=0, atol=1e-4 * np.abs(ld).max())


@needs_patch
def test_batched_rows_take_the_full_head_path_and_agree(tiny_e_engines):
    """>= clusters/top_k output rows switch to "full head, then pick" (bounded memory); same result per row."""
    from gguf_mtp.runtime.bindings import Batch, llama

    eng = tiny_e_engines["centroid"]
    prompt = prompts(eng, 1, 12)[0]
    rows = N_CLUSTERS // TOP_K + 2
    eng.truncate(0)
    eng.decode(prompt, outputs="all")
    hidden = np.stack([eng.hidden(i).copy() for i in range(len(prompt))])[-rows:]
    tokens = prompt[-rows:]
    pos = len(prompt)
    single = [eng.draft_step(t, pos, h)[0].copy() for t, h in zip(tokens, hidden)]
    batch = Batch(rows, eng.n_embd)
    assert llama.llama_decode(eng.draft_ctx, batch.set(tokens, pos, "all", embd=hidden, same_pos=True)) == 0
    for i, want in enumerate(single):
        got = np.ctypeslib.as_array(llama.llama_get_logits_ith(eng.draft_ctx, i), shape=(eng.n_vocab,)).copy()
        np.testing.assert_array_equal(selected(got), selected(want))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


@needs_patch
def test_inconsistent_centroid_keys_are_refused(tiny_e, tmp_path):
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    from gguf_mtp.errors import GgufMtpError
    from gguf_mtp.runtime.engine import Engine

    def with_top_k(dst: Path, top_k: int) -> Path:
        r = GGUFReader(str(tiny_e.centroid))
        w = GGUFWriter(str(dst), arch="gemma4-assistant")
        for name, f in r.fields.items():
            if name.startswith("GGUF.") or name == "general.architecture":
                continue
            value = top_k if name == "gemma4-assistant.centroid_top_k" else f.contents()
            sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
            w.add_key_value(name, value, f.types[0], sub_type=sub)
        for t in r.tensors:
            shape = [int(x) for x in reversed(t.shape)]
            w.add_tensor(t.name, np.asarray(t.data), raw_shape=shape, raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return dst

    for top_k in (0, N_CLUSTERS + 1):
        with pytest.raises(GgufMtpError, match="centroid_top_k"):
            Engine.load(tiny_e.target, with_top_k(tmp_path / f"bad-{top_k}.gguf", top_k), TEST_SETTINGS).close()


# --- against transformers (use_ordered_embeddings) ----------------------------------------------------


@needs_patch
@pytest.mark.reference
def test_same_clusters_and_logits_as_transformers(tiny_e_engines, hf_pair):
    eng, compared = tiny_e_engines["centroid"], 0
    for prompt in prompts(eng, 8, 12):  # shorter than the sliding window: both attend the same positions
        t, logits, h = first_step(eng, prompt)
        tp = hf_pair.ref.target_pass(hf_pair.target, prompt)
        step, gap = hf_step(hf_pair, t, tp.hidden[-1], tp, len(prompt))
        if int(tp.logits[-1].argmax()) != t or gap < CLUSTER_TIE:
            continue
        want = selected(step.logits)
        assert len(want) == TOP_K * PER_CLUSTER
        np.testing.assert_array_equal(selected(logits), want)
        scale = np.abs(step.logits[want]).max()
        np.testing.assert_allclose(logits[want], step.logits[want], rtol=0, atol=0.02 * scale)
        np.testing.assert_allclose(h, step.hidden, rtol=0, atol=0.02 * np.abs(step.hidden).max())
        compared += 1
    assert compared >= 5


@needs_patch
@pytest.mark.reference
def test_same_greedy_drafts_as_transformers(tiny_e_engines, hf_pair):
    """Each side drafts from its own previous step (as in a real round) until a near-tie may part them."""
    eng, steps, compared = tiny_e_engines["centroid"], 4, 0
    for prompt in prompts(eng, 12, 12):
        ours = drafts(eng, prompt, steps)
        tp = hf_pair.ref.target_pass(hf_pair.target, prompt)
        token, hidden = int(tp.logits[-1].argmax()), tp.hidden[-1]
        assert ours[0] == token
        for i in range(steps):
            step, gap = hf_step(hf_pair, token, hidden, tp, len(prompt))
            if near_tie(step.logits, gap):
                break
            token, hidden = int(step.logits.argmax()), step.hidden
            assert ours[i + 1] == token, (prompt, ours, i)
            compared += 1
    assert compared >= 16, compared  # of 48 steps; random weights leave many near-ties among 32 clusters


# --- the speculative loop -------------------------------------------------------------------------------


@needs_patch
@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_mtp_identical_to_plain_greedy(tiny_e_engines, k):
    from gguf_mtp.runtime.adaptive import FixedK
    from gguf_mtp.runtime.loop import generate

    eng, plain = tiny_e_engines["centroid"], tiny_e_engines["plain"]
    for prompt in prompts(eng, 3, 12):
        want = generate(plain, prompt, 48, chooser=FixedK(0), ignore_eog=True).tokens
        got = generate(eng, prompt, 48, chooser=FixedK(k), ignore_eog=True)
        assert got.stats.proposed > 0
        assert_greedy_equivalent(plain, prompt, got.tokens, want)


# --- the sliding window the drafter attends (no patch needed) -------------------------------------------


@pytest.mark.reference
def test_drafter_attends_the_last_w_minus_1_sliding_positions(tiny_e_engines, hf_pair):
    """Pinned: llama.cpp's drafter (query at position n) sees target positions n-W+1..n-1 on sliding layers.

    transformers' sees n-W-1..n-1 (W+1), vLLM's n-W..n-1 (W); see docs/runtime-build.md. Compared on the
    drafter's output hidden state, which the head does not touch (so the dense export serves both runtimes),
    against transformers' drafter given only the last W-2, W-1, W or W+1 sliding positions.
    """
    eng, ref = tiny_e_engines["dense-no-fa"], hf_pair.ref
    candidates = (WINDOW - 2, WINDOW - 1, WINDOW, WINDOW + 1)
    worst = dict.fromkeys(candidates, 0.0)  # per candidate: the largest relative error over the prompts
    for prompt in prompts(eng, 4, 2 * WINDOW + 8):
        _, _, h = first_step(eng, prompt)
        tp = ref.target_pass(hf_pair.target, prompt)
        t = int(tp.logits[-1].argmax())
        for last in candidates:
            step = ref.drafter_step(hf_pair.drafter, hf_pair.target, t, tp.hidden[-1], tp.shared_kv, len(prompt),
                                    sliding_kv_last=last)
            err = float(np.abs(h - step.hidden).max() / np.abs(step.hidden).max())
            worst[last] = max(worst[last], err)
    assert worst[WINDOW - 1] < 0.03, worst
    assert all(e > 3 * worst[WINDOW - 1] for last, e in worst.items() if last != WINDOW - 1), worst
