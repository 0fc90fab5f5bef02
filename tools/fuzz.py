#!/usr/bin/env python3
"""The long fuzz run, by hand: every target of tests/fuzz_targets.py for N inputs, findings collected, not fatal.

    python tools/fuzz.py                        # 10000 inputs per target
    python tools/fuzz.py -n 2000 --target gguf-structured --out /tmp/fuzz-findings

Prints per-target counts (inputs, accepted, refused, crashes, slow, over budget, slowest input, largest memory
peak per input byte) as JSON, and writes one reproducer per distinct finding under --out (a .bin file, or a
directory of files for config inputs). Copy a reproducer into tests/corpus/<kind>/ once its bug is fixed; the
CI run replays the corpus (tests/test_hardening_fuzz.py). The short CI run is the same targets with a few
hundred inputs each.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import hypothesis  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fuzz_targets as ft  # noqa: E402


def _targets(work: Path) -> dict:
    from gguf_mtp.tiny import make_tiny_models

    gguf_seeds = ft.gguf_seeds(work)
    st_seeds = ft.safetensors_seeds()
    tiny = work / "tiny"
    make_tiny_models(tiny)
    cfg_seeds = ft.config_seeds(tiny)
    return {  # name -> (strategy, run)
        "gguf-mutations": (ft.mutated(gguf_seeds), ft.run_gguf),
        "gguf-structured": (ft.structured_gguf(), ft.run_gguf),
        "gguf-metadata": (ft.honest_gguf(), ft.run_gguf),
        "safetensors-mutations": (ft.mutated(st_seeds), ft.run_safetensors),
        "safetensors-structured": (ft.structured_safetensors(), ft.run_safetensors),
        "safetensors-shapes": (ft.honest_safetensors(), ft.run_safetensors),
        "config-tokenizer": (ft.config_input(cfg_seeds), ft.run_config),
    }


def _save(out: Path, site: str, data) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", site)[:80]
    if isinstance(data, dict):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        for f, blob in data.items():
            (d / f).write_bytes(blob)
        return d
    p = out / f"{name}.bin"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def _campaign(strategy, run, wd: Path, n: int):
    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.generate])
    @given(data=st.data())
    def campaign(data):
        run(data.draw(strategy), wd)

    return campaign


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--examples", type=int, default=10000, help="inputs per target")
    ap.add_argument("--target", action="append", help="run only these targets (repeatable)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/gguf-mtp-fuzz"), help="where reproducers go")
    ap.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    args = ap.parse_args()

    ft.FINDINGS = {}
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        targets = _targets(work)
        for name in args.target or list(targets):
            strategy, run = targets[name]
            wd = work / name
            wd.mkdir()
            kind = name.split("-")[0]
            ft.FINDINGS = {}  # per target: a site found by an earlier target counts here too
            t0 = time.perf_counter()

            campaign = _campaign(strategy, run, wd, args.examples)
            if args.seed is not None:
                campaign = hypothesis.seed(args.seed)(campaign)
            campaign()
            stats = ft.STATS.pop(kind)
            findings = ft.FINDINGS
            report[name] = {
                "inputs": stats.inputs, "accepted": stats.accepted, "refused": sum(stats.refused.values()),
                "crashes": stats.crashes, "slow": stats.slow, "over_budget": stats.over_budget,
                "max_seconds": round(stats.max_seconds, 4), "max_peak_bytes": stats.max_peak,
                "max_peak_per_input_byte": round(stats.max_ratio, 2), "max_input_bytes": stats.max_input,
                "wall_seconds": round(time.perf_counter() - t0, 1),
                "top_refusals": dict(stats.refused.most_common(8)),
                "findings": {site: {"message": msg, "reproducer": str(_save(args.out / name, site, data))}
                             for site, (msg, data) in findings.items()},
            }
            print(f"{name}: {stats.inputs} inputs, {stats.crashes} crashes, {stats.slow} slow, "
                  f"{stats.over_budget} over budget, {len(findings)} distinct findings", file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 1 if any(r["findings"] for r in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
