"""Every quantized type the product writes, through the CPU kernels this machine's llama.cpp picks.

The CPU backend sends quantized weights to an extra buffer type where one fits the CPU: AMX on Intel CPUs that have
it, CPU_REPACK (interleaved AVX2/AVX-512 layouts) elsewhere, the plain layout otherwise. Those kernels run only
for batches of more than one token (prefill, every MTP verify), which is where the AMX crash hid
(../shared/notes/cpu.md). So, on whatever CPU runs the suite, for target and drafter of the shipped trained pair:

- a batched decode of each type (Q8_0, Q4_K_M, Q6_K, Q4_0) runs, and its logits are within the type's rounding of
  the F16 file's (REL_L2_VS_F16, measured on this pair, with ~3x headroom). Each quantized file is paired with the
  other role's F16 file, so the drafter's figure is its own rounding, not the target's carried into its input;
- the same file with extra buffer types off (llama-server --no-repack: the plain kernels) gives the same logits
  up to kernel rounding (REL_L2_VS_PLAIN): a miscompiled or misconfigured fast path gives garbage, not rounding;
- the MTP loop on the quantized pair emits the target alone's greedy output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fixtures.quant import quantize_each
from fixtures.runtime import TEST_SETTINGS, assert_greedy_equivalent
from gguf_mtp.bench import TRAINED_PAIR

# relative L2 of logits vs the F16 file, per type, measured on this pair (AMD Zen 5, AVX-512, CPU_REPACK for
# Q4_0 / Q4_K): target / drafter Q8_0 0.004 / 0.004, Q6_K 0.011 / 0.006, Q4_K_M 0.018 / 0.018, Q4_0 0.020 / 0.023.
# Garbage from a broken kernel is ~1.
REL_L2_VS_F16 = {"Q8_0": 0.02, "Q6_K": 0.04, "Q4_K_M": 0.06, "Q4_0": 0.08}
REL_L2_VS_PLAIN = 0.03  # fast vs plain kernels of the same file: CPU_REPACK measured up to 0.004, AMX 0.007
TYPES = tuple(REL_L2_VS_F16)
N_DRAFT_ROWS = 6


@pytest.fixture(scope="module")
def quantized(trained_ggufs, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    return quantize_each(trained_ggufs, TYPES, tmp_path_factory.mktemp("trained-quantized"))


def batched_logits(target: Path, drafter: Path, repack: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """Target logits of a prompt decoded in one batch (every row), and drafter logits of N_DRAFT_ROWS rows in one
    drafter batch (the target's greedy tokens and hidden states at the prompt's last positions)."""
    from gguf_mtp.runtime.engine import Engine

    with Engine.load(target, drafter, TEST_SETTINGS.replace(repack=repack), k_max=N_DRAFT_ROWS) as eng:
        text = (TRAINED_PAIR / "heldout.txt").read_text(encoding="utf-8")[:400]
        prompt = [eng.bos, *eng.tokenize(text, add_special=False)][:96]
        n = eng.decode(prompt, "all")
        assert n == len(prompt) > 1
        logits = eng.logits(n).copy()
        hidden = np.stack([eng.hidden(i).copy() for i in range(n - N_DRAFT_ROWS, n)])
        tokens = [int(t) for t in logits[-N_DRAFT_ROWS:].argmax(-1)]
        drafts = eng.draft_rows(tokens, n, hidden).copy()
        return logits, drafts, dict(eng.buffers)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def f16_logits(trained_ggufs) -> tuple[np.ndarray, np.ndarray]:
    logits, drafts, _ = batched_logits(*trained_ggufs)
    return logits, drafts


def test_draft_rows_equal_draft_steps(trained_ggufs):
    """One drafter batch of several rows gives each row's single-step logits (what the batch test relies on)."""
    from gguf_mtp.runtime.engine import Engine

    with Engine.load(*trained_ggufs, TEST_SETTINGS, k_max=4) as eng:
        prompt = [eng.bos, *eng.tokenize("def main(argv):\n    return", add_special=False)]
        n = eng.decode(prompt, "all")
        hidden = np.stack([eng.hidden(i).copy() for i in range(n - 4, n)])
        tokens = [int(t) for t in eng.logits(n)[-4:].argmax(-1)]
        rows = eng.draft_rows(tokens, n, hidden).copy()
        steps = np.stack([eng.draft_step(t, n, h)[0].copy() for t, h in zip(tokens, hidden)])
    assert rel_l2(rows, steps) < 1e-2
    assert (rows.argmax(-1) == steps.argmax(-1)).all()


@pytest.mark.parametrize("qtype", TYPES)
def test_batched_decode_of_each_quantized_type(trained_ggufs, quantized, f16_logits, qtype):
    (f16_target, f16_drafter), (target, drafter) = trained_ggufs, quantized[qtype]
    logits, _, buffers = batched_logits(target, f16_drafter)
    plain_logits, _, plain_buffers = batched_logits(target, f16_drafter, repack=False)
    _, drafts, d_buffers = batched_logits(f16_target, drafter)
    _, plain_drafts, d_plain_buffers = batched_logits(f16_target, drafter, repack=False)
    buffers.update(d_buffers)
    for bufs in (*plain_buffers.values(), *d_plain_buffers.values()):
        assert set(bufs) <= {"CPU", "CPU_Mapped"}, bufs  # --no-repack: the plain kernels
    for what, got, plain, ref in (("target", logits, plain_logits, f16_logits[0]),
                                  ("drafter", drafts, plain_drafts, f16_logits[1])):
        assert np.isfinite(got).all(), f"{qtype} {what}: non-finite logits ({buffers})"
        assert rel_l2(got, plain) <= REL_L2_VS_PLAIN, (qtype, what, buffers, rel_l2(got, plain))
        assert rel_l2(got, ref) <= REL_L2_VS_F16[qtype], (qtype, what, buffers, rel_l2(got, ref))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
def test_mtp_on_a_quantized_pair_keeps_the_target_alone_output(quantized, qtype):
    from gguf_mtp.runtime.adaptive import FixedK
    from gguf_mtp.runtime.engine import Engine
    from gguf_mtp.runtime.loop import generate

    with Engine.load(*quantized[qtype], TEST_SETTINGS) as eng:
        for text in ("import os\n\n\ndef ", "class Parser:\n    def __init__(self"):
            prompt = [eng.bos, *eng.tokenize(text, add_special=False)]
            plain = generate(eng, prompt, 48, chooser=FixedK(0), ignore_eog=True).tokens
            mtp = generate(eng, prompt, 48, chooser=FixedK(3), ignore_eog=True)
            assert mtp.stats.accepted > 0, "the trained drafter agrees with its target often"
            assert_greedy_equivalent(eng, prompt, mtp.tokens, plain)
