"""``gguf-mtp generate`` through click's CliRunner, and the library entry point it wraps."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from fixtures.runtime import TEST_SETTINGS

from gguf_mtp.cli import main
from gguf_mtp.runtime.adaptive import FixedK
from gguf_mtp.runtime.chat_template import user_prompt
from gguf_mtp.runtime.engine import Engine
from gguf_mtp.runtime.loop import generate

FAST = ["--threads", "1", "--flash-attn", "off", "--ctx", "512"]


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, ["generate", *args])
    return r.exit_code, r.stdout, r.stderr


def test_library_generate(runtime_ggufs):
    target, drafter = runtime_ggufs["tiny-dense"]
    with Engine.load(target, drafter, TEST_SETTINGS) as eng:
        prompt = user_prompt(eng, "the cat")
        g = generate(eng, prompt, 24, chooser=FixedK(3))
        assert g.text == eng.detokenize(g.tokens)
        s = g.stats
        assert s.tokens == len(g.tokens) == s.accepted + s.bonus and s.rounds > 0
        assert s.prefill_tokens == len(prompt) and s.stop_reason in ("eog", "max_tokens")


def test_cli_json(runtime_ggufs):
    target, drafter = runtime_ggufs["tiny-dense"]
    code, out, err = run("--target", str(target), "--drafter", str(drafter), "-p", "the cat", "-n", "20",
                         "--draft-max", "3", "--json", *FAST)
    assert code == 0, err
    doc = json.loads(out)
    s = doc["stats"]
    for name in ("rounds", "proposed", "accepted", "bonus", "tokens", "prefill_tokens"):
        assert isinstance(s[name], int)
    assert all(isinstance(t, int) for t in doc["tokens"] + s["accepted_by_position"])
    assert s["tokens"] == len(doc["tokens"]) == s["accepted"] + s["bonus"]
    assert s["proposed"] == 3 * s["k_histogram"].get("3", 0) + 2 * s["k_histogram"].get("2", 0) + \
        s["k_histogram"].get("1", 0)
    assert doc["drafter"] == str(drafter) and isinstance(s["tokens_per_second"], float)

    # the same prompt rendered by the library gives the same greedy tokens
    with Engine.load(target, drafter, TEST_SETTINGS) as eng:
        assert generate(eng, user_prompt(eng, "the cat"), 20, chooser=FixedK(3)).tokens == doc["tokens"]


def test_cli_text_raw_tokens_and_modes(runtime_ggufs):
    target, drafter = runtime_ggufs["tiny-e"]
    code, out, err = run("--target", str(target), "--drafter", str(drafter), "-p", "the cat", "--raw", "-n", "8",
                         *FAST)
    assert code == 0, err
    assert "tokens" in err and "tok/s" in err
    code, out, err = run("--target", str(target), "--drafter", str(drafter), "--prompt-tokens", "2,300,301,302",
                         "-n", "6", "--temp", "0.8", "--seed", "1", "--accept", "rejection", "--adaptive",
                         "--draft-cap", "4", "--json", *FAST)
    assert code == 0, err
    assert json.loads(out)["stats"]["tokens"] <= 6
    code, out, err = run("--target", str(target), "--drafter", str(drafter), "--no-drafter", "--prompt-tokens",
                         "2,300", "-n", "5", "--json", *FAST)
    doc = json.loads(out)
    assert code == 0 and doc["drafter"] is None and doc["stats"]["proposed"] == 0


@pytest.mark.parametrize("args,code,message", [
    (["-p", "x", "--prompt-tokens", "2"], 2, "exactly one of"),
    (["--prompt-tokens", "2,x"], 2, "comma-separated integers"),
    (["--prompt-tokens", "2,99999"], 2, "expected ids in 0..511"),
    (["-p", "x", "--draft-max", "2", "--adaptive"], 2, "--draft-max fixes"),
    (["-p", "x", "-ot", "nodevice"], 2, "PATTERN=CPU|GPU"),
])
def test_cli_bad_input(runtime_ggufs, args, code, message):
    target, drafter = runtime_ggufs["tiny-dense"]
    got, out, err = run("--target", str(target), "--drafter", str(drafter), *args, *FAST)
    assert got == code and message in err and err.startswith("error: ")


def test_cli_refuses_a_mismatched_pair(runtime_ggufs):
    target, _ = runtime_ggufs["tiny-dense"]
    _, other = runtime_ggufs["tiny-q"]
    code, out, err = run("--target", str(target), "--drafter", str(other), "-p", "x", *FAST)
    assert code == 1 and "hidden_size" in err and out == ""
