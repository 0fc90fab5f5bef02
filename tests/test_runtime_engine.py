"""Loading: settings reach llama.cpp (read back from its own log), pairs are checked first, failures are loud."""

from __future__ import annotations

import logging
import re

import pytest
from fixtures.runtime import TEST_SETTINGS

from gguf_mtp.errors import GgufMtpError, IncompatiblePair
from gguf_mtp.runtime import chat_template
from gguf_mtp.llama_ext import LLAMA_LOG
from gguf_mtp.runtime.bindings import gpu_buffer_type, llama
from gguf_mtp.runtime.engine import Engine


def load(ggufs, family, drafter=True, **settings) -> Engine:
    target, draft = ggufs[family]
    return Engine.load(target, draft if drafter else None, TEST_SETTINGS.replace(**settings))


def lines_matching(eng: Engine, pattern: str) -> list[str]:
    return [ln.text for ln in eng.load_log if re.search(pattern, ln.text)]


def context_lines(eng: Engine, name: str) -> list[str]:
    """``llama_context: <name> = value`` lines: [target context, drafter context]."""
    return [t.split("=", 1)[1].strip() for t in lines_matching(eng, rf"llama_context: {name}\s+=")]


def test_context_settings_reach_llama_cpp(runtime_ggufs):
    with load(runtime_ggufs, "tiny-e", n_ctx=1024, n_batch=256, n_ubatch=64, flash_attn="on", cache_type_k="q8_0",
              cache_type_v="q8_0", threads=1) as eng:
        assert context_lines(eng, "n_ctx") == ["1024", "1024"]  # the drafter context matches the target's
        assert context_lines(eng, "n_batch")[0] == "256" and context_lines(eng, "n_ubatch")[0] == "64"
        assert context_lines(eng, "flash_attn") == ["enabled", "enabled"]
        kv = lines_matching(eng, r"llama_kv_cache: size =")
        assert kv and all("K (q8_0)" in t and "V (q8_0)" in t for t in kv)
        assert llama.llama_n_threads(eng.ctx) == 1
    with load(runtime_ggufs, "tiny-e", flash_attn="off", cache_type_k="f16", cache_type_v="f32") as eng:
        assert context_lines(eng, "flash_attn")[0] == "disabled"
        assert all("K (f16)" in t and "V (f32)" in t for t in lines_matching(eng, r"llama_kv_cache: size ="))


def test_k_max_raises_n_batch_for_one_verify_batch(runtime_ggufs):
    with load(runtime_ggufs, "tiny-dense", n_batch=4, n_ubatch=4, draft_max=8) as eng:
        assert eng.k_max == 8 and eng.n_batch == 9
        assert context_lines(eng, "n_batch") == ["9", "9"]


@pytest.mark.parametrize("swa_full,cells", [(False, "256"), (True, "1024")])
def test_swa_full(runtime_ggufs, swa_full, cells):
    with load(runtime_ggufs, "tiny-dense", n_ctx=1024, n_ubatch=64, swa_full=swa_full) as eng:
        sizes = [t.rsplit("=", 1)[1].split()[0] for t in lines_matching(eng, r"creating\s+SWA KV cache, size")]
        assert sizes[0] == cells


def test_tensor_overrides_and_n_cpu_moe(runtime_ggufs):
    with load(runtime_ggufs, "tiny-moe", n_cpu_moe=1, tensor_overrides=[(r"blk\.3\.ffn_down_exps", "CPU")]) as eng:
        moved = {m.group(1) for t in lines_matching(eng, r"buffer type overridden to CPU")
                 if (m := re.match(r"tensor (\S+) ", t))}
        assert {"blk.0.ffn_gate_up_exps.weight", "blk.0.ffn_down_exps.weight", "blk.3.ffn_down_exps.weight"} <= moved
        assert not any(n.startswith(("blk.1.", "blk.2.")) for n in moved)


def test_gpu_placement_on_a_cpu_build_is_reported(runtime_ggufs, caplog):
    if gpu_buffer_type() is not None:  # (llama_supports_gpu_offload is true for an RPC build without a GPU too)
        pytest.skip("this llama.cpp has a GPU device")
    with caplog.at_level(logging.WARNING, logger="gguf_mtp"):
        with load(runtime_ggufs, "tiny-dense", tensor_overrides=[("output", "GPU")]) as eng:
            assert not lines_matching(eng, "buffer type overridden")
    assert "no GPU device" in caplog.text


def test_the_drafter_shares_the_target_kv_cache(runtime_ggufs):
    """The MTP context's KV layers are views of the target's last sliding and full layers (ctx_other)."""
    with load(runtime_ggufs, "tiny-e") as eng:
        assert eng.has_drafter
        shared = {int(m.group(1)) for t in lines_matching(eng, r"sharing with layer")
                  if (m := re.search(r"sharing with layer (\d+)", t))}
        n_layer = llama.llama_model_n_layer(eng.model)
        assert {n_layer - 2, n_layer - 1} <= shared


def test_pair_is_checked_before_loading(runtime_ggufs):
    target, _ = runtime_ggufs["tiny-dense"]
    _, wide_drafter = runtime_ggufs["tiny-q"]
    with LLAMA_LOG.capture() as lines, pytest.raises(IncompatiblePair, match="hidden_size"):
        Engine.load(target, wide_drafter, TEST_SETTINGS)
    with pytest.raises(IncompatiblePair, match="arch: drafter must be gemma4-assistant"):
        Engine.load(target, target, TEST_SETTINGS)
    assert not any("load_tensors" in ln.text for ln in lines)  # no weights were read


def test_drafter_context_failure_is_loud(runtime_ggufs, monkeypatch, caplog):
    real = llama.llama_init_from_model

    def refuse_mtp(model, params):
        return None if params.ctx_type == llama.LLAMA_CONTEXT_TYPE_MTP else real(model, params)

    monkeypatch.setattr(llama, "llama_init_from_model", refuse_mtp)
    with pytest.raises(GgufMtpError, match="MTP drafter context could not be created"):
        load(runtime_ggufs, "tiny-dense")
    with caplog.at_level(logging.WARNING, logger="gguf_mtp"):
        target, drafter = runtime_ggufs["tiny-dense"]
        with Engine.load(target, drafter, TEST_SETTINGS, allow_no_drafter=True) as eng:
            assert not eng.has_drafter and "MTP drafter context" in eng.drafter_problem
            from gguf_mtp.runtime.loop import generate

            g = generate(eng, [eng.bos, 300, 301], 5, ignore_eog=True)
            assert len(g.tokens) == 5 and g.stats.proposed == 0
    assert "running without the drafter" in caplog.text


def test_target_failure_quotes_llama_cpp(runtime_ggufs):
    with pytest.raises(GgufMtpError, match="block size 32 does not divide"):
        load(runtime_ggufs, "tiny-moe", cache_type_k="q8_0", flash_attn="on")  # head dim 16


def test_tokenizer_and_chat_template(runtime_ggufs):
    with load(runtime_ggufs, "tiny-e", drafter=False) as eng:
        text = "the cat sat on the mat"
        toks = eng.tokenize(text)
        assert toks[0] == eng.bos and eng.detokenize(toks[1:]) == text
        assert eng.is_eog(eng.eos) and not eng.is_eog(toks[1])
        prompt = chat_template.user_prompt(eng, "hello")
        rendered = eng.detokenize(prompt, special=True)
        assert rendered == "<bos><|turn>user\nhello<turn|>\n<|turn>model\n"
        assert prompt.count(eng.bos) == 1


def test_chat_template_is_sandboxed():
    with pytest.raises(GgufMtpError, match="unsafe"):
        chat_template.render("{{ messages.__class__.__mro__ }}", [])
    with pytest.raises(GgufMtpError, match="chat template: no system role"):
        chat_template.render("{{ raise_exception('no system role') }}", [])
