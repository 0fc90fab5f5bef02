"""Exported GGUFs run in llama.cpp like the checkpoints run in transformers 5.23.0 (the reference).

Targets: logits over a prompt longer than every family's sliding window. Drafters: the first MTP step (token +
the target's hidden state, attending the target's KV through an MTP context) while the context is shorter than
the sliding window (beyond it transformers and llama.cpp attend different sliding spans; see mtp-loop.md).
llama.cpp runs with flash attention off and an f32 KV cache, so what remains is arithmetic, not layout.

The tiny checkpoints are deliberately sensitive (large post-norm gains): rounding only the weights to bf16
inside transformers moves their logits by 9-50%, so reduced types are held to looser bounds here and to
exact per-tensor precision in test_export.py. Measured numbers: docs/export.md.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

reference = pytest.importorskip("gguf_mtp.transformers_reference", reason="needs the dev extra (torch, transformers)")

pytestmark = pytest.mark.reference

FAMILIES = ("tiny-e", "tiny-dense", "tiny-moe", "tiny-q")
WINDOW = {"tiny-e": 16, "tiny-dense": 8, "tiny-moe": 16, "tiny-q": 8}
PROMPT = [2] + [int(t) for t in np.random.default_rng(0).integers(108, 512, 39)]  # 40 > every window
GGML_F32 = 0


@pytest.fixture(scope="module")
def hf(export_src):
    """transformers models of the tiny families, loaded once per module."""
    cache: dict[tuple[str, str], object] = {}

    def get(family: str, role: str = "target"):
        if (family, role) not in cache:
            model = reference.load_model(export_src / family / role)
            if role == "drafter":
                model.config.use_ordered_embeddings = False  # the dense head: what stock llama.cpp computes
            cache[family, role] = model
        return cache[family, role]

    return get


def llama_logits(path, tokens: list[int]) -> np.ndarray:
    import llama_cpp

    m = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, flash_attn=False, type_k=GGML_F32, type_v=GGML_F32,
                        n_threads=1, n_threads_batch=1, verbose=False)
    m.eval(tokens)
    out = np.array(m.scores[: len(tokens)], dtype=np.float32)
    m.close()
    return out


def compare(got: np.ndarray, want: np.ndarray) -> tuple[float, float, float, int]:
    """(relative L2, max-abs, argmax agreement, argmax disagreements that are not near-ties)."""
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    mx = float(np.abs(got - want).max())
    agree = got.argmax(-1) == want.argmax(-1)
    top2 = np.sort(want, axis=-1)[:, -2:]
    real = int(np.sum(~agree & (top2[:, 1] - top2[:, 0] > 2 * mx)))
    return rel, mx, float(agree.mean()), real


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_target_logits_match_transformers(family, exports, hf):
    got = llama_logits(exports.get(family, "target", "f32"), PROMPT)
    want = reference.target_logits(hf(family), PROMPT)
    rel, mx, agree, real = compare(got, want)
    print(f"{family} f32: rel L2 {rel:.2%}, max-abs {mx:.3f} of {np.abs(want).max():.1f}, argmax {agree:.0%}")
    assert rel < 0.01 and mx < 0.05 * np.abs(want).max()
    assert real == 0


@pytest.mark.parametrize("family, outtype, max_rel, min_agree", [
    ("tiny-e", "f16", 0.05, 0.9), ("tiny-dense", "f16", 0.05, 0.9), ("tiny-moe", "f16", 0.1, 0.9),
    ("tiny-q", "f16", 0.05, 0.9), ("tiny-q", "auto", 0.1, 0.9),  # tiny-q's bf16 checkpoint, exported as is
])
def test_reduced_target_logits_stay_close(family, outtype, max_rel, min_agree, exports, hf):
    got = llama_logits(exports.get(family, "target", outtype), PROMPT)
    want = reference.target_logits(hf(family), PROMPT)
    rel, mx, agree, _ = compare(got, want)
    print(f"{family} {outtype}: rel L2 {rel:.2%}, max-abs {mx:.3f}, argmax {agree:.0%}")
    assert rel < max_rel and agree >= min_agree


@pytest.mark.parametrize("outtype", ["bf16", "q8_0"])
def test_every_outtype_loads_and_runs(outtype, exports):
    for family in FAMILIES:
        assert np.isfinite(llama_logits(exports.get(family, "target", outtype), PROMPT[:6])).all()


# --- drafter: one MTP step through llama.cpp's low-level API (see mtp-loop.md) -----------------------------------
def mtp_first_step(target_path, drafter_path, tokens: list[int], token: int) -> tuple[np.ndarray, np.ndarray]:
    """(drafter logits, target hidden at the last prompt position) for the draft step (token, pos=len(tokens))."""
    import llama_cpp.llama_cpp as L
    import llama_cpp.llama_cpp_ext as X

    def params(**kw):
        p = L.llama_context_default_params()
        p.n_ctx = p.n_batch = p.n_ubatch = 64
        p.n_seq_max, p.flash_attn_type, p.type_k, p.type_v, p.n_threads, p.n_threads_batch = 1, 0, 0, 0, 1, 1
        for k, v in kw.items():
            setattr(p, k, v)
        return p

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    tm = L.llama_model_load_from_file(str(target_path).encode(), mp)
    dm = L.llama_model_load_from_file(str(drafter_path).encode(), mp)
    tctx = L.llama_init_from_model(tm, params())
    # the drafter context first: creating it resets the KV cells it shares with the target
    dctx = L.llama_init_from_model(dm, params(ctx_type=L.LLAMA_CONTEXT_TYPE_MTP, ctx_other=tctx, n_rs_seq=0))
    tb = L.llama_batch_init(len(tokens), 0, 1)
    db = L.llama_batch_init(1, L.llama_model_n_embd(tm), 1)
    token_slot = (L.llama_token * 1)()
    try:
        assert tm and dm and tctx and dctx
        X.llama_set_embeddings_nextn(tctx, True, False)
        X.llama_set_embeddings_nextn(dctx, True, True)
        n_embd, n_vocab = L.llama_model_n_embd(tm), L.llama_vocab_n_tokens(L.llama_model_get_vocab(dm))
        for i, t in enumerate(tokens):
            tb.token[i], tb.pos[i], tb.n_seq_id[i], tb.seq_id[i][0], tb.logits[i] = t, i, 1, 0, 1
        tb.n_tokens = len(tokens)
        assert L.llama_decode(tctx, tb) == 0
        h = np.ctypeslib.as_array(X.llama_get_embeddings_nextn_ith(tctx, len(tokens) - 1), shape=(n_embd,)).copy()
        db.token = token_slot  # a row with a token *and* an embedding (llama_batch_init allocates only one)
        db.token[0], db.pos[0], db.n_seq_id[0], db.seq_id[0][0], db.logits[0] = token, len(tokens), 1, 0, 1
        np.ctypeslib.as_array(db.embd, shape=(n_embd,))[:] = h
        db.n_tokens = 1
        assert L.llama_decode(dctx, db) == 0
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(dctx, 0), shape=(n_vocab,)).copy()
        return logits, h
    finally:
        db.token = ctypes.POINTER(L.llama_token)()
        L.llama_batch_free(db)
        L.llama_batch_free(tb)
        L.llama_free(dctx)
        L.llama_free(tctx)
        L.llama_model_free(dm)
        L.llama_model_free(tm)


@pytest.mark.parametrize("family", FAMILIES)
def test_drafter_first_step_matches_transformers(family, exports, hf):
    tokens = PROMPT[: WINDOW[family] - 4]  # shorter than the sliding window
    tp = reference.target_pass(hf(family), tokens)
    token = int(tp.logits[-1].argmax())
    got, h = mtp_first_step(exports.get(family, "target", "f32"), exports.get(family, "drafter", "f32"), tokens, token)
    assert np.abs(h - tp.hidden[-1]).max() < 0.02  # the nextn row is the post-norm hidden state
    want = reference.drafter_step(hf(family, "drafter"), hf(family), token, h, tp.shared_kv, len(tokens)).logits
    rel, mx, _, _ = compare(got[None], want[None])
    print(f"{family} drafter: rel L2 {rel:.2%}, max-abs {mx:.3f} of {np.abs(want).max():.1f}")
    assert rel < 0.01 and int(got.argmax()) == int(want.argmax())
