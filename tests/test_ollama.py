"""Ollama Modelfiles: the checker against Ollama's own parser cases, our golden cases, and the CLI.

The first table restates the cases of ollama/ollama parser/parser_test.go (TestParseFileFile, ...Draft,
...TrimSpace, ...From, ...ParametersMissingValue, ...BadCommand, ...Renderer, ...Parser, ...Messages,
...Quoted, ...Parameters, ...Comments, ...UTF16ParseFile, ParseMultiByte) as (input, expected) pairs:
expected is the list of (name, args) commands, or the error kind. See docs/ollama.md for the source.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from gguf_mtp import ollama, render
from gguf_mtp.cli import main
from gguf_mtp.errors import GgufMtpError, IncompatiblePair
from gguf_mtp.ollama import INVALID_COMMAND, INVALID_ROLE, NO_FROM, UNEXPECTED_EOF, Command, ModelfileError
from gguf_mtp.pairing import facts_from_gguf
from gguf_mtp.settings import RuntimeSettings

LLAMA3_TEMPLATE = (
    "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>"
)

# --- Ollama's parser cases (parser/parser_test.go), restated ----------------------------------------------
OLLAMA_PARSER_CASES = [
    # TestParseFileFile
    (f'\nFROM model1\nADAPTER adapter1\nLICENSE MIT\nPARAMETER param1 value1\nPARAMETER param2 value2\n'
     f'TEMPLATE """{LLAMA3_TEMPLATE}"""    \n',
     [("model", "model1"), ("adapter", "adapter1"), ("license", "MIT"), ("param1", "value1"), ("param2", "value2"),
      ("template", LLAMA3_TEMPLATE)]),
    # TestParseFileDraft
    ("\nFROM base\nDRAFT ./assistant\n", [("model", "base"), ("draft", "./assistant")]),
    # TestParseFileTrimSpace
    (f'\nFROM "     model 1"\nADAPTER      adapter3\nLICENSE "MIT       "\nPARAMETER param1        value1\n'
     f'PARAMETER param2    value2\nTEMPLATE """   {LLAMA3_TEMPLATE}   """    \n',
     [("model", "     model 1"), ("adapter", "adapter3"), ("license", "MIT       "), ("param1", "value1"),
      ("param2", "value2"), ("template", f"   {LLAMA3_TEMPLATE}   ")]),
    # TestParseFileFrom
    ('FROM "FOO  BAR  "', [("model", "FOO  BAR  ")]),
    ('FROM "FOO BAR"\nPARAMETER param1 value1', [("model", "FOO BAR"), ("param1", "value1")]),
    ("FROM     FOOO BAR    ", [("model", "FOOO BAR")]),
    ("FROM /what/is/the path ", [("model", "/what/is/the path")]),
    ("FROM foo", [("model", "foo")]),
    ("FROM /path/to/model", [("model", "/path/to/model")]),
    ("FROM /path/to/model/fp16.bin", [("model", "/path/to/model/fp16.bin")]),
    ("FROM llama3:latest", [("model", "llama3:latest")]),
    ("FROM llama3:7b-instruct-q4_K_M", [("model", "llama3:7b-instruct-q4_K_M")]),
    ("", NO_FROM),
    ("PARAMETER param1 value1", NO_FROM),
    ("PARAMETER param1 value1\nFROM foo", [("param1", "value1"), ("model", "foo")]),
    ("PARAMETER what the \nFROM lemons make lemonade ", [("what", "the"), ("model", "lemons make lemonade")]),
    # TestParseFileParametersMissingValue, TestParseFileBadCommand
    ("\nFROM foo\nPARAMETER param1\n", UNEXPECTED_EOF),
    ("\nFROM foo\nBADCOMMAND param1 value1\n", INVALID_COMMAND),
    # TestParseFileRenderer, TestParseFileParser
    ("\nFROM foo\nRENDERER renderer1\n", [("model", "foo"), ("renderer", "renderer1")]),
    ("\nFROM foo\nPARSER parser1\n", [("model", "foo"), ("parser", "parser1")]),
    # TestParseFileMessages
    ("\nFROM foo\nMESSAGE system You are a file parser. Always parse things.\n",
     [("model", "foo"), ("message", "system: You are a file parser. Always parse things.")]),
    ("\nFROM foo\nMESSAGE system You are a file parser. Always parse things.",
     [("model", "foo"), ("message", "system: You are a file parser. Always parse things.")]),
    ("\nFROM foo\nMESSAGE system You are a file parser. Always parse things.\nMESSAGE user Hey there!\n"
     "MESSAGE assistant Hello, I want to parse all the things!\n",
     [("model", "foo"), ("message", "system: You are a file parser. Always parse things."),
      ("message", "user: Hey there!"), ("message", "assistant: Hello, I want to parse all the things!")]),
    ('\nFROM foo\nMESSAGE system """\nYou are a multiline file parser. Always parse things.\n"""\n\t\t\t',
     [("model", "foo"), ("message", "system: \nYou are a multiline file parser. Always parse things.\n")]),
    ("\nFROM foo\nMESSAGE badguy I'm a bad guy!\n", INVALID_ROLE),
    ("\nFROM foo\nMESSAGE system\n", UNEXPECTED_EOF),
    ("\nFROM foo\nMESSAGE system", UNEXPECTED_EOF),
    # TestParseFileQuoted
    ('\nFROM foo\nSYSTEM """\nThis is a\nmultiline system.\n"""\n\t\t\t',
     [("model", "foo"), ("system", "\nThis is a\nmultiline system.\n")]),
    ('\nFROM foo\nSYSTEM """\nThis is a\nmultiline system."""\n\t\t\t',
     [("model", "foo"), ("system", "\nThis is a\nmultiline system.")]),
    ('\nFROM foo\nSYSTEM """This is a\nmultiline system."""\n\t\t\t',
     [("model", "foo"), ("system", "This is a\nmultiline system.")]),
    ('\nFROM foo\nSYSTEM """This is a multiline system."""\n\t\t\t',
     [("model", "foo"), ("system", "This is a multiline system.")]),
    ('\nFROM foo\nSYSTEM """This is a multiline system.""\n\t\t\t', UNEXPECTED_EOF),
    ('\nFROM foo\nSYSTEM "\n\t\t\t', UNEXPECTED_EOF),
    ('\nFROM foo\nSYSTEM """\nThis is a multiline system with "quotes".\n"""\n',
     [("model", "foo"), ("system", '\nThis is a multiline system with "quotes".\n')]),
    ('\nFROM foo\nSYSTEM """"""\n', [("model", "foo"), ("system", "")]),
    ('\nFROM foo\nSYSTEM ""\n', [("model", "foo"), ("system", "")]),
    ("\nFROM foo\nSYSTEM \"'\"\n", [("model", "foo"), ("system", "'")]),
    ('\nFROM foo\nSYSTEM """\'\'"\'""\'""\'"\'\'\'\'\'""\'""\'"""\n',
     [("model", "foo"), ("system", '\'\'"\'""\'""\'"\'\'\'\'\'""\'""\'')]),
    ('\nFROM foo\nTEMPLATE """\n{{ .Prompt }}\n"""', [("model", "foo"), ("template", "\n{{ .Prompt }}\n")]),
    # TestParseFileComments, ParseMultiByte
    ("\n# comment\nFROM foo\n\t", [("model", "foo")]),
    ("FROM test\n\tSYSTEM 你好👋", [("model", "test"), ("system", "你好👋")]),
]

# TestParseFileParameters: "PARAMETER <line>" -> (name, value)
OLLAMA_PARAMETER_LINES = {
    "numa true": ("numa", "true"), "num_ctx 1": ("num_ctx", "1"), "num_batch 1": ("num_batch", "1"),
    "num_gqa 1": ("num_gqa", "1"), "num_gpu 1": ("num_gpu", "1"), "main_gpu 1": ("main_gpu", "1"),
    "use_mmap true": ("use_mmap", "true"), "num_thread 1": ("num_thread", "1"), "num_keep 1": ("num_keep", "1"),
    "seed 1": ("seed", "1"), "num_predict 1": ("num_predict", "1"), "top_k 1": ("top_k", "1"),
    "top_p 1.0": ("top_p", "1.0"), "min_p 0.05": ("min_p", "0.05"), "typical_p 1.0": ("typical_p", "1.0"),
    "repeat_last_n 1": ("repeat_last_n", "1"), "temperature 1.0": ("temperature", "1.0"),
    "repeat_penalty 1.0": ("repeat_penalty", "1.0"), "presence_penalty 1.0": ("presence_penalty", "1.0"),
    "frequency_penalty 1.0": ("frequency_penalty", "1.0"), "penalize_newline true": ("penalize_newline", "true"),
    "stop ### User:": ("stop", "### User:"), "stop ### User: ": ("stop", "### User:"),
    'stop "### User:"': ("stop", "### User:"), 'stop "### User: "': ("stop", "### User: "),
    'stop """### User:"""': ("stop", "### User:"), 'stop """### User:\n"""': ("stop", "### User:\n"),
    "stop <|endoftext|>": ("stop", "<|endoftext|>"), "stop <|eot_id|>": ("stop", "<|eot_id|>"),
    "stop </s>": ("stop", "</s>"),
}


def _commands(expected):
    return [Command(n, a) for n, a in expected]


@pytest.mark.parametrize("text, expected", OLLAMA_PARSER_CASES)
def test_parser_matches_ollamas_own_cases(text, expected):
    if isinstance(expected, str):
        with pytest.raises(ModelfileError) as e:
            ollama.parse(text)
        assert e.value.kind == expected
    else:
        assert ollama.parse(text) == _commands(expected)


def test_parser_reports_the_line_of_a_bad_command_and_role():
    with pytest.raises(ModelfileError) as e:
        ollama.parse("\nFROM foo\nBADCOMMAND param1 value1\n")
    assert e.value.line == 3
    with pytest.raises(ModelfileError) as e:
        ollama.parse("\nFROM foo\nMESSAGE badguy I'm a bad guy!\n")
    assert e.value.line == 3 and "badguy" in str(e.value)


@pytest.mark.parametrize("line", sorted(OLLAMA_PARAMETER_LINES))
def test_parameter_lines_parse_like_ollama(line):
    assert ollama.parse(f"FROM foo\nPARAMETER {line}\n") == [Command("model", "foo"),
                                                              Command(*OLLAMA_PARAMETER_LINES[line])]


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16-le", "utf-16-be"])
def test_utf16_and_bom_files_decode_like_ollama(encoding):
    text = "FROM bob\nPARAMETER param1 1\nPARAMETER param2 4096\nSYSTEM You are a utf16 file.\n"
    data = text.encode(encoding)
    if encoding.startswith("utf-16"):
        data = (b"\xff\xfe" if encoding.endswith("le") else b"\xfe\xff") + data
    assert ollama.parse(ollama.decode(data)) == _commands(
        [("model", "bob"), ("param1", "1"), ("param2", "4096"), ("system", "You are a utf16 file.")])


# TestParseFileFormatParseFile: parse -> write -> parse gives the same commands.
FORMAT_CASES = [
    "\nFROM foo\nADAPTER adapter1\nLICENSE MIT\nPARAMETER param1 value1\nPARAMETER param2 value2\n"
    "TEMPLATE template1\nMESSAGE system You are a file parser. Always parse things.\nMESSAGE user Hey there!\n"
    "MESSAGE assistant Hello, I want to parse all the things!\n",
    '\nFROM foo\nADAPTER adapter1\nLICENSE """\nVery long and boring legal text.\nBlah blah blah.\n'
    '"Oh look, a quote!"\n"""\n\nPARAMETER param1 value1\nTEMPLATE template1\nMESSAGE system """\n'
    'You are a store greeter. Always respond with "Hello!".\n"""\nMESSAGE user Hey there!\n',
    '\nFROM foo\nSYSTEM ""\n',
]


@pytest.mark.parametrize("text", FORMAT_CASES)
def test_rendering_parsed_files_round_trips(text):
    commands = ollama.parse(text)
    assert ollama.parse("\n".join(ollama.render_command(c) for c in commands)) == commands


def test_typed_parameters_from_ollamas_create_request_cases():
    # TestCreateRequest: temperature 0.5 is a float32, top_k 1 an int64.
    assert ollama.validate(ollama.parse("FROM test\nPARAMETER temperature 0.5\nPARAMETER top_k 1\n")) == []


# --- our golden cases ---------------------------------------------------------------------------------------
VALUE_CASES = [  # (parameter, value, accepted)
    ("num_ctx", "16384", True), ("num_ctx", "16k", False), ("num_ctx", "1.5", False), ("num_gpu", "-1", True),
    ("temperature", "0.7", True), ("temperature", "1", True), ("temperature", ".5", True),
    ("temperature", "1e-3", True),
    ("temperature", "warm", False), ("temperature", "1e39", False), ("top_p", "Inf", True),
    ("use_mmap", "true", True), ("use_mmap", "F", True), ("use_mmap", "yes", False),
    ("draft_num_predict", "0", True), ("draft_num_predict", "3", True), ("draft_num_predict", "three", False),
    ("stop", "<turn|>", True), ("seed", "99999999999999999999", False),
    ("numa", "true", False), ("num_gqa", "1", False), ("nope", "1", False), ("mirostat", "1", False),
]


@pytest.mark.parametrize("name, value, accepted", VALUE_CASES)
def test_parameter_names_and_types(name, value, accepted):
    assert (ollama.value_problem(name, value) is None) == accepted


def test_unknown_and_deprecated_parameters_are_named():
    problems = ollama.validate(ollama.parse("FROM x\nPARAMETER nope 1\nPARAMETER penalize_newline true\n"))
    assert problems[0].startswith("unknown parameter 'nope'") and "deprecated" in problems[1]


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_quote_writes_any_value_it_accepts_so_it_reads_back(value):
    try:
        spelled = ollama.quote(value)
    except GgufMtpError:
        assert any(not (c.isprintable() or c in "\t\n") for c in value) or "\n" in value
        return
    assert ollama.parse(f"FROM x\nSYSTEM {spelled}\n")[1].args == value


@pytest.mark.parametrize("value, spelled", [
    ("<turn|>", "<turn|>"), (" lead", '" lead"'), ('"start', '""""start"""'), ("a\nb", '"""a\nb"""'),
    ('say "hi"\nok', '"""say "hi"\nok"""'), ("/m/my model.gguf", "/m/my model.gguf"),
])
def test_quote_golden(value, spelled):
    assert ollama.quote(value) == spelled


def test_modelfile_for_a_full_set_golden(ollama_ggufs):
    g = ollama_ggufs
    s = RuntimeSettings(n_ctx=16384, n_gpu_layers=30, draft_max=3)
    mf = ollama.build_modelfile(s, g.target, g.drafter, g.mmproj, base_dir=g.dir, n_layers=6)
    text = ollama.render_modelfile(mf)
    assert ollama.check_text(text, g.dir) == _commands([
        ("model", "./target.gguf"), ("model", "./mmproj.gguf"), ("draft", "./drafter.gguf"),
        ("num_ctx", "16384"), ("num_gpu", "30"), ("draft_num_predict", "3"), ("stop", "<turn|>")])
    assert "TEMPLATE" not in text and 'PARAMETER stop "<turn|>"' in text


SET_CASES = [  # (name, drafter?, mmproj?, expected FROM count, DRAFT?)
    ("full", True, True, 2, True),
    ("no projector", True, False, 1, True),
    ("no drafter", False, True, 2, False),
]


@pytest.mark.parametrize("name, with_drafter, with_mmproj, n_from, has_draft", SET_CASES)
def test_modelfile_shapes(ollama_ggufs, name, with_drafter, with_mmproj, n_from, has_draft):
    g = ollama_ggufs
    mf = ollama.build_modelfile(RuntimeSettings(n_ctx=4096), g.target, g.drafter if with_drafter else None,
                                g.mmproj if with_mmproj else None, n_layers=6)
    commands = ollama.check_text(ollama.render_modelfile(mf), g.dir)
    assert sum(c.name == "model" for c in commands) == n_from
    assert any(c.name == "draft" for c in commands) == has_draft
    assert any(c.name == "draft_num_predict" for c in commands) == has_draft
    assert [c.args for c in commands if c.name == "num_gpu"] == ["7"]  # all 6 layers + output


@pytest.mark.parametrize("base", ["absolute", "relative"])
def test_paths_with_spaces_and_quotes(ollama_ggufs, base):
    g = ollama_ggufs
    base_dir = g.spaced_dir if base == "relative" else None
    mf = ollama.build_modelfile(RuntimeSettings(), g.spaced_target, g.spaced_drafter, base_dir=base_dir)
    commands = ollama.check_text(ollama.render_modelfile(mf), g.spaced_dir)
    paths = {c.name: ollama.local_path(c.args, g.spaced_dir) for c in commands if c.name in ("model", "draft")}
    assert paths == {"model": g.spaced_target.resolve(), "draft": g.spaced_drafter.resolve()}


def test_centroid_drafter_is_refused_with_what_to_do(ollama_ggufs):
    g = ollama_ggufs
    with pytest.raises(IncompatiblePair, match="re-export the drafter without --centroids"):
        ollama.check_set_for_ollama(facts_from_gguf(g.target), facts_from_gguf(g.centroid_drafter), None)


def test_other_pairing_problems_keep_their_field(ollama_ggufs):
    g = ollama_ggufs
    with pytest.raises(IncompatiblePair, match="vocab"):
        ollama.check_set_for_ollama(facts_from_gguf(g.target), facts_from_gguf(g.other_vocab_drafter), None)


@pytest.mark.parametrize("drafter", ["target", "target_link"])
def test_draft_equal_to_from_is_refused(ollama_ggufs, drafter):
    g = ollama_ggufs
    with pytest.raises(GgufMtpError, match="DRAFT and FROM would be the same file"):
        ollama.build_modelfile(RuntimeSettings(), g.target, getattr(g, drafter))


def test_checker_refuses_draft_equal_to_from_like_ollama(ollama_ggufs):
    # TestCreateRequestDraftRejectsSameFile
    problems = ollama.validate(ollama.parse("FROM ./target.gguf\nDRAFT ./target-link.gguf\n"), ollama_ggufs.dir)
    assert problems == [f"DRAFT must not reference the same local path as FROM: {ollama_ggufs.target.resolve()}"]


def test_glob_characters_in_paths_are_refused(tmp_path):
    with pytest.raises(GgufMtpError, match="glob character"):
        ollama.check_paths(tmp_path / "model[1].gguf")
    assert "glob character" in ollama.validate(ollama.parse("FROM ./model-*.gguf\n"))[0]


def test_unexpressible_settings_become_comments_with_their_server_variables(ollama_ggufs):
    s = RuntimeSettings(cache_type_k="q8_0", cache_type_v="q8_0", flash_attn="on", n_cpu_moe=2,
                        mmproj_on_gpu=False)
    text = ollama.render_modelfile(ollama.build_modelfile(s, ollama_ggufs.target, ollama_ggufs.drafter))
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert any("OLLAMA_KV_CACHE_TYPE=q8_0" in c for c in comments)
    assert any("OLLAMA_FLASH_ATTENTION=1" in c for c in comments)
    assert any("tensor overrides" in c and "lost:" in c for c in comments)
    assert any("projector on CPU" in c for c in comments)
    assert len(ollama.parse(text)) == 5  # the comments are not commands


def test_sampling_system_and_template(ollama_ggufs):
    mf = ollama.build_modelfile(RuntimeSettings(), ollama_ggufs.target, ollama_ggufs.drafter, template=True,
                                system='Answer in "one" line.\nBe kind.', sampling={"temperature": 1.0, "top_k": 64,
                                                                                     "stop": ["<eos>"]})
    commands = ollama.check_text(ollama.render_modelfile(mf))
    assert mf.get("template") == [ollama.GEMMA4_TEMPLATE]
    assert mf.get("system") == ['Answer in "one" line.\nBe kind.']
    assert mf.get("temperature") == ["1.0"] and mf.get("top_k") == ["64"]
    assert mf.get("stop") == ["<turn|>", "<eos>"]
    assert commands == mf.commands


def test_gemma4_template_shape():
    t = ollama.GEMMA4_TEMPLATE
    assert ollama._template_problems(t) == []
    for piece in ("<|turn>system\n{{ .Content }}<turn|>", "<|turn>user\n{{ .Content }}<turn|>", "<|turn>model\n"):
        assert piece in t
    assert ollama._template_problems("{{ if .System }}x") == ["TEMPLATE: an action is missing its {{ end }}"]


def test_draft_length_follows_the_registry_for_a_known_shape(ollama_ggufs):
    f = facts_from_gguf(ollama_ggufs.target_31b)
    assert render.recommended_draft_length(f.hidden_size, len(f.layer_layout)) == 4
    assert render.recommended_draft_length(64, 6) is None


# --- the CLI --------------------------------------------------------------------------------------------------
def _run(args, env=None):
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False)


def _plan(tmp_path, **runtime):
    p = tmp_path / "plan.json"
    p.write_text(json.dumps({"runtime": runtime}))
    return str(p)


def test_cli_writes_a_modelfile_from_a_plan(ollama_ggufs, tmp_path):
    g = ollama_ggufs
    out = tmp_path / "Modelfile"
    plan = _plan(tmp_path, n_ctx=8192, n_gpu_layers=4, cache_type_k="q8_0", cache_type_v="q8_0")
    r = _run(["modelfile", "--target", str(g.target), "--drafter", str(g.drafter), "--mmproj", str(g.mmproj),
              "--plan", plan, "-o", str(out), "--temperature", "1.0", "-p", "top_k=64"])
    assert r.exit_code == 0, r.stderr
    commands = ollama.check_text(out.read_text(), tmp_path)
    assert [(c.name, c.args) for c in commands if c.name not in ("model", "draft")] == [
        ("num_ctx", "8192"), ("num_gpu", "4"), ("draft_num_predict", "3"), ("temperature", "1.0"),
        ("top_k", "64"), ("stop", "<turn|>")]
    assert "OLLAMA_KV_CACHE_TYPE=q8_0" in r.stderr
    again = _run(["modelfile", "--target", str(g.target), "--drafter", str(g.drafter), "--ctx", "4096",
                  "-o", str(out)])
    assert again.exit_code == 2 and "--force" in again.stderr and "8192" in out.read_text()


def test_cli_parallel_plan_gives_one_slots_context_and_the_server_variable(ollama_ggufs, tmp_path):
    g = ollama_ggufs
    plan = _plan(tmp_path, n_ctx=32768, n_parallel=4)
    r = _run(["modelfile", "--target", str(g.target), "--drafter", str(g.drafter), "--plan", plan])
    assert r.exit_code == 0, r.stderr
    params = {c.name: c.args for c in ollama.check_text(r.stdout)}
    assert params["num_ctx"] == "8192"  # Ollama allocates num_ctx x OLLAMA_NUM_PARALLEL: the plan's pool
    assert "4 parallel sequences (server-wide): set OLLAMA_NUM_PARALLEL=4 on the Ollama server" in r.stderr


def test_cli_flags_override_the_plan(ollama_ggufs, tmp_path):
    g = ollama_ggufs
    plan = _plan(tmp_path, n_ctx=8192, n_gpu_layers=4, draft_max=2)
    r = _run(["modelfile", "--target", str(g.target), "--drafter", str(g.drafter), "--plan", plan, "--ctx", "2048",
              "--draft-max", "5"])
    params = {c.name: c.args for c in ollama.check_text(r.stdout)}
    assert (params["num_ctx"], params["num_gpu"], params["draft_num_predict"]) == ("2048", "4", "5")


def test_cli_uses_the_registry_draft_length_and_prints_to_stdout(ollama_ggufs):
    g = ollama_ggufs
    r = _run(["modelfile", "--target", str(g.target_31b), "--drafter", str(g.drafter_31b), "--ctx", "4096"])
    commands = ollama.check_text(r.stdout)
    assert ("draft_num_predict", "4") in [(c.name, c.args) for c in commands]
    assert ("num_gpu", "61") in [(c.name, c.args) for c in commands]
    assert "registry" in r.stdout


@pytest.mark.parametrize("args, message, code", [
    (["-p", "nope=1"], "unknown parameter 'nope'", 2),
    (["-p", "num_ctx=lots"], "expected an integer", 2),
    (["--drafter-is-target"], "DRAFT and FROM would be the same file", 2),
    (["--centroids"], "re-export the drafter without --centroids", 1),
    (["--no-ctx"], "give --plan FILE, --vram SIZE, or --ctx N", 2),
    (["--plan", "p.json", "--vram", "24GiB"], "not both", 2),
])
def test_cli_refusals(ollama_ggufs, args, message, code):
    g = ollama_ggufs
    drafter = g.target if "--drafter-is-target" in args else g.centroid_drafter if "--centroids" in args else g.drafter
    base = ["modelfile", "--target", str(g.target), "--drafter", str(drafter)]
    if "--no-ctx" not in args and "--vram" not in args:
        base += ["--ctx", "4096"]
    extra = [a for a in args if a not in ("--drafter-is-target", "--centroids", "--no-ctx")]
    r = _run(base + extra)
    assert r.exit_code == code and message in r.stderr and r.stderr.startswith("error: ")


def _stand_in_ollama(bin_dir: Path, log: Path, exit_code: int = 0) -> None:
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "ollama"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{log}"\ntest -f "$4" || exit 9\nexit {exit_code}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_cli_create_runs_ollama_create(ollama_ggufs, tmp_path, monkeypatch):
    g = ollama_ggufs
    log = tmp_path / "args.txt"
    _stand_in_ollama(tmp_path / "bin", log)
    monkeypatch.chdir(tmp_path)
    r = _run(["modelfile", "--target", str(g.target), "--drafter", str(g.drafter), "--ctx", "4096",
              "--create", "gemma4-mtp:tiny"], env={"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"})
    assert r.exit_code == 0, r.stderr
    assert log.read_text().splitlines() == ["create", "gemma4-mtp:tiny", "-f", "Modelfile"]
    assert ollama.check_text((tmp_path / "Modelfile").read_text(), tmp_path)


def test_cli_create_failure_is_an_error(ollama_ggufs, tmp_path):
    g = ollama_ggufs
    _stand_in_ollama(tmp_path / "bin", tmp_path / "args.txt", exit_code=1)
    r = _run(["modelfile", "--target", str(g.target), "--drafter", str(g.drafter), "--ctx", "4096",
              "-o", str(tmp_path / "Modelfile"), "--create", "m"], env={"PATH": str(tmp_path / "bin")})
    assert r.exit_code == 2 and "failed (exit 1)" in r.stderr


def test_cli_create_without_ollama_prints_the_command(ollama_ggufs, tmp_path):
    g = ollama_ggufs
    (tmp_path / "empty").mkdir()
    out = tmp_path / "my dir" / "Modelfile"
    out.parent.mkdir()
    r = _run(["modelfile", "--target", str(g.target), "--drafter", str(g.drafter), "--ctx", "4096",
              "-o", str(out), "--create", "m"], env={"PATH": str(tmp_path / "empty")})
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == f"ollama create m -f '{out}'"
    assert "not on PATH" in r.stderr
