"""Prompts with images in the batched scheduler (``Request(media=)``) against the single-sequence loop
(``speculative_generate(media=)``), on tiny-e with its vision projector.

tiny-e's drafter is random (drafts are never kept), so output identity alone cannot see a wrong drafter input:
the hidden row the drafter reads after an image is compared with the single-sequence loop's directly.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from fixtures.projector import PROJECTOR_FAMILY
from fixtures.runtime import TEST_SETTINGS, drain, finished

from gguf_mtp.errors import GgufMtpError
from gguf_mtp.runtime.adaptive import FixedK
from gguf_mtp.runtime.chat_template import prompt_text, prompt_tokens
from gguf_mtp.runtime.loop import generate
from gguf_mtp.runtime.scheduler import Failed, Request, Scheduler

N_SEQ = 4
SETTINGS = TEST_SETTINGS.replace(n_ctx=N_SEQ * 256)  # 256 positions per slot: an image (~80) and a reply fit
K = 3  # fixed draft length: tiny-e's random drafter would make adaptive requests stop drafting
IMAGES = {"noise": (130, 100, 0), "square": (96, 96, 1)}  # name -> width, height, seed (80 and 81 soft tokens)
# (question, image or None, max_tokens): two image requests and two text-only ones
REQUESTS = [("what is in this picture", "noise", 24), ("the cat sat on the mat", None, 16),
            ("describe the colours", "square", 32), ("and then what did the dog do", None, 20)]


def png_bytes(width: int, height: int, seed: int) -> bytes:
    pil = pytest.importorskip("PIL.Image", reason="needs the dev extra (pillow)")
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    pil.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pngs() -> dict[str, bytes]:
    return {name: png_bytes(*spec) for name, spec in IMAGES.items()}


@pytest.fixture(scope="module")
def batch(runtime_ggufs, projectors):
    from gguf_mtp.runtime.batch_engine import BatchEngine

    with BatchEngine.load(*runtime_ggufs[PROJECTOR_FAMILY], SETTINGS, n_seq=N_SEQ, mmproj=projectors.get()) as eng:
        yield eng


@pytest.fixture(scope="module")
def single(engines, projectors):
    """The single-sequence engine and its own projector (the reference)."""
    from gguf_mtp.runtime.multimodal import Projector

    eng = engines.get(PROJECTOR_FAMILY)
    with Projector.load(projectors.get(), eng) as proj:
        yield eng, proj


class Prompts:
    """Chat prompts for one engine: token lists, or MediaPrompts from its projector (closed at the end)."""

    def __init__(self, engine, projector, pngs: dict[str, bytes]) -> None:
        self.engine, self.projector, self.pngs = engine, projector, pngs
        self.opened: list = []

    def make(self, turns: list[tuple[str, str | None]], answers: tuple[str, ...] = ()):
        """The conversation ``turns`` (question, image name) with ``answers`` after the first ones."""
        marker = self.projector.marker
        msgs, images = [], []
        for i, (question, image) in enumerate(turns):
            msgs.append({"role": "user", "content": question if image is None else marker + question})
            if image is not None:
                images.append(self.projector.image_from_bytes(self.pngs[image], image))
            if i < len(answers):
                msgs.append({"role": "assistant", "content": answers[i]})
        if not images:
            return prompt_tokens(self.engine, msgs), None
        media = self.projector.tokenize(prompt_text(self.engine, msgs), images)
        self.opened += [media, *images]
        return media.tokens, media

    def close(self) -> None:
        for x in self.opened:
            x.close()


@pytest.fixture
def prompts(batch, single, pngs):
    """(batched prompts, single-sequence prompts): the same conversations built for each engine."""
    ours, theirs = Prompts(batch, batch.projector, pngs), Prompts(*single, pngs)
    yield ours, theirs
    ours.close()
    theirs.close()


def reference(single, prompt, media, n: int) -> list[int]:
    """The single-sequence loop's greedy output with MTP on (k = K), from a cold cache."""
    eng, _ = single
    eng.truncate(0)
    return generate(eng, prompt, n, chooser=FixedK(K), ignore_eog=True, media=media).tokens


# --- concurrent image and text requests == the single-sequence loop ----------------------------------------
def test_concurrent_image_and_text_requests_equal_the_single_sequence_loop(batch, single, prompts, monkeypatch):
    """Two image requests and two text ones, admitted one per iteration and read in chunks of 16 while the
    others generate (an image goes in whole between their rounds); greedy, k = 3."""
    ours, theirs = prompts
    drafted: dict[int, np.ndarray] = {}  # sequence -> the hidden row of its first drafter step
    real_draft = type(batch).draft

    def draft(self, seqs, tokens, hidden):
        for seq, h in zip(seqs, hidden):
            drafted.setdefault(seq, h.copy())
        return real_draft(self, seqs, tokens, hidden)

    monkeypatch.setattr(type(batch), "draft", draft)
    for seq in range(N_SEQ):
        batch.truncate(seq, 0)  # cold caches: every prompt, images included, is read
    sched = Scheduler(batch, prefill_chunk=16)
    handles, media = [], []
    for question, image, n in REQUESTS:
        prompt, m = ours.make([(question, image)])
        handles.append(sched.submit(Request(prompt, n, draft=K, ignore_eog=True, media=m)))
        media.append(m)
        sched.step()
    drain(sched)
    for h, m, (question, image, n) in zip(handles, media, REQUESTS):
        fin = finished(h)
        prompt, ref_media = theirs.make([(question, image)])
        assert list(h.request.prompt) == prompt  # both engines see the same positions
        assert fin.tokens == reference(single, prompt, ref_media, n)
        assert fin.stats.proposed > 0  # MTP stayed on (after the image, for image requests)
        assert fin.stats.prefill_tokens == len(prompt) and fin.stats.reused_tokens == 0
        if m is not None:
            assert m.encoded == m.media_tokens == ref_media.media_tokens >= 80
            # the drafter's first input is the hidden row of the last prompt position, as in the single loop
            eng, _ = single
            eng.truncate(0)
            h_single = eng.hidden(ref_media.decode(eng, 0) - 1).copy()
            seq = next(s for s in range(N_SEQ) if batch.tokens[s][:len(prompt)] == prompt)  # the slot it held
            assert np.abs(drafted[seq] - h_single).max() < 1e-2  # another row differs by ~1


# --- slots: cancel during an image, reuse of a cached image --------------------------------------------------
def test_cancel_during_an_image_prefill_frees_the_slot_and_the_next_turn_reuses_the_image(batch, single, prompts):
    ours, theirs = prompts
    sched = Scheduler(batch, prefill_chunk=16)
    text_prompt, _ = ours.make([("the cat sat on the mat", None)])
    other = sched.submit(Request(text_prompt, 200, draft=K, ignore_eog=True))  # generating: chunked prefill
    sched.step()
    turn = [("what is in this picture", "noise")]
    prompt, media = ours.make(turn)
    image = media.spans[0]
    h = sched.submit(Request(prompt, 16, draft=K, ignore_eog=True, media=media))
    while not media.encoded and not h.done:  # the text before the image, then the image (whole, one iteration)
        sched.step()
    assert media.encoded == image.n_tokens and h.events.empty()  # the text after the image is still to be read
    h.cancel()
    sched.step()
    fin = finished(h)
    assert (fin.reason, fin.tokens) == ("cancelled", []) and sched.snapshot().busy == 1  # the slot is free
    assert fin.stats.prefill_tokens + fin.stats.reused_tokens == image.start + image.n_tokens  # up to the image

    # the same prompt again: the slot holding the image is chosen and the image is not encoded again
    prompt, media = ours.make(turn)
    again = sched.submit(Request(prompt, 16, draft=K, ignore_eog=True, media=media))
    other.cancel()
    drain(sched)
    fin = finished(again)
    assert media.encoded == 0 and fin.stats.reused_tokens >= image.start + image.n_tokens
    assert fin.stats.proposed > 0
    ref_prompt, ref_media = theirs.make(turn)
    assert fin.tokens == reference(single, ref_prompt, ref_media, 16)

    # the next turn of that conversation: only its new part is read
    answer = batch.detokenize(fin.tokens)
    turns = [*turn, ("and the colours", None)]
    prompt2, media2 = ours.make(turns, (answer,))
    nxt = sched.submit(Request(prompt2, 16, draft=K, ignore_eog=True, media=media2))
    drain(sched)
    fin2 = finished(nxt)
    assert media2.encoded == 0 and fin2.stats.reused_tokens >= image.start + image.n_tokens
    assert fin2.stats.prefill_tokens + fin2.stats.reused_tokens == len(prompt2)
    assert fin2.stats.prefill_tokens < len(prompt2) - len(prompt) + 8  # the new turn, not the history
    ref_prompt2, ref_media2 = theirs.make(turns, (answer,))
    assert fin2.tokens == reference(single, ref_prompt2, ref_media2, 16)


def test_a_failing_image_decode_fails_its_request_and_the_rest_go_on(batch, single, prompts, monkeypatch):
    from gguf_mtp.runtime.bindings import llama
    from gguf_mtp.runtime.multimodal import MediaPrompt

    ours, theirs = prompts
    for seq in range(N_SEQ):
        batch.truncate(seq, 0)
    real = MediaPrompt.eval_span

    def broken(self, *args):  # fails after writing the image's cells (as a failing second ubatch would)
        real(self, *args)
        raise GgufMtpError("target decode of an image failed (code 1) at position 5")

    monkeypatch.setattr(MediaPrompt, "eval_span", broken)
    sched = Scheduler(batch)
    text_prompt, _ = ours.make([("the cat sat on the mat", None)])
    text = sched.submit(Request(text_prompt, 16, draft=K, ignore_eog=True))
    prompt, media = ours.make([("what is in this picture", "noise")])
    h = sched.submit(Request(prompt, 16, draft=K, ignore_eog=True, media=media))
    drain(sched)
    events = list(h)
    assert len(events) == 1 and isinstance(events[0], Failed) and "image failed" in events[0].message
    for seq in range(N_SEQ):  # the cells the failed image left are gone: each cache is what its tokens say
        assert llama.llama_memory_seq_pos_max(batch.engine.mem, seq) == batch.n_past(seq) - 1
        assert media.tokens[media.spans[0].start] not in batch.tokens[seq]
    ref_prompt, _ = theirs.make([("the cat sat on the mat", None)])
    assert finished(text).tokens == reference(single, ref_prompt, None, 16)


# --- refusals ---------------------------------------------------------------------------------------------
def test_media_requests_are_checked_before_they_are_queued(batch, single, prompts):
    from gguf_mtp.runtime.multimodal import MediaPrompt

    ours, theirs = prompts
    sched = Scheduler(batch)
    prompt, media = ours.make([("what is in this picture", "noise")])
    _, foreign = theirs.make([("what is in this picture", "noise")])
    span = media.spans[0]
    # gemma4v closes an image with a text token (<image|>): only a cut prompt ends inside one (shares the chunks)
    ends_with_image = MediaPrompt(prompt[:span.start + span.n_tokens], media.spans, media._chunks, media.projector)
    closed = batch.projector.tokenize(f"{batch.projector.marker}hi", [ours.opened[1]])  # the noise image
    closed.close()
    for request, what in (
            (Request(prompt, 4), "token ids"),  # identity ids without the MediaPrompt that explains them
            (Request(prompt[:-1], 4, media=media), "expected media.tokens"),
            (Request(prompt, 4, media=foreign), "another engine"),
            (Request(ends_with_image.tokens, 4, media=ends_with_image), "cannot end with an image"),
            (Request(closed.tokens, 4, media=closed), "closed one")):
        with pytest.raises(GgufMtpError, match=what):
            sched.submit(request)
    assert media.problems(64) == [f"media: an image of {media.media_tokens} tokens must be decoded in one batch: "
                                  f"raise --ubatch-size and --batch-size to at least {media.media_tokens} (now 64)"]
    assert media.problems(batch.n_ubatch) == []
    assert sched.snapshot().queued == 0
