"""``ChatSession`` and ``gguf-mtp chat``: cache reuse across turns, greedy identity, context overflow, thinking,
images through the projector with MTP on, the REPL through CliRunner, and hostile chat templates."""

from __future__ import annotations

import re

import numpy as np
import pytest
from click.testing import CliRunner
from fixtures.runtime import assert_greedy_equivalent

from gguf_mtp.cli import main
from gguf_mtp.errors import GgufMtpError
from gguf_mtp.runtime.adaptive import FixedK
from gguf_mtp.runtime.chat import ChatSession, Notice, Reply, ThoughtSplitter, Turn, special_id
from gguf_mtp.runtime.chat_template import Limits, render

SYSTEM = "You answer in one short line."
QUESTIONS = ["the cat sat on the mat", "and then what did the dog do", "tell me about the weather today"]
FAST = ["--threads", "1", "--flash-attn", "off", "--ctx", "512", "--cache-type-k", "f32", "--cache-type-v", "f32"]


def chat(engine, **kw) -> ChatSession:
    engine.truncate(0)  # engines are shared by the session's tests
    kw.setdefault("chooser", FixedK(3) if engine.has_drafter else FixedK(0))
    return ChatSession(engine, system=kw.pop("system", SYSTEM), max_tokens=kw.pop("max_tokens", 24), **kw)


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    """A 130x100 random RGB image as PNG (gemma4v makes 80 soft tokens of it)."""
    pil = pytest.importorskip("PIL.Image", reason="needs the dev extra (pillow)")
    path = tmp_path_factory.mktemp("chat-image") / "noise.png"
    pil.fromarray(np.random.default_rng(0).integers(0, 256, (100, 130, 3), dtype=np.uint8)).save(path)
    return path


# --- the KV cache across turns ------------------------------------------------------------------------------
LONG_SYSTEM = "You are a helpful assistant. " * 12 + SYSTEM


def test_turns_reuse_the_cache(engines):
    eng = engines.get("tiny-e")
    s = chat(eng, system=LONG_SYSTEM)
    replies = [s.ask(q) for q in QUESTIONS]
    counts = [(r.prompt_tokens, r.stats.prefill_tokens, r.stats.reused_tokens) for r in replies]
    assert counts[0][1] == counts[0][0]  # a cold cache reads everything
    for (prev_prompt, _, _), (prompt, prefill, reused) in zip(counts, counts[1:]):
        assert reused >= prev_prompt and prefill == prompt - reused  # the previous prompt stays cached
    prompt3, prefill3, _ = counts[2]
    assert prefill3 * 4 < prompt3, counts  # turn 3 reads the last reply and its own turn, not the history
    last = replies[-1]
    assert eng.tokens == (last.prompt + last.tokens)[:eng.n_past]  # the cache is exactly what was said
    assert [t.answer for t in s.turns] == [r.answer for r in replies]


def test_next_prompt_keeps_the_ids_the_model_chose(engines):
    """A reply spelled with byte tokens is not re-tokenized into merged tokens: the cache matches to its end."""
    eng = engines.get("tiny-e")
    s = chat(eng)
    first, first_text = s.render([Turn("hello")])[0], s._text
    reply = [eng.tokenize(c, add_special=False)[-1] for c in "the cat"]  # one token per character
    assert eng.tokenize("the cat", add_special=False) != reply
    s._last, s.turns = (first_text, first, "the cat", reply), [Turn("hello", answer="the cat")]
    prompt, _ = s.render([*s.turns, Turn("more")])
    assert prompt[:len(first) + len(reply)] == first + reply
    assert eng.detokenize(prompt, special=True) == s._text  # still exactly the template's text
    s._last = (first_text, first, "the cat", [*reply[:3], special_id(eng, "<|channel>"), *reply[3:]])
    prompt, _ = s.render([*s.turns, Turn("more")])
    assert prompt[:len(first) + 3] == first + reply[:3] and eng.detokenize(prompt, special=True) == s._text


@pytest.mark.parametrize("family", ["tiny-e", "tiny-dense"])
def test_greedy_chat_with_mtp_equals_target_only(engines, family):
    mtp, plain = chat(engines.get(family)), chat(engines.get(family, drafter=False))
    for q in QUESTIONS:
        got, ref = mtp.ask(q), plain.ask(q)
        assert got.prompt == ref.prompt
        assert got.stats.proposed > 0 and ref.stats.proposed == 0
        if got.tokens != ref.tokens:  # a near-tie may flip; the conversations then differ, so stop there
            assert_greedy_equivalent(engines.get(family, drafter=False), got.prompt, got.tokens, ref.tokens)
            break


def test_context_overflow_drops_the_oldest_turns(engines):
    eng = engines.get("tiny-e", n_ctx=256)  # 256 positions; 32 kept free for each reply
    s = chat(eng, max_tokens=32)
    long_message = " ".join(QUESTIONS)
    notices, turns_before = [], []
    for i in range(8):
        turns_before.append(len(s.turns))
        events = list(s.send(f"{i}: {long_message}"))
        notices += [(i, e) for e in events if isinstance(e, Notice)]
        reply = events[-1]
        assert isinstance(reply, Reply) and reply.prompt_tokens + s.room <= eng.n_ctx
    dropped = [(i, e) for i, e in notices if e.kind == "dropped"]
    assert dropped, "a long conversation in 256 positions must drop turns"
    i, first = dropped[0]
    assert "dropped the" in first.message and "oldest turn" in first.message
    assert len(s.turns) < 8 and s.messages()[0] == {"role": "system", "content": SYSTEM}
    assert s.turns[-1].user.startswith("7:")  # the newest turns stay, the oldest went
    with pytest.raises(GgufMtpError, match="raise --ctx"):  # a message that cannot fit even alone
        list(s.send(long_message * 20))


# --- thinking --------------------------------------------------------------------------------------------
def test_think_mode_renders_the_think_token_in_the_system_turn(engines):
    eng = engines.get("tiny-e")
    think = special_id(eng, "<|think|>")
    system_start = eng.tokenize("<|turn>system\n", add_special=False)
    for system in (SYSTEM, None):
        prompt, _ = chat(eng, think=True, system=system).render([Turn("hi")])
        at = prompt.index(system_start[0])
        assert prompt[at:at + len(system_start)] == system_start and prompt[at + len(system_start)] == think
        plain, _ = chat(eng, system=system).render([Turn("hi")])
        assert think not in plain


def test_thoughts_are_separated_from_the_answer(engines):
    eng = engines.get("tiny-e")
    tokens = eng.tokenize("<|channel>thought\nI ponder é<channel|>The answer é", add_special=False)
    split = ThoughtSplitter(eng)
    pieces = [p for t in tokens for p in split.feed([t])] + split.flush()  # one token at a time, as streamed
    assert split.thoughts == "I ponder é" and split.answer == "The answer é"
    assert "".join(p.text for p in pieces if p.thought) == "I ponder é"
    assert "".join(p.text for p in pieces if not p.thought) == "The answer é"
    s = chat(eng)
    s.turns.append(Turn("q", answer=split.answer, thoughts=split.thoughts))
    assert s.messages()[-1] == {"role": "assistant", "content": "The answer é"}  # thoughts stay out of history


# --- images ----------------------------------------------------------------------------------------------
def test_image_turn_runs_through_the_projector_with_mtp(engines, projectors, png):
    from gguf_mtp.runtime.multimodal import Projector

    mmproj = projectors.get()
    eng, eng_plain = engines.get("tiny-e"), engines.get("tiny-e", drafter=False)
    with Projector.load(mmproj, eng) as proj, Projector.load(mmproj, eng_plain) as proj_plain:
        mtp, plain = chat(eng, projector=proj), chat(eng_plain, projector=proj_plain)
        got, ref = mtp.ask("what is in this picture", png), plain.ask("what is in this picture", png)
        assert got.media_tokens == ref.media_tokens == 80
        assert got.prompt == ref.prompt
        assert got.stats.proposed > 0  # drafting went on after the image
        assert got.tokens == ref.tokens
        # the drafter's input after the image is the hidden row of the last prompt position, as a fresh decode gives
        _, media = mtp.render([Turn("what is in this picture", mtp.turns[0].media)])
        with media:
            assert media.tokens == got.prompt
            eng.truncate(0)
            h = eng.hidden(media.decode(eng, 0) - 1).copy()
        eng.truncate(len(got.prompt) - 1)
        eng.decode([got.prompt[-1]])
        assert np.abs(h - eng.hidden(0)).max() < 1e-2  # batched vs one-token numerics; another row differs by ~1
        # a second turn keeps the image in the cache: nothing is encoded again
        got2, ref2 = mtp.ask("and the colours"), plain.ask("and the colours")
        assert got2.media_tokens == 0 and got2.stats.reused_tokens >= got.prompt_tokens
        assert got2.tokens == ref2.tokens
        mtp.close(), plain.close()


def test_image_needs_a_projector_and_a_readable_file(engines, projectors, tmp_path):
    from gguf_mtp.runtime.multimodal import Projector

    eng = engines.get("tiny-e")
    with pytest.raises(GgufMtpError, match="needs a vision projector"):
        list(chat(eng).send("hi", tmp_path / "x.png"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with Projector.load(projectors.get(), eng) as proj:
        with pytest.raises(GgufMtpError, match="does not exist"):
            proj.load_image(tmp_path / "missing.png")
        with pytest.raises(GgufMtpError, match="not an image"):
            proj.load_image(bad)
        with pytest.raises(GgufMtpError, match="marks where images and audio clips go"):
            list(chat(eng, projector=proj).send(f"look {proj.marker}"))


# --- the REPL --------------------------------------------------------------------------------------------
def run_chat(*args: str, input: str = "") -> tuple[int, str, str]:
    r = CliRunner().invoke(main, ["chat", *args], input=input)
    return r.exit_code, r.stdout, r.stderr


SUMMARY = re.compile(r"^\[(\d+) tokens, .* prompt (\d+) tokens: (\d+) read, (\d+) cached", re.M)


def test_cli_scripted_session(runtime_ggufs):
    target, drafter = runtime_ggufs["tiny-e"]
    script = "the cat sat\n\nand then\n/stats\n/reset\nhello again\n/exit\nnever sent\n"
    code, out, err = run_chat("--target", str(target), "--drafter", str(drafter), "-n", "12", "--draft-max", "2",
                              "--system", SYSTEM, *FAST, input=script)
    assert code == 0, err
    turns = SUMMARY.findall(err)
    assert len(turns) == 3, err  # three messages before /exit; the blank line is skipped
    (_, p1, r1, c1), (_, p2, r2, c2), (_, p3, r3, c3) = [tuple(map(int, t)) for t in turns]
    assert c1 == 0 and c2 >= p1  # turn 2 reuses turn 1
    assert 0 < c3 and r3 < p3  # after /reset the system prompt is still cached
    assert "chat turns" in out and "(conversation cleared)" in err


def test_cli_tells_the_user_when_turns_are_dropped(runtime_ggufs):
    target, drafter = runtime_ggufs["tiny-e"]
    script = "".join(f"{i}: {' '.join(QUESTIONS)}\n" for i in range(6))
    code, out, err = run_chat("--target", str(target), "--drafter", str(drafter), "-n", "32", "--system", SYSTEM,
                              "--threads", "1", "--flash-attn", "off", "--ctx", "256", input=script)
    assert code == 0, err
    assert len(SUMMARY.findall(err)) == 6 and "note: context full: dropped the 1 oldest turn(s)" in err


def test_cli_image_turn_and_think(runtime_ggufs, projectors, png):
    target, drafter = runtime_ggufs["tiny-e"]
    code, out, err = run_chat("--target", str(target), "--drafter", str(drafter), "--mmproj", str(projectors.get()),
                              "--image", str(png), "--think", "-n", "8", *FAST,
                              input=f"what is this\n/image {png}\nand this\n")
    assert code == 0, err
    assert err.count("80 media tokens encoded") == 2 and "it goes with your next message" in err


def test_cli_shows_or_hides_thoughts(runtime_ggufs, monkeypatch):
    from gguf_mtp.runtime.chat import Text
    from gguf_mtp.runtime.stats import Stats

    def fake_send(self, text, image=None):
        yield Text("let me think", thought=True)
        yield Text("the answer")
        yield Reply("the answer", "let me think", [], Stats(tokens=3), [2, 105], 0, 0)

    monkeypatch.setattr(ChatSession, "send", fake_send)
    target, drafter = runtime_ggufs["tiny-e"]
    code, out, err = run_chat("--target", str(target), "--think", *FAST, input="q\n")
    assert code == 0 and out == "let me think\nthe answer\n", (out, err)
    code, out, err = run_chat("--target", str(target), "--think", "--hide-thoughts", *FAST, input="q\n")
    assert code == 0 and out == "the answer\n"


def test_cli_help_lists_the_commands_and_the_chat_goes_on(runtime_ggufs):
    from gguf_mtp.cli.conversation import COMMANDS

    target, drafter = runtime_ggufs["tiny-e"]
    code, out, err = run_chat("--target", str(target), "--drafter", str(drafter), "-n", "6", *FAST,
                              input="/help\nthe cat sat\n/exit\nnever sent\n")
    assert code == 0, err
    assert all(re.search(rf"^  {c.name}\b.*{re.escape(c.help)}$", err, re.M) for c in COMMANDS), err
    assert len(SUMMARY.findall(err)) == 1 and "error" not in err, err  # the message after /help got its reply


# A line that cannot be done is one error line (exit 2 at the end, for scripts); the next message still gets a reply.
@pytest.mark.parametrize("args,line,message", [
    ([], "/foo bar", "unknown command /foo; commands: /help, /image PATH, /audio PATH, /reset, /stats, /exit"),
    ([], "/", "unknown command /; commands: /help"),
    ([], "/image", "/image: expected PATH"),
    ([], "/image cat.png", "/image needs a vision projector: restart with --mmproj FILE"),
    (["--mmproj", "{mmproj}"], "/image missing.png", "image missing.png does not exist"),
    ([], "word " * 600, "this message needs"),
], ids=["unknown", "slash-alone", "image-without-path", "image-without-projector", "image-missing", "too-long"])
def test_cli_a_refused_line_does_not_end_the_chat(runtime_ggufs, projectors, args, line, message):
    target, drafter = runtime_ggufs["tiny-e"]
    args = [a.replace("{mmproj}", str(projectors.get())) for a in args]
    code, out, err = run_chat("--target", str(target), "--drafter", str(drafter), *args, "-n", "6", *FAST,
                              input=f"{line}\nthe cat sat\n")
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    assert len(SUMMARY.findall(err)) == 1, err


def test_cli_ctrl_c_stops_the_reply_and_the_chat_goes_on(runtime_ggufs, monkeypatch):
    """Ctrl-C inside the loop's generator: after a few rounds the partial reply stays (the next prompt reads it
    from the cache); before the first round the message is dropped. Either way the next message gets its reply."""
    import contextlib

    import gguf_mtp.runtime.chat as chat_module

    real, calls = chat_module.speculative_generate, []

    def interrupted_first_call(*args, **kw):
        calls.append(1)
        with contextlib.closing(real(*args, **kw)) as rounds:
            for i, r in enumerate(rounds):
                if len(calls) == 1 and i == rounds_before_ctrl_c:
                    raise KeyboardInterrupt
                yield r

    monkeypatch.setattr(chat_module, "speculative_generate", interrupted_first_call)
    target, drafter = runtime_ggufs["tiny-e"]
    second = {}
    for rounds_before_ctrl_c, said in [(3, "(reply stopped: what it said so far stays in the conversation)"),
                                       (0, "(stopped before the reply began: the message is not in the conv")]:
        calls.clear()
        code, out, err = run_chat("--target", str(target), "--drafter", str(drafter), "-n", "12", "--draft-max", "2",
                                  "--system", SYSTEM, *FAST, input="the cat sat on the mat\nand then\n/stats\n")
        assert code == 0 and said in err and "error" not in err, err
        (_, prompt, read, cached), = [tuple(map(int, t)) for t in SUMMARY.findall(err)]  # only the second message
        assert cached + read == prompt and len(calls) == 2, err
        second[rounds_before_ctrl_c] = prompt, cached
        assert re.search(r"^│ 2 ", out, re.M) if rounds_before_ctrl_c else not re.search(r"^│ 2 ", out, re.M), out
    (kept_prompt, kept_cached), (dropped_prompt, dropped_cached) = second[3], second[0]
    assert kept_prompt > dropped_prompt  # the conversation holds the first message and the partial reply
    assert kept_cached > dropped_cached  # ... and the cache held them: the engine trimmed it to the partial reply


@pytest.mark.parametrize("args,script,code,message", [
    (["--image", "missing.png", "--mmproj", "{mmproj}"], "", 2, "image missing.png does not exist"),
    (["--image", "x.png"], "", 2, "--image needs a vision projector"),
    ([], "/image x.png\n", 2, "/image needs a vision projector"),
    ([], "/nope\n", 2, "unknown command /nope"),
    (["--draft-max", "2", "--adaptive"], "", 2, "--draft-max fixes"),
])
def test_cli_bad_input(runtime_ggufs, projectors, args, script, code, message):
    target, drafter = runtime_ggufs["tiny-e"]
    args = [a.replace("{mmproj}", str(projectors.get())) for a in args]
    got, out, err = run_chat("--target", str(target), "--drafter", str(drafter), *args, *FAST, input=script)
    lines = err.strip().splitlines()
    assert got == code and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_cli_missing_file_and_mismatched_set(runtime_ggufs, projectors, tmp_path):
    target, drafter = runtime_ggufs["tiny-dense"]
    code, out, err = run_chat("--target", str(tmp_path / "none.gguf"), *FAST)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    other_target, other = runtime_ggufs["tiny-q"]
    code, out, err = run_chat("--target", str(target), "--drafter", str(other), *FAST, input="hi\n")
    assert code == 1 and "hidden_size" in err and out == ""
    code, out, err = run_chat("--target", str(other_target), "--mmproj", str(projectors.get()), *FAST, input="hi\n")
    assert code == 1 and "projector_dim" in err and out == ""


# --- hostile chat templates -------------------------------------------------------------------------------
HOSTILE = {
    "dunder": ("{{ ''.__class__.__mro__ }}", "unsafe: access to attribute '__class__'"),
    "dunder alone": ("{{ ''.__class__ }}", "unsafe"),
    "globals": ("{{ cycler.__init__.__globals__ }}", "unsafe"),
    "mutation": ("{{ messages.append(1) }}", "unsafe"),
    "repeat": ("{{ 'x' * 100000000 }}", "over a limit: a repetition"),
    "power": ("{{ 9 ** 999999 }}", "over a limit"),
    "big argument": ("{{ 'x'|center(1000000000) }}", "over a limit: an argument"),
    "doubling": ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
                 "over a limit: a value"),
    "output": ("{% for i in range(100000) %}{{ 'abcdefghij' * 1000 }}{% endfor %}", "characters of output"),
    "range": ("{{ range(10000000)|list }}", "over a limit"),
    "nested loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                     "longer than 0.3 s"),
    "recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_templates_raise_a_clear_error(case):
    source, message = HOSTILE[case]
    with pytest.raises(GgufMtpError, match=re.escape(message)):
        render(source, [{"role": "user", "content": "hi"}], limits=Limits(max_seconds=0.3))


def test_template_limits_leave_real_templates_alone(engines):
    eng = engines.get("tiny-e")
    msgs = [{"role": "user", "content": "hi " * 2000}, {"role": "assistant", "content": "ok"}] * 20
    text = render(eng.chat_template, msgs, bos_token="<bos>")
    assert text.count("<|turn>user") == 20 and len(text) > 120_000
