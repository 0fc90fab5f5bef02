#!/usr/bin/env python3
"""MTP over llama.cpp RPC: the speed pair all on the local CPU vs split over the CPU and two rpc-servers on
loopback, in one run.

    python bench/bench_rpc.py                       # builds .work/speed/pair on first use
    python bench/bench_rpc.py -n 64 --prompts 2 --write-docs

Rows, tokens/s for each placement and the ratio to the target alone *of that placement*: the target alone, MTP at
k = 1..4 and adaptive. The claim checked: MTP gains more over RPC than locally (one verify batch of k + 1 tokens
costs one network round trip per server, like one token). Per-round RPC overhead: seconds per target step split
minus seconds per target step local, mode by mode (a round = one verify batch + its k draft steps).

Both placements use one compute thread per participant (the local CPU and each rpc-server), so the split does the
same arithmetic as the local run and the difference is what RPC adds; the servers and the client share this
machine's cores, and a layer split computes its devices one after another. Flash attention off, f32 KV cache (the
output is the same tokens in every mode and placement: checked). ``--write-docs`` rewrites the rpc section of
docs/bench.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_speed_pair import speed_pair  # noqa: E402
from docsection import write_section  # noqa: E402

from gguf_mtp.bench import BenchResult, run_bench  # noqa: E402
from gguf_mtp.runtime_build import rpc_server_path  # noqa: E402
from gguf_mtp.settings import RuntimeSettings  # noqa: E402
from gguf_mtp.tiny import speed_pair as sp  # noqa: E402

DOCS = ROOT / "docs" / "bench.md"
KS = (1, 2, 3, 4)
SERVERS = 2


def start_servers(n: int, threads: int) -> list[tuple[subprocess.Popen, str]]:
    """n rpc-servers on loopback ports (gguf-mtp rpc-server), each listening before this returns."""
    servers = []
    try:
        for _ in range(n):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            proc = subprocess.Popen([sys.executable, "-m", "gguf_mtp", "rpc-server", "--port", str(port), "--threads",
                                     str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            servers.append((proc, f"127.0.0.1:{port}"))
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"rpc-server on port {port} did not start") from None
                    time.sleep(0.2)
        return servers
    except BaseException:
        stop_servers(servers)
        raise


def stop_servers(servers: list[tuple[subprocess.Popen, str]]) -> None:
    for proc, _ in servers:
        proc.kill()
        proc.wait(timeout=10)


def seconds_per_round(m) -> float:
    return m.seconds / m.rounds if m.rounds else 0.0


def markdown(local: BenchResult, split: BenchResult, claims: list[str]) -> str:
    lines = [
        f"Speed pair (`tools/make_speed_pair.py`), {local.prompts} prompt(s) x {local.max_tokens} tokens, greedy, "
        f"fastest of {local.repeats}; {platform.machine()}, {os.cpu_count()} CPUs shared by the client and the "
        f"servers; one compute thread per participant; flash attention off, f32 KV cache. Split: "
        f"`--rpc` {SERVERS} rpc-servers on loopback, `--device CPU,RPC[a],RPC[b] --tensor-split 1,1,1`, the drafter "
        f"on the last server (it reads the KV of the target's last layers).",
        "",
        "| mode | local tokens/s | vs target alone | split tokens/s | vs target alone (split) | split / local | "
        "s per round local | s per round split | RPC overhead per round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lm, rm in zip(local.modes, split.modes):
        lr, rr = seconds_per_round(lm), seconds_per_round(rm)
        lines.append(f"| {lm.mode} | {lm.tokens_per_second:.1f} | {lm.speedup:.2f}x | {rm.tokens_per_second:.1f} | "
                     f"{rm.speedup:.2f}x | {rm.tokens_per_second / lm.tokens_per_second:.2f}x | {lr * 1e3:.1f} ms | "
                     f"{rr * 1e3:.1f} ms | {(rr - lr) * 1e3:+.1f} ms |")
    lines += ["", *[f"- {c}" for c in claims]]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / ".work" / "speed" / "pair")
    ap.add_argument("-n", "--tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--write-docs", action="store_true", help="rewrite the rpc section of docs/bench.md")
    args = ap.parse_args()
    if rpc_server_path() is None:
        raise SystemExit("this runtime has no rpc-server (it was built with --no-rpc): gguf-mtp runtime build")

    target, drafter = speed_pair(args.workdir)
    prompts = sp.prompts(args.prompts)
    base = RuntimeSettings(n_ctx=1024, threads=1, flash_attn="off", cache_type_k="f32", cache_type_v="f32")
    t0 = time.monotonic()
    # local first: once servers are added, llama.cpp's default device choice (no --device) would include them
    local = run_bench(target, drafter, prompts, max_tokens=args.tokens, ks=KS, settings=base, repeats=args.repeats)
    servers = start_servers(SERVERS, threads=1)
    try:
        eps = [ep for _, ep in servers]
        split_settings = base.replace(rpc=eps, devices=["CPU", *[f"RPC[{ep}]" for ep in eps]],
                                      tensor_split=[1.0] * (SERVERS + 1))
        split = run_bench(target, drafter, prompts, max_tokens=args.tokens, ks=KS, settings=split_settings,
                          repeats=args.repeats)
    finally:
        stop_servers(servers)

    print(f"{'mode':<10}{'local':>8}{'x':>7}{'split':>8}{'x':>7}{'split/local':>12}{'RPC ms/round':>14}")
    for lm, rm in zip(local.modes, split.modes):
        print(f"{lm.mode:<10}{lm.tokens_per_second:>8.1f}{lm.speedup:>6.2f}x{rm.tokens_per_second:>8.1f}"
              f"{rm.speedup:>6.2f}x{rm.tokens_per_second / lm.tokens_per_second:>11.2f}x"
              f"{(seconds_per_round(rm) - seconds_per_round(lm)) * 1e3:>+14.1f}")
    fixed = [f"k={k}" for k in KS]
    mtp = [*fixed, "adaptive"]
    best_local = max(mtp, key=lambda m: local.mode(m).speedup)
    best_split = max(mtp, key=lambda m: split.mode(m).speedup)
    gains_more = split.mode(best_split).speedup > local.mode(best_local).speedup
    same = all(a == b for lm, rm in zip(local.modes, split.modes) for a, b in zip(lm.outputs, rm.outputs))
    overhead = [seconds_per_round(split.mode(m)) - seconds_per_round(local.mode(m)) for m in ["target", *fixed]]
    claims = [
        f"MTP over RPC vs MTP locally: best split {best_split} {split.mode(best_split).speedup:.2f}x over the split "
        f"target alone, best local {best_local} {local.mode(best_local).speedup:.2f}x over the local target alone "
        f"(claim 'MTP gains more over RPC': {'holds' if gains_more else 'does not hold'})",
        "speed-up over the target alone by mode, split vs local: "
        + ", ".join(f"{m} {split.mode(m).speedup:.2f}x vs {local.mode(m).speedup:.2f}x" for m in mtp)
        + f" (larger over RPC in {sum(split.mode(m).speedup > local.mode(m).speedup for m in mtp)} of {len(mtp)} modes)",
        "RPC overhead per round (split minus local seconds per target step), target alone, k=1..4: "
        + ", ".join(f"{o * 1e3:+.1f} ms" for o in overhead),
        f"same tokens local and split in every mode: {'yes' if same else 'NO'}",
        f"run time {time.monotonic() - t0:.0f} s",
    ]
    for c in claims:
        print(c)
    if args.write_docs:
        write_section(DOCS, "rpc", markdown(local, split, claims))
    return 0


if __name__ == "__main__":
    sys.exit(main())
