"""Audio (and images) through our projector exports on tiny-e (gemma4v + gemma4a conformer) and tiny-unified
(gemma4uv + gemma4ua): MTP stays on after the media and stays lossless; libmtmd's audio embeddings match
transformers'; WAV/FLAC files at another rate are resampled; bad audio is one clear error; ``chat /audio``.

The tiny drafters are random (their drafts are never kept), so the loop is also run with an oracle drafter that
proposes the target's own continuation: drafts after the media are then kept, which exercises verify and
rollback on a cache holding media cells.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fixtures.runtime import TEST_SETTINGS

from gguf_mtp.cli import main
from gguf_mtp.errors import GgufMtpError
from gguf_mtp.runtime.adaptive import FixedK
from gguf_mtp.runtime.chat_template import prompt_text
from gguf_mtp.runtime.drafters import OracleDrafter
from gguf_mtp.runtime.loop import generate

sf = pytest.importorskip("soundfile")

FAMILIES = ("tiny-e", "tiny-unified")
FILE_RATE = 24_000  # not the projector's 16 kHz: every test file is resampled
SECONDS = 1.2  # 19 200 samples at 16 kHz: 30 soft tokens on both (gemma4a: 40 ms per token; gemma4ua: 640 samples)
AUDIO_TOKENS = 30
K = 3
N = 24  # tokens generated per run
# relative L2 distance of libmtmd's audio embeddings from transformers' (f32 exports). Measured: gemma4a 0.14%
# (llama.cpp computes the log-mel spectrogram itself; transformers with numpy), gemma4ua 3e-7 (raw frames).
EMBEDDING_TOLERANCE = {"tiny-e": 0.005, "tiny-unified": 1e-5}


def audio_bytes(fmt: str = "WAV", rate: int = FILE_RATE, seconds: float = SECONDS, channels: int = 1,
                seed: int = 0) -> bytes:
    """A 440 Hz tone plus noise, written by soundfile (the reader's own library)."""
    n = int(rate * seconds)
    t = np.arange(n) / rate
    tone = 0.4 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(seed).standard_normal(n)
    frames = np.stack([tone * (c + 1) / channels for c in range(channels)], axis=1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, frames, rate, format=fmt)
    return buf.getvalue()


def png_bytes(width: int = 130, height: int = 100, seed: int = 0) -> bytes:
    pil = pytest.importorskip("PIL.Image", reason="needs the dev extra (pillow)")
    buf = io.BytesIO()
    pil.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class Loaded:
    """One family: our exports (target, drafter, projector), an engine with the drafter and one without, each
    with its own projector."""

    def __init__(self, target: Path, drafter: Path, mmproj: Path) -> None:
        from gguf_mtp.runtime.engine import Engine
        from gguf_mtp.runtime.multimodal import Projector

        self.target, self.drafter, self.mmproj = target, drafter, mmproj
        self.mtp = Engine.load(target, drafter, TEST_SETTINGS)
        self.plain = Engine.load(target, None, TEST_SETTINGS)
        self.proj, self.proj_plain = Projector.load(mmproj, self.mtp), Projector.load(mmproj, self.plain)

    def close(self) -> None:
        for x in (self.proj, self.proj_plain, self.mtp, self.plain):
            x.close()


@pytest.fixture(scope="module")
def families(exports, export_src, tmp_path_factory):
    """family -> Loaded, on first use; the projector is our exporter's (convert --mmproj)."""
    from gguf_mtp.export.projector import convert_projector

    out, loaded = tmp_path_factory.mktemp("audio-mmproj"), {}

    def get(family: str) -> Loaded:
        if family not in loaded:
            mmproj = out / f"{family}-mmproj.gguf"
            try:
                convert_projector(export_src / family / "target", mmproj)
            except GgufMtpError as e:
                pytest.skip(f"our projector export (convert --mmproj) cannot write {family}'s yet: {e}")
            loaded[family] = Loaded(exports.get(family, "target"), exports.get(family, "drafter"), mmproj)
        if not loaded[family].proj.audio:
            pytest.skip(f"our projector export (convert --mmproj) wrote no audio part for {family}")
        return loaded[family]

    yield get
    for x in loaded.values():
        x.close()


def media_prompt(engine, proj, kinds: tuple[str, ...], question: str = "what is this"):
    """(MediaPrompt, the media): the chat prompt with one image and/or audio clip before the question."""
    readers = {"image": lambda: proj.image_from_bytes(png_bytes(), "noise.png"),
               "audio": lambda: proj.audio_from_bytes(audio_bytes(), "tone.wav")}
    items = [readers[k]() for k in kinds]
    text = prompt_text(engine, [{"role": "user", "content": proj.marker * len(items) + question}])
    return proj.tokenize(text, items), items


def run(engine, proj, kinds, **kw):
    media, items = media_prompt(engine, proj, kinds)
    try:
        engine.truncate(0)
        return generate(engine, media.tokens, N, ignore_eog=True, media=media, **kw), media.tokens, media.encoded
    finally:
        media.close()
        for m in items:
            m.close()


# --- greedy MTP == the target alone, with media in the prompt -------------------------------------------------------
@pytest.mark.parametrize("kinds", [("audio",), ("image",), ("image", "audio")], ids="+".join)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_mtp_after_media_equals_the_target_alone(families, family, kinds):
    f = families(family)
    got, prompt, encoded = run(f.mtp, f.proj, kinds, chooser=FixedK(K))
    ref, ref_prompt, _ = run(f.plain, f.proj_plain, kinds)
    assert prompt == ref_prompt and got.tokens == ref.tokens
    media_positions = sum(1 for t in prompt if t < 0)
    assert encoded == media_positions >= AUDIO_TOKENS * kinds.count("audio")
    # every draft comes after the media: the prompt ends with text, drafting starts after the first token
    assert got.stats.proposed >= K * 3 and ref.stats.proposed == 0
    print(f"{family} {'+'.join(kinds)}: {media_positions} media tokens, drafts proposed {got.stats.proposed}, "
          f"kept {got.stats.accepted}")

    # drafts that are kept after the media (an oracle proposing the target's own output): same tokens, and the
    # verify batches and rollbacks run on a cache holding the media cells
    oracle = OracleDrafter([*prompt, *ref.tokens], f.mtp.n_vocab, corrupt_every=4)
    kept, _, _ = run(f.mtp, f.proj, kinds, chooser=FixedK(K), drafter=oracle)
    assert kept.tokens == ref.tokens
    assert kept.stats.accepted > 0 and kept.stats.proposed > kept.stats.accepted  # kept and rejected drafts


@pytest.mark.parametrize("family", FAMILIES)
def test_the_drafter_reads_the_last_text_row_after_audio(families, family):
    """The first draft's hidden input after an audio prompt is the target's row for the last prompt position,
    as decoding that position alone on top of the cached prompt gives it (another row differs by ~1)."""
    f = families(family)
    seen = []
    real = type(f.mtp).draft_step

    def spy(self, token, pos, hidden):
        seen.append(hidden.copy())
        return real(self, token, pos, hidden)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(f.mtp), "draft_step", spy)
        got, prompt, _ = run(f.mtp, f.proj, ("audio",), chooser=FixedK(K))
    f.mtp.truncate(len(prompt) - 1)  # the cache keeps the prompt (and the audio) after the run
    assert f.mtp.tokens == prompt[:-1]
    f.mtp.decode([prompt[-1]])
    assert np.abs(seen[0] - f.mtp.hidden(0)).max() < 1e-2
    f.mtp.truncate(0)


# --- libmtmd's audio embeddings == transformers' ---------------------------------------------------------------------
@pytest.mark.reference
@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
@pytest.mark.parametrize("family", FAMILIES)
def test_audio_embeddings_match_transformers(families, export_src, family, fmt):
    media_reference = pytest.importorskip("gguf_mtp.media_reference", reason="needs the dev extra (torch)")
    from gguf_mtp.runtime.multimodal import read_pcm
    from gguf_mtp.transformers_reference import load_model

    f = families(family)
    data = audio_bytes(fmt)
    clip = f.proj.audio_from_bytes(data, f"tone.{fmt.lower()}")
    try:
        got = f.proj.embeddings(clip)
    finally:
        clip.close()
    pcm, rate = read_pcm(data, f.proj.sample_rate)
    assert (rate, len(pcm), f.proj.sample_rate) == (FILE_RATE, int(SECONDS * 16_000), 16_000)
    src = export_src / family / "target"
    want = media_reference.audio_embeddings(load_model(src), src, pcm)
    assert got.shape == want.shape == (AUDIO_TOKENS, f.mtp.n_embd)
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    print(f"{family} {fmt}: rel L2 {rel:.2e}, max-abs {np.abs(got - want).max():.2e} of {np.abs(want).max():.2f}")
    assert rel < EMBEDDING_TOLERANCE[family]


# --- reading audio ------------------------------------------------------------------------------------------------
def test_read_pcm_downmixes_and_resamples():
    from gguf_mtp.runtime.multimodal import read_pcm

    stereo = audio_bytes("WAV", rate=16_000, channels=2)  # channels: 0.5x and 1x the tone
    pcm, rate = read_pcm(stereo, 16_000)
    frames, _ = sf.read(io.BytesIO(stereo), dtype="float32")
    assert rate == 16_000 and pcm.dtype == np.float32 and np.array_equal(pcm, frames.mean(axis=1, dtype=np.float32))
    pcm, rate = read_pcm(audio_bytes("FLAC", rate=22_050, seconds=1.0), 16_000)
    assert rate == 22_050 and abs(len(pcm) - 16_000) <= 1
    spectrum = np.abs(np.fft.rfft(pcm))  # the tone is still 440 Hz at the new rate
    assert abs(np.argmax(spectrum) * 16_000 / len(pcm) - 440) < 2


def test_bad_audio_is_one_clear_error(families, export_src, tmp_path):
    from gguf_mtp.export.projector import convert_projector
    from gguf_mtp.runtime.multimodal import Projector

    f = families("tiny-e")
    empty = io.BytesIO()
    sf.write(empty, np.zeros((0, 1), np.float32), FILE_RATE, format="WAV")
    for data, message in ((b"RIFF not really a wave file", "not an audio file soundfile can read"),
                          (empty.getvalue(), "holds no samples"),
                          (png_bytes(), "not an audio file")):
        with pytest.raises(GgufMtpError, match=message):
            f.proj.audio_from_bytes(data, "clip.wav")
    with pytest.raises(GgufMtpError, match="audio .*missing.wav does not exist"):
        f.proj.load_audio(tmp_path / "missing.wav")
    with pytest.raises(GgufMtpError, match="this is audio, not an image"):
        f.proj.image_from_bytes(audio_bytes(), "tone.wav")
    convert_projector(export_src / "tiny-e" / "target", tmp_path / "vision.gguf", audio=False)  # --no-audio
    with Projector.load(tmp_path / "vision.gguf", f.plain) as proj:
        assert (proj.vision, proj.audio) == (True, False)
        with pytest.raises(GgufMtpError, match=r"has no audio encoder \(it takes vision\)"):
            proj.audio_from_bytes(audio_bytes(), "tone.wav")


# --- chat: /audio ----------------------------------------------------------------------------------------------------
FAST = ["--threads", "1", "--flash-attn", "off", "--ctx", "512", "--cache-type-k", "f32", "--cache-type-v", "f32"]
SUMMARY = re.compile(r"^\[(\d+) tokens, [^,]+, (?:drafts kept \d+/(\d+)|no drafts).* prompt (\d+) tokens: (\d+) read, "
                     r"(\d+) cached(?:, (\d+) media tokens encoded)?", re.M)


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_chat_takes_audio_and_goes_on_after_a_bad_file(families, family, tmp_path):
    f = families(family)
    clip, bad = tmp_path / "tone.flac", tmp_path / "bad.wav"
    clip.write_bytes(audio_bytes("FLAC"))
    bad.write_bytes(b"RIFF not really a wave file")
    script = f"/audio {clip}\nwhat do you hear\n/audio {bad}\nand now\n/stats\n"
    r = CliRunner().invoke(main, ["chat", "--target", str(f.target), "--drafter", str(f.drafter), "--mmproj",
                                  str(f.mmproj), "-n", "8", "--draft-max", str(K), *FAST], input=script)
    assert r.exit_code == 2, r.stderr  # the refused line sets the exit status; the chat went on
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "bad.wav: not an audio file soundfile can read" in errors[0], r.stderr
    assert f"audio {clip}, 1.20 s at 16000 Hz, resampled from 24000 Hz: it goes with your next message" in r.stderr
    turns = [tuple(int(x or 0) for x in t) for t in SUMMARY.findall(r.stderr)]
    assert len(turns) == 2, r.stderr
    (n1, proposed1, _, _, _, encoded1), (_, _, _, _, cached2, encoded2) = turns
    assert n1 == 8 and encoded1 == AUDIO_TOKENS and proposed1 > 0  # MTP drafted after the clip
    assert encoded2 == 0 and cached2 > AUDIO_TOKENS  # the clip stayed in the cache


def test_cli_audio_needs_a_projector_with_audio(families, runtime_ggufs, tmp_path):
    f = families("tiny-e")
    clip = tmp_path / "tone.wav"
    clip.write_bytes(audio_bytes())
    r = CliRunner().invoke(main, ["chat", "--target", str(f.target), "--drafter", str(f.drafter), "-n", "4", *FAST],
                           input=f"/audio {clip}\nhi\n")
    assert r.exit_code == 2 and "/audio needs a projector with audio: restart with --mmproj FILE" in r.stderr
    r = CliRunner().invoke(main, ["chat", "--target", str(f.target), "--audio", str(clip), *FAST], input="")
    assert r.exit_code != 0 and "--audio needs a projector with audio: add --mmproj FILE" in r.stderr


# --- serve: input_audio content parts ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def audio_served(families):
    """The batched scheduler, 2 slots, with tiny-e's projector (vision + audio)."""
    from test_serve import KEY, SLOT_CTX, serving

    from gguf_mtp.runtime.batch_engine import BatchEngine
    from gguf_mtp.runtime.scheduler import Scheduler

    f = families("tiny-e")
    with BatchEngine.load(f.target, f.drafter, TEST_SETTINGS.replace(n_ctx=2 * SLOT_CTX), n_seq=2,
                          mmproj=f.mmproj) as engine:
        with serving(Scheduler(engine).start(), engine.projector, api_key=KEY) as s:
            yield s


def audio_message(data: str, fmt: str = "wav", text: str = "what do you hear") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}]}]


def b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_serve_input_audio(audio_served, fmt):
    from test_serve import MODEL

    messages = audio_message(b64(audio_bytes(fmt.upper())), fmt)
    client = audio_served.client()
    replies = [client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
               for _ in range(2)]
    text_only = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "what do you hear"}],
                                               max_tokens=1)
    u = replies[0].usage
    assert u.prompt_tokens >= text_only.usage.prompt_tokens + AUDIO_TOKENS
    assert u.completion_tokens > 0 and u.model_extra["mtp"]["proposed"] > 0  # drafting goes on after the clip
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content


AUDIO_PARAM = "messages[0].content[1].input_audio"
BAD_AUDIO = [  # id, the input_audio part, error code, param
    ("not-base64", {"data": "@@@", "format": "wav"}, "invalid_audio", f"{AUDIO_PARAM}.data"),
    ("empty", {"data": "", "format": "wav"}, "invalid_audio", f"{AUDIO_PARAM}.data"),
    ("not-audio", {"data": b64(b"RIFF not really a wave file"), "format": "wav"}, "invalid_audio",
     f"{AUDIO_PARAM}.data"),
    ("format", {"data": b64(b"x"), "format": "mp4"}, "invalid_value", f"{AUDIO_PARAM}.format"),
    ("no-data", {"format": "wav"}, "invalid_type", f"{AUDIO_PARAM}.data"),
]


@pytest.mark.parametrize("part, code, param", [c[1:] for c in BAD_AUDIO], ids=[c[0] for c in BAD_AUDIO])
def test_serve_bad_audio_is_a_400_and_the_server_goes_on(audio_served, part, code, param):
    from test_serve import CHAT, MODEL

    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "input_audio", "input_audio": part}]}]}
    with audio_served.http() as http:
        r = http.post(CHAT, json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert (error["code"], error["param"]) == (code, param), error
        good = {**body, "messages": audio_message(b64(audio_bytes()))}
        assert http.post(CHAT, json=good).status_code == 200  # still serving


def test_serve_audio_needs_a_projector_with_audio_and_a_user_message(families):
    from gguf_mtp.runtime.sampling import SamplingParams
    from gguf_mtp.serve.prompts import chat_prompt
    from gguf_mtp.serve.schema import ApiError, parse_chat

    f = families("tiny-e")
    req = parse_chat({"model": "m", "messages": audio_message(b64(audio_bytes()))}, SamplingParams(), 64)
    for projector in (None, type("VisionOnly", (), {"vision": True, "audio": False, "marker": "<__media__>"})()):
        with pytest.raises(ApiError) as e:
            chat_prompt(f.mtp, projector, req, False)
        assert (e.value.status, e.value.code, e.value.param) == (400, "audio_not_supported", f"{AUDIO_PARAM}.data")
    with pytest.raises(ApiError, match="user messages only") as e:
        parse_chat({"model": "m", "messages": [{"role": "assistant", "content": audio_message(b64(b"x"))[0]["content"]}]},
                   SamplingParams(), 64)
