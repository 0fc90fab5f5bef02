"""Pins the cross-module contracts: settings JSON, the renderer, pairing, keys, atomic outputs."""

from __future__ import annotations

import json
import shlex

import pytest

from gguf_mtp import keys, pairing, render
from gguf_mtp.errors import GgufMtpError, IncompatiblePair
from gguf_mtp.fsutil import atomic_output, remove_stale_temps
from gguf_mtp.settings import RuntimeSettings, load_plan_settings


# --- keys ------------------------------------------------------------------------------------------
def test_vocab_hash_is_bytes_plus_nul_in_order():
    import hashlib

    assert keys.vocab_sha256(["a", "bc"]) == hashlib.sha256(b"a\0bc\0").hexdigest()
    assert keys.vocab_sha256([b"a", b"bc"]) == keys.vocab_sha256(["a", "bc"])
    assert keys.vocab_sha256(["ab", "c"]) != keys.vocab_sha256(["a", "bc"])  # the NUL separates tokens


# --- settings -------------------------------------------------------------------------------------
def test_settings_round_trip_through_json():
    s = RuntimeSettings(n_gpu_layers=20, tensor_overrides=[("blk\\.3\\..*", "CPU")], cache_type_k="q8_0",
                        cache_type_v="q8_0", n_ctx=8192, draft_max=3, threads=4, n_parallel=4)
    again = RuntimeSettings.from_dict(json.loads(json.dumps(s.to_dict())))
    assert again == s
    assert not again.adaptive
    assert RuntimeSettings.from_dict({}).n_parallel == 1  # plans written before the field: one sequence


@pytest.mark.parametrize("n_ctx, n_parallel, slot", [(8192, 1, 8192), (65536, 4, 16384), (10000, 4, 2560), (1000, 1, 1024)])
def test_slot_context_splits_llama_cpps_padded_pool(n_ctx, n_parallel, slot):
    assert RuntimeSettings(n_ctx=n_ctx, n_parallel=n_parallel).slot_ctx == slot


@pytest.mark.parametrize("bad, field", [
    ({"cache_type_k": "q3"}, "cache_type_k"),
    ({"flash_attn": "yes"}, "flash_attn"),
    ({"n_ctx": 0}, "n_ctx"),
    ({"n_gpu_layers": -5}, "n_gpu_layers"),
    ({"tensor_overrides": [["x", "TPU"]]}, "tensor_overrides"),
    ({"n_ctx": "4096"}, "n_ctx"),
    ({"nctx": 4096}, "nctx"),
    ({"n_parallel": 0}, "n_parallel"),
    ({"n_parallel": 257}, "n_parallel"),
    ({"n_parallel": True}, "n_parallel"),
])
def test_settings_refuse_bad_values_naming_the_field(bad, field):
    with pytest.raises(GgufMtpError, match=field):
        RuntimeSettings.from_dict(bad)


def test_plan_file_runtime_member(tmp_path):
    p = tmp_path / "plan.json"
    p.write_text(json.dumps({"memory": {}, "runtime": {"n_ctx": 1234, "n_cpu_moe": 2}}))
    s = load_plan_settings(p)
    assert s.n_ctx == 1234
    assert [d for _, d in s.effective_overrides()] == ["CPU", "CPU"]
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(GgufMtpError, match="not JSON"):
        load_plan_settings(tmp_path / "bad.json")


# --- render ---------------------------------------------------------------------------------------
def test_server_command_round_trips_through_shlex():
    s = RuntimeSettings(n_gpu_layers=30, n_cpu_moe=4, mmproj_on_gpu=False, cache_type_k="q8_0",
                        cache_type_v="q8_0", flash_attn="on", n_ctx=32768, draft_max=4)
    cmd = render.server_command(s, "/m/my model's.gguf", "/m/mtp.gguf", "/m/mmproj.gguf", port=8080)
    argv = shlex.split(cmd)
    assert argv[0] == "llama-server"
    assert argv[1:] == render.server_args(s, "/m/my model's.gguf", "/m/mtp.gguf", "/m/mmproj.gguf", port=8080)
    assert argv[argv.index("-m") + 1] == "/m/my model's.gguf"
    assert argv[argv.index("--spec-type") + 1] == "draft-mtp"
    assert argv[argv.index("--spec-draft-n-max") + 1] == "4"
    assert "--no-mmproj-offload" in argv and argv[argv.index("--n-cpu-moe") + 1] == "4"
    assert argv[-2:] == ["--fit", "off"]


def test_ollama_parameters_and_unexpressible_settings():
    s = RuntimeSettings(n_gpu_layers=12, cache_type_k="q8_0", cache_type_v="q8_0", n_cpu_moe=1)
    assert render.ollama_parameters(s, drafter=True) == {"num_ctx": 4096, "num_gpu": 12, "draft_num_predict": 3}
    envs = [o.env for o in render.ollama_unexpressible(s) if o.env]
    assert envs == ["OLLAMA_KV_CACHE_TYPE=q8_0"]
    assert any("tensor overrides" in o.comment for o in render.ollama_unexpressible(s))
    # Ollama's num_ctx is one request's context; its server multiplies it by OLLAMA_NUM_PARALLEL
    par = RuntimeSettings(n_ctx=32768, n_parallel=4)
    assert render.ollama_parameters(par, drafter=False)["num_ctx"] == 8192
    assert [o.env for o in render.ollama_unexpressible(par)] == ["OLLAMA_NUM_PARALLEL=4"]


# --- pairing --------------------------------------------------------------------------------------
def _meta(arch, **kw):
    m = {"general.architecture": arch}
    m.update({f"{arch}.{k}": v for k, v in kw.items()})
    return m


TARGET = _meta("gemma4", embedding_length=64, block_count=4, **{
    "attention.sliding_window_pattern": [True, False, True, False], "attention.head_count_kv": [1, 2, 1, 2],
    "attention.key_length": 64, "attention.key_length_swa": 32, "attention.sliding_window": 16,
    "rope.freq_base": 1e6, "rope.freq_base_swa": 1e4})
DRAFTER = _meta("gemma4-assistant", embedding_length=32, embedding_length_out=64, block_count=2, **{
    "attention.sliding_window_pattern": [True, False], "attention.head_count_kv": [1, 2],
    "attention.key_length": 64, "attention.key_length_swa": 32, "attention.sliding_window": 16,
    "rope.freq_base": 1e6, "rope.freq_base_swa": 1e4})
TOKENS = [b"<pad>", b"<eos>", b"a"]


def _facts(meta, tokens=TOKENS):
    return pairing.facts_from_metadata(meta, tokens)


def test_matching_pair_has_no_problems():
    t = _facts(TARGET)
    assert (t.kv_heads_swa, t.kv_heads_full, t.layer_layout) == (1, 2, "SFSF")
    assert pairing.check_set(t, _facts(DRAFTER)) == []


@pytest.mark.parametrize("key, value, field", [
    ("gemma4-assistant.embedding_length_out", 48, "hidden_size"),
    ("gemma4-assistant.attention.key_length_swa", 16, "head_dim_swa"),
    ("gemma4-assistant.attention.key_length", 128, "head_dim_full"),
    ("gemma4-assistant.attention.head_count_kv", [2, 2], "kv_heads_swa"),
    ("gemma4-assistant.attention.head_count_kv", [1, 4], "kv_heads_full"),
    ("gemma4-assistant.attention.sliding_window", 32, "sliding_window"),
    ("gemma4-assistant.rope.freq_base_swa", 5e3, "rope_base_swa"),
    ("gemma4-assistant.rope.freq_base", 5e5, "rope_base_full"),
    ("gemma4-assistant.attention.sliding_window_pattern", [False, False], "layer_layout"),
    ("gemma4-assistant.centroid_count", 8, "centroid_support"),
    ("general.architecture", "llama", "arch"),
])
def test_each_drafter_field_mismatch_is_named(key, value, field):
    d = dict(DRAFTER)
    d[key] = value
    problems = pairing.check_set(_facts(TARGET), _facts(d))
    assert field in [p.field for p in problems]
    with pytest.raises(IncompatiblePair, match=field):
        pairing.require_compatible(_facts(TARGET), _facts(d))


def test_vocab_mismatch_and_projector_dim():
    problems = pairing.check_set(_facts(TARGET), _facts(DRAFTER, TOKENS[:-1] + [b"b"]))
    assert [p.field for p in problems] == ["vocab"]
    proj = pairing.facts_from_metadata({"general.architecture": "clip", "clip.vision.projection_dim": 48})
    assert [p.field for p in pairing.check_set(_facts(TARGET), projector=proj)] == ["projector_dim"]


def test_centroid_drafter_passes_on_patched_runtime():
    d = dict(DRAFTER, **{"gemma4-assistant.centroid_count": 8})
    assert pairing.check_set(_facts(TARGET), _facts(d), runtime_centroids=True) == []


@pytest.mark.parametrize("layout, shared, ok", [
    ("SFSF", 0, True),
    ("SFSFSS", 0, False),  # must end S F
    ("SSSFSF", 2, True),  # layers 2,3 = S F before the shared pair
    ("SFSSSF", 3, False),  # the layout llama.cpp aborts on (notes: mtp-loop.md)
])
def test_layout_rule(layout, shared, ok):
    assert (pairing.layout_problems(layout, shared) == []) is ok


# --- atomic outputs -------------------------------------------------------------------------------
def test_atomic_output_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "x.gguf"
    with pytest.raises(RuntimeError):
        with atomic_output(out) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_refuses_overwrite_without_force(tmp_path):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"old")
    with pytest.raises(GgufMtpError, match="--force"):
        with atomic_output(out):
            pass
    assert out.read_bytes() == b"old"
    with atomic_output(out, force=True) as tmp:
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new"


def test_atomic_output_checks_directory(tmp_path):
    with pytest.raises(GgufMtpError, match="does not exist"):
        with atomic_output(tmp_path / "missing" / "x.gguf"):
            pass
    with pytest.raises(GgufMtpError, match="is a directory"):
        with atomic_output(tmp_path):
            pass


def test_stale_temps_are_removed(tmp_path):
    (tmp_path / ".gguf-mtp-tmp-abc.gguf").write_bytes(b"x")
    (tmp_path / "keep.gguf").write_bytes(b"x")
    assert len(remove_stale_temps(tmp_path)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["keep.gguf"]
