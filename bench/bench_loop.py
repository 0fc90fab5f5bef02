"""Speed of the speculative loop, measured side by side in one run (ratios, not absolute numbers).

    python bench/bench_loop.py                       # a tiny family, exported on the fly
    python bench/bench_loop.py --wide --threads 2    # a 1024-wide, ~130M-parameter target: where drafting pays
    python bench/bench_loop.py --target T.gguf --drafter D.gguf -n 256 --threads 8

Prints, for the same prompt and token count: the target alone; MTP drafts with k = 1..4; adaptive k; an oracle
drafter (the target's own greedy continuation: acceptance 1, the best any drafter can do) at k = 1..4 and adaptive;
then the cost of a verify batch of n rows and of one drafter step relative to a single-token target step.
Greedy decoding, so every mode emits the same tokens up to near-ties. By default flash attention is off and the
KV cache f32: on the CPU, flash attention, an f16 cache and f16/bf16 weights make batched and one-token logits
differ by up to ~1 (tests/fixtures/runtime.py), and the oracle's reference (plain greedy output) then parts from
what the verify batches compute, after which the oracle has nothing to propose.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gguf_mtp.runtime.adaptive import AdaptiveK, FixedK  # noqa: E402
from gguf_mtp.runtime.drafters import OracleDrafter  # noqa: E402
from gguf_mtp.runtime.engine import Engine  # noqa: E402
from gguf_mtp.runtime.loop import generate  # noqa: E402
from gguf_mtp.settings import RuntimeSettings  # noqa: E402


def tiny_pair(family: str, out: Path, wide: bool = False) -> tuple[Path, Path]:
    """Export a tiny family; ``wide``: tiny-dense scaled to hidden 1024 / 8 layers (the notes' bench size)."""
    import dataclasses

    from gguf_mtp.export import convert
    from gguf_mtp.tiny import build_family, make_tiny_models
    from gguf_mtp.tiny.configs import FAMILIES

    if wide:
        base = FAMILIES["tiny-dense"]
        attn = dict(head_dim=128, global_head_dim=256, num_key_value_heads=4, num_global_key_value_heads=2,
                    sliding_window=64, num_attention_heads=8)
        s, f = "sliding_attention", "full_attention"
        spec = dataclasses.replace(
            base, name="wide-dense",
            target_text=dict(base.target_text, **attn, hidden_size=1024, intermediate_size=4096,
                             layer_types=[s, s, s, f] * 2, num_hidden_layers=8),
            drafter_text=dict(base.drafter_text, **attn, hidden_size=256, intermediate_size=1024))
        # a tied head over a 1024-wide unit-rms state gives logits of std 32: saturated by the softcap (30), near-ties
        # everywhere. Scale the final-norm gains so logits have the spread of the 64-wide families.
        from gguf_mtp.tiny import weights

        signed = weights.INITS["final_norm"]
        weights.INITS["final_norm"] = lambda rng, shape: signed(rng, shape) * (8.0 / shape[0] ** 0.5)
        try:
            src = build_family(spec, out / "hf")
        finally:
            weights.INITS["final_norm"] = signed
    else:
        src = make_tiny_models(out / "hf", seed=0, families=[family])[family]
    target, drafter = out / "target.gguf", out / "drafter.gguf"
    convert(src / "target", target)
    convert(src / "drafter", drafter, target=target)
    return target, drafter


def step_costs(eng: Engine, prompt: list[int], sizes: list[int], repeats: int = 20) -> dict[str, float]:
    """Median seconds of a target batch of n rows at the end of the prompt, and of one drafter step."""
    eng.truncate(0)
    eng.decode(prompt)
    n0 = eng.n_past
    out = {}
    for n in sizes:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            eng.decode(prompt[1:n + 1] if n < len(prompt) else [prompt[-1]] * n, outputs="all")
            times.append(time.perf_counter() - t)
            eng.truncate(n0)
        out[f"verify_{n}"] = statistics.median(times)
    if eng.has_drafter:
        h = eng.hidden(0).copy()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            eng.draft_step(prompt[-1], n0, h)
            times.append(time.perf_counter() - t)
        out["draft_step"] = statistics.median(times)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target")
    ap.add_argument("--drafter")
    ap.add_argument("--family", default="tiny-dense", help="tiny family to export when no files are given")
    ap.add_argument("--wide", action="store_true", help="export a 1024-wide tiny-dense instead (~130M parameters)")
    ap.add_argument("--flash-attn", default="off", choices=["auto", "on", "off"])
    ap.add_argument("--cache-type", default="f32", help="K and V cache type")
    ap.add_argument("-n", "--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    if args.target:
        target, drafter = Path(args.target), Path(args.drafter) if args.drafter else None
    else:
        target, drafter = tiny_pair(args.family, Path(tmp.name), args.wide)
    settings = RuntimeSettings(n_ctx=max(512, 2 * args.tokens + 64), threads=args.threads, draft_cap=8,
                               flash_attn=args.flash_attn, cache_type_k=args.cache_type,
                               cache_type_v=args.cache_type)
    rows = []
    with Engine.load(target, drafter, settings) as eng:
        prompt = [eng.bos, *eng.tokenize("The quick brown fox jumps over the lazy dog.", add_special=False)]
        n = args.tokens
        reference = prompt + generate(eng, prompt, n + 16, chooser=FixedK(0), ignore_eog=True).tokens  # + warm-up

        def oracle() -> OracleDrafter:
            return OracleDrafter(reference, eng.n_vocab)

        modes = [("target alone", lambda: {"chooser": FixedK(0)})]
        if eng.has_drafter:
            modes += [(f"MTP k={k}", lambda k=k: {"chooser": FixedK(k)}) for k in range(1, 5)]
            modes.append(("MTP adaptive", lambda: {"chooser": AdaptiveK(8)}))
        modes += [(f"oracle k={k}", lambda k=k: {"chooser": FixedK(k), "drafter": oracle()}) for k in range(1, 5)]
        modes.append(("oracle adaptive", lambda: {"chooser": AdaptiveK(8), "drafter": oracle()}))
        best = {}
        for _ in range(args.repeats):  # round-robin, so drift on a shared machine hits every mode alike
            for name, kw in modes:
                g = generate(eng, prompt, n, ignore_eog=True, **kw())
                if name not in best or g.stats.generate_time < best[name].stats.generate_time:
                    best[name] = g
        base = best["target alone"]
        for name, _ in modes:
            s = best[name].stats
            rows.append({"mode": name, "tokens_per_second": round(s.tokens_per_second, 1),
                         "speedup": round(s.tokens_per_second / base.stats.tokens_per_second, 3),
                         "acceptance": round(s.acceptance_rate, 3),
                         "tokens_per_round": round(s.mean_accepted_length, 2),
                         "same_tokens": best[name].tokens == base.tokens})
        costs = step_costs(eng, prompt, [1, 2, 3, 4, 5, 9])

    single = costs["verify_1"]
    ratios = {k: round(v / single, 3) for k, v in costs.items()}
    if args.json:
        print(json.dumps({"target": str(target), "tokens": args.tokens, "modes": rows, "cost_vs_single_step": ratios},
                         indent=2))
        return 0
    print(f"target {target}  drafter {drafter}  {args.tokens} tokens, {args.threads} thread(s), "
          f"best of {args.repeats} (round-robin)")
    print(f"{'mode':<18}{'tok/s':>10}{'vs target':>11}{'accept':>9}{'tok/round':>11}  same tokens")
    for r in rows:
        print(f"{r['mode']:<18}{r['tokens_per_second']:>10}{r['speedup']:>10}x{r['acceptance']:>9}"
              f"{r['tokens_per_round']:>11}  {r['same_tokens']}")
    print("cost relative to a single-token target step (median of 20):")
    for k, v in ratios.items():
        print(f"  {k:<12}{v:>7}x  ({1e3 * costs[k]:.3f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
