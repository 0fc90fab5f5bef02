"""serve-cmd: the llama-server command line round-trips through shlex, and every flag it emits exists.

tests/golden/llama_server_flags.txt lists every flag render.server_args can emit; the always-run test
keeps it equal to what we emit, and the ``upstream`` test checks each one against llama-server's
argument table in the sdist's common/arg.cpp (an option is a llama-server option when its
``set_examples`` include LLAMA_EXAMPLE_SERVER, or it has none and so is common, and no
``set_excludes`` names the server).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from gguf_mtp import render
from gguf_mtp.cli import main
from gguf_mtp.settings import RuntimeSettings

from upstream import llama_cpp_dir

FLAGS_FILE = Path(__file__).parent / "golden" / "llama_server_flags.txt"

# (settings, files, port, placement_fixed) -> the exact argument list we intend
SERVER_CASES = [
    ("plan, full set",
     RuntimeSettings(n_gpu_layers=30, n_ctx=16384, draft_max=4, cache_type_k="q8_0", cache_type_v="q8_0",
                     flash_attn="on"),
     ("/m/t.gguf", "/m/d.gguf", "/m/mm.gguf"), 8080, True,
     ["-m", "/m/t.gguf", "--mmproj", "/m/mm.gguf", "--spec-type", "draft-mtp", "-md", "/m/d.gguf",
      "--spec-draft-n-max", "4", "-ngld", "all", "-ngl", "30", "-c", "16384", "-np", "1", "-b", "512", "-ub", "512",
      "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on", "--port", "8080", "--fit", "off"]),
    ("MoE offload, projector and drafter on CPU, spaces and quotes in paths",
     RuntimeSettings(n_cpu_moe=3, tensor_overrides=[(r"blk\.0\.attn_.*", "GPU"), ("per_layer_token_embd", "CPU")],
                     mmproj_on_gpu=False, drafter_on_gpu=False, swa_full=True, repack=False, threads=8,
                     draft_max=2),
     ("/m/my model's.gguf", '/m/"mtp".gguf', "/m/mm proj.gguf"), None, True,
     ["-m", "/m/my model's.gguf", "--mmproj", "/m/mm proj.gguf", "--no-mmproj-offload", "--spec-type", "draft-mtp",
      "-md", '/m/"mtp".gguf', "--spec-draft-n-max", "2", "-ngld", "0", "-ngl", "all",
      "-ot", r"blk\.0\.attn_.*=CUDA0,per_layer_token_embd=CPU", "--n-cpu-moe", "3", "-c", "4096", "-np", "1", "-b", "512",
      "-ub", "512", "-ctk", "f16", "-ctv", "f16", "-fa", "auto", "--swa-full", "--no-repack", "-t", "8",
      "--fit", "off"]),
    ("four parallel sequences in one unified pool, each capped at its share",
     RuntimeSettings(n_ctx=65536, n_parallel=4, draft_max=3), ("/m/t.gguf", "/m/d.gguf", None), None, True,
     ["-m", "/m/t.gguf", "--spec-type", "draft-mtp", "-md", "/m/d.gguf", "--spec-draft-n-max", "3", "-ngld", "all",
      "-ngl", "all", "-c", "65536", "-np", "4", "-kvu", "--kv-unified-per-slot", "16384", "-b", "512", "-ub", "512",
      "-ctk", "f16", "-ctv", "f16", "-fa", "auto", "--fit", "off"]),
    ("two local GPUs and an rpc-server, layer split, drafter and projector on the output device",
     RuntimeSettings(n_ctx=65536, draft_max=3, rpc=["10.0.0.2:50052"], devices=["RPC0", "CUDA0", "CUDA1"],
                     tensor_split=[20.0, 30.0, 11.0], drafter_device="CUDA1"),
     ("/m/t.gguf", "/m/d.gguf", "/m/mm.gguf"), None, True,
     ["-m", "/m/t.gguf", "--mmproj", "/m/mm.gguf", "--spec-type", "draft-mtp", "-md", "/m/d.gguf",
      "--spec-draft-n-max", "3", "-ngld", "all", "-ngl", "all", "--rpc", "10.0.0.2:50052",
      "--device", "RPC0,CUDA0,CUDA1", "-sm", "layer", "-ts", "20,30,11", "-devd", "CUDA1", "-mmdev", "CUDA1",
      "-c", "65536", "-np", "1", "-b", "512", "-ub", "512", "-ctk", "f16", "-ctv", "f16", "-fa", "auto",
      "--fit", "off"]),
    ("no plan, no drafter, no projector",
     RuntimeSettings(), ("t.gguf", None, None), None, False,
     ["-m", "t.gguf", "-ngl", "all", "-c", "4096", "-np", "1", "-b", "512", "-ub", "512", "-ctk", "f16", "-ctv", "f16",
      "-fa", "auto"]),
]


@pytest.mark.parametrize("name, settings, files, port, fixed, expected", SERVER_CASES, ids=[c[0] for c in SERVER_CASES])
def test_command_round_trips_to_the_intended_arguments(name, settings, files, port, fixed, expected):
    cmd = render.server_command(settings, *files, port=port, placement_fixed=fixed)
    assert shlex.split(cmd) == ["llama-server", *expected]


def _flags(argv: list[str]) -> set[str]:
    return {a for a in argv if a.startswith("-") and not re.fullmatch(r"-?\d+", a)}


def emitted_flags() -> set[str]:
    """Every flag server_args emits over settings that switch each branch on."""
    out: set[str] = set()
    for _, settings, files, port, fixed, _ in SERVER_CASES:
        out |= _flags(render.server_args(settings, *files, port=port, placement_fixed=fixed))
    return out


def checked_in_flags() -> list[str]:
    return [line.strip() for line in FLAGS_FILE.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_checked_in_flag_list_is_what_we_emit():
    assert sorted(set(checked_in_flags())) == sorted(emitted_flags())


# --- against llama-server's own table ---------------------------------------------------------------------
_STR = r'"(?:[^"\\]|\\.)*"'
_NAMES = r"\{\s*" + _STR + r"(?:\s*,\s*" + _STR + r")*\s*\}"
_OPTION = re.compile(r"\s*(?://[^\n]*\n\s*)*(" + _NAMES + r")(?:\s*,\s*(" + _NAMES + r"))?")


def llama_server_flags(arg_cpp: str) -> set[str]:
    """The flags (and --no- forms) of every option llama-server accepts, read from common/arg.cpp."""
    flags: set[str] = set()
    for chunk in arg_cpp.split("add_opt(common_arg(")[1:]:
        m = _OPTION.match(chunk)
        if not m:
            continue
        examples = re.search(r"\.set_examples\(\{([^}]*)\}\)", chunk)
        excludes = re.search(r"\.set_excludes\(\{([^}]*)\}\)", chunk)
        ex = set(re.findall(r"LLAMA_EXAMPLE_\w+", examples.group(1))) if examples else {"LLAMA_EXAMPLE_COMMON"}
        excl = set(re.findall(r"LLAMA_EXAMPLE_\w+", excludes.group(1))) if excludes else set()
        if ex & {"LLAMA_EXAMPLE_SERVER", "LLAMA_EXAMPLE_COMMON"} and "LLAMA_EXAMPLE_SERVER" not in excl:
            flags |= {s[1:-1] for group in m.groups() if group for s in re.findall(_STR, group)}
    return flags


def test_arg_cpp_reader_on_a_sample():
    sample = '''
    add_opt(common_arg(
        {"-c", "--ctx-size"}, "N", "size", [](common_params & p, int v) { p.n_ctx = v; }
    ).set_env("LLAMA_ARG_CTX_SIZE"));
    add_opt(common_arg(
        // a comment before the names
        {"--spec-x"}, {"--no-spec-x"}, "x", [](common_params & p, bool v) {}
    ).set_spec().set_examples({LLAMA_EXAMPLE_SPECULATIVE, LLAMA_EXAMPLE_SERVER}));
    add_opt(common_arg({"-p", "--prompt"}, "P", "prompt", [](common_params & p, const std::string & v) {}
    ).set_excludes({LLAMA_EXAMPLE_SERVER}));
    add_opt(common_arg({"--cli-only"}, "x", [](common_params & p) {}).set_examples({LLAMA_EXAMPLE_CLI}));
    '''
    assert llama_server_flags(sample) == {"-c", "--ctx-size", "--spec-x", "--no-spec-x"}


@pytest.mark.upstream
def test_every_emitted_flag_exists_in_llama_server():
    root = llama_cpp_dir()
    known = llama_server_flags((root / "common" / "arg.cpp").read_text())
    assert len(known) > 200  # the reader found the table
    assert sorted(set(checked_in_flags()) - known) == []
    assert sorted(emitted_flags() - known) == []
    speculative = (root / "common" / "speculative.cpp").read_text()
    spec_types = re.findall(r'\{"([a-z0-9-]+)",\s*COMMON_SPECULATIVE_TYPE_', speculative)
    assert "draft-mtp" in spec_types


# --- the CLI ----------------------------------------------------------------------------------------------------
def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_cli_with_a_plan_fixes_placement_and_says_why(ollama_ggufs, tmp_path):
    g = ollama_ggufs
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"runtime": {"n_ctx": 8192, "n_gpu_layers": 5, "n_cpu_moe": 1}}))
    r = _run(["serve-cmd", "--target", str(g.target), "--drafter", str(g.drafter), "--mmproj", str(g.mmproj),
              "--plan", str(plan), "--port", "8080"])
    assert r.exit_code == 0, r.stderr
    argv = shlex.split(r.stdout)
    assert argv[-2:] == ["--fit", "off"] and argv[argv.index("-c") + 1] == "8192"
    assert argv[argv.index("--spec-type") + 1] == "draft-mtp" and "--n-cpu-moe" in argv
    assert f"# {render.FIT_OFF_REASON}" in r.stderr.splitlines()


def test_cli_json_without_a_plan(ollama_ggufs):
    g = ollama_ggufs
    r = _run(["serve-cmd", "--target", str(g.target_31b), "--drafter", str(g.drafter_31b), "--ctx", "32768", "--json"])
    out = json.loads(r.stdout)
    assert shlex.split(out["command"]) == out["argv"]
    assert out["fit_off"] is False and "--fit" not in out["argv"] and out["why"] == render.FIT_ON_REASON
    assert out["draft_length"] == 4 and out["argv"][out["argv"].index("--spec-draft-n-max") + 1] == "4"
    assert out["settings"]["n_ctx"] == 32768


def test_cli_gpu_buffer_names_the_override_target(ollama_ggufs, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"runtime": {"tensor_overrides": [["output\\.weight", "GPU"]]}}))
    r = _run(["serve-cmd", "--target", str(ollama_ggufs.target), "--plan", str(plan), "--gpu-buffer", "Vulkan0"])
    argv = shlex.split(r.stdout)
    assert argv[argv.index("-ot") + 1] == r"output\.weight=Vulkan0"


def test_cli_refuses_a_centroid_drafter(ollama_ggufs):
    g = ollama_ggufs
    r = _run(["serve-cmd", "--target", str(g.target), "--drafter", str(g.centroid_drafter)])
    assert r.exit_code == 1 and "centroid_support" in r.stderr


def test_vram_plans_the_placement_for_real_files(tiny_ggufs):
    """--vram runs the planner on the files: the plan's context reaches the command, and --fit is off."""
    from click.testing import CliRunner

    from gguf_mtp.cli import main

    t, d = tiny_ggufs[("tiny-dense", "target")], tiny_ggufs[("tiny-dense", "drafter")]
    r = CliRunner().invoke(main, ["serve-cmd", "--target", str(t), "--drafter", str(d), "--vram", "24GiB", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["fit_off"] is True and out["argv"][-2:] == ["--fit", "off"]
    assert out["settings"]["n_ctx"] > 4096  # the planner's largest context, not the default
    r = CliRunner().invoke(main, ["serve-cmd", "--target", str(t), "--drafter", str(d), "--vram", "1KiB"])
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and "fit" in r.stderr


def test_12b_serve_cmd_and_modelfile_from_a_16gib_plan(skeletons, tmp_path):
    """The 12B's files (full-size skeletons: target Q4_K_M, drafter Q8_0, the F16 projector with both embedders)
    planned for a 16 GiB card: the registry's draft length (3) for its shape, the projector and drafter on the
    GPU, the plan's whole 262,144-token context; the Modelfile says the same through FROM / DRAFT / PARAMETER."""
    t, d, m = (str(skeletons.get("12B", role, q)) for role, q in (("target", "Q4_K_M"), ("drafter", "Q8_0"),
                                                                    ("mmproj", None)))
    assert render.recommended_draft_length(3840, 48) == 3
    r = CliRunner().invoke(main, ["serve-cmd", "--target", t, "--drafter", d, "--mmproj", m, "--vram", "16GiB",
                                  "--json"])
    assert r.exit_code == 0, r.output
    argv = json.loads(r.stdout)["argv"]
    opt = lambda flag: argv[argv.index(flag) + 1]  # noqa: E731
    assert (opt("--mmproj"), opt("-md"), opt("--spec-draft-n-max"), opt("-c")) == (m, d, "3", "262144")
    assert "--no-mmproj-offload" not in argv and opt("-ngl") == "all" and opt("-ngld") == "all"
    out = tmp_path / "Modelfile"
    r = CliRunner().invoke(main, ["modelfile", "--target", t, "--drafter", d, "--mmproj", m, "--vram", "16GiB",
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    lines = out.read_text().splitlines()
    assert f"FROM {t}" in lines and f"FROM {m}" in lines and f"DRAFT {d}" in lines
    assert "PARAMETER draft_num_predict 3" in lines and "PARAMETER num_ctx 262144" in lines
