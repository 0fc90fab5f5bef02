"""Grammar-constrained decoding with MTP on (runtime/grammar.py), in the loop, the scheduler, serve and generate.

The trained pair (real drafts) under a small JSON schema: greedy output with MTP equals the target alone's under
the same grammar; sampled outputs all parse and validate; the drafter is steered by the grammar (no draft is cut),
and drafts from an unsteered drafter are cut and counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner
from fixtures.runtime import TEST_SETTINGS, drain, finished

from gguf_mtp.bench import heldout_prompts
from gguf_mtp.errors import GgufMtpError
from gguf_mtp.runtime.adaptive import FixedK
from gguf_mtp.runtime.drafters import Draft, MTPDrafter
from gguf_mtp.runtime.grammar import Grammar, json_object_grammar, json_schema_grammar
from gguf_mtp.runtime.loop import generate
from gguf_mtp.runtime.sampling import SamplingParams
from gguf_mtp.runtime.scheduler import Request, Scheduler

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z_]{1,12}$"},
        "count": {"type": "integer"},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "count", "ok"],
    "additionalProperties": False,
}
N_SEQ = 4
SETTINGS = TEST_SETTINGS.replace(n_ctx=N_SEQ * 256)


@pytest.fixture(scope="module")
def pair(trained_ggufs):
    """The trained pair three ways: with its drafter, the target alone, and batched (4 slots)."""
    from gguf_mtp.runtime.batch_engine import BatchEngine
    from gguf_mtp.runtime.engine import Engine

    target, drafter = trained_ggufs
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(load()) for name, load in (
            ("single", lambda: Engine.load(target, drafter, SETTINGS)),
            ("alone", lambda: Engine.load(target, None, SETTINGS)),
            ("batch", lambda: BatchEngine.load(target, drafter, SETTINGS, n_seq=N_SEQ)))}


@pytest.fixture(scope="module")
def single(pair):
    return pair["single"]


@pytest.fixture(scope="module")
def alone(pair):
    return pair["alone"]


@pytest.fixture(scope="module")
def batch(pair):
    return pair["batch"]


@pytest.fixture(scope="module")
def prompts(single) -> list[list[int]]:
    return [[single.bos, *single.tokenize(t, add_special=False)] for t in heldout_prompts(6)]


GBNF = json_schema_grammar(SCHEMA)


def parsed(engine, tokens) -> dict:
    obj = json.loads(engine.detokenize(tokens))
    jsonschema.validate(obj, SCHEMA)
    return obj


# --- the grammar state -----------------------------------------------------------------------------------
def test_argmax_equals_the_masked_argmax(single):
    """The fast path (best 64 tokens first) picks what masking the whole vocabulary picks, ties included."""
    g = Grammar(single, json_object_grammar())
    rng = np.random.default_rng(0)
    try:
        for i in range(40):
            x = rng.normal(size=single.n_vocab).astype(np.float32)
            if i % 4 == 0:  # ties at the top
                x[rng.integers(0, single.n_vocab, 100)] = x.max()
            assert g.argmax(x) == int(np.argmax(g.mask(x)))
    finally:
        g.close()


def test_control_and_end_tokens(single):
    """Control tokens are never allowed; end tokens (end-of-generation and stops) only once the grammar is done."""
    turn = single.tokenize("<|turn>", add_special=False, parse_special=True)[0]
    g = Grammar(single, 'root ::= "a"', stops=[turn])
    try:
        a = single.tokenize("a", add_special=False, parse_special=False)[0]
        assert list(g.allows([a, single.eos, turn, single.bos])) == [True, False, False, False]
        g.advance([a])
        assert g.complete()
        assert list(g.allows([a, single.eos, turn, single.bos])) == [False, True, True, False]
    finally:
        g.close()


def test_drafts_are_cut_at_the_first_rejected_token(single):
    g = Grammar(single, 'root ::= "ab" "c"*')
    a, b, c = (single.tokenize(t, add_special=False, parse_special=False)[0] for t in "abc")
    from gguf_mtp.runtime.stats import Stats

    stats = Stats()
    d, rows = g.check(Draft([a, b, a, c]), stats)
    try:
        assert d.tokens == [a, b] and len(rows) == 3 and stats.grammar_cut == 2
        assert rows[2].complete() and not rows[1].complete()
    finally:
        rows.close()
        g.close()


@pytest.mark.parametrize("bad", ['root ::= "a', "root ::= undefined-rule"])
def test_a_bad_grammar_is_refused(single, batch, bad):
    with pytest.raises(GgufMtpError, match="grammar"):
        Grammar(single, bad)
    with pytest.raises(GgufMtpError, match="grammar"):
        Scheduler(batch).submit(Request([batch.bos, 5], 4, grammar=bad))


def test_a_bad_schema_is_refused():
    with pytest.raises(GgufMtpError, match="JSON schema"):
        json_schema_grammar({"type": "nonsense"})


# --- the loop --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, "adaptive"])
def test_greedy_constrained_mtp_equals_target_alone(single, alone, prompts, k):
    from gguf_mtp.runtime.loop import make_chooser

    cut = proposed = 0
    for p in prompts:
        ref = generate(alone, p, 96, grammar=GBNF)
        chooser = make_chooser(single, adaptive=True) if k == "adaptive" else FixedK(k)
        got = generate(single, p, 96, chooser=chooser, grammar=GBNF)
        assert got.tokens == ref.tokens
        assert got.stats.stop_reason == "eog"
        parsed(single, got.tokens)
        cut, proposed = cut + got.stats.grammar_cut, proposed + got.stats.proposed
    assert cut == 0 and proposed > 0  # steered drafts all fit the grammar


def constrained_totals(engine, prompts, **kwargs) -> dict[str, int]:
    """proposed / accepted / grammar_cut / rounds summed over greedy k = 3 generations under the schema."""
    out = dict.fromkeys(("proposed", "accepted", "grammar_cut", "rounds"), 0)
    for p in prompts:
        stats = generate(engine, p, 96, chooser=FixedK(3), grammar=GBNF, **kwargs).stats
        out = {name: n + getattr(stats, name) for name, n in out.items()}
    return out


def test_steering_is_what_makes_drafts_count(single, prompts):
    """The same drafter with and without the grammar steering it: unsteered, most drafts are cut (the pair
    learned Python, not JSON); steered, none is, and several times as many are verified and kept."""
    unsteered = MTPDrafter(single)
    free = constrained_totals(single, prompts,
                              drafter=lambda req: unsteered(dataclasses.replace(req, grammar=None)))
    steered = constrained_totals(single, prompts)
    assert free["grammar_cut"] > free["proposed"]
    assert steered["grammar_cut"] == 0
    assert steered["proposed"] >= 30 * len(prompts) and steered["proposed"] > 3 * free["proposed"]
    assert steered["accepted"] > 0.5 * steered["proposed"] and steered["accepted"] > 3 * free["accepted"]
    assert steered["rounds"] < 0.5 * free["rounds"]


def test_steered_greedy_keeps_drafts_the_grammar_prefers():
    """Greedy acceptance under a grammar compares a draft with its row's best allowed token, not the plain
    argmax (which the grammar may forbid), and stays the target's constrained choice."""
    from gguf_mtp.runtime.sampling import accept_greedy

    class Allow:  # a grammar state allowing the given tokens
        def __init__(self, *ok):
            self.ok = ok

        def argmax(self, logits):
            return max(self.ok, key=lambda t: logits[t])

    logits = np.array([[9, 5, 1, 0], [9, 1, 5, 0], [0, 1, 2, 9]], dtype=np.float32)
    assert accept_greedy(logits, [1, 2]) == (0, 0)
    assert accept_greedy(logits, [1, 2], [Allow(1, 2), Allow(1, 2), Allow(3)]) == (2, 3)
    assert accept_greedy(logits, [1, 1], [Allow(1, 2), Allow(1, 2), Allow(3)]) == (1, 2)


def test_sampled_constrained_outputs_validate(single, prompts):
    """50 sampled generations with MTP on (exact and rejection acceptance): every one parses and validates."""
    for i in range(50):
        out = generate(single, prompts[i % len(prompts)], 128, chooser=FixedK(3), grammar=GBNF,
                       sampling=SamplingParams(temperature=1.0, seed=i), accept=("exact", "rejection")[i % 2])
        assert out.stats.stop_reason == "eog", out.text
        parsed(single, out.tokens)


# --- the scheduler ---------------------------------------------------------------------------------------
def test_scheduler_greedy_constrained_equals_the_loop(batch, alone, prompts):
    """Constrained and free requests side by side: each equals the single-sequence target alone's output."""
    sched = Scheduler(batch)
    reqs = [Request(p, 64, draft=3 if i % 2 else "adaptive", grammar=GBNF if i < 4 else None, ignore_eog=i >= 4)
            for i, p in enumerate(prompts)]
    handles = [sched.submit(r) for r in reqs]
    drain(sched)
    fins = [finished(h) for h in handles]
    for r, fin in zip(reqs, fins):
        ref = generate(alone, r.prompt, 64, grammar=r.grammar, ignore_eog=r.ignore_eog)
        assert fin.tokens == ref.tokens
        if r.grammar:
            parsed(batch, fin.tokens)
    assert all(f.stats.grammar_cut == 0 for f in fins)


def test_scheduler_steers_drafts_like_the_loop(batch, single, prompts):
    """Batched requests at k = 3 under the schema draft what the single-sequence loop drafts: the same counts,
    no draft cut."""
    sched = Scheduler(batch)
    handles = [sched.submit(Request(p, 96, draft=3, grammar=GBNF)) for p in prompts]
    drain(sched)
    for p, h in zip(prompts, handles):
        got, ref = finished(h).stats, generate(single, p, 96, chooser=FixedK(3), grammar=GBNF).stats
        assert got.grammar_cut == 0 and got.proposed > 30
        assert (got.proposed, got.accepted, got.rounds) == (ref.proposed, ref.accepted, ref.rounds)


def test_scheduler_sampled_constrained_requests_validate(batch, prompts):
    sched = Scheduler(batch)
    handles = [sched.submit(Request(prompts[i % len(prompts)], 128, SamplingParams(temperature=1.0, seed=i),
                                    accept=("exact", "rejection")[i % 2], draft=3, grammar=GBNF))
               for i in range(12)]
    drain(sched)
    for h in handles:
        fin = finished(h)
        assert fin.reason == "eog"
        parsed(batch, fin.tokens)


# --- gguf-mtp generate --json-schema ---------------------------------------------------------------------
def test_generate_json_schema(trained_ggufs, tmp_path):
    from gguf_mtp.cli import main

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    args = ["generate", "--target", str(trained_ggufs[0]), "--drafter", str(trained_ggufs[1]), "-p", "a record",
            "-n", "96", "--draft-max", "3", "--ctx", "512", "--flash-attn", "off", "--threads", "1"]
    r = CliRunner().invoke(main, [*args, "--json-schema", str(schema), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    jsonschema.validate(json.loads(out["text"]), SCHEMA)
    assert "grammar_cut" in out["stats"]
    schema.write_text('{"type": "nonsense"}')
    r = CliRunner().invoke(main, [*args, "--json-schema", str(schema)])
    assert r.exit_code != 0 and "JSON schema" in r.output


# --- serve: response_format ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(batch):
    from test_serve import serving

    with serving(Scheduler(batch).start()) as s:
        yield s


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "record", "schema": schema}}


def test_chat_json_schema_equals_target_alone(served, alone):
    from gguf_mtp.runtime.chat import STOP_TEXTS, special_id
    from gguf_mtp.runtime.chat_template import prompt_tokens

    messages = [{"role": "user", "content": "Describe a module as a record."}]
    r = served.client().chat.completions.create(model="tiny-e", messages=messages, max_tokens=96, temperature=0,
                                                 response_format=json_schema_format(SCHEMA), extra_body={"draft": {"max": 3}})
    stops = [i for i in (special_id(alone, s) for s in STOP_TEXTS) if i is not None]
    ref = generate(alone, prompt_tokens(alone, messages), 96, grammar=GBNF, stop_tokens=stops)
    assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    mtp = r.usage.model_extra["mtp"]
    assert mtp["grammar_cut"] == 0 and mtp["accepted"] > 0


def test_streamed_json_object_and_completion(served):
    client = served.client()
    stream = client.chat.completions.create(model="tiny-e", messages=[{"role": "user", "content": "some JSON"}],
                                            max_tokens=200, temperature=0, response_format={"type": "json_object"},
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(json.loads(text), dict)
    assert "grammar_cut" in chunks[-1].usage.model_extra["mtp"]
    r = client.completions.create(model="tiny-e", prompt="def f(x):\n", max_tokens=96, temperature=0,
                                  extra_body={"response_format": json_schema_format(SCHEMA)})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


@pytest.mark.parametrize("fmt, param", [
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    (json_schema_format({"type": "nonsense"}), "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"schema": "not an object"}}, "response_format.json_schema.schema"),
])
def test_bad_response_format_is_a_400(served, fmt, param):
    import httpx2

    with httpx2.Client(base_url=served.url, timeout=60) as http:
        r = http.post("/v1/chat/completions", json={"model": "tiny-e", "response_format": fmt,
                                                    "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
        assert http.get("/health").status_code == 200
