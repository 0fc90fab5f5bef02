#!/usr/bin/env python3
"""Write the speed pair: a ~130M-parameter Gemma 4 target and an MTP drafter that agrees with it (not shipped).

    python tools/make_speed_pair.py OUTDIR [--damping 0.04] [--force]

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
0.56 / 0.55; 0.01 keeps every draft. The default is in the range real MTP drafters reach on code. Writes OUTDIR/hf/{target,drafter} (bf16 safetensors) and OUTDIR/target-F16.gguf,
OUTDIR/drafter-F16.gguf (our converter).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gguf_mtp.errors import GgufMtpError  # noqa: E402
from gguf_mtp.export import convert  # noqa: E402
from gguf_mtp.tiny import build_family  # noqa: E402
from gguf_mtp.tiny.configs import FAMILIES, F, S, drafter_text_fields  # noqa: E402

ATTENTION = dict(num_attention_heads=8, num_key_value_heads=4, num_global_key_value_heads=2, head_dim=128,
                 global_head_dim=256, sliding_window=64)
LOGIT_STD = 8.0  # tied-head logits of a 1024-wide unit-rms state have std 32, saturating the softcap (30)


def speed_spec():
    base = FAMILIES["tiny-dense"]  # 31B-style: attention_k_eq_v, fewer global KV heads, text-only
    target = dict(base.target_text, **ATTENTION, hidden_size=1024, intermediate_size=4096,
                  layer_types=[S, S, S, F] * 2, num_hidden_layers=8)
    drafter = drafter_text_fields(target, layer_types=[S, S, S, F], hidden_size=256, intermediate_size=1024,
                                  num_attention_heads=8)
    return dataclasses.replace(base, name="speed-pair", mimics="gemma-4-31B shapes at ~130M parameters",
                               target_text=target, drafter_text=drafter, dtype="bfloat16")


def shaper(damping: float):
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--damping", type=float, default=0.04, help="target layer-output scale (0: drafts always kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace OUTDIR's files")
    args = ap.parse_args()
    out: Path = args.outdir
    hf, target, drafter = out / "hf", out / "target-F16.gguf", out / "drafter-F16.gguf"
    if (hf.exists() or target.exists()) and not args.force:
        raise SystemExit(f"error: {out} already holds a speed pair (use --force to replace it)")
    shutil.rmtree(hf, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    try:
        build_family(speed_spec(), hf, args.seed, adjust=shaper(args.damping))
        convert(hf / "target", target, outtype="f16", force=True)
        convert(hf / "drafter", drafter, outtype="f16", target=target, force=True)
    except GgufMtpError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {target} ({target.stat().st_size / 2**20:.0f} MiB) and {drafter} "
          f"({drafter.stat().st_size / 2**20:.1f} MiB); damping {args.damping}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
