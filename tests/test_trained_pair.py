"""The small trained Gemma 4 pair shipped in gguf_mtp/data/trained-pair, through our converter and runtime.

Evidence that the pair is a real one: its drafter predicts its target on held-out text (teacher-forced,
acceptance by draft position), and the target's own greedy output is not degenerate. Then ``gguf-mtp demo``
(the trained pair, then the speed pair) and ``gguf-mtp bench`` end to end (CliRunner, --json).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from gguf_mtp import bench, demo
from gguf_mtp.cli import main
from gguf_mtp.errors import GgufMtpError
from gguf_mtp.settings import RuntimeSettings

PAIR = bench.TRAINED_PAIR
MIN_ACCEPTANCE_K3 = 0.5
HELDOUT_WINDOWS = 8  # windows of 256 tokens spread over heldout.txt (the first 16 tokens of each are context only)
NGRAM = 4
MAX_NGRAM_COVER = 0.5  # the most frequent 4-gram may cover at most half of a greedy continuation
# flash attention off and an f32 cache: batched and one-token logits agree on the CPU (tests/fixtures/runtime.py)
SETTINGS = RuntimeSettings(n_ctx=1024, threads=1, flash_attn="off", cache_type_k="f32", cache_type_v="f32")


def test_shipped_pair_is_small_and_pairs() -> None:
    from gguf_mtp.export import describe
    from gguf_mtp.pairing import check_set, layout_problems

    size = sum(f.stat().st_size for f in PAIR.rglob("*") if f.is_file())
    assert size < 20 * 2**20, f"the shipped pair takes {size / 2**20:.1f} MiB"
    t, d = describe(PAIR / "target"), describe(PAIR / "drafter")
    assert layout_problems(t.text.layout, t.text.n_shared_kv) == []
    assert check_set(t.facts(), d.facts()) == []


def ngram_cover(tokens: list[int], n: int = NGRAM) -> float:
    """Share of the positions covered by the most frequent n-gram's occurrences (1.0: a pure loop)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    top, _ = Counter(grams).most_common(1)[0]
    covered = set()
    for i, g in enumerate(grams):
        if g == top:
            covered.update(range(i, i + n))
    return len(covered) / len(tokens)


def test_ngram_cover() -> None:
    assert ngram_cover([5] * 20) == 1.0
    assert ngram_cover([1, 2] * 10) == 1.0
    assert ngram_cover(list(range(20))) == pytest.approx(4 / 20)


def test_drafter_accepts_on_heldout_text(trained_ggufs: tuple[Path, Path]) -> None:
    from gguf_mtp.runtime.engine import Engine

    text = (PAIR / "heldout.txt").read_text(encoding="utf-8")
    with Engine.load(*trained_ggufs, SETTINGS, k_max=3) as eng:
        stats = bench.heldout_acceptance(eng, text, k=3, windows=HELDOUT_WINDOWS)
    by_position = [a / p for a, p in zip(stats.accepted_by_position, stats.proposed_by_position)]
    print(f"teacher-forced acceptance at k=3 on {stats.rounds} held-out positions: {stats.acceptance_rate:.3f}; "
          f"by draft position {[round(a, 3) for a in by_position]}")
    assert stats.proposed_by_position == [stats.rounds] * 3
    assert stats.accepted == sum(stats.accepted_by_position)
    assert by_position == sorted(by_position, reverse=True)  # a draft is kept only after the ones before it
    assert stats.acceptance_rate >= MIN_ACCEPTANCE_K3


def test_target_greedy_output_is_not_degenerate(trained_ggufs: tuple[Path, Path]) -> None:
    from gguf_mtp.runtime.adaptive import FixedK
    from gguf_mtp.runtime.engine import Engine
    from gguf_mtp.runtime.loop import generate

    with Engine.load(trained_ggufs[0], None, SETTINGS) as eng:
        for prompt in bench.heldout_prompts(4):
            g = generate(eng, eng.tokenize(prompt), 64, chooser=FixedK(0), ignore_eog=True)
            cover = ngram_cover(g.tokens)
            print(f"{prompt!r} -> {g.text!r} (top {NGRAM}-gram covers {cover:.2f})")
            assert len(set(g.tokens)) >= 16, f"{prompt!r}: {len(set(g.tokens))} distinct tokens in 64: {g.text!r}"
            assert cover <= MAX_NGRAM_COVER, f"{prompt!r}: one {NGRAM}-gram covers {cover:.0%}: {g.text!r}"


def test_demo_json(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["demo", "--json", "--workdir", str(tmp_path / "demo"), "-n", "48"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [s["name"] for s in doc["steps"]] == ["convert", "quantize", "check", "plan", "generate", "modelfile",
                                                 "llama-server", "speed-pair"]
    assert all(s["status"] == "ok" for s in doc["steps"]), doc["steps"]
    assert doc["same_output"] is True
    assert set(doc["tokens_per_second"]) == {"target", "mtp", "adaptive"}
    assert doc["speedup"] > 0 and doc["speedup_adaptive"] > 0
    assert 0 < doc["mean_accepted_length"] and len(doc["acceptance_by_position"]) == 3  # k = 3: every position
    assert doc["quant"] == {"target": "Q8_0", "drafter": "Q8_0"}
    assert Path(doc["modelfile"]).read_text().count("DRAFT ") == 1
    assert doc["llama_server"].startswith("llama-server ") and "--spec-type draft-mtp" in doc["llama_server"]
    assert [m["mode"] for m in doc["modes"]] == ["target", "k=3", "adaptive"]
    # the speed pair: built in the work directory, every mode's output the target alone's (timings not checked)
    sp = doc["speed_pair"]
    assert Path(doc["files"]["speed_target"]).parent == tmp_path / "demo" / "speed-pair"
    assert Path(doc["files"]["speed_target"]).is_file() and Path(doc["files"]["speed_drafter"]).is_file()
    assert sp["same_output"] is True and sp["what"] == demo.SPEED_WHAT
    assert (sp["prompts"], sp["max_tokens"], sp["repeats"]) == (demo.SPEED_PROMPTS, 48, demo.SPEED_REPEATS)
    assert [m["mode"] for m in sp["modes"]] == ["target", "k=3", "adaptive"]
    for m in sp["modes"]:
        assert (m["tokens"], m["same_output"]) == (sp["prompts"] * 48, sp["prompts"]), m["mode"]
    assert set(sp["tokens_per_second"]) == {"target", "mtp", "adaptive"}
    assert sp["speedup"] > 0 and sp["speedup_adaptive"] > 0 and len(sp["acceptance_by_position"]) == 3


def test_demo_speed_step_fails_alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The speed pair's step needs nothing above it and nothing needs it: its failure leaves the other steps
    as they were, is reported as one line, and makes the exit status 1. (Steps stubbed: no model is run.)"""
    def broken(d: demo.Demo) -> str:
        raise GgufMtpError("no room for the speed pair")

    stubbed = [(name, broken if name == "speed-pair" else (lambda d: "fine"), needs)
               for name, _, needs in demo.STEPS]
    monkeypatch.setattr(demo, "STEPS", stubbed)
    res = CliRunner().invoke(main, ["demo", "--workdir", str(tmp_path)])
    assert res.exit_code == 1
    lines = res.output.splitlines()
    assert [line.split()[0] for line in lines if line.strip().endswith(": fine")] == ["ok"] * (len(stubbed) - 1)
    assert " failed  speed-pair: no room for the speed pair" in lines


def test_bench_json(trained_ggufs: tuple[Path, Path]) -> None:
    target, drafter = trained_ggufs
    args = ["bench", "--target", str(target), "--drafter", str(drafter), "-n", "24", "--k-max", "2", "--oracle",
            "--threads", "1", "--flash-attn", "off", "--cache-type-k", "f32", "--cache-type-v", "f32", "--json"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    modes = {m["mode"]: m for m in doc["modes"]}
    assert list(modes) == ["target", "k=1", "k=2", "adaptive", "oracle k=1", "oracle k=2", "oracle adaptive"]
    assert modes["target"]["speedup"] == 1.0
    for name, m in modes.items():
        assert m["tokens"] == doc["prompts"] * 24, name
        assert m["same_output"] == doc["prompts"], name
    assert len(modes["k=2"]["acceptance_by_position"]) == 2
    assert modes["oracle k=2"]["acceptance"] == 1.0


def test_bench_reads_prompt_files(tmp_path: Path) -> None:
    f = tmp_path / "prompts.txt"
    f.write_text("def f(x):\\n    return\n\nplain line\n", encoding="utf-8")
    assert bench.read_prompts(f) == ["def f(x):\n    return", "plain line"]
    (tmp_path / "empty.txt").write_text("\n\n")
    res = CliRunner().invoke(main, ["bench", "--target", "t.gguf", "--drafter", "d.gguf", "--prompts",
                                    str(tmp_path / "empty.txt")])
    assert res.exit_code == 2 and "no prompts" in res.output
