#!/usr/bin/env python3
"""Batched MTP on the speed pair: aggregate tokens/s at 1, 2, 4, 8 concurrent streams, side by side in one run.

    python bench/bench_batch.py                    # builds .work/speed/pair on first use
    python bench/bench_batch.py -n 96 --repeats 3 --threads 2 --streams 1,2,4,8

One ``BatchEngine`` with 8 slots and one ``Scheduler`` per mode, kept across runs as a server keeps its
(runtime/scheduler.py: adaptive k keeps the costs and acceptance it has learnt). For each number of streams N,
N requests (different prompts, greedy, ``-n`` tokens each, end-of-generation ignored) are submitted at once; a run
takes from the first submission to the last request's end. Modes, each run ``--repeats`` times in turn (the
fastest run counts): the target alone (``draft="off"``), MTP with k = 3, MTP with adaptive k (BatchAdaptiveK on
the batch's measured costs). Rows: aggregate tokens/s, each MTP mode's ratio to the target alone at the same N,
acceptance, mean time to first token. Every slot's cache is emptied before each run (no prefix reuse), and every
mode's output is checked against the target alone's (same tokens: flash attention off, f32 KV cache).
The single-sequence loop (runtime/loop.py) on the same prompts is printed first for reference.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_speed_pair import speed_pair  # noqa: E402

from gguf_mtp.runtime.adaptive import FixedK  # noqa: E402
from gguf_mtp.runtime.batch_engine import BatchEngine  # noqa: E402
from gguf_mtp.runtime.engine import Engine  # noqa: E402
from gguf_mtp.runtime.loop import generate  # noqa: E402
from gguf_mtp.runtime.scheduler import Finished, Request, Scheduler  # noqa: E402
from gguf_mtp.settings import RuntimeSettings  # noqa: E402
from gguf_mtp.tiny import speed_pair as sp  # noqa: E402

MODES = {"target": "off", "k=3": 3, "adaptive": "adaptive"}  # mode name -> Request.draft
SLOT_CTX = 512


@dataclass
class RunResult:
    seconds: float
    tokens: int
    proposed: int
    accepted: int
    ttft: float  # mean seconds from submission to the first token
    outputs: list[list[int]]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def run(engine: BatchEngine, sched: Scheduler, prompts: list[list[int]], n: int, draft) -> RunResult:
    for seq in range(engine.n_seq):  # a cold cache: every run reads its prompts
        engine.truncate(seq, 0)
    t0 = time.perf_counter()
    handles = [sched.submit(Request(p, n, draft=draft, ignore_eog=True)) for p in prompts]
    first: dict[int, float] = {}
    while sched.step():
        for h in handles:
            if h.id not in first and not h.events.empty():
                first[h.id] = time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    fins = [list(h)[-1] for h in handles]
    assert all(isinstance(f, Finished) for f in fins), fins
    return RunResult(seconds, sum(len(f.tokens) for f in fins), sum(f.stats.proposed for f in fins),
                     sum(f.stats.accepted for f in fins), sum(first.values()) / len(first), [f.tokens for f in fins])


def reference(target: Path, drafter: Path, prompts: list[str], n: int, settings: RuntimeSettings) -> None:
    with Engine.load(target, drafter, settings) as eng:
        for mode, chooser in (("target", lambda: FixedK(0)), ("k=3", lambda: FixedK(3))):
            generate(eng, eng.tokenize(prompts[0]), 8, chooser=chooser(), ignore_eog=True)  # warm-up
            gens = [generate(eng, eng.tokenize(p), n, chooser=chooser(), ignore_eog=True) for p in prompts[:2]]
            tps = sum(g.stats.tokens for g in gens) / sum(g.stats.generate_time for g in gens)
            print(f"single-sequence loop, {mode:<8} {tps:8.1f} tok/s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / ".work" / "speed" / "pair")
    ap.add_argument("-n", "--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", default="1,2,4,8")
    args = ap.parse_args()

    streams = [int(s) for s in args.streams.split(",")]
    target, drafter = speed_pair(args.workdir)
    texts = sp.prompts(max(streams))
    n_seq = max(streams)
    settings = RuntimeSettings(n_ctx=n_seq * SLOT_CTX, threads=args.threads, flash_attn="off", cache_type_k="f32",
                               cache_type_v="f32")
    print(f"speed pair, greedy, {args.tokens} tokens per stream, {args.threads} thread(s), fastest of "
          f"{args.repeats}; {platform.machine()}, {os.cpu_count()} CPUs; flash attention off, f32 KV cache")
    reference(target, drafter, texts, args.tokens, settings.replace(n_ctx=SLOT_CTX))
    with BatchEngine.load(target, drafter, settings, n_seq=n_seq) as engine:
        prompts = [engine.tokenize(t) for t in texts]
        scheds = {mode: Scheduler(engine) for mode in MODES}
        for mode, draft in MODES.items():  # warm-up: weights faulted in, graphs built
            run(engine, scheds[mode], prompts[:2], 8, draft)
        print(f"{'streams':>7} {'target tok/s':>13} {'k=3 tok/s':>10} {'vs target':>9} {'adaptive':>9} "
              f"{'vs target':>9} {'accept k=3':>10} {'accept ad.':>10} {'TTFT ms (t/k3/ad)':>19}  same output")
        for n_streams in streams:
            best: dict[str, RunResult] = {}
            for _ in range(args.repeats):
                for mode, draft in MODES.items():
                    r = run(engine, scheds[mode], prompts[:n_streams], args.tokens, draft)
                    if mode not in best or r.seconds < best[mode].seconds:
                        best[mode] = r
            base, k3, ad = best["target"], best["k=3"], best["adaptive"]
            same = all(m.outputs == base.outputs for m in best.values())
            ttft = "/".join(f"{m.ttft * 1000:.0f}" for m in (base, k3, ad))
            print(f"{n_streams:>7} {base.tokens_per_second:>13.1f} {k3.tokens_per_second:>10.1f} "
                  f"{k3.tokens_per_second / base.tokens_per_second:>8.2f}x {ad.tokens_per_second:>9.1f} "
                  f"{ad.tokens_per_second / base.tokens_per_second:>8.2f}x {k3.acceptance:>10.2f} "
                  f"{ad.acceptance:>10.2f} {ttft:>19}  {'yes' if same else 'NO'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
