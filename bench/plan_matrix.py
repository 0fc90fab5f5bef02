#!/usr/bin/env python3
"""The planner's memory model against llama.cpp's own accounting, over the full matrix.

For every variant x target quant x context x (KV type, flash attention), with the MTP drafter context attached
(ctx_type MTP, ctx_other = the target context, shapes as gguf-mtp's engine sets them), llama.cpp loads full-size
sparse skeletons with no_alloc (nothing allocated, no weight read) and reports weights, KV cache and compute
buffers; the planner computes the same from its own arithmetic. Also the vision projector against libmtmd's
estimate (a 256-token image: the warm-up graph libmtmd sizes itself with).

Prints one row per configuration and the worst error per component; --json writes every row.

    python3 bench/plan_matrix.py [--variants E2B,31B] [--quants Q4_K_M,Q8_0] [--ctx 4096,32768,131072]
                                 [--dir /tmp/gguf-mtp-skeletons] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gguf_mtp.planning.layout import layout_for  # noqa: E402
from gguf_mtp.planning.probe import compare_with_llama  # noqa: E402
from gguf_mtp.settings import RuntimeSettings  # noqa: E402
from gguf_mtp.planning.skeleton import write_sparse  # noqa: E402

KV_FA = (("f16", "on"), ("f16", "off"), ("q8_0", "on"), ("q4_0", "on"))
LIMITS = {"compute": 0.10, "weights": 0.005, "KV cache": 0.005}  # first match wins


def skeleton(d: Path, variant: str, role: str, quant: str | None) -> Path:
    p = d / f"{variant}-{role}-{quant or 'base'}.gguf"
    if not p.exists():
        write_sparse(p, layout_for(variant, role, quant))
    return p


def limit(item: str) -> float:
    return next(v for k, v in LIMITS.items() if k in item) if any(k in item for k in LIMITS) else 0.10


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="E2B,E4B,26B-A4B,31B")
    ap.add_argument("--quants", default="Q4_K_M,Q8_0")
    ap.add_argument("--drafter-quant", default="Q8_0")
    ap.add_argument("--ctx", default="4096,32768,131072")
    ap.add_argument("--dir", default="/tmp/gguf-mtp-skeletons")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    rows, worst = [], {}
    t0 = time.time()
    print(f"{'variant':8} {'quant':7} {'ctx':>7} {'kv':5} {'fa':3}  {'item':38} {'planner MiB':>12} {'llama MiB':>11} {'err':>7}")
    for variant in args.variants.split(","):
        drafter = skeleton(d, variant, "drafter", args.drafter_quant)
        mmproj = skeleton(d, variant, "mmproj", None)
        for quant in args.quants.split(","):
            target = skeleton(d, variant, "target", quant)
            for n_ctx in (int(c) for c in args.ctx.split(",")):
                for kv, fa in KV_FA:
                    s = RuntimeSettings(n_ctx=n_ctx, cache_type_k=kv, cache_type_v=kv, flash_attn=fa)
                    with_mm = n_ctx == int(args.ctx.split(",")[0]) and kv == "f16"
                    for a in compare_with_llama(target, drafter, s, mmproj if with_mm else None):
                        err = a.error
                        flag = "" if abs(err) <= limit(a.item) or abs(a.planner - a.llama) < 2**21 else "  <-- over"
                        print(f"{variant:8} {quant:7} {n_ctx:7} {kv:5} {fa:3}  {a.item:38} {a.planner / 2**20:12.1f} "
                              f"{a.llama / 2**20:11.1f} {err * 100:+6.2f}%{flag}", flush=True)
                        rows.append({"variant": variant, "quant": quant, "n_ctx": n_ctx, "kv": kv, "fa": fa, **a.to_dict()})
                        key = a.item.split(" (")[0]
                        if "compute" not in key or abs(a.planner - a.llama) >= 2**21:
                            worst[key] = max(worst.get(key, 0.0), abs(err))
    print(f"\nworst |error| per item ({len(rows)} comparisons, {time.time() - t0:.0f} s; compute buffers under 2 MiB "
          "apart are not counted):")
    for k, v in sorted(worst.items()):
        print(f"  {k:40} {v * 100:6.2f}%  (limit {limit(k) * 100:.1f}%)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows, "worst": worst}, indent=1))
    return 0 if all(v <= limit(k) for k, v in worst.items()) else 1


if __name__ == "__main__":
    sys.exit(main())
