#!/usr/bin/env python3
"""MTP speed where it pays on a CPU: the speed pair (gguf_mtp/tiny/speed_pair.py), side by side in one run.

    python bench/bench_speed_pair.py                      # builds .work/speed/pair on first use
    python bench/bench_speed_pair.py -n 128 --repeats 3 --threads 2 --write-docs

Rows, each as tokens/s and the ratio to the target alone, same prompts and token count: the target alone; MTP at
k = 1..4 and adaptive; the oracle (drafts = the target's own greedy output: every draft kept, drafting free) at the
same lengths; llama.cpp's own C++ loop (``llama-speculative-simple --spec-type draft-mtp``, same prompts) at
k = 1..4 when the binary is built (``--build-cpp`` builds it: bench/cppbuild.py; or ``$LLAMA_SPECULATIVE_SIMPLE``),
else a line saying it was skipped. Then the two claims the product makes, checked: MTP >= 1.5x the target alone;
adaptive k >= the best fixed k. Then sampled decoding at temperature 0.7 / 1.0: exact-match acceptance vs
rejection sampling, k = 3 and adaptive.
Flash attention off and an f32 KV cache (batched and one-token logits then agree, so every mode emits the same
tokens and the oracle can replay them); ``--write-docs`` rewrites the speed-pair section of docs/bench.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cppbuild  # noqa: E402
from docsection import write_section  # noqa: E402

from gguf_mtp.bench import BenchResult, run_bench  # noqa: E402
from gguf_mtp.settings import RuntimeSettings  # noqa: E402
from gguf_mtp.tiny import speed_pair as sp  # noqa: E402

DOCS = ROOT / "docs" / "bench.md"
KS = (1, 2, 3, 4)
TEMPERATURES = (0.7, 1.0)
CPP_SPEED = re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s")
CPP_COUNTS = re.compile(r"n_drafted\s+=\s+(\d+).*?n_accept\s+=\s+(\d+)", re.S)


def speed_pair(workdir: Path) -> tuple[Path, Path]:
    target, drafter = workdir / sp.TARGET_FILE, workdir / sp.DRAFTER_FILE
    if not (target.exists() and drafter.exists()):
        sp.make_speed_pair(workdir, force=True)  # a half-written pair is replaced whole
    return target, drafter


def find_cpp_loop() -> Path | None:
    return cppbuild.find_tool("llama-speculative-simple", env="LLAMA_SPECULATIVE_SIMPLE")


def build_cpp_loop() -> Path:
    """``llama-speculative-simple`` from the sdist our runtime is built from, patched as the runtime is
    (bench/cppbuild.py: one build shared with the other benches; ~10 minutes on 2 cores, then incremental)."""
    return cppbuild.build_tools("llama-speculative-simple")["llama-speculative-simple"]


def cpp_loop(exe: Path, target: Path, drafter: Path, prompts: list[str], n: int, k: int, threads: int,
             repeats: int) -> dict:
    """llama.cpp's reference loop on the same files, settings and prompts: per prompt the fastest of ``repeats``
    runs by its own timer (decoding, prefill excluded), summed over prompts as our modes are."""
    tokens = seconds = drafted = accepted = 0.0
    for prompt in prompts:
        argv = [str(exe), "-m", str(target), "-md", str(drafter), "--spec-type", "draft-mtp", "--spec-draft-n-max",
                str(k), "-p", prompt, "-n", str(n), "-t", str(threads), "-fa", "off", "-ctk", "f32", "-ctv", "f32",
                "--temp", "0", "--ignore-eos", "-c", "1024"]
        runs = []
        for _ in range(repeats):
            out = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=600)
            text = out.stderr + out.stdout
            speed, counts = CPP_SPEED.search(text), CPP_COUNTS.search(text)
            if out.returncode != 0 or not speed or not counts:
                raise RuntimeError(f"{exe.name} failed (exit {out.returncode}): {text.strip()[-300:]}")
            runs.append((float(speed[2]), int(speed[1]), int(counts[1]), int(counts[2])))
        t, n_tok, n_drafted, n_accept = min(runs)
        tokens, seconds, drafted, accepted = tokens + n_tok, seconds + t, drafted + n_drafted, accepted + n_accept
    return {"tokens_per_second": tokens / seconds, "acceptance": accepted / drafted if drafted else None}


def sampled_runs(target: Path, drafter: Path, prompts: list[str], settings: RuntimeSettings, args) -> list[dict]:
    """k = 3 and adaptive at temperature 0.7 / 1.0, llama.cpp's exact-match rule vs rejection sampling."""
    rows = []
    for temp in TEMPERATURES:
        for accept in ("exact", "rejection"):
            r = run_bench(target, drafter, prompts, max_tokens=args.tokens, ks=(3,), settings=settings,
                          repeats=args.repeats, temperature=temp, seed=0, accept=accept)
            k3, ad = r.mode("k=3"), r.mode("adaptive")
            rows.append({"temperature": temp, "accept": accept, "k3": k3, "adaptive": ad})
            print(f"T={temp} {accept:<9} k=3 {k3.speedup:.2f}x (acceptance {k3.acceptance:.2f})  "
                  f"adaptive {ad.speedup:.2f}x (acceptance {ad.acceptance:.2f})")
    return rows


def markdown(r: BenchResult, cpp: dict[int, dict] | None, cpp_note: str, claims: list[str], args,
             sampled: list[dict]) -> str:
    base = r.mode("target").tokens_per_second
    lines = [
        f"Speed pair (`tools/make_speed_pair.py`: ~130M-parameter 31B-style target, 4-layer drafter), "
        f"{r.prompts} prompts x {r.max_tokens} tokens, greedy, {args.threads} thread(s), fastest of {r.repeats}; "
        f"{platform.machine()}, {os.cpu_count()} CPUs; flash attention off, f32 KV cache.",
        "",
        "| mode | tokens/s | vs target alone | acceptance | by draft position | tokens per target step |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for m in r.modes:
        drafted = m.mode != "target"
        by_pos = " ".join(f"{a:.2f}" for a in m.acceptance_by_position) if drafted else "-"
        lines.append(f"| {m.mode} | {m.tokens_per_second:.1f} | {m.speedup:.2f}x | "
                     f"{f'{m.acceptance:.2f}' if drafted else '-'} | {by_pos} | {m.mean_accepted_length:.2f} |")
    if cpp:
        for k, c in cpp.items():
            acc = f"{c['acceptance']:.2f}" if c["acceptance"] is not None else "-"
            lines.append(f"| llama.cpp C++ loop k={k} | {c['tokens_per_second']:.1f} | "
                         f"{c['tokens_per_second'] / base:.2f}x | {acc} | - | - |")
    lines += ["", cpp_note, "", *[f"- {c}" for c in claims], "",
              "Sampled, same prompts and settings (seed 0; speed-up against the target alone sampling at the same "
              "temperature): llama.cpp's exact-match rule keeps a draft only if the target samples the same token; "
              "rejection sampling keeps it with probability min(1, p/q) and stays exact in distribution.", "",
              "| temperature | rule | k=3 vs target alone | k=3 acceptance | adaptive vs target alone | "
              "adaptive acceptance |",
              "|---:|---|---:|---:|---:|---:|"]
    for row in sampled:
        k3, ad = row["k3"], row["adaptive"]
        lines.append(f"| {row['temperature']} | {row['accept']} | {k3.speedup:.2f}x | {k3.acceptance:.2f} | "
                     f"{ad.speedup:.2f}x | {ad.acceptance:.2f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / ".work" / "speed" / "pair")
    ap.add_argument("-n", "--tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-docs", action="store_true", help="rewrite the speed-pair section of docs/bench.md")
    ap.add_argument("--build-cpp", action="store_true", help="build llama-speculative-simple first (bench/cppbuild.py)")
    args = ap.parse_args()

    target, drafter = speed_pair(args.workdir)
    prompts = sp.prompts(args.prompts)
    settings = RuntimeSettings(n_ctx=1024, threads=args.threads, flash_attn="off", cache_type_k="f32",
                               cache_type_v="f32")
    r = run_bench(target, drafter, prompts, max_tokens=args.tokens, ks=KS, oracle=True, settings=settings,
                  repeats=args.repeats)
    print(f"{'mode':<18}{'tok/s':>9}{'vs target':>11}{'accept':>8}  by position")
    for m in r.modes:
        print(f"{m.mode:<18}{m.tokens_per_second:>9.1f}{m.speedup:>10.2f}x{m.acceptance:>8.2f}  "
              + " ".join(f"{a:.2f}" for a in m.acceptance_by_position))

    exe, cpp = build_cpp_loop() if args.build_cpp else find_cpp_loop(), None
    if exe is None:
        cpp_note = ("llama.cpp's C++ loop: skipped, `llama-speculative-simple` is not built (`--build-cpp` builds it "
                    "with bench/cppbuild.py, or set LLAMA_SPECULATIVE_SIMPLE).")
    else:
        cpp = {k: cpp_loop(exe, target, drafter, prompts, args.tokens, k, args.threads, args.repeats) for k in KS}
        shown = exe.relative_to(ROOT) if exe.is_relative_to(ROOT) else exe
        cpp_note = (f"llama.cpp's C++ loop: `{shown}` (same prompts, fastest of {args.repeats} per prompt by its "
                    "own timer).")
        for k, c in cpp.items():
            print(f"{'C++ loop k=' + str(k):<18}{c['tokens_per_second']:>9.1f}"
                  f"{c['tokens_per_second'] / r.mode('target').tokens_per_second:>10.2f}x")
    print(cpp_note)

    fixed = [r.mode(f"k={k}") for k in KS]
    best = max(fixed, key=lambda m: m.tokens_per_second)
    adaptive = r.mode("adaptive")
    claims = [f"MTP vs the target alone: best fixed {best.mode} {best.speedup:.2f}x, adaptive {adaptive.speedup:.2f}x "
              f"(claim >= 1.5x: {'holds' if max(best.speedup, adaptive.speedup) >= 1.5 else 'does not hold'})",
              f"adaptive vs the best fixed k ({best.mode}): {adaptive.tokens_per_second / best.tokens_per_second:.2f}x "
              f"(claim >= 1: {'holds' if adaptive.tokens_per_second >= best.tokens_per_second else 'does not hold'})",
              f"same tokens as the target alone: {min(m.same_output or 0 for m in r.modes)}/{r.prompts} prompts in "
              f"every mode"]
    for c in claims:
        print(c)
    sampled = sampled_runs(target, drafter, prompts, settings, args)
    if args.write_docs:
        write_section(DOCS, "speed-pair", markdown(r, cpp, cpp_note, claims, args, sampled))
    return 0


if __name__ == "__main__":
    sys.exit(main())
