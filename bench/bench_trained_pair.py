#!/usr/bin/env python3
"""Acceptance on the trained pair (gguf_mtp/data/trained-pair), side by side in one run.

    python bench/bench_trained_pair.py [--write-docs]

1. Quantization: drafter F16 / Q8_0 / Q4_K_M against target F16 / Q8_0 / Q4_K_M (llama.cpp's quantizer through
   ``gguf_mtp.quantize``): the drafter's acceptance at k = 3 teacher-forced on the held-out text (by draft
   position), and in greedy generation from held-out prompts. Target F16 + drafter F16 is the reference row.
2. Sampling: exact-match acceptance (llama.cpp's rule) vs rejection sampling (speculative sampling) at
   temperature 0.7 and 1.0, k = 3: acceptance, tokens per target step, and tokens/s relative to the target
   alone at the same temperature (several seeds).

``--write-docs`` rewrites the trained-pair section of docs/bench.md and the quantize-pair acceptance section of
docs/quantize.md. The pair is a few MB: tokens/s there are mostly llama.cpp's per-call overhead
(bench/bench_speed_pair.py measures speed where it pays); acceptance is the point here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from docsection import write_section  # noqa: E402

from gguf_mtp.bench import TRAINED_PAIR, heldout_acceptance, heldout_prompts, run_bench  # noqa: E402
from gguf_mtp.export import convert  # noqa: E402
from gguf_mtp.quantize import quantize  # noqa: E402
from gguf_mtp.runtime.engine import Engine  # noqa: E402
from gguf_mtp.settings import RuntimeSettings  # noqa: E402

TYPES = ("F16", "Q8_0", "Q4_K_M")
TEMPERATURES = (0.7, 1.0)
SETTINGS = RuntimeSettings(n_ctx=1024, threads=1, flash_attn="off", cache_type_k="f32", cache_type_v="f32")


def files(workdir: Path) -> dict[tuple[str, str], Path]:
    """(role, type) -> GGUF: converted once (F16), quantized from it."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = {}
    for role in ("target", "drafter"):
        f16 = workdir / f"{role}-F16.gguf"
        if not f16.exists():
            convert(TRAINED_PAIR / role, f16, target=out.get(("target", "F16")) if role == "drafter" else None)
        out[(role, "F16")] = f16
        for q in TYPES[1:]:
            dst = workdir / f"{role}-{q}.gguf"
            if not dst.exists():
                quantize(f16, dst, q)
            out[(role, q)] = dst
    return out


def bits_per_weight(path: Path) -> str:
    """Bits per weight of a file's tensors (the drafter's 128-wide rows cannot hold k-quant blocks)."""
    from gguf_mtp.inspect import inspect_gguf

    ins = inspect_gguf(path)
    return f"{ins.bits_per_weight:.2f}"


def quant_matrix(f: dict, text: str, windows: int, n_gen: int) -> list[dict]:
    rows = []
    prompts = heldout_prompts(4)
    for tq in TYPES:
        for dq in TYPES:
            with Engine.load(f[("target", tq)], f[("drafter", dq)], SETTINGS, k_max=3) as eng:
                s = heldout_acceptance(eng, text, k=3, windows=windows)
            g = run_bench(f[("target", tq)], f[("drafter", dq)], prompts, max_tokens=n_gen, ks=(3,),
                          adaptive=False, settings=SETTINGS).mode("k=3")
            rows.append({"target": tq, "drafter": dq, "heldout": s.acceptance_rate,
                         "heldout_by_position": [a / p for a, p in zip(s.accepted_by_position,
                                                                       s.proposed_by_position)],
                         "generation": g.acceptance, "generation_by_position": g.acceptance_by_position,
                         "drafter_bpw": bits_per_weight(f[("drafter", dq)]),
                         "target_bpw": bits_per_weight(f[("target", tq)])})
            print(f"target {tq:<7} drafter {dq:<7} held-out {s.acceptance_rate:.3f} "
                  f"{[round(a, 3) for a in rows[-1]['heldout_by_position']]}  generation {g.acceptance:.3f}")
    return rows


def sampling_rows(f: dict, n_gen: int, seeds: int) -> list[dict]:
    rows = []
    target, drafter = f[("target", "Q8_0")], f[("drafter", "Q8_0")]
    prompts = heldout_prompts(4)
    for temp in TEMPERATURES:
        for accept in ("exact", "rejection"):
            acc = steps = speed = 0.0
            for seed in range(seeds):
                r = run_bench(target, drafter, prompts, max_tokens=n_gen, ks=(3,), adaptive=False, settings=SETTINGS,
                              temperature=temp, seed=seed, accept=accept)
                m = r.mode("k=3")
                acc, steps, speed = acc + m.acceptance, steps + m.mean_accepted_length, speed + m.speedup
            rows.append({"temperature": temp, "accept": accept, "acceptance": acc / seeds,
                         "tokens_per_step": steps / seeds, "speedup": speed / seeds})
            print(f"T={temp} {accept:<9} acceptance {acc / seeds:.3f}  tokens/step {steps / seeds:.2f}  "
                  f"speed-up {speed / seeds:.2f}x")
    return rows


def quant_markdown(rows: list[dict], windows: int, n_gen: int) -> str:
    lines = [
        f"Trained pair, k = 3, greedy: acceptance teacher-forced on held-out text ({windows} windows of 256 tokens "
        f"spread over heldout.txt, `bench.heldout_acceptance`), and in "
        f"generation (4 held-out prompts x {n_gen} tokens); by draft position in brackets. bpw: bits per weight "
        "of the file (the drafter's 128-wide rows cannot hold 256-blocks: llama.cpp stores those Q4_K tensors as "
        "Q5_0).",
        "",
        "| target | drafter | held-out acceptance (by position) | generation acceptance (by position) | "
        "target bpw | drafter bpw |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['target']} | {r['drafter']} | {r['heldout']:.3f} "
                     f"({' '.join(f'{a:.2f}' for a in r['heldout_by_position'])}) | {r['generation']:.3f} "
                     f"({' '.join(f'{a:.2f}' for a in r['generation_by_position'])}) | {r['target_bpw']} | "
                     f"{r['drafter_bpw']} |")
    return "\n".join(lines)


def sampling_markdown(rows: list[dict], n_gen: int, seeds: int) -> str:
    lines = [
        f"Target Q8_0 + drafter Q8_0, k = 3, 4 held-out prompts x {n_gen} tokens, mean of {seeds} seeds; speed-up "
        "relative to the target alone at the same temperature.",
        "",
        "| temperature | acceptance rule | acceptance | tokens per target step | speed-up |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['temperature']} | {r['accept']} | {r['acceptance']:.3f} | {r['tokens_per_step']:.2f} | "
                     f"{r['speedup']:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / ".work" / "bench-trained")
    ap.add_argument("--windows", type=int, default=8, help="held-out windows of 256 tokens")
    ap.add_argument("-n", "--tokens", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()

    f = files(args.workdir)
    text = (TRAINED_PAIR / "heldout.txt").read_text(encoding="utf-8")
    quant = quant_matrix(f, text, args.windows, args.tokens)
    sampling = sampling_rows(f, args.tokens, args.seeds)
    if args.write_docs:
        q = quant_markdown(quant, args.windows, args.tokens)
        write_section(ROOT / "docs" / "quantize.md", "quantize-pair-acceptance", q)
        write_section(ROOT / "docs" / "bench.md", "trained-pair", q + "\n\n" + sampling_markdown(sampling, args.tokens,
                                                                                                   args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
