#!/usr/bin/env python3
"""MTP over llama.cpp RPC: the speed pair all on the local CPU vs split over the CPU and two rpc-servers, on
loopback and with network latency, in one run.

    python bench/bench_rpc.py                       # builds .work/speed/pair on first use
    python bench/bench_rpc.py -n 128 --prompts 3 --repeats 2 --rtt-ms 1,5 --rtt-repeats 1 --write-docs

Rows, tokens/s for each placement and the ratio to the target alone *of that placement*: the target alone, MTP at
k = 1..4 and adaptive, and the target with no drafter loaded (see below). The claim checked: MTP gains more over
RPC than locally (one verify batch of k + 1 tokens costs one network round trip per server, like one token).
Per-round RPC overhead: seconds per target step split minus seconds per target step local, mode by mode (a round
= one verify batch + its k draft steps).

Loopback has no latency, so ``--rtt-ms 1,5`` adds placements with network latency, two per RTT, each on fresh
rpc-servers a and b (``--device CPU,RPC[a],RPC[b]``, the drafter on b, which holds the target's last layers and
output layer) with a delaying proxy (bench/rpc_latency.py: every chunk held RTT/2 each way) in front of
  - both servers ("drafter remote"): every device is remote, so the drafter is too -- the planner's layout for a
    client with no GPU (``plan --vram 0 --rpc A --rpc B``); the worst case, each draft step crosses the network;
  - a only ("drafter local"): b on plain loopback stands for the local GPU -- the planner's layout for a local GPU
    plus remote hosts (``plan --vram 24GiB --rpc HOST:PORT=24GiB``: rpc-servers first, so the last layers, the
    output layer and the drafter stay local).
On plain loopback the two are the same placement (one column). The proxy is checked against an echo server first.
The RPC commands and replies of one round are counted through the first RTT's proxies (target alone and k=3),
which says how many network round trips a round costs. ``--rtt-tokens`` / ``--rtt-prompts`` / ``--rtt-repeats``
shorten the delayed runs (shorter runs' tokens are compared with the local run's as a prefix).

"Target, no drafter": the target loaded without a drafter. With a drafter the target context returns its
hidden-state rows on every decode, the target alone too, which costs it one more read of the last device (over
RPC: one more round trip to that server); the ratio of the two target rows is what that read costs.

Every placement uses one compute thread per participant (the local CPU and each rpc-server), so the split does the
same arithmetic as the local run and the difference is what RPC adds; the servers and the client share this
machine's cores, and a layer split computes its devices one after another. Flash attention off, f32 KV cache (the
output is the same tokens in every mode and placement: checked). ``--write-docs`` rewrites the rpc section of
docs/bench.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_speed_pair import speed_pair  # noqa: E402
from docsection import write_section  # noqa: E402
from rpc_latency import DelayProxy, echo_server, round_trip_ms  # noqa: E402

from gguf_mtp.bench import BenchResult, ModeResult, run_bench  # noqa: E402
from gguf_mtp.runtime import devices  # noqa: E402
from gguf_mtp.runtime_build import rpc_server_path  # noqa: E402
from gguf_mtp.settings import RuntimeSettings  # noqa: E402
from gguf_mtp.tiny import speed_pair as sp  # noqa: E402

DOCS = ROOT / "docs" / "bench.md"
KS = (1, 2, 3, 4)
SERVERS = 2
# layout -> how many of the servers (from the first) sit behind the delaying proxy; the rest stay on loopback
LAYOUTS = {"drafter remote": SERVERS, "drafter local": SERVERS - 1}
COUNT_KS = (0, 3)  # modes whose RPC traffic per round is counted (0: the target alone)
COUNT_TOKENS = (8, 40)  # two generations, differenced: load, prefill and graph building cancel
BARE = "target, no drafter"


def start_servers(n: int, threads: int) -> list[tuple[subprocess.Popen, str]]:
    """n rpc-servers on loopback ports (gguf-mtp rpc-server), each listening before this returns."""
    servers = []
    try:
        for _ in range(n):
            servers.append(devices.launch_local_server(threads))
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


def split_settings(base: RuntimeSettings, eps: list[str]) -> RuntimeSettings:
    """CPU first, then the servers in order; the drafter on the last (as the planner puts it: search._with_split)."""
    devices = ["CPU", *[f"RPC[{ep}]" for ep in eps]]
    return base.replace(rpc=eps, devices=devices, tensor_split=[1.0] * len(devices), drafter_device=devices[-1])


def count_round_trips(target, drafter, prompt: str, settings: RuntimeSettings, proxy: DelayProxy,
                      proxied: int) -> dict:
    """{k: per proxied server {"replies": n, "commands": {name: n}}} per round, through ``proxy`` (whose first
    ``proxied`` upstreams are servers)."""
    from gguf_mtp.runtime.adaptive import FixedK
    from gguf_mtp.runtime.engine import Engine
    from gguf_mtp.runtime.loop import generate

    def delta(a: dict, b: dict) -> dict:
        names = set(a["commands"]) | set(b["commands"])
        return {"replies": b["replies"] - a["replies"],
                "commands": {c: b["commands"].get(c, 0) - a["commands"].get(c, 0) for c in names}}

    out = {}
    with Engine.load(target, drafter, settings, k_max=max(COUNT_KS)) as eng:
        p = eng.tokenize(prompt)
        for k in COUNT_KS:
            # warm-up, each counted generation once: graphs built, and ggml-rpc's cache of alloc sizes (by tensor
            # shape and op parameters, per process) holds every shape the counted runs meet (greedy: the same
            # batches), else the GET_ALLOC_SIZE queries of a shape's first use, such as a generation's shortened
            # last round, are counted as if every round paid them
            for n in COUNT_TOKENS:
                generate(eng, p, n, chooser=FixedK(k), ignore_eog=True)
            runs = []
            for n in COUNT_TOKENS:
                before = proxy.counts()
                g = generate(eng, p, n, chooser=FixedK(k), ignore_eog=True)
                runs.append((g.stats.rounds, [delta(a, b) for a, b in zip(before, proxy.counts())]))
            (r0, c0), (r1, c1) = runs
            longer = [delta(a, b) for a, b in zip(c0[:proxied], c1[:proxied])]  # the extra rounds' traffic
            out[k] = [{"replies": d["replies"] / (r1 - r0),
                       "commands": {c: v / (r1 - r0) for c, v in sorted(d["commands"].items())}} for d in longer]
    return out


def count_lines(layout: str, counts: dict) -> list[str]:
    lines = []
    for k, per_server in counts.items():
        mode = "target alone (1 token)" if k == 0 else f"k={k} (verify {k + 1} tokens + {k} draft steps)"
        parts = []
        for i, c in enumerate(per_server):
            cmds = ", ".join(f"{v:.2g} {name}" for name, v in c["commands"].items() if v)
            parts.append(f"server {'ab'[i]}: {c['replies']:.2g} replies ({cmds})")
        total = sum(c["replies"] for c in per_server)
        lines.append(f"{layout}, RPC traffic per round through the proxy, {mode}: {total:.2g} network round trips "
                     "the client waits for; " + "; ".join(parts))
    return lines


@dataclass
class Placement:
    """One split run: ``rtt`` ms added per round trip to the proxied servers (0: plain loopback), the echo round
    trip measured through its proxy (None: no proxy); ``bare`` the target with no drafter loaded."""

    rtt: float
    layout: str
    result: BenchResult
    bare: ModeResult
    measured: float | None = None

    @property
    def label(self) -> str:
        return "loopback" if not self.rtt else f"+{self.rtt:g} ms RTT, {self.layout}"

    def row(self, i: int) -> ModeResult:
        """Mode i of the table: the modes of ``result``, then the bare target."""
        return self.result.modes[i] if i < len(self.result.modes) else self.bare


def bare_target(target, prompts, settings: RuntimeSettings, **bench) -> ModeResult:
    """The target alone with no drafter loaded (no hidden-state rows), its speed-up left for ``with_bare``."""
    r = run_bench(target, None, prompts, ks=(), adaptive=False, settings=settings, **bench)
    m = r.modes[0]
    m.mode = BARE
    return m


def with_bare(result: BenchResult, bare: ModeResult) -> ModeResult:
    bare.speedup = bare.tokens_per_second / result.mode("target").tokens_per_second
    return bare


def claims_for(local: Placement, split: Placement) -> list[str]:
    mtp = [*[f"k={k}" for k in KS], "adaptive"]
    lo, sr = local.result, split.result
    best_local = max(mtp, key=lambda m: lo.mode(m).speedup)
    best_split = max(mtp, key=lambda m: sr.mode(m).speedup)
    gains_more = sr.mode(best_split).speedup > lo.mode(best_local).speedup

    def over_bare(p: Placement, m: str) -> float:
        return p.result.mode(m).tokens_per_second / p.bare.tokens_per_second

    return [
        f"MTP over RPC vs MTP locally: best split {best_split} {sr.mode(best_split).speedup:.2f}x over the split "
        f"target alone, best local {best_local} {lo.mode(best_local).speedup:.2f}x over the local target alone "
        f"(claim 'MTP gains more over RPC': {'holds' if gains_more else 'does not hold'})",
        "speed-up over the target alone by mode, split vs local: "
        + ", ".join(f"{m} {sr.mode(m).speedup:.2f}x vs {lo.mode(m).speedup:.2f}x" for m in mtp)
        + f" (larger over RPC in {sum(sr.mode(m).speedup > lo.mode(m).speedup for m in mtp)} of {len(mtp)} modes)",
        f"over the target with no drafter loaded instead (no hidden-state read): best split {best_split} "
        f"{over_bare(split, best_split):.2f}x, best local {best_local} {over_bare(local, best_local):.2f}x "
        f"(the read inflates the split speed-up by {split.bare.speedup:.2f}x, the local one by "
        f"{local.bare.speedup:.2f}x)",
    ]


def same_tokens(local: Placement, split: Placement) -> bool:
    """Every row's tokens equal the local run's (a prefix of them where the split run was shorter), the bare
    target's too, and the local bare target's equal the local target alone's."""
    rows = range(len(local.result.modes) + 1)
    pairs = [(local.row(i), split.row(i)) for i in rows] + [(local.result.modes[0], local.bare)]
    return all(len(b) <= len(a) and a[:len(b)] == b for lm, rm in pairs for a, b in zip(lm.outputs, rm.outputs))


def markdown(local: Placement, placements: list[Placement], claims: list[str]) -> str:
    lr = local.result
    workloads = sorted({(p.result.prompts, p.result.max_tokens, p.result.repeats) for p in placements if p.rtt}
                       - {(lr.prompts, lr.max_tokens, lr.repeats)})
    measured = {p.rtt: p.measured for p in placements if p.measured is not None}
    lines = [
        f"Speed pair (`tools/make_speed_pair.py`), {lr.prompts} prompt(s) x {lr.max_tokens} tokens, greedy, "
        f"fastest of {lr.repeats}; {platform.machine()}, {os.cpu_count()} CPUs shared by the client and the "
        f"servers; one compute thread per participant; flash attention off, f32 KV cache. Split: "
        f"`--rpc` {SERVERS} rpc-servers on loopback, `--device CPU,RPC[a],RPC[b] --tensor-split 1,1,1 "
        f"--device-draft RPC[b]` (b holds the target's last layers and output layer; the drafter reads their KV). "
        f"Added RTT: `bench/rpc_latency.py` (each chunk held RTT/2 each way) in front of a and b (drafter remote) "
        f"or of a only (drafter local: b stands for the local GPU); measured echo round trip (64 B, median of 50): "
        + ", ".join(f"{r:g} ms nominal -> {m:.2f} ms" for r, m in measured.items()) + "."
        + "".join(f" Delayed runs: {n} prompt(s) x {t} tokens, fastest of {r} (to keep the run short)."
                  for n, t, r in workloads),
        "",
        "Tokens/s, and in brackets the speed-up over the target alone of the same placement:",
        "",
        "| mode | local | " + " | ".join(p.label for p in placements) + " |",
        "|---|" + "---:|" * (1 + len(placements)),
    ]
    n_rows = len(lr.modes) + 1
    for i in range(n_rows):
        lm = local.row(i)
        lines.append(f"| {lm.mode} | {lm.tokens_per_second:.1f} ({lm.speedup:.2f}x) | " + " | ".join(
            f"{p.row(i).tokens_per_second:.1f} ({p.row(i).speedup:.2f}x)" for p in placements) + " |")
    lines += [
        "",
        "Seconds per round (one verify batch and its draft steps) locally, and what each split placement adds to it "
        "(RPC overhead per round); for an added RTT, in brackets: the overhead beyond loopback's, in measured RTTs "
        "(the network round trips a round waits for):",
        "",
        "| mode | local | " + " | ".join(p.label for p in placements) + " |",
        "|---|" + "---:|" * (1 + len(placements)),
    ]
    loop = next(p for p in placements if not p.rtt)
    for i in range(n_rows):
        lm = local.row(i)
        t_local, cells = seconds_per_round(lm), []
        for p in placements:
            extra = seconds_per_round(p.row(i)) - t_local
            cell = f"{extra * 1e3:+.1f} ms"
            if p.rtt:
                beyond = seconds_per_round(p.row(i)) - seconds_per_round(loop.row(i))
                cell += f" ({beyond * 1e3 / p.measured:.1f})"
            cells.append(cell)
        lines.append(f"| {lm.mode} | {t_local * 1e3:.1f} ms | " + " | ".join(cells) + " |")
    lines += ["", *[f"- {c}" for c in claims]]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / ".work" / "speed" / "pair")
    ap.add_argument("-n", "--tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--rtt-ms", default="", help="added round-trip times to run too, comma-separated (e.g. 1,5)")
    ap.add_argument("--rtt-tokens", type=int, help="tokens per prompt with an added RTT (default: --tokens)")
    ap.add_argument("--rtt-prompts", type=int, help="prompts with an added RTT, the first of --prompts (default: all)")
    ap.add_argument("--rtt-repeats", type=int, help="repeats with an added RTT (default: --repeats)")
    ap.add_argument("--write-docs", action="store_true", help="rewrite the rpc section of docs/bench.md")
    args = ap.parse_args()
    if rpc_server_path() is None:
        raise SystemExit("this runtime has no rpc-server (it was built with --no-rpc): gguf-mtp runtime build")
    rtts = [float(r) for r in args.rtt_ms.split(",") if r.strip()]
    if any(r <= 0 for r in rtts):
        raise SystemExit(f"expected positive round-trip times, got --rtt-ms {args.rtt_ms}")

    target, drafter = speed_pair(args.workdir)
    prompts = sp.prompts(args.prompts)
    base = RuntimeSettings(n_ctx=1024, threads=1, flash_attn="off", cache_type_k="f32", cache_type_v="f32")
    full = dict(max_tokens=args.tokens, repeats=args.repeats)
    delayed = dict(max_tokens=args.rtt_tokens or args.tokens, repeats=args.rtt_repeats or args.repeats)
    t0 = time.monotonic()

    def placement(rtt: float, layout: str, settings: RuntimeSettings, ps: list[str], bench: dict,
                  measured: float | None = None) -> Placement:
        result = run_bench(target, drafter, ps, ks=KS, settings=settings, **bench)
        bare = with_bare(result, bare_target(target, ps, settings, **bench))
        return Placement(rtt, layout, result, bare, measured)

    # local first: once servers are added, llama.cpp's default device choice (no --device) would include them
    local = placement(0.0, "local", base, prompts, full)
    # An rpc-server serves one client connection at a time and llama.cpp keeps each endpoint's connection for the
    # process's life: every placement gets fresh servers, and all stay up (idle) until the end.
    servers, proxies, placements, counts = [], [], [], {}
    try:
        servers += start_servers(SERVERS, threads=1)
        placements.append(placement(0.0, "", split_settings(base, [ep for _, ep in servers]), prompts, full))
        echo = echo_server()
        direct_rtt = round_trip_ms(echo)
        for rtt in rtts:
            for layout, proxied in LAYOUTS.items():
                fresh = start_servers(SERVERS, threads=1)
                servers += fresh
                eps = [ep for _, ep in fresh]
                proxies.append(DelayProxy(rtt, [*eps[:proxied], echo]))
                *via, echo_via = proxies[-1].listen
                measured = round_trip_ms(echo_via)
                print(f"+{rtt:g} ms RTT, {layout}: echo round trip through the proxy {measured:.2f} ms "
                      f"(direct {direct_rtt:.2f} ms)")
                settings = split_settings(base, [*via, *eps[proxied:]])
                if layout not in counts:
                    counts[layout] = count_round_trips(target, drafter, prompts[0], settings, proxies[-1], proxied)
                placements.append(placement(rtt, layout, settings, prompts[:args.rtt_prompts], delayed, measured))
    finally:
        for proxy in proxies:
            proxy.close()
        stop_servers(servers)

    print(f"{'mode':<20}{'local':>8}{'x':>7}" + "".join(f"{p.label:>34}{'x':>7}{'RPC ms/round':>14}"
                                                         for p in placements))
    for i in range(len(local.result.modes) + 1):
        lm = local.row(i)
        print(f"{lm.mode:<20}{lm.tokens_per_second:>8.1f}{lm.speedup:>6.2f}x" + "".join(
            f"{p.row(i).tokens_per_second:>34.1f}{p.row(i).speedup:>6.2f}x"
            f"{(seconds_per_round(p.row(i)) - seconds_per_round(lm)) * 1e3:>+14.1f}" for p in placements))
    claims = []
    for p in placements:
        claims += [f"{p.label}: {c}" for c in claims_for(local, p)]
    for layout, c in counts.items():
        claims += count_lines(layout, c)
    claims += [
        "same tokens local and split in every mode and placement, with and without a drafter loaded: "
        + ("yes" if all(same_tokens(local, p) for p in placements) else "NO"),
        f"run time {time.monotonic() - t0:.0f} s",
    ]
    for c in claims:
        print(c)
    if args.write_docs:
        write_section(DOCS, "rpc", markdown(local, placements, claims))
    return 0


if __name__ == "__main__":
    sys.exit(main())
