"""The speed pair: a ~130M-parameter Gemma 4 target and an MTP drafter built to agree with it (generated, not shipped).

At a few MB (the trained pair) llama.cpp's per-call overhead is most of a decoding step, so speculation cannot
show what it does for a real model. This pair has the shape where it pays on a CPU (shared notes, mtp-loop.md
"Measured: a bigger target"): a 31B-style dense target scaled to hidden 1024, 8 layers [S,S,S,F] x 2,
intermediate 4096, vocabulary 512 (gguf_mtp.tiny's), attention_k_eq_v full layers; a 4-layer drafter of hidden
256. Speed depends only on these shapes and on how often drafts are kept, so the weights are constructed, not
trained:

- target: gguf_mtp.tiny's random weights, with every layer's output damped (post-attention / post-feedforward
  norm gains x ``damping``): its next token is then mostly f(current token) = the argmax of its tied head over
  the current token's own embedding, and the layers decide only near-ties;
- drafter: computes f exactly: ``pre_projection`` maps the target's (scaled) embedding of each token to the
  drafter's own embedding of f(token) (a least-squares solve, exact for all 512 tokens, the hidden-state half is
  zero), its layers add nothing (post-norm gains 0), its final norm gains are 1, so its tied head picks f(token).

So drafts are kept wherever the target's layers do not overturn f. Measured on 3 prompts x 128 tokens, by draft
position: damping 0.03 -> ~0.95 everywhere, 0.04 (the default) -> 0.90 / 0.81 / 0.80 / 0.77, 0.05 -> 0.84 / 0.56 /
0.56 / 0.55; 0.01 keeps every draft. The default is in the range real MTP drafters reach on code.

numpy, tokenizers and sentencepiece only (no torch): ``gguf-mtp demo`` builds it after a plain ``pip install``.
Used by ``gguf-mtp demo``, tools/make_speed_pair.py and bench/bench_speed_pair.py.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import GgufMtpError
from ..export import convert
from ..fsutil import TMP_PREFIX, check_output_path
from . import Adjust, build_family
from .configs import FAMILIES, F, S, FamilySpec, drafter_text_fields
from .tokenizer import corpus_lines

ATTENTION = dict(num_attention_heads=8, num_key_value_heads=4, num_global_key_value_heads=2, head_dim=128,
                 global_head_dim=256, sliding_window=64)
LOGIT_STD = 8.0  # tied-head logits of a 1024-wide unit-rms state have std 32, saturating the softcap (30)
DEFAULT_DAMPING = 0.04
# what OUTDIR holds: the F16 GGUFs (our converter) and, when kept, the bf16 checkpoints they came from
TARGET_FILE, DRAFTER_FILE, HF_DIR = "target-F16.gguf", "drafter-F16.gguf", "hf"


@dataclasses.dataclass(frozen=True)
class SpeedPair:
    target: Path
    drafter: Path


def speed_spec() -> FamilySpec:
    base = FAMILIES["tiny-dense"]  # 31B-style: attention_k_eq_v, fewer global KV heads, text-only
    target = dict(base.target_text, **ATTENTION, hidden_size=1024, intermediate_size=4096,
                  layer_types=[S, S, S, F] * 2, num_hidden_layers=8)
    drafter = drafter_text_fields(target, layer_types=[S, S, S, F], hidden_size=256, intermediate_size=1024,
                                  num_attention_heads=8)
    return dataclasses.replace(base, name="speed-pair", mimics="gemma-4-31B shapes at ~130M parameters",
                               target_text=target, drafter_text=drafter, dtype="bfloat16")


def shaper(damping: float) -> Adjust:
    """The ``adjust`` hook of gguf_mtp.tiny.build_family: damp the target, make the drafter compute f."""
    seen: dict[str, np.ndarray] = {}

    def adjust(role: str, t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if role == "target":
            t["model.norm.weight"] *= np.float32(LOGIT_STD / t["model.norm.weight"].size ** 0.5)
            for name in t:
                if name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
                    t[name] *= np.float32(damping)
            e, g = t["model.embed_tokens.weight"], t["model.norm.weight"]
            unit = e / np.sqrt((e * e).mean(axis=1, keepdims=True))
            seen["f"] = np.argmax((unit * g) @ e.T, axis=1)  # the target's next token with its layers silent
            seen["x"] = e * np.float32(e.shape[1] ** 0.5)  # what the drafter reads: the embedding x sqrt(hidden)
            return t
        d = t["model.embed_tokens.weight"]
        x, y = seen["x"].astype(np.float64), d[seen["f"]].astype(np.float64)
        p_embd = np.linalg.solve(x @ x.T, x).T @ y  # p_embd.T @ x[i] = y[i] for every token i
        pre = np.zeros_like(t["pre_projection.weight"])
        pre[:, : x.shape[1]] = p_embd.T
        t["pre_projection.weight"] = pre
        t["model.norm.weight"] = np.ones_like(t["model.norm.weight"])
        for name in t:
            if name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
                t[name] = np.zeros_like(t[name])
        return t

    return adjust


def prompts(n: int = 3) -> list[str]:
    """``n`` lines of the tiny tokenizer's corpus spread evenly over it: the speed pair's benchmark prompts."""
    lines = corpus_lines()
    return [lines[i * len(lines) // n] for i in range(n)]


def make_speed_pair(outdir: str | os.PathLike, *, damping: float = DEFAULT_DAMPING, seed: int = 0,
                    keep_hf: bool = True, force: bool = False) -> SpeedPair:
    """Write OUTDIR/target-F16.gguf and OUTDIR/drafter-F16.gguf (and, with ``keep_hf``, the bf16 checkpoints
    in OUTDIR/hf/{target,drafter}); ~260 MB, seconds. Existing files are an error unless ``force``.

    The checkpoints are built in a temporary directory beside the outputs and moved into place (or dropped)
    once both GGUFs are written, so an interrupted run leaves no half-built pair under the final names.
    """
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    pair, hf = SpeedPair(out / TARGET_FILE, out / DRAFTER_FILE), out / HF_DIR
    for path in (pair.target, pair.drafter):
        check_output_path(path, force)
    if keep_hf and hf.exists() and not force:
        raise GgufMtpError(f"{hf} exists (use --force to overwrite)")
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out))
    try:
        build_family(speed_spec(), tmp / HF_DIR, seed, adjust=shaper(damping))
        convert(tmp / HF_DIR / "target", pair.target, outtype="f16", force=force)
        convert(tmp / HF_DIR / "drafter", pair.drafter, outtype="f16", target=pair.target, force=force)
        if keep_hf:
            shutil.rmtree(hf, ignore_errors=True)
            os.replace(tmp / HF_DIR, hf)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return pair
